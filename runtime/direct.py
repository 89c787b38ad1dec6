"""Subscriptions whose messages are handled as nats-py reads them, without a queue and a task.

A nats-py subscription with a callback puts every message in an ``asyncio.Queue``; a task per
subscription takes it out and awaits the callback. For the runtime's busiest subscriptions (the
invocations its pull requests fetch, the replies and acknowledgements on its inboxes) that is a
queue round, a coroutine and a loop pass per message, on the path of every call. Here the
subscription's queue is replaced by one that hands each message to a plain function at once,
from the read loop: the function must not block and must not raise (what it raises is logged).

It leans on two nats-py internals, checked: ``Subscription._pending_queue`` (which the read loop
``put_nowait``s into) and ``_pending_size``. Without them the subscription keeps its queue and
task, and its callback calls the same function. The connections the runtime opens go one step
further (:func:`hand_over_faster`): the message is built and handed over without nats-py's
per-message checks, which do not apply to such a subscription.

Reading a message's headers is the other cost on that path: nats-py splits the block into lines
and checks each key character by character, about 4.5 µs for an invocation's four headers. The
connections the runtime opens read them with :func:`read_headers_faster` instead: the same
result (keys and values as nats-py gives them), decoding an all-ASCII block once; a block with a
status line or other bytes still goes to nats-py.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("runtime.direct")

Handler = Callable[[Msg], None]


class _HandOver(asyncio.Queue[Msg]):
    """Stands in for a subscription's pending queue: each message put is handled, never kept.

    Nothing is ever queued, so the subscription's own task waits on ``get`` until it is
    cancelled (by ``unsubscribe``), and ``join`` (``drain``) returns at once.
    """

    def __init__(self, sub: Any, handler: Handler) -> None:
        super().__init__()
        self._sub = sub
        self._handler = handler

    def put_nowait(self, item: Msg) -> None:
        self._sub._pending_size -= len(item.data)   # counted by the read loop as if queued
        self.handle(item)

    def handle(self, item: Msg) -> None:
        try:
            self._handler(item)
        except Exception:
            # The read loop must go on: one bad message cannot stop the connection.
            log.exception("handling a message on %s failed", item.subject)


def handing_over(sub: Subscription) -> bool:
    """True if ``sub`` hands its messages over directly (see :func:`subscribe`)."""
    return isinstance(getattr(sub, "_pending_queue", None), _HandOver)


async def subscribe(nc: NATS, subject: str, handler: Handler) -> Subscription:
    """Subscribe to ``subject``, calling ``handler(msg)`` for each message as it is read.

    No pending limits: the handler is the consumer, and it does not fall behind the reader.
    """

    async def through_queue(msg: Msg) -> None:
        handler(msg)

    sub = await nc.subscribe(subject, cb=through_queue, pending_msgs_limit=-1, pending_bytes_limit=-1)
    queue = getattr(sub, "_pending_queue", None)
    if isinstance(queue, asyncio.Queue) and isinstance(getattr(sub, "_pending_size", None), int):
        sub._pending_queue = _HandOver(sub, handler)
        # A message read before the switch (the subjects used this way get none before their
        # first request goes out) would still be handled, by the subscription's task.
    return sub


def hand_over_faster(nc: NATS) -> bool:
    """Make ``nc`` build the messages of its handing-over subscriptions itself; False if it cannot.

    For every message, nats-py's ``_process_msg`` awaits a header reader (a coroutine even when
    there are no headers), builds the message through a method, and checks for JetStream flow
    control, a request's future and the pending limits before it puts the message in the queue.
    None of that applies to a subscription made by :func:`subscribe`: its messages are built
    here, the same way, and handed over at once. Other subscriptions, and one with a message
    limit, go through nats-py as before. Leans on ``Client._process_msg``, ``_subs``, ``stats``
    and ``msg_class``, and on ``Subscription._received``, ``_max_msgs`` and ``_jsi``.
    """
    original: Callable[..., Awaitable[None]] | None = getattr(nc, "_process_msg", None)
    if original is None or not inspect.iscoroutinefunction(original) or not isinstance(
            getattr(nc, "_subs", None), dict) or not isinstance(getattr(nc, "stats", None), dict):
        return False

    async def process_msg(sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        sub: Any = nc._subs.get(sid)
        queue = getattr(sub, "_pending_queue", None)
        if queue.__class__ is not _HandOver or sub._max_msgs or sub._jsi:
            await original(sid, subject, reply, data, headers)
            return
        stats = nc.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        sub._received += 1
        hdr = None
        if headers:
            hdr = _read_quickly(headers)
            if hdr is None:
                hdr = await nc._process_headers(headers)
        queue.handle(nc.msg_class(subject=subject.decode(), reply=reply.decode(), data=data, headers=hdr or None,
                                  _client=nc, _sid=sid))

    nc._process_msg = process_msg  # type: ignore[method-assign]
    return True


# ------------------------------------------------------------------ the read loop's parser

_AWAITING_CONTROL_LINE, _AWAITING_MSG_PAYLOAD = 1, 2   # nats-py's parser states (nats.protocol.parser)


def parse_messages_faster(nc: NATS) -> bool:
    """Make ``nc``'s protocol parser read ``MSG`` and ``HMSG`` itself; False if it cannot.

    nats-py's parser tries a regular expression on every control line and keeps a message's
    arguments in a dict until its payload is read. Here a ``MSG``/``HMSG`` line is split on
    whitespace and its message handed to ``_process_msg`` with the same arguments. Anything
    else (``PING``, ``INFO``, ``-ERR``, a line that does not read as a message) goes to nats-py's
    parser with the rest of the buffer, which also raises its errors. A message whose payload
    is still on its way is left in the parser's own state, as nats-py leaves it.
    Leans on ``Client._ps`` and the parser's ``buf``, ``state``, ``msg_arg``, ``needed`` and
    ``header_needed``.
    """
    parser: Any = getattr(nc, "_ps", None)
    original: Callable[..., Awaitable[None]] | None = getattr(parser, "parse", None)
    if original is None or not inspect.iscoroutinefunction(original) or not all(
            hasattr(parser, name) for name in ("buf", "state", "msg_arg", "needed", "header_needed")):
        return False

    async def parse(data: bytes = b"") -> None:
        buf: bytearray = parser.buf
        buf.extend(data)
        process: Callable[..., Awaitable[None]] = nc._process_msg
        if parser.state == _AWAITING_MSG_PAYLOAD:   # the rest of a message split between reads
            if len(buf) < parser.needed + 2:
                return
            headers, payload = _take(buf, 0, parser.header_needed, parser.needed)
            parser.header_needed = 0
            parser.state = _AWAITING_CONTROL_LINE
            arg = parser.msg_arg
            await process(arg["sid"], arg["subject"], arg["reply"], payload, headers)
            if parser.buf is not buf:
                return
        while buf.startswith(b"MSG ") or buf.startswith(b"HMSG "):
            end = buf.find(b"\r\n")
            if end < 0:
                return   # the line is still on its way
            line = _message_line(bytes(buf[:end]))
            if line is None:
                break   # not a message line after all: nats-py's parser says what it is
            subject, sid, reply, header_needed, needed = line
            start = end + 2
            if len(buf) < start + needed + 2:   # the payload is still on its way: as nats-py leaves it
                parser.msg_arg.update(subject=subject, sid=sid, reply=reply)
                parser.needed, parser.header_needed = needed, header_needed
                parser.state = _AWAITING_MSG_PAYLOAD
                del buf[:start]
                return
            headers, payload = _take(buf, start, header_needed, needed)
            await process(sid, subject, reply, payload, headers)
            if parser.buf is not buf:
                return   # reset meanwhile (a reconnect): what is left was the old connection's
        if buf:
            await original()

    parser.parse = parse
    return True


def _take(buf: bytearray, start: int, header_needed: int, needed: int) -> tuple[bytes | None, bytes]:
    """The headers (None without) and payload of the message at ``start``, taken out of ``buf``
    with the line before them and the CRLF after them."""
    if header_needed:
        headers: bytes | None = bytes(buf[start:start + header_needed])
        payload = bytes(buf[start + header_needed:start + needed])
    else:
        headers, payload = None, bytes(buf[start:start + needed])
    del buf[:start + needed + 2]
    return headers, payload


def _message_line(line: bytes) -> tuple[bytes, int, bytes, int, int] | None:
    """``MSG <subject> <sid> [reply] <size>`` or ``HMSG <subject> <sid> [reply] <header size>
    <size>`` as (subject, sid, reply, header size, size); None if it does not read as one (sizes
    are digits only, as nats-py's parser wants them)."""
    args = line.split()
    hmsg = args[0] == b"HMSG"
    count = len(args) - hmsg   # as a MSG line counts them: with a reply subject, 5
    if count not in (4, 5) or not (hmsg or args[0] == b"MSG"):
        return None
    size, header_size = args[-1], (args[-2] if hmsg else b"0")
    if not (size.isdigit() and header_size.isdigit()):
        return None
    try:
        sid = int(args[2])
    except ValueError:
        return None
    return args[1], sid, (args[3] if count == 5 else b""), int(header_size), int(size)


# ------------------------------------------------------------------ headers

_HEADER_LINE = b"NATS/1.0\r\n"
_BYTES_SPACE = " \t\n\r\x0b\x0c"   # what bytes.strip() strips: nats-py strips keys and values so
_SPACE = re.compile(r"\s")            # a key with any whitespace left (str.isspace) is dropped


def parse_header_block(block: bytes) -> dict[str, str] | None:
    """The headers of ``block`` (``NATS/1.0\\r\\n`` then ``Name: Value`` lines, no status) as
    nats-py reads them: keys and values stripped, a line without a colon or with a key that holds
    whitespace left out. None if the block is not all ASCII: nats-py's own reader takes it."""
    try:
        text = block[len(_HEADER_LINE):].decode("ascii")
    except UnicodeDecodeError:
        return None
    out: dict[str, str] = {}
    for line in text.split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            key = name.strip(_BYTES_SPACE)
            if not _SPACE.search(key):
                out[key] = value.strip(_BYTES_SPACE)
    return out


def _read_quickly(block: bytes) -> dict[str, str] | None:
    """``block``'s headers by :func:`parse_header_block`; None for a status line or a block that
    is not all ASCII, which nats-py's own reader must read."""
    return parse_header_block(block) if block.startswith(_HEADER_LINE) else None


def read_headers_faster(nc: NATS) -> bool:
    """Make ``nc`` read message headers with :func:`parse_header_block`; False if it cannot."""
    original: Callable[[bytes | None], Awaitable[dict[str, str] | None]] | None = getattr(
        nc, "_process_headers", None)
    if original is None or not inspect.iscoroutinefunction(original):
        return False

    async def process_headers(headers: bytes | None) -> dict[str, str] | None:
        if not headers:
            return None
        parsed = _read_quickly(headers)
        if parsed is None:
            return await original(headers)
        return parsed or None

    nc._process_headers = process_headers  # type: ignore[method-assign]
    return True


__all__ = ["Handler", "hand_over_faster", "handing_over", "parse_header_block", "parse_messages_faster",
           "read_headers_faster", "subscribe"]
