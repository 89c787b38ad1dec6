"""Subscriptions handled as the connection reads them: every message, in order, without a task."""

from __future__ import annotations

import asyncio
import logging
import random

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.protocol.parser import Parser

from runtime import direct
from runtime.connection import open_connection
from runtime.fastpub import Publisher
from runtime.server import EmbeddedServer


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


async def test_a_runtime_connection_hands_over_the_messages_nats_py_would_build(nats_server: EmbeddedServer,
                                                                             nc: NATS) -> None:
    ours = await open_connection(nats_server.url)
    try:
        direct_got: list[Msg] = []
        sub = await direct.subscribe(ours, "same.>", direct_got.append)
        plain = await ours.subscribe("same.>")   # through nats-py's own path, on the same connection
        limited = await ours.subscribe("same.>")
        await limited.unsubscribe(limit=2)        # a message limit: nats-py's path too
        await ours.flush()
        before = ours.stats["in_msgs"]
        sent = [("same.a", b"1", "", None), ("same.b", b"", "reply.here", {"Fn-Call-Id": "c-1", "K": "v"}),
                ("same.c", b"3", "r", {"Name": "caf\u00e9"}), ("same.d", b"4", "", {})]
        for subject, data, reply, headers in sent:
            await nc.publish(subject, data, reply=reply, headers=headers)
        nats_got = [await plain.next_msg(timeout=5) for _ in sent]
        async with asyncio.timeout(5):
            while len(direct_got) < len(sent):
                await asyncio.sleep(0.01)
        assert [(m.subject, m.reply, m.data, m.headers) for m in direct_got] == \
            [(m.subject, m.reply, m.data, m.headers) for m in nats_got]
        assert direct_got[1].headers == {"Fn-Call-Id": "c-1", "K": "v"} and direct_got[0].headers is None
        assert ours.stats["in_msgs"] - before == 3 * len(sent) - 2   # the limited one stopped after 2
        assert [await limited.next_msg(timeout=1) for _ in range(2)] and limited._id not in ours._subs
        assert sub.pending_msgs == 0 and sub.pending_bytes == 0
        # A message handed over answers like any other: it knows its connection.
        answering: set[asyncio.Task[None]] = set()

        def answer_upper(m: Msg) -> None:
            task = asyncio.ensure_future(m.respond(m.data.upper()))
            answering.add(task)
            task.add_done_callback(answering.discard)

        responder = await direct.subscribe(ours, "same.ask", answer_upper)
        await ours.flush()
        answer = await nc.request("same.ask", b"hi", timeout=5)
        assert answer.data == b"HI"
        await responder.unsubscribe()
    finally:
        await ours.close()


# ------------------------------------------------------------------ the protocol, read as nats-py reads it

class _Recorder:
    """Stands in for a client: records what its parser hands it."""

    def __init__(self, reset_on: bytes | None = None) -> None:
        self.seen: list[tuple[object, ...]] = []
        self._ps = Parser(self)
        self.reset_on = reset_on   # a subject whose message resets the parser, as a reconnect does

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.seen.append(("msg", sid, bytes(subject), bytes(reply), data, headers))
        if bytes(subject) == self.reset_on:
            self._ps.reset()

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_info(self, info: dict[str, object]) -> None:
        self.seen.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.seen.append(("err", err))


def _protocol(rng: random.Random, count: int) -> bytes:
    out = bytearray()
    for _ in range(count):
        kind = rng.choice(["msg", "msg", "hmsg", "hmsg", "ping", "pong", "ok", "info", "err"])
        payload = bytes(rng.choice(b"ab\r\n x") for _ in range(rng.randint(0, 40)))
        subject = rng.choice([b"fn.invoke.a", b"_INBOX.x.1", b"q"])
        reply = rng.choice([b"", b"$JS.ACK.FN.a.1.2.3.4.0", b"r"])
        sid = rng.randint(1, 300)
        if kind == "msg":
            out += b"MSG %s %d %s%d\r\n%s\r\n" % (subject, sid, reply + b" " if reply else b"", len(payload), payload)
        elif kind == "hmsg":
            block = b"NATS/1.0\r\nK: %d\r\n\r\n" % rng.randint(0, 9)
            out += b"HMSG %s %d %s%d %d\r\n%s%s\r\n" % (subject, sid, reply + b" " if reply else b"", len(block),
                                                          len(block) + len(payload), block, payload)
        else:
            out += {"ping": b"PING\r\n", "pong": b"PONG\r\n", "ok": b"+OK\r\n", "info": b'INFO {"max_payload":9}\r\n',
                    "err": b"-ERR 'Permissions Violation for Subscription to \"x\"'\r\n"}[kind]
    return bytes(out)


async def _read(data: bytes, cuts: list[int], fast: bool, reset_on: bytes | None = None
                ) -> tuple[list[tuple[object, ...]], str | None]:
    client = _Recorder(reset_on)
    if fast:
        assert direct.parse_messages_faster(client)  # type: ignore[arg-type]
    error = None
    try:
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            await client._ps.parse(data[start:end])
    except nats.errors.ProtocolError as exc:
        error = str(exc)
    return client.seen, error


async def test_the_protocol_is_read_exactly_as_nats_py_reads_it() -> None:
    rng = random.Random(11)
    messages = 0
    for _ in range(300):
        data = _protocol(rng, rng.randint(1, 30))
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
        seen, error = await _read(data, cuts, fast=True)
        assert (seen, error) == await _read(data, cuts, fast=False)
        assert error is None
        messages += sum(1 for item in seen if item[0] == "msg")
    assert messages > 2000   # most of them cut somewhere: in a line, a header block or a payload
    # Lines that only look like messages are refused as nats-py refuses them, after what came before.
    for bad in (b"MSG a b 3\r\nxyz\r\n", b"MSG a 1 -3\r\n", b"HMSG a 1 r 5 x\r\n", b"MSG a\r\n",
                b"MSG a 1 2 3 4 5\r\n", b"MSGX a 1 3\r\n", b"HMSG a 1 +2 4\r\n"):
        data = b"PING\r\nMSG ok 1 2\r\nhi\r\n" + bad
        seen, error = await _read(data, [7], fast=True)
        assert (seen, error) == await _read(data, [7], fast=False), bad
        assert error is not None and seen[:2] == [("ping",), ("msg", 1, b"ok", b"", b"hi", None)]
    # A reset while a message is handed on (a reconnect) drops what the old connection had left.
    data = b"MSG a 1 1\r\nx\r\nMSG reset 1 1\r\ny\r\nMSG b 1 1\r\nz\r\n"
    for cuts in ([], [20]):
        seen, error = await _read(data, cuts, fast=True, reset_on=b"reset")
        assert (seen, error) == await _read(data, cuts, fast=False, reset_on=b"reset")
        assert [item[2] for item in seen] == [b"a", b"reset"] and error is None


# ------------------------------------------------------------------ headers, read as nats-py reads them

TRICKY = [
    b"NATS/1.0\r\nFn-Call-Id: c-1\r\nContent-Type: application/json\r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Id: a\r\nFn-Reply-To: _INBOX.x.1\r\nFn-Call-Id: a\r\nFn-Priority: 7\r\n\r\n",
    b"NATS/1.0\r\n\r\n",
    b"NATS/1.0\r\nA:b\r\nC:\tD \r\nE:   \r\n\r\n",                 # no space, tabs, an empty value
    b"NATS/1.0\r\nK: 1\r\nK: 2\r\n\r\n",                              # the last one wins
    b"NATS/1.0\r\nno colon here\r\nX: y\r\n\r\n",
    b"NATS/1.0\r\nBad Key: v\r\n\tFolded: v\r\n\x1cSep: v\r\nOk: v\x1c\r\n\r\n",
    b"NATS/1.0\r\nName: caf\xc3\xa9\r\nBroken: \xff\xfe\r\n\r\n",    # UTF-8, and bytes that are not
    "NATS/1.0\r\nK\u00e9y: v\r\nOk: v\r\n\r\n".encode(),              # a key that is not ASCII
    b"NATS/1.0\r\nUrl: nats://h:4222/x\r\nTime: 12:30:00\r\n\r\n",  # colons in values
    b"NATS/1.0 404 No Messages\r\n\r\n",                             # status lines: nats-py's own
    b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 0\r\nNats-Last-Stream: 0\r\n\r\n",
    b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 3\r\nNats-Pending-Bytes: 120\r\n\r\n",
]


def _random_blocks(count: int) -> list[bytes]:
    rng = random.Random(7)
    alphabet = [b"a", b"Z", b"-", b"_", b" ", b"\t", b":", b"\x1c", b"\x0b", b"\xc3\xa9", b"\xff", b"\r", b"\n",
                b"1", b"."]
    blocks = []
    for _ in range(count):
        lines = [b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(0, 5))]
        blocks.append(b"NATS/1.0\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n")
    return blocks


async def test_headers_are_read_exactly_as_nats_py_reads_them() -> None:
    plain, fast = NATS(), NATS()
    assert direct.read_headers_faster(fast)
    for block in [*TRICKY, *_random_blocks(3000)]:
        assert await fast._process_headers(block) == await plain._process_headers(block), block


async def test_a_connection_the_runtime_opens_reads_every_header_as_sent(nats_server: EmbeddedServer,
                                                                         nc: NATS) -> None:
    ours = await open_connection(nats_server.url)
    try:
        sub = await ours.subscribe("hdr.>")
        await ours.flush()
        sent = [{"Fn-Call-Id": "c-1", "Content-Type": "application/json"}, {"Name": "café", "Empty": ""}, {}]
        for i, headers in enumerate(sent):
            await nc.publish(f"hdr.{i}", b"x", headers=headers or None)
        got = [await sub.next_msg(timeout=5) for _ in sent]
        assert [m.headers or {} for m in got] == sent
        # A status message (a pull request that found nothing) is still read by nats-py.
        js = ours.jetstream()
        await js.add_stream(name="HDR", subjects=["hdrjs.>"])
        psub = await js.pull_subscribe("hdrjs.x", durable="reader")
        with pytest.raises(nats.errors.TimeoutError):
            await psub.fetch(1, timeout=0.3)
    finally:
        await ours.close()
