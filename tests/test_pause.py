"""``runtime queue pause | resume``: no runtime starts a paused function's calls, which keep queueing,
whatever level they come at and whatever is deployed meanwhile; resuming starts them at once."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime import Client
from runtime import queue as queues
from runtime.exitcodes import RET_NOT_FOUND, RET_USAGE
from runtime.manifest import FunctionManifest
from runtime.server import EmbeddedServer
from runtime.streams import INVOKE_STREAM, ensure_consumer, invoke_consumers, provision_base

from .conftest import RuntimeFactory, collect, eventually
from .test_cli_queue import cli, ok
from .test_client import fn


async def paused_consumers(js: JetStreamContext, function: str) -> dict[str, bool]:
    return {c.name: bool(c.paused) for c in await invoke_consumers(js) if c.name.split("_L")[0] == function}


async def test_a_paused_function_queues_its_calls_and_runs_them_when_resumed(
        runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext) -> None:
    await runtime(greet=fn("greet", "core:greet"))
    started, _ = await collect(nc, "test.events.greet")
    async with Client(nats_server.url) as client:
        assert await client.invoke("greet", {"name": "before"}, timeout=5) == {"greeting": "Hello, before!"}
        await eventually(lambda: len(started) == 1, message="the first call's event")
        assert ok(await cli(nats_server, "queue", "pause", "greet")) == \
            "paused greet until resumed: its calls queue, none starts\n"
        calls = [await client.submit("greet", {"name": f"n{i}"}) for i in range(3)]
        # At a level no call used before: its consumer is made paused.
        calls += [await client.submit("greet", {"name": f"u{i}"}, priority=8) for i in range(2)]
        await eventually(lambda: _all_paused(js), message="every consumer of greet paused, level 8's too")
        await asyncio.sleep(1.5)   # calls start within milliseconds when nothing holds them
        assert len(started) == 1, [json.loads(m.data) for m in started]
        [row] = json.loads(ok(await cli(nats_server, "queue", "ls", "greet", "--json")))
        assert (row["paused"], row["paused_until"], row["queued"]) == (True, None, 5)
        fleet = json.loads(ok(await cli(nats_server, "status", "--json")))
        [view] = [f for f in fleet["functions"] if f["function"] == "greet"]
        assert (view["status"], view["paused"], view["queued"]) == ("paused", True, 5)
        [listed] = [r for r in json.loads(ok(await cli(nats_server, "ls", "--json"))) if r["name"] == "greet"]
        assert listed["status"] == "paused"
        table = ok(await cli(nats_server, "queue", "ls"))
        assert table.splitlines()[0].split()[-1] == "PAUSED" and table.splitlines()[1].endswith("until resumed")
        resumed_out = ok(await cli(nats_server, "queue", "resume", "greet"))
        assert resumed_out == "resumed greet: runtimes start its calls again\n"
        resumed = time.monotonic()
        results = await asyncio.gather(*(client.result(c.id, wait=10) for c in calls))
        # The doorbells it rang start them at once, not at the next look (every 5 s).
        assert time.monotonic() - resumed < 3
    assert sorted(r["greeting"] for r in results) == sorted(f"Hello, {n}!" for n in ("n0", "n1", "n2", "u0", "u1"))
    assert set((await paused_consumers(js, "greet")).values()) == {False}


async def _all_paused(js: JetStreamContext) -> bool:
    consumers = await paused_consumers(js, "greet")
    return set(consumers) == {"greet", "greet_L8"} and all(consumers.values())


async def test_a_pause_for_a_while_ends_by_itself(runtime: RuntimeFactory, nats_server: EmbeddedServer,
                                                  nc: NATS) -> None:
    await runtime(greet=fn("greet", "core:greet"))
    started, _ = await collect(nc, "test.events.greet")
    out = json.loads(ok(await cli(nats_server, "queue", "pause", "greet", "--for", "2s", "--json")))
    assert out["paused"] is True and out["consumers"] == ["greet"]
    paused_at = time.monotonic()
    async with Client(nats_server.url) as client:
        call = await client.submit("greet", {"name": "later"})
        assert await client.result(call.id, wait=15) == {"greeting": "Hello, later!"}
    # Held for the 2 s; then started at the runtime's next look (every 5 s at most).
    assert 1.9 <= time.monotonic() - paused_at < 12
    assert len(started) == 1


async def test_a_deploy_keeps_the_pause_even_when_the_default_level_moves(js: JetStreamContext) -> None:
    await provision_base(js)
    manifest = FunctionManifest(name="f", handler="m:f")
    await ensure_consumer(js, manifest)
    until = queues.now().replace(microsecond=0) + timedelta(hours=1)
    paused = await queues.pause(js, "f", until)
    assert paused.consumers == ["f"]
    await ensure_consumer(js, manifest.model_copy(update={"concurrency": 3}))
    await ensure_consumer(js, manifest.model_copy(update={"priority": 8}))   # "f" is made again
    info = await js.consumer_info(INVOKE_STREAM, "f")
    assert info.config.filter_subjects == ["fn.invoke.f", "fn.invoke.f.8"]
    assert info.paused
    state = await queues.queue_state(js, "f")
    assert state.paused_until == until


async def test_pausing_an_unknown_function_is_one_line_and_exit_7(nats_server: EmbeddedServer,
                                                                   js: JetStreamContext) -> None:
    await provision_base(js)
    for action in ("pause", "resume"):
        result = await cli(nats_server, "queue", action, "nobody")
        assert result.returncode == RET_NOT_FOUND, result.stderr
        assert result.stderr == "runtime: error: function 'nobody' has no consumer in FN: it is not deployed\n"
    both = await cli(nats_server, "queue", "pause", "x", "--for", "1m", "--until", "2030-01-01T00:00:00Z")
    assert both.returncode == RET_USAGE

