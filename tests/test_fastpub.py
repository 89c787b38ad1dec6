"""Publishing straight into the connection's buffer: what arrives is what Client.publish sends."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from runtime.connection import open_connection
from runtime.fastpub import Publisher, encode_headers
from runtime.server import EmbeddedServer


def test_headers_are_encoded_as_the_protocol_wants() -> None:
    assert encode_headers({"Fn-Call-Id": "c-1", "Content-Type": "application/json"}) == (
        b"NATS/1.0\r\nFn-Call-Id: c-1\r\nContent-Type: application/json\r\n\r\n")


@pytest.mark.parametrize("headers", [{"K": "a\r\nInjected: 1"}, {"K": "a\nb"}, {"": "v"}, {"Bad Key": "v"},
                                     {"K:x": "v"}])
def test_headers_that_would_break_the_protocol_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        encode_headers(headers)


async def collect(nc: NATS, subject: str, count: int) -> tuple[list[Msg], asyncio.Event]:
    got: list[Msg] = []
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        got.append(msg)
        if len(got) == count:
            done.set()

    await nc.subscribe(subject, cb=on_msg)
    return got, done


async def test_messages_arrive_whole_and_in_order_beside_client_publishes(nc: NATS) -> None:
    pub = Publisher(nc)
    assert pub.direct
    got, done = await collect(nc, "fp.>", 300)
    for i in range(300):
        if i % 3 == 0:
            await nc.publish("fp.plain", str(i).encode())
        elif i % 3 == 1:
            await pub.publish("fp.direct", str(i).encode(), reply="fp-reply.x")
        else:
            await pub.publish("fp.headers", str(i).encode(), headers={"Fn-Call-Id": f"c-{i}", "A": "b c"})
    await asyncio.wait_for(done.wait(), 5)
    assert [int(m.data) for m in got] == list(range(300))
    for i, msg in enumerate(got):
        if i % 3 == 1:
            assert msg.subject == "fp.direct" and msg.reply == "fp-reply.x" and not msg.headers
        elif i % 3 == 2:
            assert msg.headers == {"Fn-Call-Id": f"c-{i}", "A": "b c"}


async def test_an_empty_payload_and_a_header_value_with_a_newline(nc: NATS) -> None:
    pub = Publisher(nc)
    got, done = await collect(nc, "fp.edge", 2)
    await pub.publish("fp.edge")
    await pub.publish("fp.edge", b"x", headers={"K": "one\ntwo"})   # goes through Client.publish, cleaned
    await asyncio.wait_for(done.wait(), 5)
    assert got[0].data == b"" and not got[0].headers
    assert got[1].data == b"x" and got[1].headers is not None and "\n" not in got[1].headers["K"]


async def test_a_closed_connection_raises_as_client_publish_does(nats_server: EmbeddedServer) -> None:
    conn = await nats.connect(nats_server.url)
    pub = Publisher(conn)
    await conn.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await pub.publish("fp.closed", b"x")


async def test_a_publish_while_reconnecting_is_sent_once_the_server_is_back(nats_server: EmbeddedServer) -> None:
    conn = await nats.connect(nats_server.url, reconnect_time_wait=0.05, max_reconnect_attempts=-1)
    try:
        js = conn.jetstream()
        await js.add_stream(name="FP", subjects=["fp.kept"])
        pub = Publisher(conn)
        await nats_server.stop()
        while conn.is_connected:
            await asyncio.sleep(0.01)
        await pub.publish("fp.kept", b"late")   # buffered by the client, as Client.publish does
        await nats_server.start()
        while not conn.is_connected:
            await asyncio.sleep(0.01)
        await conn.flush()
        msg = await js.get_last_msg("FP", "fp.kept")
        assert msg.data == b"late"
    finally:
        await conn.close()


def _listen_in_a_thread(url: str, subject: str) -> tuple[threading.Thread, threading.Event, threading.Event]:
    """A subscriber on its own connection and event loop: it sees what reaches the server while
    the publishing loop is busy. Returns the thread, 'subscribed' and 'received'."""
    subscribed, received = threading.Event(), threading.Event()

    async def listen() -> None:
        conn = await nats.connect(url)
        try:
            sub = await conn.subscribe(subject)
            await conn.flush()
            subscribed.set()
            await sub.next_msg(timeout=5)
            received.set()
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(listen(),), daemon=True)
    thread.start()
    assert subscribed.wait(5)
    return thread, subscribed, received


async def test_an_answer_at_once_is_on_the_wire_before_the_loop_moves_on(nats_server: EmbeddedServer,
                                                                         nc: NATS) -> None:
    pub = Publisher(nc)
    thread, _, received = _listen_in_a_thread(nats_server.url, "fp.now")
    await pub.publish("fp.now", b"answer", at_once=True)
    # The loop is held (as by the store and ack work after an answer): the flusher cannot run.
    assert received.wait(2), "the answer waited for the flusher"
    thread.join(5)


async def test_a_plain_publish_waits_for_the_flusher(nats_server: EmbeddedServer, nc: NATS) -> None:
    pub = Publisher(nc)
    thread, _, received = _listen_in_a_thread(nats_server.url, "fp.later")
    await pub.publish("fp.later", b"ack")
    assert not received.wait(0.3)   # the loop is held: nothing written yet
    await nc.flush()
    assert await asyncio.to_thread(received.wait, 5)
    thread.join(5)


async def test_an_answer_at_once_keeps_its_place_after_what_is_pending(nc: NATS) -> None:
    pub = Publisher(nc)
    got, done = await collect(nc, "fp.order.>", 400)
    for i in range(400):
        if i % 4 == 0:
            await nc.publish("fp.order.plain", str(i).encode())
        elif i % 4 == 1:
            await pub.publish("fp.order.direct", str(i).encode())
        else:   # sometimes a flush is due (it joins it), sometimes none is (written now)
            await pub.publish("fp.order.now", str(i).encode(), headers={"Fn-Call-Id": f"c-{i}"}, at_once=True)
        if i % 7 == 0:
            await asyncio.sleep(0)
    await asyncio.wait_for(done.wait(), 5)
    assert [int(m.data) for m in got] == list(range(400))


async def test_answers_at_once_in_one_loop_pass_share_a_write(nc: NATS) -> None:
    """Only the first answer of a pass is written by itself; the rest wait for the flusher together
    (one write per answer would cost the server a read per message under load)."""
    pub = Publisher(nc)
    got, done = await collect(nc, "fp.pass", 50)
    await nc.flush()
    transport: Any = nc._transport
    writes = 0
    write = transport.writelines

    def counting(payload: list[bytes]) -> None:
        nonlocal writes
        writes += 1
        write(payload)

    transport.writelines = counting
    try:
        for i in range(50):   # one loop pass: no await yields here
            await pub.publish("fp.pass", str(i).encode(), at_once=True)
        await asyncio.wait_for(done.wait(), 5)
    finally:
        del transport.writelines
    assert [int(m.data) for m in got] == list(range(50))
    assert writes == 2   # the first answer, then the other 49 in one flush


async def test_a_connection_the_runtime_opens_has_its_subscription_once_flush_returns(
        nats_server: EmbeddedServer, nc: NATS) -> None:
    """A message published from another connection right after ``subscribe`` and ``flush`` arrives:
    the flush's PING goes out behind the SUB (nats-py alone sends it ahead, and then loses about
    one such message in a hundred)."""
    lost = []
    for i in range(500):
        ours = await open_connection(nats_server.url)
        try:
            sub = await ours.subscribe(f"barrier.{i}")
            await ours.flush()
            await nc.publish(f"barrier.{i}", b"x")
            try:
                await sub.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                lost.append(i)
        finally:
            await ours.close()
    assert lost == []
