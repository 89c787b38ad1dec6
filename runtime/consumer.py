"""The pull loop: keeps pull requests for one durable consumer topped up to the free slots.

Messages arrive on a private inbox through a core subscription (no per-message request
round trip). The feed never asks for more messages than it has free slots, so a runtime
never holds more than ``slots`` messages of a function; the consumer's ``max_ack_pending``
bounds what all runtimes together hold.

A server that restarts forgets the pull requests it held. When the connection comes back
(:func:`reconnected`), every feed on it asks again at once, from a new inbox: a request that
did survive (the connection dropped, the server did not) may still deliver to the old one, and
what it delivers is taken while there is room and handed back otherwise, so a feed never holds
more than its slots. Missed heartbeats do the same for a request lost without a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from . import direct
from . import headers as H
from .loop import cancel_and_wait, spawn
from .protocol import NAK, STATUS_CONFLICT, STATUS_HEARTBEAT, pull_subject

log = logging.getLogger("runtime.consumer")

Sink = Callable[[Msg], None]


class Renewable(Protocol):
    def renew(self) -> None:
        """Forget the pull requests out (they may be lost) and ask again."""


# The feeds of each connection, told when it comes back after a disconnect.
_FEEDS: weakref.WeakKeyDictionary[NATS, weakref.WeakSet[Renewable]] = weakref.WeakKeyDictionary()


def follow_reconnects(nc: NATS, feed: Renewable) -> None:
    _FEEDS.setdefault(nc, weakref.WeakSet()).add(feed)


def unfollow_reconnects(nc: NATS, feed: Renewable) -> None:
    feeds = _FEEDS.get(nc)
    if feeds is not None:
        feeds.discard(feed)


def reconnected(nc: NATS) -> int:
    """``nc`` is connected again: every feed on it asks again now; how many feeds there were."""
    feeds = list(_FEEDS.get(nc, ()))
    for feed in feeds:
        try:
            feed.renew()
        except Exception:
            log.exception("could not ask again after the reconnect")
    return len(feeds)


def wanted(slots: int, held: int, outstanding: int) -> int:
    """How many messages to ask for now: free slots not yet asked for, in batches.

    While requests are outstanding, a new one waits until a quarter of the slots (at least
    one) is free, so a busy feed sends a few large pull requests rather than one per release.
    """
    want = slots - held - outstanding
    if want <= 0 or (outstanding and want < max(1, slots // 4)):
        return 0
    return want


@dataclass(frozen=True, slots=True)
class StatusEffect:
    """What a status message on the pull inbox (one without a reply subject) changes."""

    outstanding: int            # messages still asked for after it
    pull: bool                  # whether to top the requests up again
    consumer_deleted: bool = False


def read_status(headers: Mapping[str, str] | None, outstanding: int) -> StatusEffect:
    """The effect of a status message with ``headers`` while ``outstanding`` messages are asked for."""
    headers = headers or {}
    status = headers.get(H.STATUS, "")
    if status == STATUS_HEARTBEAT:  # idle heartbeat
        return StatusEffect(outstanding, pull=False)
    # 404/408/409: a request ended; it reports how many of its messages it did not deliver.
    left = headers.get(H.PENDING_MESSAGES)
    outstanding = max(0, outstanding - int(left)) if left else 0
    if status == STATUS_CONFLICT and "Consumer Deleted" in headers.get(H.DESCRIPTION, ""):
        return StatusEffect(outstanding, pull=False, consumer_deleted=True)
    return StatusEffect(outstanding, pull=True)


class PullFeed:
    """Pull requests for ``stream``/``consumer``, delivering each message to ``sink``."""

    def __init__(self, nc: NATS, stream: str, consumer: str, slots: int, sink: Sink, *,
                 expires: float = 30.0, heartbeat: float = 5.0) -> None:
        self.nc = nc
        self.consumer = consumer
        self.slots = slots
        self.sink = sink
        self.expires = expires
        self.heartbeat = heartbeat
        self.held = 0          # delivered to the sink and not yet released
        self.outstanding = 0   # asked for and not yet delivered or expired
        self.delivered = 0
        self._api = pull_subject(stream, consumer)
        # Requests go out on the inbox of the current round; a renew starts a new round (its
        # messages carry no trace of the request they answer, only the inbox they come to).
        self._round = 0
        self._inbox = ""
        self._subs: dict[int, Subscription] = {}
        self._renewing = False
        self._pulling = False
        self._pull_scheduled = False
        self._last_seen = 0.0
        self._watchdog: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._pulling = True
        await self._new_round()
        follow_reconnects(self.nc, self)
        self._last_seen = time.monotonic()
        self._watchdog = asyncio.create_task(self._watch(), name=f"feed-watch-{self.consumer}")
        await self._pull()

    async def stop(self) -> None:
        """Stop asking for messages; messages already on their way still reach the sink."""
        self._pulling = False
        unfollow_reconnects(self.nc, self)
        await cancel_and_wait(self._watchdog)
        subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]
        for task in list(self._tasks):
            task.cancel()

    def resize(self, slots: int) -> None:
        self.slots = slots
        self.schedule_pull()

    def release(self) -> None:
        """A held message was settled: its slot is free again."""
        self.held -= 1
        self.schedule_pull()

    def _wanted(self) -> int:
        return wanted(self.slots, self.held, self.outstanding)

    def renew(self) -> None:
        """Forget the requests out (a restarted server lost them) and ask again, from a new inbox."""
        if self._pulling and not self._renewing:
            self._renewing = True
            spawn(self._tasks, self._renew())

    async def _renew(self) -> None:
        try:
            await self._new_round()
        except Exception as exc:   # disconnected again: the next reconnect, or the watchdog, renews
            log.warning("could not renew the pull requests for %s: %s", self.consumer, exc)
            return
        finally:
            self._renewing = False
        self.outstanding = 0
        self._last_seen = time.monotonic()
        self.schedule_pull()

    async def _new_round(self) -> None:
        """Subscribe to a new inbox and send requests there from now on. The inbox before stays
        until its requests have expired: a request that survived may still deliver to it."""
        this = self._round + 1
        inbox = self.nc.new_inbox()
        self._subs[this] = await direct.subscribe(self.nc, inbox, lambda msg: self._on_msg(msg, this))
        before, self._round, self._inbox = self._round, this, inbox
        if before in self._subs:
            spawn(self._tasks, self._retire(before))

    async def _retire(self, old: int) -> None:
        await asyncio.sleep(self.expires + self.heartbeat)
        sub = self._subs.pop(old, None)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def schedule_pull(self) -> None:
        # Coalesce all releases of one event-loop turn into a single pull request.
        if self._pulling and not self._pull_scheduled and self._wanted():
            self._pull_scheduled = True
            spawn(self._tasks, self._pull())

    async def _pull(self) -> None:
        self._pull_scheduled = False
        if not self._pulling or self.nc.is_closed:
            return
        want = self._wanted()
        if not want:
            return
        self.outstanding += want
        request = {"batch": want, "expires": int(self.expires * 1e9),
                   "idle_heartbeat": int(self.heartbeat * 1e9)}
        try:
            await self.nc.publish(self._api, json.dumps(request).encode(), reply=self._inbox)
        except Exception as exc:  # disconnected: the watchdog asks again
            self.outstanding -= want
            log.warning("pull request for %s failed: %s", self.consumer, exc)

    def _on_msg(self, msg: Msg, round_: int) -> None:
        # Called as the connection reads the message (runtime.direct): nothing here waits.
        current = round_ == self._round
        if current:   # only the requests out now can say they are alive (see _watch)
            self._last_seen = time.monotonic()
        if msg.reply:
            if current:
                self.outstanding = max(0, self.outstanding - 1)
            elif self.held + self.outstanding >= self.slots:
                # From a request given up that survived after all, with no room for it.
                spawn(self._tasks, self._hand_back(msg.reply))
                return
            self.held += 1
            self.delivered += 1
            self.sink(msg)
            return
        if not current:
            return   # a request given up ended: what it did not deliver was not counted any more
        effect = read_status(msg.headers, self.outstanding)
        self.outstanding = effect.outstanding
        if effect.consumer_deleted:
            log.warning("consumer %s was deleted", self.consumer)
        if effect.pull:
            self.schedule_pull()

    async def _watch(self) -> None:
        # Pull requests die silently with a server restart or a consumer's new leader; missed
        # heartbeats tell us to forget them and ask again.
        while True:
            await asyncio.sleep(self.heartbeat)
            silent = time.monotonic() - self._last_seen
            if self.outstanding and silent > 3 * self.heartbeat:
                log.info("no heartbeat from %s for %.0fs; pulling again", self.consumer, silent)
                self.renew()
            self.schedule_pull()

    async def _hand_back(self, reply: str) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(reply, NAK)
