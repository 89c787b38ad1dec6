"""What a handler sees of its invocation: ``ctx``."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import codec
from . import headers as H
from .errors import FnRuntimeError, QueueFull
from .manifest import NAME_PATTERN
from .priority import invoke_subject
from .queuelimit import is_queue_full
from .wire import WireLimits, subject_problem

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext


@dataclass(slots=True)
class Context:
    """The invocation's identity, limits and connection handles.

    ``call_id`` is the correlation id (the caller's ``Nats-Msg-Id``, or derived from the stream
    sequence); ``attempt`` counts from 1; ``deadline`` is a ``time.monotonic()`` instant after
    which the attempt is cancelled.
    """

    function: str
    call_id: str
    attempt: int
    max_attempts: int
    deadline: float
    subject: str
    stream_seq: int
    headers: dict[str, str]
    logger: logging.LoggerAdapter[logging.Logger]
    nc: NATS
    js: JetStreamContext
    scheduled_at: datetime | None = None
    schedule: str | None = None
    limits: WireLimits | None = None
    progress_to: str | None = None   # where the caller follows progress (checked against the reply policy)
    trigger: str | None = None       # the trigger that ran it, for an event
    progress_sent: int = 0

    @property
    def remaining(self) -> float:
        """Seconds left before the attempt's deadline."""
        return max(0.0, self.deadline - time.monotonic())

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    async def invoke(self, function: str, payload: Any, *, msg_id: str | None = None,
                     priority: int | None = None) -> int:
        """Queue an invocation of another function (at ``priority``, 1 to 10, or its default level).

        Returns its stream sequence; raises ``QueueFull`` if that function's queue is at its limit.
        """
        if not re.match(NAME_PATTERN, function):
            raise FnRuntimeError(f"{function!r} is not a function name")
        headers = {H.MSG_ID: msg_id} if msg_id else None
        body = codec.encode(payload)
        subject = invoke_subject(function, priority)
        self._check(subject, body, headers)
        try:
            ack = await self.js.publish(subject, body, headers=headers)
        except Exception as exc:
            if is_queue_full(exc):
                raise QueueFull(f"the queue of {function} is full: the invocation was not stored") from None
            raise
        return int(ack.seq)

    async def progress(self, data: Any) -> bool:
        """Send ``data`` (JSON-able, or bytes) to the caller as a progress update while the function runs.

        Updates are not stored: a caller that follows the call (``Client.stream``, ``on_progress=``,
        ``runtime invoke --follow``) gets them, in order, each marked with this attempt's number;
        nobody else does. Returns False when the caller did not ask for them.
        """
        if self.progress_to is None:
            return False
        body = data if isinstance(data, bytes) else codec.encode(data)
        self.progress_sent += 1
        headers = {H.CALL_ID: self.call_id, H.PROGRESS: str(self.progress_sent), H.ATTEMPT: str(self.attempt)}
        self._check(self.progress_to, body, headers)
        await self.nc.publish(self.progress_to, body, headers=headers)
        return True

    async def publish(self, subject: str, payload: Any, headers: dict[str, str] | None = None) -> None:
        """Publish a core NATS message (events, notifications)."""
        body = codec.encode(payload)
        self._check(subject, body, headers)
        await self.nc.publish(subject, body, headers=headers)

    def _check(self, subject: str, body: bytes, headers: dict[str, str] | None) -> None:
        # The server closes a connection that publishes what it cannot take, and this
        # connection is the runtime's: refuse here, where the handler sees the reason.
        problem = subject_problem(subject)
        if problem:
            raise FnRuntimeError(f"cannot publish to {subject[:80]!r}: {problem}")
        if self.limits is not None and not self.limits.fits(subject, body, headers):
            raise FnRuntimeError(f"cannot publish to {subject!r}: the message does not fit the server's "
                                 f"max_payload of {self.limits.max_payload} bytes")
