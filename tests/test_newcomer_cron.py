"""The README's cron example as a newcomer runs it: the shipped files, ticks without payload, undeploy."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from runtime import Client
from runtime.manifest import ManifestSet
from runtime.pytest_plugin import Caller
from runtime.registry import Registry
from runtime.server import EmbeddedServer
from runtime.wire import call_id_for

from .conftest import ROOT, RuntimeFactory, RuntimeProcess, eventually

DIGEST = ROOT / "manifests" / "digest.yaml"
HEARTBEAT = ROOT / "manifests" / "heartbeat.yaml"


async def cli(server: EmbeddedServer, *args: str) -> subprocess.CompletedProcess[str]:
    # In a thread: an in-process runtime may share this event loop.
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "runtime", *args, "--server", server.url],
                                   cwd=ROOT, capture_output=True, text=True, timeout=30)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("runtime: error: "), result.stderr
    return lines[0]


def readme_manifest(path: str) -> dict[str, Any]:
    """The YAML block of the README that starts with ``# <path>``."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"```yaml\n# {re.escape(path)}\n(.*?)```", text, re.S)
    assert match, f"the README shows {path}"
    data: dict[str, Any] = yaml.safe_load(match.group(1))
    return data


# ------------------------------------------------------------------ the example ships and runs


@pytest.mark.parametrize("path", [DIGEST, HEARTBEAT])
def test_the_readme_cron_manifests_are_the_shipped_ones(path: Path) -> None:
    shipped = yaml.safe_load(path.read_text())
    shown = readme_manifest(f"manifests/{path.name}")
    assert {key: shipped.get(key) for key in shown} == shown


def test_digest_covers_the_day_before_its_tick(fn_call: Caller) -> None:
    out = fn_call(str(DIGEST), {"scope": "daily"},
                  headers={"Fn-Schedule": "nightly-digest", "Fn-Scheduled-At": "2026-10-25T01:30:00Z"})
    assert out.result == {"scope": "daily", "schedule": "nightly-digest", "period_start": "2026-10-24T01:30:00Z",
                          "period_end": "2026-10-25T01:30:00Z"}


async def test_a_schedule_without_payload_runs_the_digest(runtime: RuntimeFactory, nc: NATS,
                                                          nats_server: EmbeddedServer) -> None:
    # The shipped heartbeat, every second rather than every ten, so the test waits for one tick only.
    heartbeat = HEARTBEAT.read_text().replace('"*/10 * * * * *"', '"* * * * * *"')
    assert heartbeat != HEARTBEAT.read_text() and "payload" not in heartbeat
    ticks: list[Msg] = []

    async def on_tick(msg: Msg) -> None:
        ticks.append(msg)

    await nc.subscribe("fn.invoke.digest", cb=on_tick)
    await runtime(digest=DIGEST.read_text(), heartbeat=heartbeat)
    await eventually(lambda: ticks, timeout=5, message="a heartbeat tick")
    tick = ticks[0]
    assert tick.data == b"{}", "a schedule without payload sends an empty object, not null"
    headers = tick.headers or {}
    call_id = call_id_for(headers["Nats-Msg-Id"])
    assert call_id is not None
    async with Client(nats_server.url) as fn:
        result = await fn.result(call_id, wait=5)
    at = headers["Fn-Scheduled-At"]
    assert result == {"scope": "tick", "schedule": "heartbeat", "period_start": at, "period_end": at}


# ------------------------------------------------------------------ undeploy keeps schedules and functions in step


async def deployed(server: EmbeddedServer) -> tuple[dict[str, str], list[str]]:
    """``ls`` (name: status) and ``schedules`` (names), as JSON."""
    listing, schedules = await asyncio.gather(cli(server, "ls", "--json"), cli(server, "schedules", "--json"))
    assert listing.returncode == schedules.returncode == 0, listing.stderr + schedules.stderr
    return ({r["name"]: r["status"] for r in json.loads(listing.stdout)},
            [s["name"] for s in json.loads(schedules.stdout)])


async def test_undeploying_a_scheduled_function_is_refused_unless_forced(nats_server: EmbeddedServer) -> None:
    created = await cli(nats_server, "deploy", str(DIGEST), str(HEARTBEAT))
    assert created.returncode == 0, created.stderr

    refused = await cli(nats_server, "undeploy", "digest")
    assert "function 'digest' is still the target of schedule heartbeat" in one_error_line(refused)
    assert "--force" in refused.stderr
    assert await deployed(nats_server) == ({"digest": "idle", "heartbeat": "enabled"},
                                           ["heartbeat", "nightly-digest"])

    schedule = await cli(nats_server, "undeploy", "heartbeat", "--yes")
    assert schedule.returncode == 0, schedule.stderr
    assert schedule.stdout.strip() == "schedule heartbeat: undeployed (it fires no more; its function stays deployed)"
    assert await deployed(nats_server) == ({"digest": "idle"}, ["nightly-digest"])

    again = await cli(nats_server, "deploy", str(HEARTBEAT))
    assert again.returncode == 0, again.stderr
    forced = await cli(nats_server, "undeploy", "digest", "--force", "--yes")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.splitlines() == [
        "schedule heartbeat: undeployed (it targeted digest)",
        "function digest: undeployed, with its schedule nightly-digest "
        "(queued messages are kept until it is deployed again)"]
    assert await deployed(nats_server) == ({}, [])


# ------------------------------------------------------------------ deploy errors name what is wrong


async def test_deploying_an_empty_directory_says_no_manifests_were_found(nats_server: EmbeddedServer,
                                                                         tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(await cli(nats_server, "deploy", str(empty)))
    assert line == f"runtime: error: {empty}: no manifests found (*.yaml or *.yml files)"


async def test_an_import_failure_at_deploy_names_the_manifest(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    manifest = tmp_path / "broken.yaml"
    manifest.write_text("name: broken\nhandler: functions.no_such_module:main\n")
    line = one_error_line(await cli(nats_server, "deploy", str(manifest)))
    assert line.startswith(f"runtime: error: {manifest}: handler: ") and "functions.no_such_module" in line


# ------------------------------------------------------------------ runtime logs say what happened here


async def test_a_runtime_only_says_it_stops_what_it_served(nats_server: EmbeddedServer, tmp_path: Path,
                                                           runtime_process: Callable[..., RuntimeProcess]) -> None:
    early = tmp_path / "early.yaml"
    early.write_text("name: early\nhandler: tests.handlers.deploy:ping\n")
    late = tmp_path / "late.yaml"
    late.write_text("name: late\nhandler: tests.handlers.deploy:ping\n")
    for step in (("deploy", str(early), "--trust", "tests"), ("undeploy", "early", "--yes"),
                 ("deploy", str(late), "--trust", "tests")):
        result = await cli(nats_server, *step)
        assert result.returncode == 0, result.stderr
    proc = runtime_process(None, extra=["--trust", "tests"])
    await proc.wait_ready()
    assert await cli(nats_server, "undeploy", "late", "--yes")
    await eventually(lambda: "stopped serving late" in proc.output(), message="late to stop")
    log = proc.output()
    assert "early is no longer deployed (this runtime was not serving it)" in log
    assert "early was undeployed" not in log
    assert "late was undeployed; stopping it once in-flight invocations finish" in log


async def test_ls_says_when_a_schedule_has_no_function(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    # A schedule left from before undeploy refused to orphan one: runtimes do not run it, and ls says why.
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("kind: Schedule\nname: orphan\nfunction: ghost\ncron: '@daily'\n")
    async with Client(nats_server.url) as fn:
        registry = await Registry.open(fn.js)
        await registry.deploy(ManifestSet.load([orphan], known_functions={"ghost"}))
    assert await deployed(nats_server) == ({"orphan": "no function"}, [])
