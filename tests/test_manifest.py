from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from runtime.durations import format_duration, parse_duration
from runtime.errors import ManifestError
from runtime.manifest import FunctionManifest, ManifestSet, load_manifest


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
