"""``runtime deploy``: running runtimes follow the registry without restarting."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime.manifest import ManifestSet
from runtime.registry import Registry
from runtime.server import EmbeddedServer
from runtime.status import gather_status

from .conftest import ROOT, RuntimeProcess, collect, eventually

PING = "name: ping\nhandler: tests.handlers.deploy:ping\n"
TRUST = {"RUNTIME_TRUST": "tests"}   # the handlers of these tests live in the tests package


def cli(server: EmbeddedServer, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime", *args, "--server", server.url], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, env={**os.environ, **TRUST, **(env or {})})


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


async def serving(nc: NATS, name: str, count: int = 1) -> bool:
    """True when exactly ``count`` runtimes answer that they serve ``name``."""
    return sum(1 for s in await gather_status(nc, 0.2) if name in s["serving"]) == count


async def empty_runtimes(runtime_process: Callable[..., RuntimeProcess], count: int,
                         env: dict[str, str] | None = None) -> list[RuntimeProcess]:
    procs = [runtime_process(None, env={**TRUST, **(env or {})}) for _ in range(count)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    return procs


async def test_deploy_reaches_running_runtimes(nats_server: EmbeddedServer, nc: NATS, tmp_path: Path,
                                               runtime_process: Callable[..., RuntimeProcess]) -> None:
    await empty_runtimes(runtime_process, 2)
    seen, _ = await collect(nc, "test.events.ping")
    result = cli(nats_server, "deploy", str(write(tmp_path / "ping.yaml", PING)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("function ping: created")
    deployed = time.monotonic()
    await eventually(lambda: serving(nc, "ping", 2), timeout=2, message="both runtimes serving")
    await nc.publish("fn.invoke.ping", b'{"n": 1}')
    await eventually(lambda: seen, timeout=2, message="the new function to run")
    assert time.monotonic() - deployed < 2.5


async def test_deploying_the_same_manifest_twice_is_unchanged(nats_server: EmbeddedServer, js: JetStreamContext,
                                                              tmp_path: Path) -> None:
    path = write(tmp_path / "ping.yaml", PING)
    first = cli(nats_server, "deploy", str(path), "--json")
    assert json.loads(first.stdout)[0]["status"] == "created"
    assert json.loads(first.stdout)[0]["revision"] == 1
    kv = await js.key_value("fn_manifests")
    written = (await kv.get("ping")).revision
    second = cli(nats_server, "deploy", str(path))
    assert second.stdout.strip() == "function ping: unchanged [revision 1]"
    assert (await kv.get("ping")).revision == written, "nothing was written"


async def test_redeploy_changes_retry_settings_and_rollback_restores_them(
        nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, tmp_path: Path,
        runtime_process: Callable[..., RuntimeProcess]) -> None:
    await empty_runtimes(runtime_process, 1)
    seen, _ = await collect(nc, "test.events.failing")
    path = tmp_path / "failing.yaml"
    manifest = "name: failing\nhandler: tests.handlers.deploy:fail\nretry:\n  max_deliver: {n}\n  backoff: [{b}]\n"
    write(path, manifest.format(n=2, b="100ms"))
    assert cli(nats_server, "deploy", str(path)).returncode == 0

    async def attempts_for(msg_id: str, expected: int) -> list[float]:
        seen.clear()
        await js.publish("fn.invoke.failing", b"{}", headers={"Nats-Msg-Id": msg_id})
        await eventually(lambda: len(seen) >= expected, timeout=10, message=f"{expected} attempts")
        await asyncio.sleep(0.6)  # longer than any configured backoff: no extra attempt follows
        assert len(seen) == expected
        return [json.loads(m.data)["t"] for m in seen]

    await attempts_for("a", 2)
    write(path, manifest.format(n=4, b="300ms"))
    result = cli(nats_server, "deploy", str(path))
    assert "function failing: updated (retry.backoff, retry.max_deliver)" in result.stdout
    await eventually(lambda: _consumer_max_deliver(js, "failing", 4))
    times = await attempts_for("b", 4)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.25 <= g <= 0.8 for g in gaps), gaps

    rolled = cli(nats_server, "rollback", "failing")
    assert rolled.returncode == 0 and "rolled back" in rolled.stdout
    await eventually(lambda: _consumer_max_deliver(js, "failing", 2))
    await attempts_for("c", 2)


async def _consumer_max_deliver(js: JetStreamContext, name: str, expected: int) -> bool:
    return (await js.consumer_info("FN", name)).config.max_deliver == expected


async def test_undeploy_lets_in_flight_finish_and_keeps_later_messages(
        nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, tmp_path: Path,
        runtime_process: Callable[..., RuntimeProcess]) -> None:
    await empty_runtimes(runtime_process, 1)
    seen, _ = await collect(nc, "test.events.slow")
    path = write(tmp_path / "slow.yaml", "name: slow\nhandler: tests.handlers.deploy:slow\nconcurrency: 3\n")
    assert cli(nats_server, "deploy", str(path)).returncode == 0
    await eventually(lambda: serving(nc, "slow"))
    for n in range(3):
        await js.publish("fn.invoke.slow", json.dumps({"n": n, "seconds": 1.5}).encode())
    await eventually(lambda: sum(1 for m in seen if json.loads(m.data)["phase"] == "start") == 3)
    result = cli(nats_server, "undeploy", "slow", "--yes")
    assert result.returncode == 0 and "undeployed" in result.stdout
    await js.publish("fn.invoke.slow", json.dumps({"n": 99, "seconds": 0}).encode())
    await eventually(lambda: sum(1 for m in seen if json.loads(m.data)["phase"] == "end") == 3, timeout=5,
                     message="in-flight invocations to finish")
    await eventually(lambda: serving(nc, "slow", 0), timeout=5)
    info = await js.consumer_info("FN", "slow")
    assert info.num_pending == 1 and info.num_ack_pending == 0, "the later message waits, unlost"
    assert not any(json.loads(m.data).get("n") == 99 for m in seen)
    listing = json.loads(cli(nats_server, "ls", "--json").stdout)
    assert "slow" not in [r["name"] for r in listing]
    # Deployed again, it runs the message that waited.
    assert cli(nats_server, "deploy", str(path)).returncode == 0
    await eventually(lambda: any(json.loads(m.data).get("n") == 99 for m in seen), timeout=5)


async def test_deploy_rejects_a_handler_that_does_not_import(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    path = write(tmp_path / "ghost.yaml", "name: ghost\nhandler: tests.handlers.missing_module:main\n")
    result = cli(nats_server, "deploy", str(path))
    assert result.returncode == 1
    assert "cannot import module 'tests.handlers.missing_module'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    bad_sig = write(tmp_path / "sig.yaml", "name: sig\nhandler: tests.handlers.deploy:three\n")
    result = cli(nats_server, "deploy", str(bad_sig))
    assert result.returncode == 1 and "must take (event) or (event, ctx)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_a_runtime_that_cannot_import_a_handler_keeps_serving_the_others(
        nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, tmp_path: Path,
        runtime_process: Callable[..., RuntimeProcess]) -> None:
    # The module exists where the deploy ran, not on the runtime's host.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "onlyhere").mkdir(parents=True)
    (elsewhere / "onlyhere" / "__init__.py").write_text("")
    (elsewhere / "onlyhere" / "fn.py").write_text("async def main(event):\n    return event\n")
    trust = {"RUNTIME_TRUST": "tests,onlyhere"}
    proc = (await empty_runtimes(runtime_process, 1, env=trust))[0]
    ping = write(tmp_path / "ping.yaml", PING)
    remote = write(tmp_path / "remote.yaml", "name: remote\nhandler: onlyhere.fn:main\n")
    result = cli(nats_server, "deploy", str(ping), str(remote), env={"PYTHONPATH": str(elsewhere), **trust})
    assert result.returncode == 0, result.stderr
    await eventually(lambda: "cannot serve remote" in proc.output(), timeout=3)
    seen, _ = await collect(nc, "test.events.ping")
    await nc.publish("fn.invoke.ping", b"{}")
    await eventually(lambda: seen, timeout=3, message="ping still served")
    listing = {r["name"]: r for r in json.loads(cli(nats_server, "ls", "--json").stdout)}
    assert listing["remote"]["status"] == "failing"
    assert "cannot import module 'onlyhere.fn'" in next(iter(listing["remote"]["failing"].values()))
    assert listing["ping"]["status"] == "serving"
    table = cli(nats_server, "ls").stdout
    assert "remote failing on" in table


async def test_redeploy_with_changed_module_reloads_it(nats_server: EmbeddedServer, nc: NATS,
                                                       js: JetStreamContext, tmp_path: Path,
                                                       runtime_process: Callable[..., RuntimeProcess]) -> None:
    pkg = tmp_path / "code"
    (pkg / "reloadme").mkdir(parents=True)
    (pkg / "reloadme" / "__init__.py").write_text("")
    module = pkg / "reloadme" / "fn.py"
    module.write_text("async def main(event):\n    return {'version': 1}\n")
    env = {"PYTHONPATH": str(pkg), "RUNTIME_TRUST": "reloadme"}
    await empty_runtimes(runtime_process, 1, env=env)
    path = write(tmp_path / "r.yaml", "name: reloadme\nhandler: reloadme.fn:main\n")
    assert cli(nats_server, "deploy", str(path), env=env).returncode == 0
    from runtime.results import fetch_response

    await js.publish("fn.invoke.reloadme", b"{}", headers={"Nats-Msg-Id": "v1"})
    assert (await eventually(lambda: fetch_response(js, "v1"))).value() == {"version": 1}
    module.write_text("async def main(event):\n    return {'version': 2}\n")
    result = cli(nats_server, "deploy", str(path), env=env)
    assert "updated (code)" in result.stdout, result.stdout
    await asyncio.sleep(0.5)
    await js.publish("fn.invoke.reloadme", b"{}", headers={"Nats-Msg-Id": "v2"})
    assert (await eventually(lambda: fetch_response(js, "v2"))).value() == {"version": 2}


async def test_registry_api_round_trip(js: JetStreamContext, manifest_dir: Callable[..., Path]) -> None:
    registry = await Registry.open(js)
    d = manifest_dir(ping=PING)
    results = await registry.deploy(ManifestSet.load([d]))
    assert [(r.name, r.status) for r in results] == [("ping", "created")]
    assert (await registry.get("ping")) is not None
    await registry.undeploy("ping")
    assert await registry.get("ping") is None
    restored = await registry.rollback("ping")
    assert restored.status == "rolled back"
    dep: Any = await registry.get("ping")
    assert dep.manifest.handler == "tests.handlers.deploy:ping"
