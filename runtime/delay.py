"""Delayed calls: held by the server's message scheduler, queued like any call once due.

A delayed call is one message on ``fn.delayed.<function>.<key>`` in ``FN_DELAYED`` (``key``: a
digest of its call id, so ids that are not subject-safe still name one subject). Its
``Nats-Schedule: @at <time>`` header makes the server publish it, at that second, to its
``Nats-Schedule-Target`` ``fn.due.<function>[.<level>]``, which ``FN`` sources as
``fn.invoke.<function>[.<level>]`` (see ``streams.delayed_stream_config``); the server then
removes the schedule. The wait lives in the stream: no runtime needs to be running meanwhile,
and a server restart keeps it.

The server copies the call's own headers (``Fn-Call-Id``, ``Fn-Reply-To``, ``Content-Type``...)
to what it publishes but not ``Nats-Msg-Id``, so the call id travels in ``Fn-Call-Id`` too;
``Nats-Msg-Id`` still keeps a call id from being scheduled twice within the duplicate window.

Cancelling deletes the schedule message before it fires and stores the call's outcome as
``Cancelled``, written once like any outcome.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import APIError, BadRequestError, NotFoundError

from . import headers as H
from .errors import Cancelled, NotPending
from .priority import invoke_subject
from .protocol import INVOKE_PREFIX, NO_MESSAGE_FOUND, SEQUENCE_NOT_FOUND, WRONG_LAST_SEQUENCE
from .results import Response, result_subject
from .streams import DELAYED_PREFIX, DELAYED_STREAM, DUE_PREFIX
from .wire import ReplyPolicy, call_id_for

log = logging.getLogger("runtime.delay")

# How long the copy the server publishes stays in FN_DELAYED: FN takes it at once unless its
# queue is full, and a queue full for a whole day has bigger problems. FN takes the resulting
# Nats-TTL header along; it allows no message TTLs, so there the header means nothing.
FIRED_TTL = "24h"
_KEY_LENGTH = 32


def schedule_key(call_id: str) -> str:
    """The subject token of ``call_id``'s pending delayed call: hex, whatever the id holds."""
    usable = call_id_for(call_id) or call_id
    return hashlib.sha256(usable.encode("utf-8", "surrogatepass")).hexdigest()[:_KEY_LENGTH]


def delayed_subject(function: str, call_id: str) -> str:
    """Where ``call_id``'s delayed call of ``function`` waits until it is due."""
    return f"{DELAYED_PREFIX}{function}.{schedule_key(call_id)}"


def due_subject(function: str, level: int | None = None) -> str:
    """What the server publishes a due call of ``function`` to: ``FN`` takes it as its invocation subject."""
    return DUE_PREFIX + invoke_subject(function, level).removeprefix(INVOKE_PREFIX)


def due_time(*, delay: float | None = None, at: datetime | None = None, now: float | None = None) -> datetime:
    """When a call given ``delay`` (seconds from ``now``) or ``at`` becomes due, in whole UTC seconds.

    The server schedules to the second, so the time is rounded up: a call never runs early.
    A naive ``at`` is local time (as ``datetime.timestamp`` reads it). A time already past
    makes the call due at once.
    """
    if (delay is None) == (at is None):
        raise ValueError("give either delay (seconds) or at (a datetime), not both")
    if at is not None:
        if not isinstance(at, datetime):
            raise ValueError(f"at must be a datetime, not {type(at).__name__}")
        when = at.timestamp()
    else:
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not math.isfinite(delay) or delay < 0:
            raise ValueError(f"delay must be a number of seconds, 0 or more, not {delay!r}")
        when = (time.time() if now is None else now) + delay
    return datetime.fromtimestamp(math.ceil(when), UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def schedule_headers(function: str, call_id: str, due: datetime, level: int | None = None) -> dict[str, str]:
    """The headers that make the server queue ``call_id`` for ``function`` at ``due``."""
    return {
        H.NATS_SCHEDULE: f"@at {rfc3339(due)}",
        H.SCHEDULE_TARGET: due_subject(function, level),
        H.SCHEDULE_TTL: FIRED_TTL,
        H.CALL_ID: call_id,
        H.MSG_ID: call_id,
    }


@dataclass(frozen=True, slots=True)
class Pending:
    """A delayed call that has not fired yet, as ``FN_DELAYED`` holds it."""

    call_id: str
    function: str
    seq: int
    due: str                  # RFC 3339, as the schedule says
    headers: dict[str, str]

    @property
    def reply_to(self) -> str | None:
        return self.headers.get(H.REPLY_TO) or None

    def due_by(self, now: float) -> bool:
        """Whether the call is due at ``now`` (a time the schedule does not spell is never due)."""
        try:
            return parse_moment(self.due).timestamp() <= now
        except ValueError:
            return False


async def find_pending(js: JetStreamContext, call_id: str) -> Pending | None:
    """``call_id``'s delayed call if it is still waiting, else None (unknown, or fired already)."""
    try:
        msg = await js.get_msg(DELAYED_STREAM, subject=f"{DELAYED_PREFIX}*.{schedule_key(call_id)}", direct=True)
    except (NotFoundError, NoRespondersError):
        return None
    hdrs = dict(msg.headers or {})
    assert msg.subject is not None and msg.seq is not None
    function = msg.subject.removeprefix(DELAYED_PREFIX).rpartition(".")[0]
    return Pending(call_id_for(call_id) or call_id, function, msg.seq,
                   hdrs.get(H.NATS_SCHEDULE, "").removeprefix("@at").strip(), hdrs)


async def cancel(nc: NATS, js: JetStreamContext, call_id: str, *, replies: ReplyPolicy | None = None) -> Pending:
    """Remove ``call_id``'s delayed call before it fires; its outcome then reads ``Cancelled``.

    The caller waiting on its ``Fn-Reply-To`` (if any, and one the runtime would answer on) is
    told at once. Raises ``NotPending`` when there is no such call waiting (unknown, queued
    already, or cancelled already) or when it is due.
    """
    pending = await find_pending(js, call_id)
    if pending is None:
        raise NotPending(f"no delayed call {call_id!r} is waiting: it is unknown, has already been "
                         f"queued to run, or was cancelled")
    if pending.due_by(time.time()):
        # The server is queueing it (or will the moment it is back): deleting it now could
        # come after the queued copy, and the call would run all the same.
        raise NotPending(f"delayed call {call_id!r} was due at {pending.due}; too late to cancel")
    try:
        await js.delete_msg(DELAYED_STREAM, pending.seq)
    except APIError as exc:   # it fired (or was cancelled) between the read and the delete
        if exc.err_code not in (NO_MESSAGE_FOUND, SEQUENCE_NOT_FOUND) and not isinstance(exc, NotFoundError):
            raise
        raise NotPending(f"delayed call {call_id!r} has just been queued to run; too late to cancel") from None
    error = Cancelled(f"call {pending.call_id!r} of {pending.function} was cancelled before it ran "
                      f"(it was due at {pending.due})", call_id=pending.call_id)
    response = Response.failure(pending.call_id, error)
    await _store_once(js, response)
    reply = pending.reply_to
    problem = (replies or ReplyPolicy()).problem(reply) if reply else "none"
    if reply and problem is None:
        await nc.publish(reply, response.body, headers=response.headers)
    elif reply:
        log.warning("not telling the caller of call %s that it was cancelled on %r: %s",
                    pending.call_id[:64], reply[:80], problem)
    log.info("cancelled delayed call %s of %s (due at %s)", pending.call_id, pending.function, pending.due)
    return pending


async def _store_once(js: JetStreamContext, response: Response) -> None:
    """Store ``response`` as the call's outcome unless it already has one (as the runtime does)."""
    try:
        await js.publish(result_subject(response.call_id), response.body,
                         headers={**response.headers, H.EXPECTED_LAST_SUBJECT_SEQ: "0"})
    except BadRequestError as exc:
        if exc.err_code != WRONG_LAST_SEQUENCE:
            raise
        log.warning("call id %s already has a stored outcome; keeping it", response.call_id)


async def delayed_count(js: JetStreamContext, function: str) -> int:
    """How many delayed calls of ``function`` are waiting (0 when ``FN_DELAYED`` does not exist yet)."""
    try:
        info = await js.stream_info(DELAYED_STREAM, subjects_filter=f"{DELAYED_PREFIX}{function}.*")
    except NotFoundError:
        return 0
    return sum((info.state.subjects or {}).values())


def parse_moment(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 time such as ``2026-12-01T08:00:00Z``; without an offset it is local time."""
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a time; use RFC 3339, e.g. 2026-12-01T08:00:00Z") from None
