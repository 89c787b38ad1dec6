"""Priority dispatch: each free slot starts an invocation of the most urgent level that has one queued.

A function has one durable consumer per priority level (a consumer hands out messages in
stream order, so one consumer cannot put urgent work first) and ``concurrency`` slot
messages in ``FN_SLOTS``. A runtime runs an invocation only while it holds a slot, which
bounds the whole fleet across levels. With slots in hand it asks the level consumers, most
urgent first, for as many invocations as it has free slots (``no_wait`` pull requests, so
nothing is held that is not started at once). Requests are pipelined: a new one goes out as
soon as enough slots are free, without waiting for the answers to earlier ones.

Which levels to ask: a level is asked until a request brings nothing; then the runtime listens
on that level's doorbell (``FN`` republishes the headers of every stored invocation on
``fn.queued.<function>[.<level>]``) and asks again when it rings. A level that ran dry but still
gets invocations one by one is asked with a short wait (``LINGER``), so they stream into the open
request; a busy level is never listened to, so steady traffic costs no doorbell messages.

A level other than the default one gets its consumer when an invocation first waits there. A
request to a level with no consumer is answered "no responders"; the runtime then looks at how
many invocations the stream holds at that level instead of asking (when it rings, and every 5 s),
and makes the consumer once one waits.

Slots go back with a nak (so JetStream redelivers them at once) once they have been idle for
``IDLE_HOLD`` seconds, and, while other runtimes are waiting for one, after ``TURN`` seconds of
use, so that every runtime gets its share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from . import direct, priority
from .consumer import PullFeed, follow_reconnects, unfollow_reconnects
from .loop import cancel_and_wait, spawn
from .manifest import FunctionManifest
from .protocol import IN_PROGRESS, NAK, AckSubject, parse_ack, pull_subject
from .streams import INVOKE_STREAM, SLOT_ACK_WAIT, SLOTS_STREAM, ensure_level_consumer

log = logging.getLogger("runtime.dispatch")

Sink = Callable[[Msg], None]

TURN = 0.1              # seconds a runtime keeps a slot while other runtimes wait for one
IDLE_HOLD = 1.0         # seconds an idle slot is kept for the next invocation before it goes back
CONTENTION_CHECK = 0.25  # how often a runtime holding every slot asks whether others wait
FETCH_TIMEOUT = 5.0     # an unanswered pull request (the server restarting) is given up after this
POLL_EVERY = 5.0         # every level is looked at this often (at most ack_wait) whatever the bells said
MIXED_WINDOW = 10.0      # a level that had work this recently counts as in use (see _ask)
LINGER = 0.05           # how long a request to a level that just ran dry waits for more (see _request)
RING_SETTLE = 0.02       # a level found empty this soon after its bell, or after its bell was
                         # listened to, is looked at once more, this much later (see _ended)
REDELIVERY_SLACK = 0.02  # a handed-back invocation's bell rings this long after it is due again
NO_RESPONDERS = "503"    # the status of a request to a consumer that does not exist


@dataclass(slots=True)
class Slot:
    reply: str           # the slot message's ack subject
    since: float         # when this runtime got it
    idle_since: float = 0.0


@dataclass(slots=True)
class _Fetch:
    """One pull request to a level consumer and the slots kept for what it brings."""

    consumer: str
    level: int
    want: int
    reserved: list[Slot]
    deadline: float
    rings: int                # the level's bell count when the request went out
    sent: float               # when it went out
    got: int = 0
    drained: bool = False    # the consumer has no more messages (it said so, or reported 0 pending)
    absent: bool = False     # there is no such consumer
    done: bool = False


class PriorityFeed:
    """Feeds ``sink`` the invocations of one function, most urgent level first, one per held slot."""

    def __init__(self, nc: NATS, manifest: FunctionManifest, sink: Sink) -> None:
        self.nc = nc
        self.manifest = manifest
        self.function = manifest.name
        self.default = manifest.priority
        self.concurrency = manifest.concurrency
        self.poll_every = min(manifest.effective_ack_wait, POLL_EVERY)
        self.sink = sink
        self.slot_feed = PullFeed(nc, SLOTS_STREAM, manifest.name, 0, self._on_slot)
        self.idle: deque[Slot] = deque()
        self.busy: dict[str, Slot] = {}            # invocation ack subject -> the slot it runs on
        self.maybe = dict.fromkeys(priority.LEVELS, True)   # the level may have queued invocations
        self.delivered = 0
        self.contended = False                     # other runtimes wait for this function's slots
        self._bells: dict[int, list[Subscription]] = {}    # levels listened to: those found empty
        self._arming: set[int] = set()                      # levels whose doorbells are being subscribed to
        self._rings = dict.fromkeys(priority.LEVELS, 0)     # bells heard per level
        self._last_ring = dict.fromkeys(priority.LEVELS, 0.0)
        self._listening_since = dict.fromkeys(priority.LEVELS, 0.0)   # when its bells were last subscribed to
        self._shallow = dict.fromkeys(priority.LEVELS, False)   # its last request found it empty
        self._seen = dict.fromkeys(priority.LEVELS, float("-inf"))   # when an invocation last came from it
        self._absent: set[int] = set()     # levels whose consumer was missing when last asked
        self._finding: set[int] = set()    # absent levels being looked at (see _find)
        # consumer -> its outstanding request. One at a time per consumer: its messages carry no
        # trace of the request they answer, so they are counted against the only one there is.
        self._requests: dict[str, _Fetch] = {}
        self._by_tag: dict[str, _Fetch] = {}
        self._tags = 0
        self._inbox = ""
        self._sub: Subscription | None = None
        self._running = False
        self._again = False
        self._round: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await direct.subscribe(self.nc, f"{self._inbox}.*", self._on_fetched)
        self._running = True
        await self.slot_feed.start()
        follow_reconnects(self.nc, self)
        spawn(self._tasks, self._housekeeping())
        self._kick()

    def renew(self) -> None:
        """The connection is back: requests out may be lost (a restarted server forgets them) and
        doorbells rung meanwhile were missed. Give the requests up and look at every level now."""
        if not self._running:
            return
        for fetch in list(self._by_tag.values()):
            self._finish(fetch)
        self._wake_empty()
        self._kick()

    async def stop(self) -> None:
        """Stop starting invocations; idle slots go back now, busy ones as their invocations finish."""
        self._running = False
        unfollow_reconnects(self.nc, self)
        await self.slot_feed.stop()
        await cancel_and_wait(self._round)
        for level in list(self._bells):
            await self._unsubscribe(self._bells.pop(level))
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]
        for fetch in list(self._by_tag.values()):
            self._finish(fetch)
        while self.idle:
            await self._give_back(self.idle.popleft())
        for task in list(self._tasks):
            task.cancel()

    def update(self, manifest: FunctionManifest) -> None:
        """New settings: slot count, default level (its consumers were recreated by the deploy)."""
        moved = manifest.priority != self.default
        self.manifest = manifest
        self.default = manifest.priority
        self.concurrency = manifest.concurrency
        self.poll_every = min(manifest.effective_ack_wait, POLL_EVERY)
        if moved:
            self._absent.clear()   # the levels' consumers changed names: asked anew
            for level in priority.LEVELS:
                self._wake(level)
        self._demand()
        self._kick()

    def slot_replies(self) -> list[str]:
        """Every slot this runtime holds, to keep alive with in-progress acks."""
        reserved = [s.reply for f in self._by_tag.values() for s in f.reserved]
        return [s.reply for s in self.idle] + [s.reply for s in self.busy.values()] + reserved

    # ------------------------------------------------------------------ slots

    def _on_slot(self, msg: Msg) -> None:
        now = time.monotonic()
        slot = Slot(msg.reply, now, now)
        if not self._running:
            spawn(self._tasks, self._give_back(slot))
            return
        self.idle.append(slot)
        self._kick()

    def release(self, reply: str) -> None:
        """The invocation with ack subject ``reply`` is settled: its slot runs the next one, or goes back."""
        slot = self.busy.pop(reply, None)
        if slot is None:
            return
        now = time.monotonic()
        if not self._running or (self.contended and now - slot.since > TURN):
            spawn(self._tasks, self._give_back(slot))
        else:
            slot.idle_since = now
            self.idle.append(slot)
            if self._by_tag and (len(self.idle) < self._batch or self._asked_at_top()):
                return   # the answer to a request out now asks again (see _ask)
        self._kick()

    def _top(self) -> int | None:
        """The most urgent level that may have work."""
        return next((lv for lv in priority.LEVELS if self.maybe[lv]), None)

    def _asked_at_top(self) -> bool:
        """Whether the most urgent level that may have work has a request out already."""
        level = self._top()
        return level is not None and priority.consumer_name(self.function, level, self.default) in self._requests

    @property
    def _batch(self) -> int:
        """Free slots worth another request while one is out."""
        return max(1, self.concurrency // 4)

    async def _give_back(self, slot: Slot) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(slot.reply, NAK)
        self.slot_feed.release()

    def _demand(self) -> None:
        # Ask for slots only while some level may have work: idle runtimes hold none for long.
        wanted = self.concurrency if self._running and any(self.maybe.values()) else 0
        if wanted != self.slot_feed.slots:
            self.slot_feed.resize(wanted)

    async def _housekeeping(self) -> None:
        last_poll = last_check = last_alive = time.monotonic()
        while True:
            await asyncio.sleep(min(CONTENTION_CHECK, IDLE_HOLD / 2))
            now = time.monotonic()
            if now - last_alive >= SLOT_ACK_WAIT / 3:
                last_alive = now
                for reply in self.slot_replies():
                    with contextlib.suppress(Exception):
                        await self.nc.publish(reply, IN_PROGRESS)
            # Idle slots go back after IDLE_HOLD, or at once while other runtimes wait for one.
            hold = 0.0 if self.contended else IDLE_HOLD
            for slot in [s for s in self.idle if now - s.idle_since > hold]:
                self.idle.remove(slot)
                await self._give_back(slot)
            for fetch in [f for f in self._by_tag.values() if now > f.deadline]:
                log.info("no answer from consumer %s in %gs", fetch.consumer, FETCH_TIMEOUT)
                self._finish(fetch)
                self._kick()
            if now - last_check >= CONTENTION_CHECK:
                last_check = now
                await self._check_contention()
            if now - last_poll >= self.poll_every:
                # Invocations held by a runtime that died come back after ack_wait, with no bell;
                # and a bell is a hint, not a promise (see _ended).
                last_poll = now
                self._wake_empty()

    async def _check_contention(self) -> None:
        if self.slot_feed.held < self.concurrency:
            self.contended = False   # some slot is free or held elsewhere: nobody is shut out by us
            return
        try:
            info = await self.nc.jetstream().consumer_info(SLOTS_STREAM, self.function)
        except Exception:
            return
        own = 1 if self.slot_feed.outstanding else 0
        self.contended = (info.num_waiting or 0) > own

    # ------------------------------------------------------------------ requests

    def _kick(self) -> None:
        self._again = True
        if self._running and (self._round is None or self._round.done()):
            self._round = asyncio.get_running_loop().create_task(self._rounds(), name=f"dispatch-{self.function}")

    async def _rounds(self) -> None:
        while self._again and self._running:
            self._again = False
            try:
                await self._ask()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # disconnected: the next release or doorbell tries again
                log.warning("dispatching %s failed: %s", self.function, exc)
                await asyncio.sleep(0.5)
                self._again = True
            self._demand()

    async def _ask(self) -> None:
        # Each request goes to the most urgent level that may have work, chosen afresh for
        # every request. While requests are out, a new one waits for a quarter of the slots.
        while self.idle and self._running:
            level = self._top()
            if level is None:
                return
            if self._by_tag and len(self.idle) < self._batch:
                return
            if priority.consumer_name(self.function, level, self.default) in self._requests:
                return   # asked already: its answer asks again (never a lower level meanwhile)
            if level in self._arming or level in self._finding:
                return   # asked once its doorbells are listened to (see _listen), or once looked at
            if level in self._absent:
                self._find()
                return
            # While other levels are in use, at most a quarter of the slots per request: an urgent
            # invocation that arrives just after a request waits for that batch to start, not for
            # every slot's worth. A function used at one level takes all its free slots at once.
            now = time.monotonic()
            mixed = any(now - seen < MIXED_WINDOW for lv, seen in self._seen.items() if lv != level)
            await self._request(level, min(len(self.idle), self._batch) if mixed else len(self.idle))

    async def _request(self, level: int, want: int) -> None:
        consumer = priority.consumer_name(self.function, level, self.default)
        reserved = [self.idle.popleft() for _ in range(want)]
        self._tags += 1
        tag = f"{self._inbox}.{self._tags}"
        now = time.monotonic()
        # A level that ran dry gets a short wait instead of "none" at once: invocations arriving
        # one by one then stream into the open request without a bell and a request each.
        # Only when no less urgent level may have work: their invocations must not wait on it.
        lower = any(self.maybe[lv] for lv in priority.LEVELS if lv < level)
        wait = LINGER if self._shallow[level] and not lower else 0.0
        fetch = _Fetch(consumer, level, want, reserved, now + wait + FETCH_TIMEOUT, self._rings[level], now)
        self._requests[consumer] = fetch
        self._by_tag[tag] = fetch
        body: dict[str, object] = {"batch": want}
        if wait:
            body["expires"] = int(wait * 1e9)
        else:
            body["no_wait"] = True
        request = json.dumps(body).encode()
        await self.nc.publish(pull_subject(INVOKE_STREAM, consumer), request, reply=tag)

    def _finish(self, fetch: _Fetch) -> None:
        """A request is over: the slots nothing came for are free again."""
        if fetch.done:
            return
        fetch.done = True
        for tag, known in list(self._by_tag.items()):
            if known is fetch:
                del self._by_tag[tag]
        if self._requests.get(fetch.consumer) is fetch:
            del self._requests[fetch.consumer]
        self.idle.extend(fetch.reserved)   # idle since before the request: asking is not using
        fetch.reserved = []

    def _on_fetched(self, msg: Msg) -> None:
        # Called as the connection reads the message (runtime.direct): nothing here waits.
        if not msg.reply:   # a status: the request ended with fewer messages than asked for
            fetch = self._by_tag.get(msg.subject)
            if fetch is not None:
                fetch.drained = True
                fetch.absent = msg.headers is not None and msg.headers.get("Status") == NO_RESPONDERS
                self._ended(fetch)
            return
        try:
            ack: AckSubject | None = parse_ack(msg.reply)
        except ValueError:
            ack = None
        fetch = self._requests.get(ack.consumer) if ack else None
        if fetch is None or not fetch.reserved:
            # Came after its request was given up: run it if a slot is free, else hand it back.
            if self.idle and self._running:
                self._run(msg, self.idle.popleft())
            else:
                spawn(self._tasks, self._hand_back(msg.reply))
            return
        fetch.got += 1
        self._seen[fetch.level] = time.monotonic()
        self._run(msg, fetch.reserved.pop())
        if ack is not None and ack.pending == 0:
            # Nothing else was waiting then; the request stays open for its status (or for an
            # invocation stored meanwhile, which the server may still hand to it).
            fetch.drained = True
        if fetch.got >= fetch.want:
            self._ended(fetch)

    async def _hand_back(self, reply: str) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(reply, NAK)
        self.requeued(reply, 0.0)   # a nak is not stored anew: ring for it

    def _ended(self, fetch: _Fetch) -> None:
        self._finish(fetch)
        level = fetch.level
        if fetch.absent:
            self._absent.add(level)   # from now on looked at, not asked, until an invocation waits
        self._shallow[level] = fetch.drained
        # Nothing came, and no bell rang since the request went out: the level is empty.
        if fetch.drained and not fetch.got and self._rings[level] == fetch.rings:
            if level in self._bells:
                if not any(f.level == level for f in self._by_tag.values()):
                    self.maybe[level] = False
                if fetch.sent - max(self._last_ring[level], self._listening_since[level]) < RING_SETTLE:
                    # The server rings as it stores, and its consumer may see the invocation a
                    # moment later: a "none" just after a bell is checked once more. So is one
                    # just after the runtime began to listen: an invocation stored right before
                    # rang for nobody, and the request that followed may have missed it too.
                    asyncio.get_running_loop().call_later(RING_SETTLE, self._recheck, level)
            else:
                # Listen first, then ask once more (maybe stays set): an invocation stored in
                # between rings the bell or is found by that request.
                self._arm(level)
                return
        self._kick()

    def _recheck(self, level: int) -> None:
        if self._running and not self.maybe[level]:
            self._look([level])

    def _look(self, levels: list[int]) -> None:
        """Ask ``levels`` again, still listening to their bells: one found empty again stays
        armed, without subscribing anew (and is not rechecked: see _ended). Levels with no
        consumer are looked at aside, holding no other level back: nothing says work waits there."""
        absent = [lv for lv in levels if lv in self._absent]
        for level in levels:
            if level not in absent:
                self.maybe[level] = True
        self._find(absent)
        self._demand()
        self._kick()

    def _find(self, aside: list[int] | None = None) -> None:
        """Look at absent levels (one request for them all): those that may have work (a bell rang
        for them; the most urgent of them holds the less urgent levels back until it is settled),
        or ``aside``, found empty before."""
        if aside is None:
            levels = [lv for lv in self._absent if self.maybe[lv] and lv not in self._finding]
        else:
            levels = [lv for lv in aside if not self.maybe[lv] and lv not in self._finding]
        if levels and self._running:
            self._finding.update(levels)
            spawn(self._tasks, self._look_at_absent(levels, {lv: self._rings[lv] for lv in levels}))

    async def _look_at_absent(self, levels: list[int], rings: dict[int, int]) -> None:
        # How many invocations FN holds per subject of the function; a level with any gets its
        # consumer (made the same way by every runtime, so runtimes racing to make it agree).
        # Asked of the stream's leader, which knows of every stored invocation whose bell rang.
        try:
            waiting = {self.default} & set(levels)   # its consumer was deleted by hand: always wanted
            others = [lv for lv in levels if lv != self.default]
            if others:
                prefix = f"{priority.invoke_subject(self.function)}."
                state = (await self.nc.jetstream().stream_info(INVOKE_STREAM, subjects_filter=f"{prefix}*")).state
                counts = state.subjects or {}
                waiting.update(lv for lv in others if counts.get(f"{prefix}{lv}"))
            made = await asyncio.gather(*(self._make(lv) for lv in sorted(waiting)))
        except Exception as exc:   # no leader (an election) or disconnected: the periodic look tries again
            log.warning("cannot look at the queued invocations of %s: %s", self.function, exc)
            failed, waiting, made = True, set(), []
        else:
            failed = False
        finally:
            self._finding.difference_update(levels)
        for level, ok in zip(sorted(waiting), made, strict=True):
            if ok:
                self._absent.discard(level)
                self.maybe[level] = True
        for level in levels:
            if level not in self._absent:
                continue
            if level not in self._bells:
                self._arm(level)
                if self.maybe[level] and not failed and level not in waiting:
                    continue   # looked at once more once listened to: nothing is missed in between
            if self._rings[level] == rings[level] or failed:
                self.maybe[level] = False   # empty (or its consumer could not be made: see _make)
        self._demand()
        self._kick()

    async def _make(self, level: int) -> bool:
        try:
            await ensure_level_consumer(self.nc.jetstream(), self.manifest, level)
        except Exception as exc:
            log.warning("cannot create the consumer of %s for priority %d: %s", self.function, level, exc)
            return False
        log.info("created the consumer of %s for priority %d: an invocation waits there", self.function, level)
        return True

    def _run(self, msg: Msg, slot: Slot) -> None:
        self.busy[msg.reply] = slot
        self.delivered += 1
        self.sink(msg)

    # ------------------------------------------------------------------ doorbells

    def _arm(self, level: int) -> None:
        """Listen to ``level``'s doorbells, then ask again (a task: subscribing waits for the connection)."""
        if level in self._bells:   # listened to already (or being subscribed): just ask
            self._kick()
            return
        subs: list[Subscription] = []
        self._bells[level] = subs
        self._arming.add(level)
        spawn(self._tasks, self._listen(level, subs))

    async def _listen(self, level: int, subs: list[Subscription]) -> None:
        # The level is asked again only after this: the server then sees the subscriptions
        # before the request, so an invocation stored in between rings or is found (by that
        # request, or by the one RING_SETTLE later: see _ended).
        try:
            for subject in priority.doorbell_subjects(self.function, level, self.default):
                subs.append(await self.nc.subscribe(subject, cb=self._bell_for(level)))
            self._listening_since[level] = time.monotonic()
        except Exception as exc:   # disconnected: the periodic look finds the level's work instead
            log.warning("cannot listen for invocations of %s at level %d: %s", self.function, level, exc)
            if self._bells.get(level) is subs:
                del self._bells[level]
        finally:
            self._arming.discard(level)
        if self._bells.get(level) is not subs:   # woken while subscribing (or failed): not needed
            await self._unsubscribe(subs)
        self._kick()

    def _bell_for(self, level: int) -> Callable[[Msg], Awaitable[None]]:
        async def ring(_msg: Msg) -> None:
            if level in self._bells and self._running:
                self._rings[level] += 1
                self._last_ring[level] = time.monotonic()
                self._wake(level)
        return ring

    def _wake_empty(self) -> None:
        """Look again at every level found empty: a bell may have been missed, or never rung."""
        empty = [level for level in priority.LEVELS if not self.maybe[level]]
        if empty and self._running:
            self._look(empty)

    def _wake(self, level: int) -> None:
        self.maybe[level] = True
        # Forgotten at once (a level with work is not listened to): an answer coming meanwhile
        # must not take the level for still armed.
        subs = self._bells.pop(level, [])
        if subs:
            spawn(self._tasks, self._unsubscribe(subs))
        self._demand()
        self._kick()

    async def _unsubscribe(self, subs: list[Subscription]) -> None:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def requeued(self, reply: str, delay: float) -> None:
        """An invocation was handed back for redelivery in ``delay`` seconds: ring its level's bell then.

        Redeliveries are not stored anew, so FN does not republish them; every runtime
        listening for that level hears this bell instead. (Messages of a runtime that died
        are found by the periodic look in ``_housekeeping``.)
        """
        try:
            level = self.level_of(parse_ack(reply).consumer)
        except ValueError:
            return
        subject = priority.doorbell_subjects(self.function, level, self.default)[-1]

        def ring() -> None:
            if not self.nc.is_closed:
                spawn(self._tasks, self.nc.publish(subject, b""))
        asyncio.get_running_loop().call_later(max(0.0, delay) + REDELIVERY_SLACK, ring)

    def level_of(self, consumer: str) -> int:
        level = priority.split_consumer(consumer)[1]
        return self.default if level is None else level

