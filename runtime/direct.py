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
            hdr = parse_header_block(headers) if headers.startswith(_HEADER_LINE) else None
            if hdr is None:   # a status line, a block that is not all ASCII: nats-py reads it
                hdr = await nc._process_headers(headers)
        queue.handle(nc.msg_class(subject=subject.decode(), reply=reply.decode(), data=data, headers=hdr or None,
                                  _client=nc, _sid=sid))

    nc._process_msg = process_msg  # type: ignore[method-assign]
    return True


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


def read_headers_faster(nc: NATS) -> bool:
    """Make ``nc`` read message headers with :func:`parse_header_block`; False if it cannot."""
    original: Callable[[bytes | None], Awaitable[dict[str, str] | None]] | None = getattr(
        nc, "_process_headers", None)
    if original is None or not inspect.iscoroutinefunction(original):
        return False

    async def process_headers(headers: bytes | None) -> dict[str, str] | None:
        if not headers:
            return None
        parsed = parse_header_block(headers) if headers.startswith(_HEADER_LINE) else None
        if parsed is None:   # a status line, a block that is not all ASCII: nats-py reads it
            return await original(headers)
        return parsed or None

    nc._process_headers = process_headers  # type: ignore[method-assign]
    return True


__all__ = ["Handler", "hand_over_faster", "handing_over", "parse_header_block", "read_headers_faster", "subscribe"]
