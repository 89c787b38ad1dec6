"""Final outcomes leave the runtime here: answered to the caller, stored once by call id.

Three promises live in this module:

- the runtime answers only on reply subjects it may publish to (``wire.ReplyPolicy``), so a
  crafted ``Fn-Reply-To`` cannot make it act with its own rights;
- a call's stored outcome is written once (``Nats-Expected-Last-Subject-Sequence``): a later
  message reusing the call id cannot replace it; only a replay, which first clears the stored
  outcome, can;
- a write JetStream refuses for a passing reason (store full, no quorum, timeout) is retried
  with a growing delay while the invocation keeps its message, so nothing is acked before its
  outcome is kept and nothing burns its deliveries meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, MaxPayloadError, NoRespondersError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import APIError, BadRequestError, NotFoundError

from . import headers as H
from .errors import InvocationError
from .fastpub import Publisher
from .inbox import ReplyInbox
from .logs import call_fields
from .loop import spawn
from .protocol import ACK, IN_PROGRESS, WRONG_LAST_SEQUENCE, is_tombstone, kv_stream
from .results import Response, result_subject
from .streams import RESULTS_BUCKET
from .wire import ReplyPolicy, WireLimits

log = logging.getLogger("runtime.outbox")

T = TypeVar("T")

KEEP_HELD = 0.5     # seconds between in-progress acks while a store waits for room
ACK_TIMEOUT = 5.0   # seconds JetStream gets to acknowledge a write before it is tried again
RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)   # then the last one repeats
# Failures that retrying cannot fix: the connection is gone, or the request itself is wrong.
_PERMANENT = (ConnectionClosedError, MaxPayloadError, BadRequestError)
# Failures that pass: a full store (503), no JetStream quorum or responders, timeouts, reconnects.
_PASSING = (NatsError, TimeoutError, OSError)


def refusal(ack: Msg | None) -> Exception | None:
    """Why JetStream did not store a write, from its acknowledgement (None: no answer in time).

    None when it did store it; the common acknowledgement is not even parsed.
    """
    if ack is None:
        return NatsTimeoutError()
    if not ack.data:   # a status message: no stream took the subject
        return NoRespondersError()
    if b'"error"' in ack.data:
        try:
            APIError.from_error(json.loads(ack.data)["error"])   # raises the typed error
        except APIError as exc:
            return exc
    return None


def headers_at_most(headers: Mapping[str, str]) -> int:
    """An upper bound of ``wire.header_size(headers)`` (at most 4 bytes a character), cheaper to get."""
    return 12 + 4 * (sum(map(len, headers)) + sum(map(len, headers.values())) + len(headers))


def _written_once(response: Response, expected: str) -> dict[str, str]:
    """The headers that store ``response`` only if the call's last stored sequence is ``expected``."""
    return {**response.headers, H.EXPECTED_LAST_SUBJECT_SEQ: expected}


class Throttle:
    """Lets a log line through at most once per ``interval`` seconds per key; counts the rest."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self.suppressed = 0

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            self.suppressed += 1
            return False
        self._last[key] = now
        return True


class Outbox:
    """Answers callers and stores outcomes for one runtime connection."""

    def __init__(self, nc: NATS, js: JetStreamContext, replies: ReplyPolicy | None = None) -> None:
        self.nc = nc
        self.js = js
        self.pub = Publisher(nc)
        self.replies = replies or ReplyPolicy()
        self.limits = WireLimits(nc.max_payload)
        self.throttle = Throttle()
        self.refused_replies = 0
        self.kept_first = 0       # outcomes not stored because the call id already had one
        self.write_failures = 0   # writes JetStream refused and that were tried again
        # JetStream's acknowledgements of writes; a write not acknowledged in time is tried again.
        self.inbox = ReplyInbox(nc, tick=0.5, name="outbox-acks")
        self._start_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()   # stores waiting for room
        # Told of every final failure of a call that came through a micro endpoint (the gateway
        # counts it in that endpoint's STATS); None when this runtime serves no endpoints.
        self.on_endpoint_failure: Callable[[str, InvocationError], None] | None = None

    # ------------------------------------------------------------------ replies

    def reply_subject(self, subject: str | None, call_id: str = "") -> str | None:
        """``subject`` if the runtime may answer on it; None (with a warning) if not."""
        if not subject:
            return None
        problem = self.replies.problem(subject)
        if problem is None:
            return subject
        self.refused_replies += 1
        if self.throttle.allow("reply"):
            log.warning("not answering call %s on reply subject %r: %s (its outcome is still stored)",
                        call_id[:64], subject[:80], problem, extra=call_fields(call_id=call_id[:64] or None))
        return None

    def endpoint_failed(self, function: str, error: InvocationError) -> None:
        """A call of ``function`` that came through its micro endpoint failed for good."""
        if self.on_endpoint_failure is not None:
            self.on_endpoint_failure(function, error)

    async def answer(self, subject: str | None, response: Response) -> None:
        """Send ``response`` to the caller's reply subject, if it is one the runtime may use."""
        reply = self.reply_subject(subject, response.call_id)
        if reply is None:
            return
        # Measured exactly only near the limit (the reply policy keeps the subject short enough).
        if len(response.body) + headers_at_most(response.headers) > self.limits.max_payload and not self.limits.fits(
                reply, response.body, response.headers):
            if self.throttle.allow("answer-size"):
                log.warning("the answer to call %s does not fit a message; it is only stored", response.call_id,
                            extra=call_fields(call_id=response.call_id))
            return
        try:
            # On the wire before the store and ack that follow it: the caller waits for this one.
            await self.pub.publish(reply, response.body, headers=response.headers, at_once=True)
        except Exception as exc:  # the caller misses the answer; the outcome is still stored
            log.warning("could not answer call %s: %s", response.call_id, exc,
                        extra=call_fields(call_id=response.call_id))

    # ------------------------------------------------------------------ the result store

    async def store(self, response: Response, *, patient: bool = True) -> bool:
        """Keep ``response`` as the call's outcome unless one is stored; False if one was.

        ``patient``: retry until JetStream takes it (see ``persist``); otherwise one attempt.
        """
        subject = result_subject(response.call_id)
        expected = "0"
        while True:
            write = functools.partial(self.publish_acked, subject, response.body,
                                      _written_once(response, expected))
            try:
                if patient:
                    await self.persist(f"outcome of call {response.call_id}", write)
                else:
                    await write()
                return True
            except BadRequestError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
            # An outcome exists; a deleted or purged one (a replay cleared it) may be replaced.
            try:
                current = await self.js.get_msg(kv_stream(RESULTS_BUCKET), subject=subject, direct=True)
            except NotFoundError:
                expected = "0"   # expired meanwhile
                continue
            if is_tombstone(current.headers) and str(current.seq) != expected:
                expected = str(current.seq)
                continue
            self.kept_first += 1
            if self.throttle.allow("kept-first"):
                log.warning("call id %s already has a stored outcome; keeping the first one", response.call_id,
                            extra=call_fields(call_id=response.call_id))
            return False

    async def deliver(self, response: Response, reply_to: str | None, store: bool, *, patient: bool = True,
                      watched: bool = False) -> None:
        """Answer the caller at once, then keep the outcome (``patient``: waiting until JetStream has it).

        ``watched``: the caller subscribes to the outcome's subject in ``fn_results``
        (``headers.WATCHES_OUTCOME``), so the write of a stored outcome is its answer.
        """
        if not (store and watched):
            await self.answer(reply_to, response)
        if store:
            await self.store(response, patient=patient)

    # ------------------------------------------------------------------ acknowledged writes

    async def _acks(self) -> ReplyInbox:
        """The inbox JetStream acknowledges this outbox's writes on, started on first use."""
        if not self.inbox.started:
            async with self._start_lock:
                if not self.inbox.started:
                    await self.inbox.start()
        return self.inbox

    async def publish_acked(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        """Publish through JetStream and wait for its acknowledgement; raise what it refuses."""
        inbox = await self._acks()
        reply, waiter = inbox.expect(asyncio.get_running_loop().time() + ACK_TIMEOUT)
        try:
            await self.nc.publish(subject, body, reply=reply, headers=headers)
            ack = await waiter
        finally:
            inbox.forget(reply)
        problem = refusal(ack)
        if problem is not None:
            raise problem

    async def store_then_ack(self, response: Response, ack_subject: str, *, confirm: bool = True,
                             at_once: bool = False) -> None:
        """Store ``response`` and only then ack the invocation message on ``ack_subject``.

        The hot path waits for nothing: the acknowledgement of the store triggers the ack. A
        store JetStream refuses (full, timeout, an outcome already kept) continues in a task that
        keeps the message held (in-progress acks) until the outcome is kept.

        Without ``confirm`` (a call nobody holds the id of, see ``results.caller_holds_id``) the
        write goes out without asking JetStream to acknowledge it, followed by the ack: the server
        takes them in that order, so the outcome is stored before the message is gone unless the
        store refuses it, and then nobody was waiting for it.

        ``at_once``: the write goes on the wire now (see ``Publisher.publish``): it is the answer
        of a caller that watches the outcome's subject.
        """
        if not confirm:
            await self.pub.publish(result_subject(response.call_id), response.body,
                                   headers=_written_once(response, "0"))
            if not self.pub.try_publish(ack_subject, ACK):
                await self.pub.publish(ack_subject, ACK)
            return
        inbox = self.inbox if self.inbox.started else await self._acks()

        def stored(ack: Msg | None) -> None:
            if refusal(ack) is None:
                self.pub.publish_nowait(ack_subject, ACK)
            else:
                self._slow(response, ack_subject)

        reply = inbox.on_reply(asyncio.get_running_loop().time() + ACK_TIMEOUT, stored)
        try:
            await self.pub.publish(result_subject(response.call_id), response.body, reply=reply,
                                   headers=_written_once(response, "0"), at_once=at_once)
        except Exception:
            inbox.forget(reply)
            self._slow(response, ack_subject)

    def _slow(self, response: Response, ack_subject: str) -> None:
        spawn(self._tasks, self._store_and_ack(response, ack_subject))

    async def _store_and_ack(self, response: Response, ack_subject: str) -> None:
        async def keep_held() -> None:
            while True:
                await asyncio.sleep(KEEP_HELD)
                with contextlib.suppress(Exception):
                    await self.nc.publish(ack_subject, IN_PROGRESS)

        holder = asyncio.get_running_loop().create_task(keep_held())
        try:
            await self.store(response)
        finally:
            holder.cancel()
        await self.nc.publish(ack_subject, ACK)

    async def stop(self, grace: float = 2.0) -> None:
        """Let pending stores finish (up to ``grace``); messages not acked by then are redelivered."""
        deadline = time.monotonic() + grace
        while (self.inbox.pending or any(not t.done() for t in self._tasks)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in list(self._tasks):
            task.cancel()
        await self.inbox.stop()

    # ------------------------------------------------------------------ retrying writes

    async def persist(self, what: str, write: Callable[[], Awaitable[T]]) -> T:
        """Run ``write`` until JetStream takes it, waiting longer after each refusal.

        Permanent failures (a closed connection, a malformed request) are raised at once.
        """
        attempt = 0
        while True:
            try:
                return await write()
            except _PERMANENT:
                raise
            except _PASSING as exc:
                self.write_failures += 1
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                attempt += 1
                if self.throttle.allow("persist"):
                    log.error("could not write the %s (%s); trying again in %gs (%d writes waiting so far, "
                              "the invocation keeps its message meanwhile)", what, exc or type(exc).__name__,
                              delay, self.write_failures)
                await asyncio.sleep(delay)
