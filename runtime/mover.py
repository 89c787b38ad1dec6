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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError, ServerError

from . import headers as H
from .deadletter import REASONS, WORKER_LOST, dead_letter_headers, last_error, write_dead_letter
from .errors import FunctionError, InvalidInput, InvocationError, InvocationTimeout, Rejected
from .results import Response, publish_response
from .streams import DLQ_STREAM, EVENTS_STREAM, INVOKE_STREAM

log = logging.getLogger("runtime.mover")

MOVER_CONSUMER = "dlq-mover"
MAX_DELIVERIES = "io.nats.jetstream.advisory.v1.max_deliver"
TERMINATED = "io.nats.jetstream.advisory.v1.terminated"
_NO_MESSAGE = 10057  # JetStream's "no message found" on delete
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z$")


@dataclass(frozen=True, slots=True)
class Advisory:
    """What an ``FN`` consumer advisory says about one message."""

    type: str
    function: str       # the consumer, named after its function
    stream_seq: int
    deliveries: int
    reason: str = ""    # the ``+TERM`` reason, for terminations
    timestamp: str = ""  # when JetStream gave up on the message, as Fn-Failed-At spells it

    @classmethod
    def parse(cls, data: bytes) -> Advisory | None:
        """The advisory in ``data``, or None if it is not one the mover acts on."""
        try:
            raw: dict[str, Any] = json.loads(data)
            if raw.get("type") not in (MAX_DELIVERIES, TERMINATED) or raw.get("stream") != INVOKE_STREAM:
                return None
            return cls(type=str(raw["type"]), function=str(raw["consumer"]), stream_seq=int(raw["stream_seq"]),
                       deliveries=int(raw.get("deliveries") or 1), reason=str(raw.get("reason") or ""),
                       timestamp=_milliseconds(str(raw.get("timestamp") or "")))
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def dead_letter_reason(self) -> str:
        if self.type == MAX_DELIVERIES:
            return "max_deliver"
        return self.reason if self.reason in REASONS else "rejected"


def _milliseconds(timestamp: str) -> str:
    """``timestamp`` (RFC 3339 UTC, nanoseconds) cut to milliseconds; empty if it is not one."""
    match = _TIMESTAMP.match(timestamp)
    if not match:
        return ""
    return f"{match.group(1)}.{(match.group(2) or '').ljust(3, '0')[:3]}Z"


def failure_of(reason: str, error: str) -> InvocationError:
    """The caller's error for a dead letter's ``Fn-Reason`` and ``Fn-Error``, as the executor reports it."""
    type_, sep, message = error.partition(": ")
    if not sep or not type_.isidentifier():
        type_, message = "", error
    if error.startswith("worker lost"):
        return FunctionError(error, type="worker_lost")
    if reason == "timeout" or type_ == "InvocationTimeout":
        return InvocationTimeout(message, type=type_ or None)
    if reason == "invalid_input":
        return InvalidInput(message, type=type_ or None)
    if reason == "rejected":
        return Rejected(message, type=type_ or None)
    return FunctionError(error, type=type_ or None)


class DeadLetterMover:
    """Handles ``FN_EVENTS`` advisories on the shared ``dlq-mover`` consumer until stopped."""

    def __init__(self, nc: NATS, js: JetStreamContext, *, store_results: Callable[[str], bool] = lambda _: True,
                 batch: int = 128, ack_wait: float = 30.0) -> None:
        self.nc = nc
        self.js = js
        self.store_results = store_results
        self.batch = batch
        self.ack_wait = ack_wait
        self.moved = 0
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self._busy = False

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
        self._task = asyncio.create_task(self._run(), name="dlq-mover")

    async def stop(self) -> None:
        """Stop fetching; a batch being moved may finish, a half-moved one is finished by the next mover."""
        self._running = False
        if self._task is not None:
            if not self._busy:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 10)
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
                msgs = await self._sub.fetch(self.batch, timeout=5)
            except NatsTimeout:
                continue
            except Exception as exc:  # disconnected or the stream is being recreated: try again soon
                log.warning("fetching advisories failed: %s", exc)
                await asyncio.sleep(1)
                continue
            self._busy = True
            try:
                await asyncio.gather(*(self._settle(m) for m in msgs))
            finally:
                self._busy = False

    async def _settle(self, msg: Msg) -> None:
        advisory = Advisory.parse(msg.data)
        try:
            if advisory is not None:
                await self.move(advisory)
        except Exception as exc:
            log.warning("could not move message %s of %s; trying again: %s", advisory and advisory.stream_seq,
                        advisory and advisory.function, exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=2)
            return
        await msg.ack()

    async def move(self, advisory: Advisory) -> bool:
        """Dead-letter the message ``advisory`` names; False if it is no longer in ``FN``."""
        seq = advisory.stream_seq
        try:
            original = await self.js.get_msg(INVOKE_STREAM, seq)
        except NotFoundError:
            return False
        hdrs = dict(original.headers or {})
        call_id = hdrs.get(H.CALL_ID) or hdrs.get(H.MSG_ID) or f"{INVOKE_STREAM.lower()}-{seq}"
        error = await last_error(self.js, seq, advisory.deliveries)
        dead = dead_letter_headers(hdrs, function=advisory.function, subject=original.subject or "", seq=seq,
                                   deliveries=advisory.deliveries, reason=advisory.dead_letter_reason,
                                   error=error, call_id=call_id)
        if advisory.timestamp:
            dead[H.FAILED_AT] = advisory.timestamp
        dlq_seq = await write_dead_letter(self.js, advisory.function, original.data or b"", dead)
        # A repeated write returns the dead letter stored first; the caller hears what it says.
        stored = await self.js.get_msg(DLQ_STREAM, dlq_seq)
        stored_hdrs = stored.headers or {}
        failure = failure_of(stored_hdrs.get(H.REASON, advisory.dead_letter_reason),
                             stored_hdrs.get(H.ERROR, WORKER_LOST))
        reply_to = hdrs.get(H.REPLY_TO) or None
        store = self.store_results(advisory.function) or bool(reply_to)
        if reply_to or store:
            await publish_response(self.nc, Response.failure(call_id, failure), reply_to, store)
            await self.nc.flush()
        try:
            await self.js.delete_msg(INVOKE_STREAM, seq)
        except ServerError as exc:
            if exc.err_code != _NO_MESSAGE:  # gone meanwhile: moved by another mover
                raise
        self.moved += 1
        log.warning("dead-lettered message %d of %s after %d deliveries: %s", seq, advisory.function,
                    advisory.deliveries, stored_hdrs.get(H.ERROR, error))
        return True
