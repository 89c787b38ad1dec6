"""Run one invocation: decode → call under a timeout → settle (ack, retry later, or fail for good).

Whatever the handler does (raise ``SystemExit``, return something that cannot be encoded or
does not fit in a message, block the event loop past its deadline), the attempt ends in one
of the same three outcomes; nothing a handler does may stop the runtime.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import Executor as ThreadExecutor
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from . import codec
from . import headers as H
from .context import Context
from .deadletter import dead_letter_headers, record_error, write_dead_letter
from .errors import (
    FunctionError,
    InvalidInput,
    InvocationError,
    InvocationTimeout,
    Reject,
    Rejected,
    ResultTooLarge,
    Retry,
)
from .invocation import Invocation
from .loader import Handler
from .manifest import FunctionManifest
from .outbox import Outbox
from .protocol import ACK, NAK, nak_after, term
from .results import Response
from .wire import clip

log = logging.getLogger("runtime.executor")

MAX_ERROR = 4096   # characters of an error message kept in outcomes and dead letters


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, on one line and bounded (it travels in headers)."""
    text = clip(str(exc), MAX_ERROR)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _validation_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            parts = [f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in errors()]
            return clip("; ".join(parts), MAX_ERROR)
        except Exception:
            pass
    return describe(exc)


class _Late(Exception):
    """The handler returned after its deadline (it kept the event loop from enforcing it)."""


class Executor:
    """Runs invocations of one function with its current manifest and handler."""

    def __init__(self, nc: NATS, js: JetStreamContext, manifest: FunctionManifest, handler: Handler,
                 threads: ThreadExecutor | None, outbox: Outbox) -> None:
        self.nc = nc
        self.js = js
        self.manifest = manifest
        self.handler = handler
        self.threads = threads
        self.outbox = outbox
        self.logger = logging.getLogger(f"runtime.fn.{manifest.name}")
        # Running attempts and their deadlines. One watchdog enforces them all: cheaper than
        # a timer per invocation on the hot path. It sleeps until the earliest deadline and is
        # woken only when an earlier one arrives.
        self._deadlines: dict[asyncio.Task[Any], tuple[float, Invocation]] = {}
        self._next_check = float("inf")
        self.wake = asyncio.Event()
        self.late = 0

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
        manifest, handler = self.manifest, self.handler
        try:
            event = handler.decoder.decode(inv.msg.data, inv.content_type)
        except Exception as exc:
            error = InvalidInput(_validation_message(exc), type=type(exc).__name__, call_id=inv.call_id)
            await self.fail_for_good(inv, "invalid_input", error)
            return
        task = asyncio.current_task()
        assert task is not None
        started = time.monotonic()
        deadline = started + manifest.timeout
        self._watch(task, deadline, inv)
        try:
            try:
                result = await self._call(handler, inv, manifest, event, deadline)
            finally:
                self._deadlines.pop(task, None)
            if time.monotonic() > deadline:
                raise _Late
            body = self._encode(result, manifest, inv)
        except Retry as exc:
            await self._failed_attempt(inv, manifest, FunctionError(exc.reason, type="Retry"), exc.delay)
        except Reject as exc:
            await self.fail_for_good(inv, "rejected", Rejected(exc.reason, type="Reject"))
        except asyncio.CancelledError:
            if not inv.timed_out:
                # Shut down before the attempt finished: hand it back for another runtime at once.
                await self.nc.publish(inv.msg.reply, NAK)
                raise
            task.uncancel()
            message = f"attempt exceeded the timeout of {manifest.timeout:g}s"
            await self._failed_attempt(inv, manifest, InvocationTimeout(message, type="InvocationTimeout"))
        except _Late:
            self.late += 1
            took = time.monotonic() - started
            message = (f"attempt took {took:.1f}s, past the timeout of {manifest.timeout:g}s, without yielding "
                       f"to the event loop (a blocking call in an async handler?)")
            await self._failed_attempt(inv, manifest, InvocationTimeout(message, type="InvocationTimeout"))
        except InvocationError as exc:   # raised by the runtime itself, e.g. a result too large
            await self._failed_attempt(inv, manifest, exc)
        except BaseException as exc:  # SystemExit and the like from a handler fail the attempt, never the runtime
            await self._failed_attempt(inv, manifest, FunctionError(describe(exc), type=type(exc).__name__))
        else:
            await self._succeed(inv, manifest, body)

    async def _call(self, handler: Handler, inv: Invocation, manifest: FunctionManifest, event: Any,
                    deadline: float) -> Any:
        args = (event, self._context(inv, manifest, deadline)) if handler.takes_ctx else (event,)
        if handler.is_async:
            return await handler.func(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.threads, functools.partial(handler.func, *args))

    def _encode(self, result: Any, manifest: FunctionManifest, inv: Invocation) -> bytes:
        """The result as a message body; a result that cannot be sent fails the attempt with the reason."""
        try:
            body = codec.encode(result, manifest.encoding)
        except Exception as exc:
            raise FunctionError(f"the result cannot be encoded as {manifest.encoding}: {describe(exc)}",
                                type=type(exc).__name__, call_id=inv.call_id) from None
        room = self.outbox.limits.room_for_body(self._success_headers(inv, manifest))
        if len(body) > room:
            raise ResultTooLarge(f"the result is {len(body)} bytes; at most {room} fit in a message "
                                 f"(the server's max_payload is {self.outbox.limits.max_payload})",
                                 call_id=inv.call_id)
        return body

    @staticmethod
    def _success_headers(inv: Invocation, manifest: FunctionManifest) -> dict[str, str]:
        # What Response.success and the store add, plus the write-once header.
        return {H.CALL_ID: inv.call_id, H.CONTENT_TYPE: codec.CONTENT_TYPES[manifest.encoding],
                H.EXPECTED_LAST_SUBJECT_SEQ: "18446744073709551615"}

    async def _succeed(self, inv: Invocation, manifest: FunctionManifest, body: bytes) -> None:
        response = Response.success(inv.call_id, body, codec.CONTENT_TYPES[manifest.encoding])
        await self.outbox.answer(inv.reply_to, response)
        if manifest.store_results:
            # Acked only once the outcome is kept: a full store delays the ack, it never loses a result.
            await self.outbox.store_then_ack(response, inv.msg.reply)
        else:
            await self.nc.publish(inv.msg.reply, ACK)

    def _context(self, inv: Invocation, manifest: FunctionManifest, deadline: float) -> Context:
        scheduled = inv.headers.get(H.SCHEDULED_AT)
        scheduled_at = None
        if scheduled:
            try:
                scheduled_at = datetime.fromisoformat(scheduled.replace("Z", "+00:00"))
            except ValueError:
                scheduled_at = None
        logger = logging.LoggerAdapter(self.logger, {"call_id": inv.call_id, "attempt": inv.delivered})
        return Context(function=manifest.name, call_id=inv.call_id, attempt=inv.delivered,
                       max_attempts=manifest.retry.max_deliver, deadline=deadline, subject=inv.msg.subject,
                       stream_seq=inv.stream_seq, headers=inv.headers, logger=logger, nc=self.nc,
                       js=self.js, scheduled_at=scheduled_at, schedule=inv.headers.get(H.SCHEDULE),
                       limits=self.outbox.limits)

    async def _failed_attempt(self, inv: Invocation, manifest: FunctionManifest, error: InvocationError,
                              delay: float | None = None) -> None:
        if inv.delivered >= manifest.retry.max_deliver:
            reason = "timeout" if isinstance(error, InvocationTimeout) else "max_deliver"
            await self.fail_for_good(inv, reason, error)
            return
        if delay is None:
            delay = manifest.retry.delay_before(inv.delivered + 1)
        self.logger.warning("attempt %d/%d of %s failed, retrying in %gs: %s", inv.delivered,
                            manifest.retry.max_deliver, inv.call_id, delay, error.message)
        await record_error(self.nc, inv.stream_seq, inv.delivered, error.described)
        await self.nc.publish(inv.msg.reply, nak_after(delay))

    async def fail_for_good(self, inv: Invocation, reason: str, error: InvocationError) -> None:
        """Dead-letter the message, tell the caller, then terminate it with the reason.

        A dead letter JetStream cannot take yet (a full store) is retried while the message is
        held, so the message never runs out of deliveries waiting for room.
        """
        error.call_id = inv.call_id
        described = error.described
        self.logger.warning("%s failed for good after %d attempt(s) (%s): %s", inv.call_id, inv.delivered,
                            reason, described)
        dead = dead_letter_headers(inv.headers, function=self.manifest.name, subject=inv.msg.subject,
                                   seq=inv.stream_seq, deliveries=inv.delivered, reason=reason,
                                   error=described, call_id=inv.call_id)
        max_payload = self.outbox.limits.max_payload
        await self.outbox.persist(
            f"dead letter of call {inv.call_id}",
            lambda: write_dead_letter(self.js, self.manifest.name, inv.msg.data, dead, max_payload=max_payload))
        await self.outbox.deliver(Response.failure(inv.call_id, error), inv.reply_to,
                                  self.manifest.store_results or bool(inv.reply_to))
        await self.nc.publish(inv.msg.reply, term(reason))
