"""What a handler sees of its invocation: ``ctx``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import codec

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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def invocation_id(self) -> str:
        return self.call_id

    @property
    def remaining(self) -> float:
        """Seconds left before the attempt's deadline."""
        return max(0.0, self.deadline - time.monotonic())

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    async def invoke(self, function: str, payload: Any, *, msg_id: str | None = None) -> int:
        """Queue an invocation of another function; returns its stream sequence."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        ack = await self.js.publish(f"fn.invoke.{function}", codec.encode(payload), headers=headers)
        return int(ack.seq)

    async def publish(self, subject: str, payload: Any, headers: dict[str, str] | None = None) -> None:
        """Publish a core NATS message (events, notifications)."""
        await self.nc.publish(subject, codec.encode(payload), headers=headers)
