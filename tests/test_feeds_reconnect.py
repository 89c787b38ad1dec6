"""Pull feeds across a server restart: they ask again as soon as the connection is back, and a
request that survived a reconnect never makes a feed hold more than its slots."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from runtime import Client
from runtime.consumer import PullFeed, reconnected
from runtime.server import EmbeddedServer
from tests.handlers import events

from .conftest import RuntimeFactory, eventually

pytestmark = pytest.mark.asyncio

AUDIT = "name: audit\nhandler: tests.handlers.events:audit\nconcurrency: 4\ntriggers:\n  - subject: orders.>\n"
HELLO = "name: hello\nhandler: tests.handlers.events:billing\nconcurrency: 4\n"


async def restart(server: EmbeddedServer) -> None:
    await server.stop()
    await server.start()


async def test_a_trigger_takes_events_at_once_after_the_server_restarts(runtime: RuntimeFactory,
                                                                        nats_server: EmbeddedServer) -> None:
    events.seen.clear()
    rt = await runtime(audit=AUDIT, hello=HELLO)
    publisher = await nats.connect(nats_server.url, reconnect_time_wait=0.05, max_reconnect_attempts=-1)
    try:
        await publisher.publish("orders.created", json.dumps({"id": 1}).encode())
        await eventually(lambda: len(events.seen.get("audit", [])) == 1, message="the first event to run")
        # The trigger's feed has a pull request out, waiting for events: the restart loses it.
        await restart(nats_server)
        await eventually(lambda: publisher.is_connected and rt.state.connection is not None
                         and rt.state.connection[0].is_connected, timeout=10, message="everyone reconnected")
        sent = time.monotonic()
        await publisher.jetstream().publish("orders.created", json.dumps({"id": 2}).encode())
        async with Client(publisher) as fn:
            assert await fn.invoke("hello", {"id": 3}, timeout=10) == {"billed": {"id": 3}}
        # Missed heartbeats would tell it after 15 s; the reconnect tells it now.
        await eventually(lambda: len(events.seen.get("audit", [])) == 2, timeout=3,
                         message="the event published after the restart to run within 3 s")
        assert time.monotonic() - sent < 3
    finally:
        await publisher.close()


async def _feed_setup(nc: NATS) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="FEED", subjects=["feed.>"]))
    await js.add_consumer("FEED", ConsumerConfig(durable_name="worker", ack_policy=AckPolicy.EXPLICIT,
                                                 ack_wait=30))


async def test_a_request_that_survives_a_reconnect_never_overfills_the_feed(nc: NATS) -> None:
    await _feed_setup(nc)
    held: list[Msg] = []
    most = 0

    def sink(msg: Msg) -> None:
        nonlocal most
        held.append(msg)
        most = max(most, len(held))

    feed = PullFeed(nc, "FEED", "worker", 2, sink)
    await feed.start()
    await nc.flush()
    try:
        # As after a reconnect the server survived: the request out is still alive, and the feed
        # asks again from a new inbox.
        assert reconnected(nc) == 1
        await eventually(lambda: feed.outstanding == 2, message="the feed to ask again")
        await nc.flush()
        js = nc.jetstream()
        for i in range(6):
            await js.publish("feed.x", str(i).encode())
        await eventually(lambda: len(held) == 2, message="two messages held")
        await asyncio.sleep(0.3)   # the surplus of the old request is handed back, not taken
        assert len(held) == 2 and feed.held == 2
        # Settling them frees their slots; every message comes through, two at a time at most.
        done: list[bytes] = []
        while len(done) < 6:
            await eventually(lambda: len(held) > 0, timeout=5, message="a message to settle")
            msg = held.pop(0)
            done.append(msg.data)
            await msg.ack()
            feed.release()
        assert sorted(int(d) for d in done) == list(range(6))
        assert most <= 2
    finally:
        await feed.stop()



async def test_a_call_stored_while_the_runtime_reconnects_starts_as_soon_as_it_is_back(
        runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    events.seen.clear()
    rt = await runtime(hello=HELLO)
    assert rt.state.connection is not None
    runtime_nc = rt.state.connection[0]
    caller = await nats.connect(nats_server.url, reconnect_time_wait=0.05, max_reconnect_attempts=-1)

    def ran() -> int:
        return len(events.seen.get("billing", []))

    try:
        async with Client(caller) as fn:
            assert await fn.invoke("hello", {"id": 0}, timeout=10) == {"billed": {"id": 0}}
            for attempt in range(1, 4):
                await asyncio.sleep(0.5)   # its queue found empty: the runtime waits for the doorbell
                await restart(nats_server)
                # The caller is back within 50 ms, the runtime after its 1 s reconnect wait: the
                # call's doorbell rings while nobody listens (unless the runtime's retry came first).
                await eventually(lambda: caller.is_connected, timeout=5, interval=0.01, message="the caller back")
                before = ran()
                await fn.submit("hello", {"id": attempt}, call_id=f"while-away-{attempt}")
                away = not runtime_nc.is_connected
                await eventually(lambda: runtime_nc.is_connected, timeout=10, interval=0.01,
                                 message="the runtime back")
                back = time.monotonic()
                await eventually(lambda before=before: ran() == before + 1, timeout=10, interval=0.01,
                                 message="the call stored while it was away to run")
                if away:
                    break
            else:
                pytest.skip("the runtime reconnected before the call was stored, three times")
            # Without looking again on reconnect it would wait for the periodic look (every 5 s).
            assert time.monotonic() - back < 1.5
            assert await fn.result(f"while-away-{attempt}", wait=5) == {"billed": {"id": attempt}}
    finally:
        await caller.close()
