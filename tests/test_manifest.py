from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from runtime.documents import MAX_ENTRY_BYTES, MAX_NODES, load_json_object
from runtime.durations import format_duration, parse_duration
from runtime.errors import ManifestError
from runtime.manifest import MAX_DESCRIPTION, FunctionManifest, ManifestSet, load_manifest
from runtime.registry import Registry
from runtime.server import EmbeddedServer

from .conftest import ROOT


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("30s", 30), ("5m", 300), ("1h", 3600),
                                               ("1.5s", 1.5), (2, 2.0)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["30", "5 minutes", "-1s", "", True])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_duration_round_trips() -> None:
    for seconds in (0.25, 1, 30, 90, 300, 3600):
        assert parse_duration(format_duration(seconds)) == seconds


def test_defaults() -> None:
    m = FunctionManifest(name="f", handler="functions.hello:main")
    assert (m.concurrency, m.timeout, m.encoding) == (4, 30.0, "json")
    assert m.retry.max_deliver == 3
    assert m.retry.backoff == [1.0, 10.0, 60.0]
    assert m.effective_ack_wait == 30.0


def test_backoff_last_value_repeats() -> None:
    m = FunctionManifest.model_validate({"name": "f", "handler": "m:f",
                                         "retry": {"max_deliver": 6, "backoff": ["1s", "10s"]}})
    assert [m.retry.delay_before(a) for a in range(2, 7)] == [1, 10, 10, 10, 10]


def test_example_manifests_load() -> None:
    root = Path(__file__).resolve().parent.parent
    loaded = ManifestSet.load([root / "manifests"])
    assert {"hello", "primes", "flaky"} <= set(loaded.functions)
    assert loaded.functions["hello"].retry.backoff == [1.0, 10.0, 60.0]


@pytest.mark.parametrize(("body", "field", "problem"), [
    ("name: Hello\nhandler: a:b\n", "name", "should match pattern"),
    ("name: f\nhandler: nocolon\n", "handler", "is not of the form"),
    ("name: f\nhandler: a:b\ntimeout: forever\n", "timeout", "is not a duration"),
    ("name: f\nhandler: a:b\nretry:\n  max_deliver: 0\n", "retry.max_deliver", "greater than or equal to 1"),
    ("name: f\nhandler: a:b\nretry:\n  backoff: [1s, soon]\n", "retry.backoff[1]", "is not a duration"),
    ("name: f\nhandler: a:b\nconcurency: 3\n", "concurency", "unknown field"),
    ("name: f\nhandler: a:b\nencoding: xml\n", "encoding", "'json' or 'msgpack'"),
])
def test_invalid_manifest_names_file_field_and_problem(tmp_path: Path, body: str, field: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert f"{field}: " in message
    assert problem in message


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ManifestError, match=r"broken\.yaml: invalid YAML"):
        load_manifest(path)


def test_duplicate_function_names(manifest_dir: Callable[..., Path]) -> None:
    d = manifest_dir(a="name: same\nhandler: m:f\n", b="name: same\nhandler: m:g\n")
    with pytest.raises(ManifestError, match=r"b\.yaml: name: 'same' is already declared in .*a\.yaml"):
        ManifestSet.load([d])


def test_missing_path() -> None:
    with pytest.raises(ManifestError, match="nowhere: no such file or directory"):
        ManifestSet.load(["nowhere"])


# ------------------------------------------------------------------ limits on fields

def _function(**fields: object) -> str:
    return json.dumps({"name": "f", "handler": "m:f", **fields}, ensure_ascii=False)


def _schedule(**fields: object) -> dict[str, object]:
    return {"name": "s", "cron": "* * * * *", **fields}


@pytest.mark.parametrize(("body", "field", "problem"), [
    (_function(description="x" * 1025), "description", "is 1025 bytes long; at most 1024 are allowed"),
    (_function(description="é" * 513), "description", "is 1026 bytes long"),
    (_function(handler="m:" + "f" * 300), "handler", "at most 256 characters"),
    (_function(schedules=[_schedule(cron="*/1 " * 100)]), "schedules[0].cron", "at most 256 characters"),
    (_function(schedules=[_schedule(timezone="Europe/" + "x" * 100)]), "schedules[0].timezone",
     "at most 64 characters"),
    (_function(schedules=[_schedule(payload="x" * 70_000)]), "schedules[0].payload",
     "at most 65536 are allowed"),
    (_function(schedules=[_schedule(name=f"s{i}") for i in range(101)]), "schedules", "at most 100 items"),
    (_function(ack_wait="30d"), "ack_wait", "at most 7 days"),
    (_function(timeout="8d"), "timeout", "at most 7 days"),
    (_function(retry={"backoff": ["1s"] * 101}), "retry.backoff", "at most 100 items"),
    (_function(retry={"backoff": ["1s", "99999999999d"]}), "retry.backoff", "at most 7 days"),
])
def test_fields_over_their_limits_are_refused(tmp_path: Path, body: str, field: str, problem: str) -> None:
    path = tmp_path / "long.yaml"
    path.write_text(body)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert f"{field}: " in message
    assert problem in message


def test_a_schedule_payload_must_be_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "nan.yaml"
    path.write_text("name: f\nhandler: m:f\nschedules:\n- name: s\n  cron: '* * * * *'\n  payload: {x: .nan}\n")
    with pytest.raises(ManifestError, match=r"schedules\[0\]\.payload: cannot be sent as JSON: NaN"):
        load_manifest(path)


def test_a_huge_unknown_field_gives_a_short_error(tmp_path: Path) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(f"name: f\nhandler: m:f\n{'k' * 1000}: 1\n")
    with pytest.raises(ManifestError, match=r"kkk\.\.\.: unknown field") as info:
        load_manifest(path)
    assert len(str(info.value)) < len(str(path)) + 100
    path.write_text(f"kind: {'X' * 5000}\nname: f\n")
    with pytest.raises(ManifestError, match="kind: unknown kind 'XXX") as info:
        load_manifest(path)
    assert len(str(info.value)) < len(str(path)) + 150


async def test_the_longest_description_is_accepted_by_the_server(js: JetStreamContext,
                                                                 manifest_dir: Callable[..., Path]) -> None:
    # 256 four-byte characters: the limit in bytes, whatever the script.
    text = "\N{GRINNING FACE}" * (MAX_DESCRIPTION // 4)
    ok = manifest_dir(f=_function(description=text))
    registry = await Registry.open(js)
    await registry.deploy(ManifestSet.load([ok]))
    assert (await js.consumer_info("FN", "f")).config.description == text
    too_long = manifest_dir(f=_function(description=text + "x"))
    with pytest.raises(ManifestError, match=r"f\.yaml: description: is 1025 bytes long"):
        ManifestSet.load([too_long])


# ------------------------------------------------------------------ limits on documents

LAUGHS = textwrap.dedent("""\
    name: lol
    handler: m:f
    schedules:
    - name: s
      cron: "* * * * *"
      payload:
        a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
        b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
        c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
        d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
        e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
        f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
        g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
        h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
        i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    """)


# `runtime deploy` with its address space capped, so that a regression fails the test, not the machine.
CAPPED_CLI = ("import resource, runpy; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
              "runpy.run_module('runtime', run_name='__main__')")


async def test_deploy_refuses_a_billion_laughs(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    path = tmp_path / "lol.yaml"
    path.write_text(LAUGHS)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", CAPPED_CLI, "deploy", str(path), "--server", nats_server.url],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert f"{path}: expands to more than {MAX_NODES} nodes through YAML aliases" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("fanout", [10, 3])
def test_a_small_alias_bomb_is_refused(tmp_path: Path, fanout: int) -> None:
    # 10**5 (or 3**10) leaves: small enough for any parser, too many for a manifest.
    levels = 5 if fanout == 10 else 10
    lines = ["name: f", "handler: m:f", "schedules:", "- name: s", "  cron: '* * * * *'", "  payload:",
             "    l0: &l0 [" + ",".join(["1"] * fanout) + "]"]
    lines += [f"    l{n}: &l{n} [" + ",".join([f"*l{n - 1}"] * fanout) + "]" for n in range(1, levels)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=rf"bomb\.yaml: expands to more than {MAX_NODES} nodes through "
                                            "YAML aliases"):
        load_manifest(path)


def test_aliased_long_text_is_refused(tmp_path: Path) -> None:
    text = "x" * 200_000
    path = tmp_path / "text.yaml"
    path.write_text(f"name: f\nhandler: m:f\nschedules:\n- name: s\n  cron: '* * * * *'\n"
                    f"  payload: [&t {text}, *t, *t, *t, *t, *t]\n")
    with pytest.raises(ManifestError, match="expands to more than 1,048,576 characters of text through YAML aliases"):
        load_manifest(path)


def test_ordinary_anchors_and_aliases_still_work(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text(textwrap.dedent("""\
        name: f
        handler: m:f
        retry:
          backoff: &delays [1s, 5s]
        schedules:
        - &base
          name: a
          cron: "*/5 * * * *"
          payload: &p {region: eu, tags: [1, 2, 3], delays: *delays}
        - <<: *base
          name: b
          payload: {copy: *p}
        """))
    manifest = load_manifest(path)
    assert isinstance(manifest, FunctionManifest)
    a, b = manifest.schedules
    assert (b.name, b.cron) == ("b", "*/5 * * * *")
    assert b.payload == {"copy": {"region": "eu", "tags": [1, 2, 3], "delays": ["1s", "5s"]}}
    assert a.payload["delays"] == ["1s", "5s"]


@pytest.mark.parametrize(("text", "problem"), [
    ("name: f\nhandler: m:f\nschedules:\n- name: s\n  cron: '* * * * *'\n  payload: &r [1, *r]\n",
     "refers to itself through YAML aliases"),
    ("payload: " + "[" * 100 + "]" * 100 + "\n", "nests deeper than 64 levels"),
    ("payload: " + "[" * 100_000 + "\n", "nests deeper than 64 levels"),
    ("a: &a " + "[" * 40 + "1" + "]" * 40 + "\nb: &b " + "[" * 40 + "*a" + "]" * 40 + "\n",
     "nests deeper than 64 levels through YAML aliases"),
    ("name: f\nhandler: m:f\nconcurrency: " + "9" * 5000 + "\n", "invalid YAML: Exceeds the limit"),
])
def test_documents_too_deep_or_odd_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value).startswith(f"{path}: {problem}")


def test_a_large_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("name: f\nhandler: m:f\n" + "# padding\n" * 30_000)
    with pytest.raises(ManifestError, match=r"big\.yaml: is larger than 256 KiB"):
        load_manifest(path)
    path.write_text("name: f\nhandler: m:f\n" + "# padding\n" * 20_000)
    assert load_manifest(path).name == "f"


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: f\nhandler: m:f\ndescription: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin1\.yaml: is not UTF-8 text"):
        load_manifest(path)


@pytest.mark.parametrize(("data", "problem"), [
    (b"{" + b" " * MAX_ENTRY_BYTES + b"}", f"at most {MAX_ENTRY_BYTES} are allowed"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
    (b"\xff{}", "invalid JSON"),
    (b"[1, 2]", "expected a JSON object, not list"),
])
def test_registry_entries_are_parsed_with_bounds(data: bytes, problem: str) -> None:
    with pytest.raises(ManifestError, match=r"^registry entry 'f': ") as info:
        load_json_object(data, "registry entry 'f'")
    assert problem in str(info.value)
