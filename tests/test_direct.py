"""Subscriptions handled as the connection reads them: every message, in order, without a task."""

from __future__ import annotations

import asyncio
import logging

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from runtime import direct
from runtime.fastpub import Publisher


async def test_every_message_is_handled_in_order_as_it_is_read(nc: NATS) -> None:
    got: list[Msg] = []
    done = asyncio.Event()

    def handler(msg: Msg) -> None:
        got.append(msg)
        if len(got) == 2000:
            done.set()

    sub = await direct.subscribe(nc, "direct.*", handler)
    assert direct.handing_over(sub)
    for i in range(2000):
        await nc.publish(f"direct.{i % 7}", str(i).encode(), headers={"N": str(i)} if i % 2 else None)
    await asyncio.wait_for(done.wait(), 5)
    assert [int(m.data) for m in got] == list(range(2000))
    assert all(m.headers == {"N": str(int(m.data))} for m in got if int(m.data) % 2)
    # Nothing waits in the subscription, and nats-py's accounting of what is pending stays right.
    assert sub.pending_msgs == 0 and sub.pending_bytes == 0


async def test_a_failing_handler_is_logged_and_the_connection_reads_on(nc: NATS, caplog: pytest.LogCaptureFixture
                                                                       ) -> None:
    got: list[bytes] = []

    def handler(msg: Msg) -> None:
        if msg.data == b"bad":
            raise ValueError("cannot handle this one")
        got.append(msg.data)

    await direct.subscribe(nc, "direct.fail", handler)
    with caplog.at_level(logging.ERROR, logger="runtime.direct"):
        for data in (b"1", b"bad", b"2"):
            await nc.publish("direct.fail", data)
        await nc.flush()
        async with asyncio.timeout(5):
            while len(got) < 2:
                await asyncio.sleep(0.01)
    assert got == [b"1", b"2"]
    assert "handling a message on direct.fail failed" in caplog.text
    assert "cannot handle this one" in caplog.text
    assert nc.is_connected


async def test_unsubscribe_and_drain_end_the_subscription(nc: NATS) -> None:
    got: list[bytes] = []
    sub = await direct.subscribe(nc, "direct.end", lambda m: got.append(m.data))
    await nc.publish("direct.end", b"1")
    await nc.flush()
    async with asyncio.timeout(5):
        while not got:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(sub.drain(), 5)
    await nc.publish("direct.end", b"2")
    await nc.flush()
    other = await direct.subscribe(nc, "direct.end", lambda m: got.append(b"other:" + m.data))
    await nc.publish("direct.end", b"3")
    await nc.flush()
    async with asyncio.timeout(5):
        while len(got) < 2:
            await asyncio.sleep(0.01)
    await other.unsubscribe()
    assert got == [b"1", b"other:3"]


async def test_a_handler_may_publish_as_it_handles(nc: NATS) -> None:
    # The handler runs inside the connection's read loop: publishing from there must work.
    pub = Publisher(nc)
    answers: list[bytes] = []
    done = asyncio.Event()

    def on_answer(msg: Msg) -> None:
        answers.append(msg.data)
        if len(answers) == 100:
            done.set()

    await direct.subscribe(nc, "direct.ask", lambda m: pub.publish_nowait("direct.answer", m.data[::-1]))
    await direct.subscribe(nc, "direct.answer", on_answer)
    for i in range(100):
        await nc.publish("direct.ask", f"q{i}".encode())
    await asyncio.wait_for(done.wait(), 5)
    assert answers == [f"q{i}".encode()[::-1] for i in range(100)]
