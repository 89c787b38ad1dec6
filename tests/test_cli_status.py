"""``runtime status``: the fleet view from the runtimes' answers and JetStream, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime.fleet import assemble
from runtime.manifest import ManifestSet
from runtime.queue import QueueState
from runtime.registry import Registry
from runtime.server import EmbeddedServer
from runtime.streams import INVOKE_STREAM, provision_base

from .conftest import ROOT, RuntimeProcess, collect, eventually

HELD = "name: held\nhandler: tests.handlers.outcomes:held\nconcurrency: 10\ntimeout: 30s\n"
PING = "name: ping\nhandler: tests.handlers.deploy:ping\n"
IDLE = "name: idle\nhandler: tests.handlers.deploy:ping\n"
ENV = {"RUNTIME_TRUST": "tests"}


async def cli(server: EmbeddedServer, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "runtime", *args, "--server", server.url],
                                   cwd=ROOT, capture_output=True, text=True, timeout=30,
                                   env={k: v for k, v in os.environ.items() if k != "NATS_URL"},
                                   stdin=subprocess.DEVNULL)


async def status(server: EmbeddedServer, *args: str) -> dict[str, Any]:
    result = await cli(server, "status", "--json", *args)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def function(view: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [f for f in view["functions"] if f["function"] == name]
    assert len(found) == 1, view
    return found[0]


async def start(runtime_process: Callable[..., RuntimeProcess], manifests: Path, count: int) -> list[RuntimeProcess]:
    procs = [runtime_process(manifests, env=ENV) for _ in range(count)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    return procs


# ------------------------------------------------------------------ against real runtimes


async def test_two_runtimes_in_flight_adds_up_to_what_the_function_sees(
        nats_server: EmbeddedServer, runtime_process: Callable[..., RuntimeProcess],
        manifest_dir: Callable[..., Path], nc: NATS, js: JetStreamContext) -> None:
    procs = await start(runtime_process, manifest_dir(held=HELD), 2)
    started, sub = await collect(nc, "test.events.held")
    for n in range(6):
        await js.publish("fn.invoke.held", json.dumps({"n": n}).encode())
    await eventually(lambda: len(started) == 6, message="6 calls running")
    try:
        view = await status(nats_server)
        assert sorted(r["pid"] for r in view["runtimes"]) == sorted(p.pid for p in procs)
        assert all("held" in r["serving"] for r in view["runtimes"])
        held = function(view, "held")
        per_runtime = [r["serving"]["held"]["in_flight"] for r in view["runtimes"]]
        consumer = await js.consumer_info(INVOKE_STREAM, "held")
        assert sum(per_runtime) == held["in_flight"] == held["ack_pending"] == consumer.num_ack_pending == 6
        assert held["status"] == "serving" and len(held["runtimes"]) == 2 and held["queued"] == 0
    finally:
        for msg in started:
            await nc.publish(f"test.release.{json.loads(msg.data)['call_id']}", b"")
        await sub.unsubscribe()


async def test_queued_work_of_a_function_no_runtime_pulls(nats_server: EmbeddedServer, js: JetStreamContext,
                                                        manifest_dir: Callable[..., Path]) -> None:
    await provision_base(js)
    await (await Registry.open(js)).deploy(ManifestSet.load([manifest_dir(idle=IDLE)]))
    for chunk in range(0, 250, 50):
        await asyncio.gather(*(js.publish("fn.invoke.idle", b"{}") for _ in range(chunk, chunk + 50)))

    async def queued() -> dict[str, Any] | None:
        idle = function(await status(nats_server, "--wait", "0.1"), "idle")
        return idle if idle["queued"] == 250 else None

    idle = await eventually(queued, timeout=10, interval=0.2, message="250 queued")
    assert idle["status"] == "no runtime" and idle["deployed"] and idle["runtimes"] == []
    assert idle["in_flight"] is None and idle["dead_letters"] == 0


async def test_a_stopped_runtime_disappears(nats_server: EmbeddedServer,
                                           runtime_process: Callable[..., RuntimeProcess],
                                           manifest_dir: Callable[..., Path]) -> None:
    first, second = await start(runtime_process, manifest_dir(ping=PING), 2)
    assert sorted(r["pid"] for r in (await status(nats_server))["runtimes"]) == sorted([first.pid, second.pid])
    first.signal(signal.SIGTERM)
    assert await first.wait_exit() == 0
    view = await status(nats_server)
    assert [r["pid"] for r in view["runtimes"]] == [second.pid]
    assert function(view, "ping")["runtimes"] == [view["runtimes"][0]["id"]]


async def test_table_and_watch(nats_server: EmbeddedServer, runtime_process: Callable[..., RuntimeProcess],
                               manifest_dir: Callable[..., Path], tmp_path: Path) -> None:
    [proc] = await start(runtime_process, manifest_dir(ping=PING), 1)
    result = await cli(nats_server, "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["FUNCTION", "STATUS", "RUNTIMES", "QUEUED", "IN", "FLIGHT", "ACK", "PENDING",
                                "COMPLETED/1M", "FAILED/1M", "P50", "P99", "DEAD", "LETTERS"]
    assert lines[1].split()[:4] == ["ping", "serving", "1", "0"]
    runtimes = lines.index(next(line for line in lines if line.startswith("RUNTIME ")))
    assert lines[runtimes].split() == ["RUNTIME", "HOST", "PID", "VERSION", "UPTIME", "IN", "FLIGHT", "SERVING",
                                       "FAILING"]
    assert str(proc.pid) in lines[runtimes + 1].split() and "ping" in lines[runtimes + 1].split()

    out = tmp_path / "watch.out"
    with open(out, "w") as stdout:
        watcher = subprocess.Popen([sys.executable, "-m", "runtime", "status", "--watch", "0.2s", "--wait", "0.05",
                                    "--server", nats_server.url], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, text=True)
    try:
        await eventually(lambda: out.read_text().count("FUNCTION ") >= 2, message="two snapshots")
        watcher.send_signal(signal.SIGINT)
        _, stderr = await asyncio.to_thread(watcher.communicate, timeout=10)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 130
    assert stderr == ""
    snapshots = out.read_text().split("\n\nFUNCTION ")
    assert len(snapshots) >= 2 and all("ping" in s for s in snapshots)


async def test_status_without_runtime_streams_is_one_line(nats_server: EmbeddedServer) -> None:
    result = await cli(nats_server, "status")
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "runtime serve" in result.stderr


# ------------------------------------------------------------------ assembling (no server)


AT = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_what_a_runtime_does_not_say_is_unknown() -> None:
    old = {"runtime": "box:41", "serving": {"ping": {"in_flight": 1, "completed": 3}}, "failing": {},
           "refused": {"secret": "not trusted"}}
    view = assemble([old], [QueueState("ping", True, 2, 1, {}, 0)], [], {"ping": 4, "gone": 1}, AT)
    [runtime] = view.runtimes
    assert (runtime.host, runtime.pid, runtime.version, runtime.uptime) == ("box", 41, None, None)
    ping = next(f for f in view.functions if f.name == "ping")
    assert (ping.queued, ping.in_flight, ping.completed_1m, ping.p50, ping.dead_letters) == (2, 1, None, None, 4)
    assert [f.name for f in view.functions] == ["gone", "ping", "secret"]
    secret = view.functions[2]
    assert secret.status == "failing" and secret.failing == {"box:41": "refused: not trusted"}
    assert view.functions[0].status == "undeployed"


def test_several_runtimes_add_up() -> None:
    started = (AT - timedelta(seconds=90)).isoformat()

    def snap(rid: str, in_flight: int, done: int, p50: float, p99: float) -> dict[str, Any]:
        return {"runtime": rid, "host": "h", "pid": 7, "version": "1.0", "started": started,
                "serving": {"f": {"in_flight": in_flight, "completed_1m": done, "failed_1m": 1, "p50": p50,
                                  "p99": p99, "ok": done, "retry": 1}}}

    nested = snap("b:2", 3, 30, 0.2, 0.5)
    nested["serving"]["f"]["outcomes"] = {"ok": 30, "retry": 1}
    view = assemble([nested, snap("a:1", 1, 10, 0.6, 0.9)], [], [], None, AT)
    assert [r.id for r in view.runtimes] == ["a:1", "b:2"]
    assert view.runtimes[0].uptime == 90.0
    [f] = view.functions
    assert (f.in_flight, f.completed_1m, f.failed_1m, f.p99, f.dead_letters) == (4, 40, 2, 0.9, None)
    assert abs((f.p50 or 0) - 0.3) < 1e-9   # weighted by what each runtime completed
    assert f.outcomes == {"ok": 40, "retry": 2}
    assert f.status == "serving" and f.runtimes == ["a:1", "b:2"] and not f.deployed
