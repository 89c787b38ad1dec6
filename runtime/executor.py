"""Run one invocation: decode → call under a timeout → carry out the policy's decision.

Whatever the handler does (raise ``SystemExit``, return something that cannot be encoded or
does not fit in a message, block the event loop past its deadline), the attempt ends in one
of the three decisions of :mod:`runtime.policy`; nothing a handler does may stop the runtime.
This module does the I/O: acks, negative acks with a delay, dead letters and answers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor as ThreadExecutor
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from . import cache, codec, expiry
from . import headers as H
from .context import Context
from .deadletter import dead_letter_headers, failure_of, last_error, record_error, write_dead_letter
from .errors import InvocationError
from .invocation import Invocation
from .loader import Handler
from .logs import InvocationLogger, fields
from .manifest import FunctionManifest
from .outbox import Outbox
from .policy import Ack, AttemptEnd, DeadLetter, Overran, RetryAfter, Undecodable, decide, encode_result
from .protocol import ACK, NAK, nak_after, term
from .ratelimit import RateLimiter
from .results import Response, caller_holds_id, should_store
from .stats import FunctionStats, outcome_of
from .wire import ReplyPolicy, WireLimits

log = logging.getLogger("runtime.executor")


class Executor:
    """Runs invocations of one function with its current manifest and handler."""

    def __init__(self, nc: NATS, js: JetStreamContext, manifest: FunctionManifest, handler: Handler,
                 threads: ThreadExecutor | None, outbox: Outbox, stats: FunctionStats | None = None) -> None:
        self.nc = nc
        self.js = js
        self.manifest = manifest
        self.handler = handler
        self.threads = threads
        self.outbox = outbox
        self.pub = outbox.pub   # one per connection
        self.logger = logging.getLogger(f"runtime.fn.{manifest.name}")
        # Running attempts and their deadlines. One watchdog enforces them all: cheaper than
        # a timer per invocation on the hot path. It sleeps until the earliest deadline and is
        # woken only when an earlier one arrives.
        self._deadlines: dict[asyncio.Task[Any], tuple[float, Invocation]] = {}
        self._next_check = float("inf")
        self.wake = asyncio.Event()
        self.late = 0
        self.stats = FunctionStats() if stats is None else stats   # read by the metrics and the status
        # Told of every message handed back for redelivery, and after how many seconds.
        self.requeued: Callable[[Invocation, float], None] = lambda inv, delay: None
        self.limiter = RateLimiter(js, manifest.name)   # used only with a rate_limit

    def expire(self) -> float | None:
        """Cancel attempts past their deadline; seconds until the next deadline (None: none pending)."""
        now = time.monotonic()
        upcoming = float("inf")
        for task, (deadline, inv) in list(self._deadlines.items()):
            if now >= deadline and not inv.timed_out:
                inv.timed_out = True
                del self._deadlines[task]
                task.cancel()
            elif deadline < upcoming:
                upcoming = deadline
        self._next_check = upcoming
        return None if upcoming == float("inf") else max(0.0, upcoming - now)

    def _watch(self, task: asyncio.Task[Any], deadline: float, inv: Invocation) -> None:
        self._deadlines[task] = (deadline, inv)
        if deadline < self._next_check:
            self._next_check = deadline
            self.wake.set()

    async def run(self, inv: Invocation) -> None:
        # One snapshot for the whole attempt: a deploy meanwhile applies to later invocations.
        manifest, handler = self.manifest, self.handler
        stale = expiry.check(inv, manifest)
        if stale is not None:
            # Past its TTL (or with one that cannot be read): never run, dead-lettered like any failure.
            refused = decide(stale, inv.delivered, manifest)
            assert isinstance(refused, DeadLetter)
            self.stats.record(outcome_of(refused), None, inv.delivered)
            await self.fail_for_good(inv, refused.reason, refused.error, manifest)
            return
        if inv.delivered > manifest.retry.max_deliver:
            await self._exhausted(inv, manifest)
            return
        if manifest.cache is not None and (hit := await cache.answer(self.js, manifest, inv, handler.code)) is not None:
            self.stats.record(outcome_of(Ack()), None, inv.delivered)
            await self._succeed(inv, manifest, hit.body, hit)
            return
        task = asyncio.current_task()
        assert task is not None
        started = time.monotonic()
        try:
            if manifest.rate_limit is not None:   # wait for the fleet's permit; the message stays held
                started += await self.limiter.acquire(manifest)
            outcome, body = await attempt(inv, manifest, handler, lambda deadline: self._watch(task, deadline, inv),
                                          self.nc, self.js, self.outbox.limits, self.threads,
                                          self.outbox.replies)
        except asyncio.CancelledError:
            # Shut down before the attempt finished: hand it back for another runtime at once. With
            # the connection gone it cannot be, and is redelivered once its ack wait runs out: the
            # cancellation must go on all the same (the shutdown waits for it).
            try:
                await self.nc.publish(inv.msg.reply, NAK)
            except Exception:
                log.debug("could not hand back %s: the connection is gone", inv.call_id)
            else:
                self.requeued(inv, 0.0)
            raise
        finally:
            self._deadlines.pop(task, None)
        if isinstance(outcome, Overran) and outcome.took is not None:
            self.late += 1
        # The policy decides; what follows only carries the decision out.
        decision = decide(outcome, inv.delivered, manifest)
        self.stats.record(outcome_of(decision), started, inv.delivered)
        if isinstance(decision, Ack):
            if manifest.cache is not None:
                await cache.keep(self.js, manifest, inv, body, handler.code)
            await self._succeed(inv, manifest, body)
        elif isinstance(decision, RetryAfter):
            await self._retry(inv, manifest, decision)
        else:
            await self.fail_for_good(inv, decision.reason, decision.error, manifest)

    async def _exhausted(self, inv: Invocation, manifest: FunctionManifest) -> None:
        """A delivery past the last attempt: the runtime that ran that attempt ended before settling it.

        A trigger's consumer delivers an event once more than ``max_deliver`` for this (see
        ``triggers.trigger_consumer_config``), so that a live runtime dead-letters it instead of
        the server's advisory, which is not kept for a stream of the user's own (nor when the store
        is full). The delivery is not an attempt: the dead letter counts ``max_deliver`` of them,
        and names the last one's error, or ``worker lost``.
        """
        attempts = manifest.retry.max_deliver
        recorded = await last_error(self.js, inv.error_key, attempts)   # as the mover would name it
        error = failure_of("max_deliver", recorded)
        inv.delivered = attempts
        self.stats.record(outcome_of(DeadLetter("max_deliver", error)), None, attempts)
        await self.fail_for_good(inv, "max_deliver", error, manifest, described=recorded)

    async def _succeed(self, inv: Invocation, manifest: FunctionManifest, body: bytes,
                       response: Response | None = None) -> None:
        if manifest.output is not None:
            await self._emit(inv, manifest, manifest.output, body)
        reply_to = inv.reply_to
        store = should_store(manifest, inv)
        if reply_to or store:   # a call nobody waits on is acked without building its response
            response = response or Response.success(inv.call_id, body, codec.CONTENT_TYPES[manifest.encoding])
            watched = store and inv.watches_outcome   # the write itself answers the caller
            if reply_to and not watched:
                await self.outbox.answer(reply_to, response)
            if store:
                # Acked only once the outcome is kept (a full store delays the ack, it never loses a
                # result), unless nobody holds the call's id: then the write just goes ahead of the ack.
                await self.outbox.store_then_ack(response, inv.msg.reply, confirm=caller_holds_id(inv),
                                                 at_once=watched)
                return
        if not self.pub.try_publish(inv.msg.reply, ACK):
            await self.pub.publish(inv.msg.reply, ACK)

    async def _retry(self, inv: Invocation, manifest: FunctionManifest, decision: RetryAfter) -> None:
        self.logger.warning("attempt %d/%d of %s failed, retrying in %gs: %s", inv.delivered,
                            manifest.retry.max_deliver, inv.call_id, decision.delay, decision.error.message,
                            extra=fields(inv))
        await record_error(self.nc, inv.error_key, inv.delivered, decision.error.described)
        await self.pub.publish(inv.msg.reply, nak_after(decision.delay))
        self.requeued(inv, decision.delay)

    async def _emit(self, inv: Invocation, manifest: FunctionManifest, subject: str, body: bytes) -> None:
        """Publish the result as an event on the manifest's ``output`` subject, before the call is acked.

        Its ``Nats-Msg-Id`` is made of the call id, so the event of a call run again (a retry, a
        redelivery after a crash) is stored once by a stream that captures the subject. With no
        stream there, it goes out as a plain NATS message for whoever subscribes.
        """
        headers = {H.CALL_ID: inv.call_id, H.FUNCTION: manifest.name, H.MSG_ID: f"out:{manifest.name}:{inv.call_id}",
                   H.CONTENT_TYPE: codec.CONTENT_TYPES[manifest.encoding]}

        async def publish() -> None:
            try:
                await self.js.publish(subject, body, headers=headers)
            except NoStreamResponseError:
                await self.nc.publish(subject, body, headers=headers)

        await self.outbox.persist(f"output of call {inv.call_id} to {subject}", publish)

    async def fail_for_good(self, inv: Invocation, reason: str, error: InvocationError,
                            manifest: FunctionManifest | None = None, described: str | None = None) -> None:
        """Dead-letter the message, tell the caller, then terminate it with the reason.

        ``manifest`` is the one the attempt ran with (default: the current one); ``described``
        the dead letter's ``Fn-Error`` (default: the error, described). A dead letter JetStream
        cannot take yet (a full store) is retried while the message is held, so the message never
        runs out of deliveries waiting for room.
        """
        manifest = manifest or self.manifest
        error.call_id = inv.call_id
        described = described or error.described
        self.logger.warning("%s failed for good after %d attempt(s) (%s): %s", inv.call_id, inv.delivered,
                            reason, described, extra=fields(inv))
        dead = dead_letter_headers(inv.headers, function=manifest.name, subject=inv.msg.subject,
                                   seq=inv.stream_seq, deliveries=inv.delivered, reason=reason,
                                   error=described, call_id=inv.call_id, stream=inv.stream,
                                   trigger=inv.trigger)
        max_payload = self.outbox.limits.max_payload
        await self.outbox.persist(
            f"dead letter of call {inv.call_id}",
            lambda: write_dead_letter(self.js, manifest.name, inv.msg.data, dead, max_payload=max_payload))
        await self.outbox.deliver(Response.failure(inv.call_id, error), inv.reply_to,
                                  should_store(manifest, inv) or bool(inv.reply_to), watched=inv.watches_outcome)
        if H.ENDPOINT in inv.headers:
            self.outbox.endpoint_failed(manifest.name, error)
        await self.pub.publish(inv.msg.reply, term(reason))


async def attempt(inv: Invocation, manifest: FunctionManifest, handler: Handler, watch: Callable[[float], None],
                  nc: NATS, js: JetStreamContext, limits: WireLimits,
                  threads: ThreadExecutor | None, replies: ReplyPolicy | None = None) -> tuple[AttemptEnd, bytes]:
    """Decode the input, call the handler with it and encode its result.

    Returns what the attempt came to (for :func:`runtime.policy.decide`) and the result's body.
    ``watch(deadline)`` is told the attempt's deadline (a ``time.monotonic()`` instant) once the
    handler is about to run; whoever enforces it sets ``inv.timed_out`` and cancels the task.
    Any other cancellation (a shutdown) propagates.
    """
    try:
        event = handler.decoder.decode(inv.msg.data, inv.content_type)
    except Exception as exc:
        return Undecodable(exc), b""
    started = time.monotonic()
    deadline = started + manifest.timeout
    watch(deadline)
    try:
        args = (event, make_context(inv, manifest, deadline, nc, js, limits, replies)) if handler.takes_ctx \
            else (event,)
        if handler.is_async:
            result = await handler.func(*args)
        else:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(threads, functools.partial(handler.func, *args))
        took = time.monotonic() - started
        if took > manifest.timeout:
            return Overran(manifest.timeout, took), b""
        return None, encode_result(result, manifest, inv.call_id, limits)
    except asyncio.CancelledError:
        if not inv.timed_out:
            raise
        task = asyncio.current_task()
        assert task is not None
        task.uncancel()
        return Overran(manifest.timeout), b""
    except BaseException as exc:  # SystemExit and the like from a handler fail the attempt, never the runtime
        return exc, b""


def make_context(inv: Invocation, manifest: FunctionManifest, deadline: float, nc: NATS, js: JetStreamContext,
                 limits: WireLimits, replies: ReplyPolicy | None = None) -> Context:
    """The ``ctx`` a handler gets for one attempt."""
    scheduled = inv.headers.get(H.SCHEDULED_AT)
    scheduled_at = None
    if scheduled:
        try:
            scheduled_at = datetime.fromisoformat(scheduled.replace("Z", "+00:00"))
        except ValueError:
            scheduled_at = None
    logger = InvocationLogger(logging.getLogger(f"runtime.fn.{manifest.name}"), inv)
    return Context(function=manifest.name, call_id=inv.call_id, attempt=inv.delivered,
                   max_attempts=manifest.retry.max_deliver, deadline=deadline, subject=inv.subject,
                   stream_seq=inv.stream_seq, headers=inv.headers, logger=logger, nc=nc, js=js, trigger=inv.trigger,
                   scheduled_at=scheduled_at, schedule=inv.headers.get(H.SCHEDULE), limits=limits,
                   progress_to=progress_subject(inv.headers.get(H.PROGRESS_TO), replies))


def progress_subject(subject: str | None, replies: ReplyPolicy | None) -> str | None:
    """Where progress updates may go: the caller's subject, if the runtime may answer there."""
    if not subject or replies is None or replies.problem(subject) is not None:
        return None
    return subject
