"""Replies to many outstanding requests on one wildcard inbox, each with a deadline.

Every request gets a reply subject ``<inbox>.<token>``; one subscription to ``<inbox>.*`` serves
them all, each reply matched to its request by the last subject token, and one watchdog settles
every request whose deadline passed. Cheaper than a subscription or a timer per request on the
hot path. The client waits on its calls' replies and JetStream acknowledgements this way; the
gateway takes the acknowledgements of the invocations it stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from . import direct
from .loop import cancel_and_wait, finish_within, spawn
from .protocol import is_tombstone

log = logging.getLogger("runtime.inbox")

TICK = 0.05   # deadlines are enforced this precisely

Waiter = asyncio.Future["Msg | None"]           # None: the deadline passed
# Called as the reply is read; a callback that must wait returns an awaitable, run in a task.
OnReply = Callable[["Msg | None"], "Awaitable[None] | None"]


class ReplyInbox:
    """One wildcard inbox for many requests. Deadlines are in the running loop's ``time()``."""

    def __init__(self, nc: NATS, *, tick: float = TICK, name: str = "inbox-deadlines") -> None:
        self.nc = nc
        self.tick = tick
        self.name = name
        self._prefix = ""
        self._cut = 0
        self._tokens = itertools.count(1)
        self._pending: dict[str, tuple[Waiter | OnReply, float]] = {}
        # Subjects that take many messages (progress updates) until forgotten or their deadline.
        self._listeners: dict[str, tuple[Callable[[Msg], None], float]] = {}
        self._sub: Subscription | None = None
        self._also: Subscription | None = None   # a second prefix for the same tokens (see also_on)
        self._also_cut = 0
        self._also_tokens: set[str] = set()      # the requests it may settle
        self._watchdog: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()   # callbacks that had to wait

    @property
    def started(self) -> bool:
        return self._sub is not None

    @property
    def pending(self) -> int:
        """Requests still waiting for their reply."""
        return len(self._pending)

    async def start(self) -> None:
        inbox = self.nc.new_inbox()
        self._prefix = inbox + "."
        self._cut = len(self._prefix)
        self._sub = await direct.subscribe(self.nc, inbox + ".*", self._on_msg)
        self._watchdog = asyncio.create_task(self._expire(), name=self.name)

    async def also_on(self, prefix: str) -> None:
        """Settle requests made with ``expect(..., also=True)`` by messages on ``<prefix>.<token>``
        as well: the same token there answers the request of ``<inbox>.<token>``, whichever comes
        first. Markers of a deleted or purged KV entry on it are no answer."""
        self._also_cut = len(prefix) + 1
        self._also = await direct.subscribe(self.nc, prefix + ".*", self._on_also)

    def token(self, subject: str) -> str:
        """The token of a reply subject made here."""
        return subject[self._cut:]

    async def stop(self, *, drain: bool = False) -> None:
        """Stop matching; waiters still pending are cancelled.

        With ``drain``, replies already received are handled first.
        """
        sub, self._sub = self._sub, None
        if drain and sub is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]
            sub = None
        await cancel_and_wait(self._watchdog)
        self._watchdog = None
        await finish_within(self._callbacks, 1.0)   # short: they publish an answer
        pending, self._pending = self._pending, {}
        self._listeners.clear()
        self._also_tokens.clear()
        for target, _ in pending.values():
            if isinstance(target, asyncio.Future):
                target.cancel()
        also, self._also = self._also, None
        for subscription in (sub, also):
            if subscription is not None and not self.nc.is_closed:
                await subscription.unsubscribe()

    def expect(self, deadline: float, *, also: bool = False) -> tuple[str, Waiter]:
        """A reply subject, and the future its reply (or None at ``deadline``) is set on.

        ``also``: a message on the same token under the :meth:`also_on` prefix answers it too.
        """
        waiter: Waiter = asyncio.get_running_loop().create_future()
        subject = self._add(waiter, deadline)
        if also:
            self._also_tokens.add(subject[self._cut:])
        return subject, waiter

    def on_reply(self, deadline: float, callback: OnReply) -> str:
        """A reply subject whose reply (or None at ``deadline``) is passed to ``callback``."""
        return self._add(callback, deadline)

    def listen(self, deadline: float, callback: Callable[[Msg], None]) -> str:
        """A subject every message on which is passed to ``callback`` until :meth:`forget` or
        ``deadline``."""
        token = str(next(self._tokens))
        self._listeners[token] = (callback, deadline)
        return self._prefix + token

    def forget(self, subject: str) -> None:
        """No longer wait for a reply on ``subject`` (the caller is done with it)."""
        token = subject[self._cut:]
        self._pending.pop(token, None)
        self._listeners.pop(token, None)
        self._also_tokens.discard(token)

    def _add(self, target: Waiter | OnReply, deadline: float) -> str:
        token = str(next(self._tokens))
        self._pending[token] = (target, deadline)
        return self._prefix + token

    def _on_msg(self, msg: Msg) -> None:
        # Called as the connection reads the reply (runtime.direct): nothing here waits.
        token = msg.subject[self._cut:]
        entry = self._pending.pop(token, None)
        if entry is not None:
            self._settle(entry[0], msg)
        elif self._listeners:
            listener = self._listeners.get(token)
            if listener is not None:
                listener[0](msg)

    def _on_also(self, msg: Msg) -> None:
        token = msg.subject[self._also_cut:]
        if token in self._also_tokens and not is_tombstone(msg.headers):
            self._also_tokens.discard(token)
            entry = self._pending.pop(token, None)
            if entry is not None:
                self._settle(entry[0], msg)

    async def _expire(self) -> None:
        # One watchdog for every request: cheaper than a timer per request on the hot path.
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick)
            now = loop.time()
            for token in [t for t, (_, deadline) in self._listeners.items() if deadline <= now]:
                del self._listeners[token]
            late = [token for token, (_, deadline) in self._pending.items() if deadline <= now]
            for token in late:
                entry = self._pending.pop(token, None)
                if entry is not None:
                    self._settle(entry[0], None)

    def _settle(self, target: Waiter | OnReply, msg: Msg | None) -> None:
        if isinstance(target, asyncio.Future):
            if not target.done():
                target.set_result(msg)
            return
        try:
            waits = target(msg)
        except Exception:
            # One failing callback must not stop the matching or the watchdog for the others.
            log.exception("handling the reply on an inbox failed")
            return
        if inspect.isawaitable(waits):
            spawn(self._callbacks, self._finish(waits))

    @staticmethod
    async def _finish(waits: Awaitable[None]) -> None:
        try:
            await waits
        except Exception:
            log.exception("handling the reply on an inbox failed")
