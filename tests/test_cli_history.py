"""Per-function revisions: ``runtime ls`` numbers, ``runtime history`` and ``runtime rollback --to``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime.cli import build_parser, subcommands
from runtime.cli.deploy import local_time
from runtime.client import Client
from runtime.deployment import Deployment, module_digest
from runtime.errors import InvocationTimeout
from runtime.exitcodes import RET_ERROR, RET_NOT_FOUND
from runtime.manifest import parse_manifest
from runtime.registry import Registry
from runtime.revisions import describe, number
from runtime.server import EmbeddedServer
from runtime.status import gather_status

from .conftest import ROOT, RuntimeProcess, eventually

PING = "name: {name}\nhandler: tests.handlers.deploy:ping\nconcurrency: {c}\ntimeout: {t}\n"
LOCAL = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
TRUST = {"RUNTIME_TRUST": "tests"}   # the handlers of these tests live in the tests package


async def cli(server: EmbeddedServer, *args: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # In a thread: a runtime under test may share this event loop.
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "runtime", *args, "--server", server.url], cwd=ROOT,
        capture_output=True, text=True, timeout=30, env={**os.environ, **TRUST, **(env or {})})


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def ping(tmp_path: Path, name: str = "ping", concurrency: int = 1, timeout: str = "30s") -> Path:
    return write(tmp_path / f"{name}.yaml", PING.format(name=name, c=concurrency, t=timeout))


async def deploy(server: EmbeddedServer, path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = await cli(server, "deploy", str(path), "--json", env=env)
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    return dict(row)


async def history(server: EmbeddedServer, name: str) -> list[dict[str, Any]]:
    result = await cli(server, "history", name, "--json")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def table(stdout: str) -> list[list[str]]:
    """The rows of a printed table (header left out), cells split on runs of two or more spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.strip().splitlines()[1:]]


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("runtime: error: "), result.stderr
    assert "Traceback" not in result.stderr and "nats:" not in result.stderr
    return lines[0].removeprefix("runtime: error: ")


# ------------------------------------------------------------------ numbering


async def test_each_function_counts_its_own_revisions(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    async def both(alpha: int, beta: int) -> list[int]:
        # Deployed at the same moment: each counts its own, whatever the order of the writes.
        a, b = await asyncio.gather(deploy(nats_server, ping(tmp_path, "alpha", concurrency=alpha)),
                                    deploy(nats_server, ping(tmp_path, "beta", concurrency=beta)))
        return [a["revision"], b["revision"]]

    assert await both(1, 1) == [1, 1]
    assert await both(2, 1) == [2, 1]
    assert await both(3, 2) == [3, 2]
    schedule = write(tmp_path / "tick.yaml", """\
        kind: Schedule
        name: tick
        function: beta
        cron: "0 0 1 1 *"
        """)
    assert (await deploy(nats_server, schedule))["revision"] == 1
    scripted, human, ticks = await asyncio.gather(cli(nats_server, "ls", "--json"), cli(nats_server, "ls"),
                                                  history(nats_server, "tick"))
    assert {r["name"]: r["revision"] for r in json.loads(scripted.stdout)} == {"alpha": 3, "beta": 2, "tick": 1}
    rows = {row[0]: row for row in table(human.stdout)}
    assert rows["alpha"][2] == "3" and rows["beta"][2] == "2" and rows["tick"][2] == "1"
    assert LOCAL.match(rows["alpha"][3]), rows["alpha"]
    assert [(r["revision"], r["kind"], r["change"]) for r in ticks] == [(1, "Schedule", "created")]


async def test_an_unchanged_deploy_writes_nothing_and_keeps_the_revision(
        nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> None:
    path = ping(tmp_path)
    await deploy(nats_server, path)
    await deploy(nats_server, ping(tmp_path, concurrency=2))
    again = await cli(nats_server, "deploy", str(path))  # holds revision 2 now
    assert again.stdout.strip() == "function ping: unchanged [revision 2]"
    assert len(await (await js.key_value("fn_manifests")).history("ping")) == 2, "nothing was written"
    assert [r["revision"] for r in await history(nats_server, "ping")] == [2, 1]


# ------------------------------------------------------------------ history


async def test_history_says_when_and_what_changed_newest_first(nats_server: EmbeddedServer,
                                                              tmp_path: Path) -> None:
    pkg = tmp_path / "code"
    (pkg / "histmod").mkdir(parents=True)
    (pkg / "histmod" / "__init__.py").write_text("")
    module = pkg / "histmod" / "fn.py"
    module.write_text("async def main(event):\n    return 1\n")
    env = {"PYTHONPATH": str(pkg), "RUNTIME_TRUST": "histmod"}
    manifest = "name: hist\nhandler: histmod.fn:main\nconcurrency: {c}\ntimeout: {t}\n"
    path = tmp_path / "hist.yaml"
    write(path, manifest.format(c=1, t="30s"))
    await deploy(nats_server, path, env)                                       # 1
    write(path, manifest.format(c=2, t="10s"))
    assert (await deploy(nats_server, path, env))["changed"] == ["concurrency", "timeout"]  # 2
    module.write_text("async def main(event):\n    return 2\n")
    await deploy(nats_server, path, env)                                       # 3: code
    assert (await cli(nats_server, "undeploy", "hist", "--yes")).returncode == 0   # 4
    rolled = await cli(nats_server, "rollback", "hist", "--to", "1")           # 5
    assert rolled.returncode == 0, rolled.stderr
    assert rolled.stdout.strip() == "function hist: rolled back to revision 1 [revision 5]"

    human = await cli(nats_server, "history", "hist")
    assert human.returncode == 0, human.stderr
    assert human.stdout.splitlines()[0].split() == ["REV", "DEPLOYED", "AT", "CHANGE"]
    rows = table(human.stdout)
    assert [(r[0], r[2]) for r in rows] == [("5", "rollback to 1"), ("4", "undeployed"), ("3", "code"),
                                           ("2", "concurrency, timeout"), ("1", "created")]
    assert all(LOCAL.match(r[1]) for r in rows), rows
    scripted = await history(nats_server, "hist")
    assert [r["revision"] for r in scripted] == [5, 4, 3, 2, 1]
    assert scripted[0]["restored"] == 1 and scripted[1]["undeployed"] is True
    assert scripted[1]["change"] == "undeployed" and scripted[2]["changed"] == ["code"]
    assert rows[0][1] == local_time(scripted[0]["deployed_at"])
    assert datetime.fromisoformat(scripted[0]["deployed_at"]).utcoffset() is not None, "stored in UTC"


def test_history_and_rollback_have_help_that_says_how_much_is_kept() -> None:
    parser = build_parser()
    top = next(a for a in parser._actions if a.dest == "command")
    listed = {choice.dest: choice.help for choice in top._get_subactions()}
    assert "last 16 changes" in str(listed["history"])
    for command in subcommands(parser):
        if command.prog.split()[1] in ("history", "rollback"):
            assert all(action.help for action in command._actions), command.prog
    readme = (ROOT / "README.md").read_text()
    assert "runtime history hello" in readme and "runtime rollback hello --to 1" in readme
    assert "last 16 changes" in readme


# ------------------------------------------------------------------ rollback


async def test_rollback_to_a_revision_and_back(nats_server: EmbeddedServer, js: JetStreamContext,
                                               tmp_path: Path) -> None:
    for concurrency in (1, 2, 3):
        await deploy(nats_server, ping(tmp_path, concurrency=concurrency))
    to_one = await cli(nats_server, "rollback", "ping", "--to", "1", "--json")
    assert json.loads(to_one.stdout) == {"name": "ping", "kind": "Function", "status": "rolled back",
                                         "revision": 4, "changed": ["concurrency"], "restored": 1}
    registry = await Registry.open(js)
    dep: Any = await registry.get("ping")
    assert (dep.manifest.concurrency, dep.revision, dep.restored) == (1, 4, 1)
    # Without --to: the revision before the current one, as a new revision again.
    back = await cli(nats_server, "rollback", "ping")
    assert back.stdout.strip() == "function ping: rolled back to revision 3 (concurrency) [revision 5]"
    dep = await registry.get("ping")
    assert (dep.manifest.concurrency, dep.revision) == (3, 5)
    # Restoring what is deployed writes nothing.
    same = await cli(nats_server, "rollback", "ping", "--to", "3")
    assert same.returncode == 0
    assert same.stdout.strip() == "function ping: unchanged, revision 3 is what is deployed [revision 5]"
    assert [r["change"] for r in await history(nats_server, "ping")][:2] == ["rollback to 3 (concurrency)",
                                                                             "rollback to 1 (concurrency)"]


async def test_rolling_back_an_undeployed_function_deploys_it_again(nats_server: EmbeddedServer,
                                                                    js: JetStreamContext, tmp_path: Path) -> None:
    await deploy(nats_server, ping(tmp_path))
    await deploy(nats_server, ping(tmp_path, concurrency=2))
    assert (await cli(nats_server, "undeploy", "ping", "--yes")).returncode == 0
    assert "ping" not in [r["name"] for r in json.loads((await cli(nats_server, "ls", "--json")).stdout)]
    restored = await cli(nats_server, "rollback", "ping")
    assert restored.stdout.strip() == "function ping: rolled back to revision 2 [revision 4]"
    listing = {r["name"]: r for r in json.loads((await cli(nats_server, "ls", "--json")).stdout)}
    assert listing["ping"]["revision"] == 4
    assert "concurrency=2" in listing["ping"]["settings"]


async def test_unknown_names_and_revisions_are_one_line_with_their_own_exit_code(
        nats_server: EmbeddedServer, tmp_path: Path) -> None:
    unknown = [("history", "ghost"), ("rollback", "ghost"), ("rollback", "ghost", "--to", "1"),
               ("history", ">"), ("history", "Bad Name")]
    for args, result in zip(unknown, await asyncio.gather(*(cli(nats_server, *a) for a in unknown)), strict=True):
        assert result.returncode == RET_NOT_FOUND, (args, result.stderr)
        assert one_error(result) == f"nothing named {args[1]!r} has been deployed"
    await deploy(nats_server, ping(tmp_path))
    only = await cli(nats_server, "rollback", "ping")
    assert only.returncode == RET_ERROR
    assert one_error(only) == "'ping' has no earlier revision to roll back to"
    await deploy(nats_server, ping(tmp_path, concurrency=2))
    missing = await cli(nats_server, "rollback", "ping", "--to", "9")
    assert missing.returncode == RET_NOT_FOUND
    assert one_error(missing) == "'ping' has no revision 9 (revisions 1 to 2)"
    assert (await cli(nats_server, "undeploy", "ping", "--yes")).returncode == 0
    tombstone = await cli(nats_server, "rollback", "ping", "--to", "3")
    assert tombstone.returncode == RET_ERROR
    assert "revision 3 of 'ping' is an undeploy" in one_error(tombstone)
    assert [r["revision"] for r in await history(nats_server, "ping")] == [3, 2, 1], "the errors wrote nothing"


async def test_a_running_runtime_serves_the_rolled_back_settings(
        nats_server: EmbeddedServer, nc: NATS, tmp_path: Path,
        runtime_process: Callable[..., RuntimeProcess]) -> None:
    proc = runtime_process(None, env=TRUST)
    await proc.wait_ready()
    path = tmp_path / "slow.yaml"
    manifest = "name: slow\nhandler: tests.handlers.deploy:slow\ntimeout: {t}\nretry:\n  max_deliver: 1\n"
    write(path, manifest.format(t="200ms"))
    await deploy(nats_server, path)                      # 1: a 0.5 s call times out
    write(path, manifest.format(t="10s"))
    await deploy(nats_server, path)                      # 2: it completes
    calls = iter(range(100))

    async def times_out() -> bool:
        async with Client(nc) as fn:
            try:
                await fn.invoke("slow", {"seconds": 0.5}, timeout=5, call_id=f"slow-{next(calls)}")
            except InvocationTimeout:
                return True
            return False

    async def completes() -> bool:
        return not await times_out()

    async def serving() -> bool:
        return any("slow" in s["serving"] for s in await gather_status(nc, 0.2))

    await eventually(serving, timeout=5, message="the runtime to serve slow")
    await eventually(completes, timeout=10, message="revision 2's timeout to apply")
    rolled = await cli(nats_server, "rollback", "slow", "--to", "1")
    assert rolled.stdout.strip() == "function slow: rolled back to revision 1 (timeout) [revision 3]"
    await eventually(times_out, timeout=10, message="revision 1's timeout to apply again")
    assert "Traceback" not in proc.output()


# ------------------------------------------------------------------ records written before revisions


async def test_records_without_a_revision_are_numbered_from_their_history(
        nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> None:
    registry = await Registry.open(js)

    def legacy(concurrency: int) -> bytes:
        manifest = parse_manifest({"name": "old", "handler": "tests.handlers.deploy:ping",
                                   "concurrency": concurrency}, "test")
        code = module_digest(manifest.handler)
        record = json.loads(Deployment(manifest, code, "2025-01-02T03:04:05+00:00", "old.yaml").encode())
        for key in ("revision", "change", "changed", "restored"):
            del record[key]
        return json.dumps(record).encode()

    await registry.kv.put("old", legacy(1))
    await registry.kv.put("old", legacy(2))
    await registry.kv.delete("old")
    await registry.kv.put("old", legacy(2))
    # A runtime reads such a record as it always did.
    assert Deployment.decode(legacy(1), 7, "old").revision == 7
    assert [(r["revision"], r["change"]) for r in await history(nats_server, "old")] == [
        (4, "created"), (3, "undeployed"), (2, "concurrency"), (1, "created")]
    listing = {r["name"]: r for r in json.loads((await cli(nats_server, "ls", "--json")).stdout)}
    assert listing["old"]["revision"] == 4
    path = write(tmp_path / "old.yaml", "name: old\nhandler: tests.handlers.deploy:ping\nconcurrency: 5\n")
    assert (await deploy(nats_server, path))["revision"] == 5
    rolled = await cli(nats_server, "rollback", "old", "--to", "2")
    assert rolled.stdout.strip() == "function old: rolled back to revision 2 (concurrency) [revision 6]"
    assert [r["revision"] for r in await history(nats_server, "old")] == [6, 5, 4, 3, 2, 1]


@pytest.mark.parametrize(("stored", "expected"), [
    ([], []),
    ([0, 0, 0], [1, 2, 3]),                  # only old records: counted from the oldest kept
    ([3, 4, 0, 6], [3, 4, 5, 6]),            # an undeploy between numbered records
    ([0, 0, 9, 10], [7, 8, 9, 10]),          # old records before numbered ones: counted back
    ([5, 0, 0], [5, 6, 7]),                  # written by an older version after a newer one
])
def test_revision_numbers_from_what_is_stored(stored: list[int], expected: list[int]) -> None:
    assert number(stored) == expected


def test_change_descriptions() -> None:
    assert describe("created") == "created"
    assert describe("updated", ["concurrency", "timeout"]) == "concurrency, timeout"
    assert describe("updated", ["code"]) == "code"
    assert describe("rolled back", [], 3) == "rollback to 3"
    assert describe("rolled back", ["code"], 3) == "rollback to 3 (code)"
    assert describe("undeployed") == "undeployed"
