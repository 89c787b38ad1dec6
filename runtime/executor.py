"""Run one invocation: decode → call under a timeout → settle (ack, retry later, or fail for good)."""

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
    Retry,
)
from .invocation import Invocation
from .loader import Handler
from .manifest import FunctionManifest
from .results import Response, publish_response

log = logging.getLogger("runtime.executor")

ACK = b"+ACK"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _validation_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            parts = [f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in errors()]
            return "; ".join(parts)
        except Exception:
            pass
    return _describe(exc)


class Executor:
    """Runs invocations of one function with its current manifest and handler."""

    def __init__(self, nc: NATS, js: JetStreamContext, manifest: FunctionManifest, handler: Handler,
                 threads: ThreadExecutor | None) -> None:
        self.nc = nc
        self.js = js
        self.manifest = manifest
        self.handler = handler
        self.threads = threads
        self.logger = logging.getLogger(f"runtime.fn.{manifest.name}")
        # Running attempts and their deadlines. One watchdog enforces them all: cheaper than
        # a timer per invocation on the hot path.
        self._deadlines: dict[asyncio.Task[Any], tuple[float, Invocation]] = {}

    def expire(self) -> float:
        """Cancel attempts past their deadline; returns seconds until the next deadline check."""
        now = time.monotonic()
        for task, (deadline, inv) in list(self._deadlines.items()):
            if now >= deadline and not inv.timed_out:
                inv.timed_out = True
                del self._deadlines[task]
                task.cancel()
        return min(0.05, self.manifest.timeout / 10)

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
        self._deadlines[task] = (time.monotonic() + manifest.timeout, inv)
        try:
            try:
                result = await self._call(handler, inv, manifest, event)
            finally:
                self._deadlines.pop(task, None)
        except Retry as exc:
            await self._failed_attempt(inv, manifest, FunctionError(exc.reason, type="Retry"), exc.delay)
        except Reject as exc:
            await self.fail_for_good(inv, "rejected", Rejected(exc.reason, type="Reject"))
        except asyncio.CancelledError:
            if not inv.timed_out:
                # Shut down before the attempt finished: hand it back for another runtime at once.
                await self.nc.publish(inv.msg.reply, b"-NAK")
                raise
            task.uncancel()
            message = f"attempt exceeded the timeout of {manifest.timeout:g}s"
            await self._failed_attempt(inv, manifest, InvocationTimeout(message, type="InvocationTimeout"))
        except Exception as exc:
            await self._failed_attempt(inv, manifest, FunctionError(_describe(exc), type=type(exc).__name__))
        else:
            body = codec.encode(result, manifest.encoding)
            response = Response.success(inv.call_id, body, codec.CONTENT_TYPES[manifest.encoding])
            await publish_response(self.nc, response, inv.reply_to, manifest.store_results)
            await self.nc.publish(inv.msg.reply, ACK)

    async def _call(self, handler: Handler, inv: Invocation, manifest: FunctionManifest, event: Any) -> Any:
        args = (event, self._context(inv, manifest)) if handler.takes_ctx else (event,)
        if handler.is_async:
            return await handler.func(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.threads, functools.partial(handler.func, *args))

    def _context(self, inv: Invocation, manifest: FunctionManifest) -> Context:
        scheduled = inv.headers.get(H.SCHEDULED_AT)
        scheduled_at = None
        if scheduled:
            try:
                scheduled_at = datetime.fromisoformat(scheduled.replace("Z", "+00:00"))
            except ValueError:
                scheduled_at = None
        logger = logging.LoggerAdapter(self.logger, {"call_id": inv.call_id, "attempt": inv.delivered})
        return Context(function=manifest.name, call_id=inv.call_id, attempt=inv.delivered,
                       max_attempts=manifest.retry.max_deliver,
                       deadline=time.monotonic() + manifest.timeout, subject=inv.msg.subject,
                       stream_seq=inv.stream_seq, headers=inv.headers, logger=logger, nc=self.nc,
                       js=self.js, scheduled_at=scheduled_at, schedule=inv.headers.get(H.SCHEDULE))

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
        nak = b"-NAK" if delay <= 0 else b'-NAK {"delay": %d}' % int(delay * 1e9)
        await self.nc.publish(inv.msg.reply, nak)

    async def fail_for_good(self, inv: Invocation, reason: str, error: InvocationError) -> None:
        """Dead-letter the message, tell the caller, then terminate it with the reason."""
        error.call_id = inv.call_id
        described = error.described
        self.logger.warning("%s failed for good after %d attempt(s) (%s): %s", inv.call_id, inv.delivered,
                            reason, described)
        dead = dead_letter_headers(inv.headers, function=self.manifest.name, subject=inv.msg.subject,
                                   seq=inv.stream_seq, deliveries=inv.delivered, reason=reason,
                                   error=described, call_id=inv.call_id)
        try:
            await write_dead_letter(self.js, self.manifest.name, inv.msg.data, dead)
        except Exception as exc:
            # Keep the message: once its deliveries run out, the advisory path moves it.
            log.error("could not write the dead letter of %s (%s); leaving it to the mover", inv.call_id, exc)
            await record_error(self.nc, inv.stream_seq, inv.delivered, described)
            await self.nc.publish(inv.msg.reply, b"-NAK")
            return
        await publish_response(self.nc, Response.failure(inv.call_id, error), inv.reply_to,
                               self.manifest.store_results or bool(inv.reply_to))
        await self.nc.publish(inv.msg.reply, b"+TERM " + reason.encode())
