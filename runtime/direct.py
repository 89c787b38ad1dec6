"""Subscriptions whose messages are handled as nats-py reads them, without a queue and a task.

A nats-py subscription with a callback puts every message in an ``asyncio.Queue``; a task per
subscription takes it out and awaits the callback. For the runtime's busiest subscriptions (the
invocations its pull requests fetch, the replies and acknowledgements on its inboxes) that is a
queue round, a coroutine and a loop pass per message, on the path of every call. Here the
subscription's queue is replaced by one that hands each message to a plain function at once,
from the read loop: the function must not block and must not raise (what it raises is logged).

It leans on two nats-py internals, checked: ``Subscription._pending_queue`` (which the read loop
``put_nowait``s into) and ``_pending_size``. Without them the subscription keeps its queue and
task, and its callback calls the same function.

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


__all__ = ["Handler", "handing_over", "parse_header_block", "read_headers_faster", "subscribe"]
