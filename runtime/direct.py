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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
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


__all__ = ["Handler", "handing_over", "subscribe"]
