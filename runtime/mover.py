"""The dead-letter mover: turns the stored consumer advisories of ``FN`` into dead letters.

JetStream reports a message that ran out of deliveries (``MAX_DELIVERIES``) or was
terminated (``MSG_TERMINATED``); ``FN_EVENTS`` keeps those advisories until a mover
handles them. Every runtime runs a mover on the same durable consumer, so each advisory
is handled once, and one that arrived while no runtime was up is handled when one starts.

Moving is idempotent, so a mover that dies half way leaves nothing a successor cannot
finish: fetch the original from ``FN`` → write the dead letter (deterministic
``Nats-Msg-Id``, so a second write is dropped) → tell the caller → delete the original →
ack the advisory. A message already gone from ``FN`` was terminated by a runtime that
wrote its dead letter itself, or was moved before: the advisory is just acknowledged.
A trigger's event that ran out of deliveries (on ``FN_TRIGGERS``, or on a stream of the user's
own whose advisories ``FN_EVENTS`` keeps: see ``streams.capture_advisories``) is moved the same
way, except that it stays in its stream for the other functions it triggers.

An advisory the server could not store (the store was full) is lost, and its message would
stay in ``FN`` for good, delivered no more. So the mover also sweeps ``FN`` (``sweep.py``), on
start-up and then every ``sweep_interval`` seconds, for such messages and moves them the same way.
Before each sweep it also checks that ``FN_EVENTS`` still keeps the advisories of the user's
streams that its runtime's triggers read (``keep_advisories``), and adds back those it lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, RawStreamMsg
from nats.js.errors import NotFoundError, ServerError

from . import headers as H
from .deadletter import REASONS, WORKER_LOST, dead_letter_headers, failure_of, last_error, write_dead_letter
from .invocation import error_key, event_call_id
from .logs import call_fields
from .outbox import Outbox
from .priority import function_of_consumer
from .protocol import ADVISORY_MAX_DELIVERIES, ADVISORY_TERMINATED, NO_MESSAGE_FOUND, fallback_call_id
from .results import Call, Response, should_store, watches_outcome
from .streams import DLQ_STREAM, EVENTS_STREAM, INVOKE_STREAM, capture_advisories, trigger_advisories
from .sweep import SWEEP_LIMIT, sweep_exhausted
from .triggers import parse_consumer
from .wire import call_id_for

log = logging.getLogger("runtime.mover")

MOVER_CONSUMER = "dlq-mover"
SWEEP_INTERVAL = 30.0
# A runtime that dies leaves its pull request for advisories behind, and the server may hand the
# next advisory to it: FETCH_WAIT bounds how long such a request lives, ACK_WAIT how long that
# advisory then waits before another mover gets it (a caller waits as long to hear its call failed).
# A batch being moved keeps its advisories held meanwhile (in-progress acks).
FETCH_WAIT = 2.0
ACK_WAIT = 5.0
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z$")


@dataclass(frozen=True, slots=True)
class Advisory:
    """What an ``FN`` consumer advisory says about one message."""

    type: str
    function: str       # the function whose consumer (one per priority level) gave up
    stream_seq: int
    deliveries: int
    reason: str = ""    # the ``+TERM`` reason, for terminations
    timestamp: str = ""  # when JetStream gave up on the message, as Fn-Failed-At spells it
    stream: str = INVOKE_STREAM
    trigger: str | None = None   # an event's: the trigger whose consumer gave up

    @classmethod
    def parse(cls, data: bytes) -> Advisory | None:
        """The advisory in ``data``, or None if it is not one the mover acts on."""
        try:
            raw: dict[str, Any] = json.loads(data)
            kind, stream, consumer = raw.get("type"), raw.get("stream"), str(raw["consumer"])
            trigger = None
            if (isinstance(stream, str) and stream and stream != INVOKE_STREAM and kind == ADVISORY_MAX_DELIVERIES
                    and parse_consumer(consumer)):
                # A trigger's consumer, on FN_TRIGGERS or on a stream of the user's own
                # (``FN_EVENTS`` keeps no other advisory of those streams that matters here).
                function, trigger = parse_consumer(consumer) or ("", "")
            elif kind in (ADVISORY_MAX_DELIVERIES, ADVISORY_TERMINATED) and stream == INVOKE_STREAM:
                function = function_of_consumer(consumer)
            else:
                return None
            return cls(type=str(kind), function=function, stream_seq=int(raw["stream_seq"]),
                       deliveries=int(raw.get("deliveries") or 1), reason=str(raw.get("reason") or ""),
                       timestamp=_milliseconds(str(raw.get("timestamp") or "")), stream=str(stream), trigger=trigger)
        except (ValueError, KeyError, TypeError, AttributeError):  # AttributeError: JSON that is not an object
            return None

    @property
    def dead_letter_reason(self) -> str:
        if self.type == ADVISORY_MAX_DELIVERIES:
            return "max_deliver"
        return self.reason if self.reason in REASONS else "rejected"


def _milliseconds(timestamp: str) -> str:
    """``timestamp`` (RFC 3339 UTC, nanoseconds) cut to milliseconds; empty if it is not one."""
    match = _TIMESTAMP.match(timestamp)
    if not match:
        return ""
    return f"{match.group(1)}.{(match.group(2) or '').ljust(3, '0')[:3]}Z"


@dataclass(frozen=True, slots=True)
class _Event:
    """An event read back from its stream, for the store decision (an ``Invocation.event`` there)."""

    headers: dict[str, str]
    event: bool = True


class DeadLetterMover:
    """Handles ``FN_EVENTS`` advisories on the shared ``dlq-mover`` consumer, and sweeps ``FN``, until stopped."""

    def __init__(self, nc: NATS, js: JetStreamContext, *,
                 store_results: Callable[[str, Call], bool] = lambda _, call: should_store(None, call),
                 attempts: Callable[[str], int | None] = lambda _: None,
                 user_streams: Callable[[], Iterable[str]] = lambda: (),
                 batch: int = 128, ack_wait: float = ACK_WAIT, sweep_interval: float = SWEEP_INTERVAL,
                 sweep_limit: int = SWEEP_LIMIT, outbox: Outbox | None = None) -> None:
        self.nc = nc
        self.js = js
        self.outbox = outbox or Outbox(nc, js)
        self.store_results = store_results
        self.attempts = attempts   # a function's retry.max_deliver, if known
        self.user_streams = user_streams   # the streams of the user's own that this runtime's triggers read
        self._uncovered: set[str] = set()   # of those, the ones whose advisories FN_EVENTS cannot keep
        self.batch = batch
        self.ack_wait = ack_wait
        self.sweep_interval = sweep_interval
        self.sweep_limit = sweep_limit
        self.moved = 0
        self.sweeps = 0   # sweeps completed
        self._sub: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._busy = False
        self._sweeping = False
        self._moving: set[int] = set()  # FN sequences this mover is moving now

    async def start(self) -> None:
        # Every runtime declares the same consumer; declaring an identical one is a no-op.
        await self.js.add_consumer(EVENTS_STREAM, ConsumerConfig(
            durable_name=MOVER_CONSUMER,
            description=f"moves failed {INVOKE_STREAM} messages to {DLQ_STREAM}",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            max_ack_pending=4 * self.batch,
        ))
        self._sub = await self.js.pull_subscribe_bind(durable=MOVER_CONSUMER, stream=EVENTS_STREAM)
        self._running = True
        self._tasks = [asyncio.create_task(self._run(), name="dlq-mover"),
                       asyncio.create_task(self._sweep_loop(), name="dlq-sweeper")]

    async def stop(self) -> None:
        """Stop fetching; a batch being moved may finish, a half-moved one is finished by the next mover."""
        self._running = False
        for task, busy in zip(self._tasks, (self._busy, self._sweeping), strict=True):
            if not busy:
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 10)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def __aenter__(self) -> DeadLetterMover:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        while self._running:
            try:
                msgs = await self._sub.fetch(self.batch, timeout=FETCH_WAIT)
            except NatsTimeout:
                continue
            except Exception as exc:  # disconnected or the stream is being recreated: try again soon
                log.warning("fetching advisories failed: %s", exc)
                await asyncio.sleep(1)
                continue
            self._busy = True
            holder = asyncio.get_running_loop().create_task(self._keep_held(msgs))
            try:
                await asyncio.gather(*(self._settle(m) for m in msgs))
            finally:
                holder.cancel()
                self._busy = False

    async def _keep_held(self, msgs: list[Msg]) -> None:
        """In-progress acks for ``msgs`` while they are moved (a full store can make that slow)."""
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            for msg in msgs:
                if not msg.is_acked:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    async def _settle(self, msg: Msg) -> None:
        advisory = Advisory.parse(msg.data)
        try:
            if advisory is not None:
                await self.move(advisory)
        except Exception as exc:
            log.warning("could not move message %s of %s; trying again: %s", advisory and advisory.stream_seq,
                        advisory and advisory.function, exc,
                        extra=call_fields(advisory.function, stream_seq=advisory.stream_seq) if advisory else None)
            with contextlib.suppress(Exception):
                await msg.nak(delay=2)
            return
        await msg.ack()

    # -------------------------------------------------------------- sweeping

    async def _sweep_loop(self) -> None:
        loop = asyncio.get_running_loop()
        waiting_since: float | None = None
        while self._running:
            handled = 0
            try:
                # Advisories in hand cover their messages; sweeping those too would tell their
                # callers twice. They get one interval to be handled, not more.
                if await self._advisories_waiting():
                    waiting_since = loop.time() if waiting_since is None else waiting_since
                    if loop.time() - waiting_since < self.sweep_interval:
                        await asyncio.sleep(min(1.0, self.sweep_interval))
                        continue
                waiting_since = None
                try:
                    await self.keep_advisories()
                except Exception as exc:   # disconnected: the next round looks again
                    log.warning("cannot check which advisories %s keeps: %s", EVENTS_STREAM, exc)
                self._sweeping = True
                try:
                    handled = await self.sweep()
                finally:
                    self._sweeping = False
                self.sweeps += 1
            except Exception as exc:  # disconnected, or FN is being recreated: the next sweep tries again
                log.warning("sweeping %s failed: %s", INVOKE_STREAM, exc)
            if self._running and handled < self.sweep_limit:
                await asyncio.sleep(self.sweep_interval)

    async def keep_advisories(self) -> list[str]:
        """Add back to ``FN_EVENTS`` the advisories of the user's trigger streams that it lost; the
        streams added back.

        Two runtimes adding subjects to ``FN_EVENTS`` at once can each overwrite the other's
        (JetStream updates a stream's whole configuration), and so can an operator's edit. A
        stream whose advisories cannot be kept (another stream captures them, no permission) is
        warned about once, by ``streams.capture_advisories``, and not tried again.
        """
        wanted = set(self.user_streams()) - self._uncovered
        if not wanted:
            return []
        kept = set((await self.js.stream_info(EVENTS_STREAM)).config.subjects or [])
        restored = []
        for stream in sorted(wanted):
            if trigger_advisories(stream) in kept:
                continue
            if await capture_advisories(self.js, stream):
                log.warning("%s no longer kept the advisories of stream %s's consumers (changed by someone "
                            "else meanwhile); added them back", EVENTS_STREAM, stream)
                restored.append(stream)
            else:
                self._uncovered.add(stream)
        return restored

    async def _advisories_waiting(self) -> bool:
        info = await self.js.consumer_info(EVENTS_STREAM, MOVER_CONSUMER)
        return bool(info.num_pending or info.num_ack_pending)

    async def sweep(self) -> int:
        """Move the messages of ``FN`` that ran out of deliveries with no advisory to say so.

        Returns how many it handled, at most ``sweep_limit``.
        """
        handled = await sweep_exhausted(self.js, self._move_exhausted, limit=self.sweep_limit,
                                        running=lambda: self._running)
        if handled:
            log.warning("swept %d message(s) of %s that ran out of deliveries with no advisory to say so",
                        handled, INVOKE_STREAM)
        return handled

    async def _move_exhausted(self, consumer: ConsumerInfo, original: RawStreamMsg) -> None:
        # What the lost advisory would have said.
        advisory = Advisory(type=ADVISORY_MAX_DELIVERIES, function=function_of_consumer(consumer.name),
                            stream_seq=original.seq or 0,
                            deliveries=consumer.config.max_deliver or 1)
        await self.move(advisory, original)

    # -------------------------------------------------------------- moving

    async def move(self, advisory: Advisory, original: RawStreamMsg | None = None) -> bool:
        """Dead-letter the message ``advisory`` names; True if this call removed it from ``FN``."""
        seq = advisory.stream_seq
        if seq in self._moving:
            return False  # the sweep and an advisory met: one move is enough
        self._moving.add(seq)
        try:
            return await self._move(advisory, original)
        finally:
            self._moving.discard(seq)

    async def _move(self, advisory: Advisory, original: RawStreamMsg | None) -> bool:
        seq = advisory.stream_seq
        event = advisory.stream != INVOKE_STREAM
        if original is None:
            try:
                original = await self.js.get_msg(advisory.stream, seq)
            except NotFoundError:
                return False
        hdrs = dict(original.headers or {})
        deliveries = advisory.deliveries
        if event:
            # The call id the runtime gave that event for that function (see Invocation.from_event).
            call_id = event_call_id(advisory.function, advisory.trigger or "", seq)
            # Its consumer delivers once more than the attempts (see triggers.trigger_consumer_config):
            # that delivery was never an attempt, so the dead letter counts the attempts.
            allowed = self.attempts(advisory.function)
            if allowed is not None:
                deliveries = min(deliveries, allowed)
        else:
            call_id = call_id_for(hdrs.get(H.CALL_ID) or hdrs.get(H.MSG_ID)) or fallback_call_id(INVOKE_STREAM, seq)
        error = await last_error(self.js, error_key(advisory.stream, seq, advisory.function), deliveries)
        dead = dead_letter_headers(hdrs, function=advisory.function, subject=original.subject or "", seq=seq,
                                   deliveries=deliveries, reason=advisory.dead_letter_reason,
                                   error=error, call_id=call_id, stream=advisory.stream, trigger=advisory.trigger)
        if advisory.timestamp:
            dead[H.FAILED_AT] = advisory.timestamp
        dlq_seq = await write_dead_letter(self.js, advisory.function, original.data or b"", dead,
                                          max_payload=self.nc.max_payload)
        # A repeated write returns the dead letter stored first; the caller hears what it says.
        stored = await self.js.get_msg(DLQ_STREAM, dlq_seq)
        stored_hdrs = stored.headers or {}
        failure = failure_of(stored_hdrs.get(H.REASON, advisory.dead_letter_reason),
                             stored_hdrs.get(H.ERROR, WORKER_LOST))
        reply_to = hdrs.get(H.REPLY_TO) or None
        # An event's own call id (see Invocation.from_event) is held by nobody: the store decision
        # reads it as the runtime does (results.caller_holds_id).
        call = _Event(hdrs) if event else original
        store = self.store_results(advisory.function, call) or bool(reply_to)
        if reply_to or store:
            # One attempt at storing: a refusal naks the advisory, which comes back in a moment.
            await self.outbox.deliver(Response.failure(call_id, failure), reply_to, store, patient=False,
                                      watched=watches_outcome(hdrs))
            await self.nc.flush()
        if event:
            # Other functions may still want the event: it stays, and goes once they have it (or its age).
            self.moved += 1
            log.warning("dead-lettered event %d of %s for %s after %d deliveries: %s", seq, advisory.stream,
                        advisory.function, deliveries, stored_hdrs.get(H.ERROR, error),
                        extra=call_fields(advisory.function, call_id, deliveries, seq))
            return True
        try:
            await self.js.delete_msg(INVOKE_STREAM, seq)
        except ServerError as exc:
            if exc.err_code != NO_MESSAGE_FOUND:
                raise
            return False  # gone meanwhile: moved by another mover
        self.moved += 1
        log.warning("dead-lettered message %d of %s after %d deliveries: %s", seq, advisory.function,
                    advisory.deliveries, stored_hdrs.get(H.ERROR, error),
                    extra=call_fields(advisory.function, call_id, advisory.deliveries, seq))
        return True
