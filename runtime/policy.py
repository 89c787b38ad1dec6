"""The outcome policy: what becomes of an attempt, decided from what it came to and nothing else.

``decide(outcome, attempt, manifest)`` is pure: no I/O, no clock. It answers *ack*, *retry after
N seconds* or *dead-letter with a reason and an error*; the executor carries that out on the
wire (``+ACK``, ``-NAK {delay}``, a dead letter then ``+TERM reason``), and
``runtime.testing.call`` and the unit tests use the very same function.

What an attempt came to (the ``outcome``):

- ``None``: the handler returned and its result was encoded (see :func:`encode_result`);
- :class:`Undecodable`: the input did not decode or validate, so the handler never ran;
- :class:`Overdue`: it waited in the queue past its TTL, so the handler never ran;
- :class:`Overran`: the attempt ran past its timeout (cancelled, or returned too late);
- any exception the handler raised, including ``Retry``, ``Reject``, ``SystemExit``; or an
  :class:`~runtime.errors.InvocationError` the runtime raised for it (a result too large).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from . import codec
from . import headers as H
from .errors import (
    MAX_ERROR,
    Expired,
    FunctionError,
    InvalidInput,
    InvocationError,
    InvocationTimeout,
    Reject,
    Rejected,
    ResultTooLarge,
    Retry,
    describe,
    validation_message,
)
from .manifest import FunctionManifest
from .wire import WireLimits, clip

Reason = Literal["max_deliver", "rejected", "invalid_input", "timeout", "expired"]
# Bytes a stored result's headers take at the most: a call id is at most 256 characters (see
# wire.call_id_for), the other headers are fixed.
HEADERS_AT_MOST = 4096


# ------------------------------------------------------------------ decisions


@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledge: the result goes to the caller (if any) and to the result store."""


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """Negative-acknowledge: JetStream delivers the message again after ``delay`` seconds."""

    delay: float
    error: InvocationError


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Fail for good: dead-letter the message with ``reason``, tell the caller ``error``, terminate it."""

    reason: Reason
    error: InvocationError


Decision = Ack | RetryAfter | DeadLetter
_ACK = Ack()   # the common case, decided once per invocation: no new object each time


# ------------------------------------------------------------------ outcomes the runtime observes


@dataclass(frozen=True, slots=True)
class Undecodable:
    """The input did not decode or validate; ``cause`` is the decoder's exception."""

    cause: BaseException


@dataclass(frozen=True, slots=True)
class Overran:
    """The attempt ran past ``timeout``: cancelled at its deadline (``took`` is None), or it
    returned after ``took`` seconds because it kept the event loop from cancelling it."""

    timeout: float
    took: float | None = None

    def error(self) -> InvocationTimeout:
        if self.took is None:
            message = f"attempt exceeded the timeout of {self.timeout:g}s"
        else:
            message = (f"attempt took {self.took:.1f}s, past the timeout of {self.timeout:g}s, without yielding "
                       f"to the event loop (a blocking call in an async handler?)")
        return InvocationTimeout(message)


@dataclass(frozen=True, slots=True)
class Overdue:
    """The invocation was still queued ``waited`` seconds after it was stored, past its ``ttl``."""

    ttl: float
    waited: float

    def error(self) -> Expired:
        return Expired(f"waited {self.waited:.1f}s in the queue, past its TTL of {self.ttl:g}s; it was not run")


AttemptEnd = BaseException | Undecodable | Overran | Overdue | None


# ------------------------------------------------------------------ the policy


def decide(outcome: AttemptEnd, attempt: int, manifest: FunctionManifest) -> Decision:
    """What to do with attempt number ``attempt`` (from 1) of ``manifest``'s function."""
    if outcome is None:
        return _ACK
    if isinstance(outcome, Undecodable):
        # Retrying cannot make bad input good: no delivery is spent on it.
        cause = outcome.cause
        if isinstance(cause, InvalidInput):
            return DeadLetter("invalid_input", cause)
        return DeadLetter("invalid_input", InvalidInput(validation_message(cause)))
    if isinstance(outcome, Overdue):
        return DeadLetter("expired", outcome.error())
    if isinstance(outcome, Reject):
        return DeadLetter("rejected", Rejected(outcome.reason))
    if isinstance(outcome, Retry):
        return failed(FunctionError(outcome.reason, type="Retry"), attempt, manifest, outcome.delay)
    return failed(attempt_error(outcome), attempt, manifest)


def failed(error: InvocationError, attempt: int, manifest: FunctionManifest,
           delay: float | None = None) -> RetryAfter | DeadLetter:
    """A failed attempt: retried after ``delay`` (default: the manifest's backoff) unless it was the last."""
    if attempt >= manifest.retry.max_deliver:
        return DeadLetter("timeout" if isinstance(error, InvocationTimeout) else "max_deliver", error)
    return RetryAfter(manifest.retry.delay_before(attempt + 1) if delay is None else delay, error)


def attempt_error(outcome: BaseException | Overran) -> InvocationError:
    """The error a failed attempt reports: the runtime's own as it is, anything else by its class name
    and its own message (the wire keeps the two apart; ``describe`` joins them for one-line text)."""
    if isinstance(outcome, Overran):
        return outcome.error()
    if isinstance(outcome, InvocationError):
        return outcome
    return FunctionError(clip(str(outcome), MAX_ERROR), type=type(outcome).__name__)


# ------------------------------------------------------------------ results that cannot be sent


def encode_result(result: Any, manifest: FunctionManifest, call_id: str, limits: WireLimits) -> bytes:
    """``result`` as a message body; raises the error that fails the attempt when it cannot be sent."""
    try:
        body = codec.encode(result, manifest.encoding)
    except Exception as exc:
        raise FunctionError(f"the result cannot be encoded as {manifest.encoding}: {describe(exc)}",
                            type=type(exc).__name__, call_id=call_id) from None
    # Measuring the headers exactly is worth it only near the limit (they take well under this).
    if len(body) > limits.max_payload - HEADERS_AT_MOST:
        room = limits.room_for_body(success_headers(call_id, manifest))
        if len(body) > room:
            raise ResultTooLarge(f"the result is {len(body)} bytes; at most {room} fit in a message "
                                 f"(the server's max_payload is {limits.max_payload})", call_id=call_id)
    return body


def success_headers(call_id: str, manifest: FunctionManifest) -> dict[str, str]:
    """The headers a stored result carries: what a success response and the store add, and write-once."""
    return {H.CALL_ID: call_id, H.CONTENT_TYPE: codec.CONTENT_TYPES[manifest.encoding],
            H.EXPECTED_LAST_SUBJECT_SEQ: "18446744073709551615"}
