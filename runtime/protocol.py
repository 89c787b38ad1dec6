"""The JetStream protocol details the runtime speaks, in one place: ack verbs, KV markers, error codes.

Header names are in ``headers.py``; what the server accepts (sizes, subjects) in ``wire.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

# ------------------------------------------------------------------ acknowledgements of a delivered message

ACK = b"+ACK"
NAK = b"-NAK"
IN_PROGRESS = b"+WPI"


def nak_after(delay: float) -> bytes:
    """A negative ack asking for redelivery after ``delay`` seconds (plain ``-NAK`` ignores backoff)."""
    return NAK if delay <= 0 else b'-NAK {"delay": %d}' % int(delay * 1e9)


def term(reason: str) -> bytes:
    """Terminate: no more deliveries; the reason reaches the ``MSG_TERMINATED`` advisory."""
    return b"+TERM " + reason.encode()


# ------------------------------------------------------------------ key-value markers

KV_OPERATION = "KV-Operation"
KV_GONE = ("DEL", "PURGE")   # a deleted or purged key: its last message is a marker, not a value


def is_tombstone(headers: Mapping[str, str] | None) -> bool:
    """Whether a KV message (by its headers) marks a deleted or purged key."""
    return (headers or {}).get(KV_OPERATION) in KV_GONE


def kv_subject(bucket: str, key: str) -> str:
    return f"$KV.{bucket}.{key}"


# ------------------------------------------------------------------ JetStream API error codes

STREAM_NAME_IN_USE = 10058     # creating a stream that exists (another runtime created it meanwhile)
NO_MESSAGE_FOUND = 10057       # deleting a message that is gone
WRONG_LAST_SEQUENCE = 10071    # Nats-Expected-Last-Subject-Sequence did not match


# ------------------------------------------------------------------ call ids

def fallback_call_id(stream: str, seq: int) -> str:
    """The call id of a message published without one (a plain ``nats pub``)."""
    return f"{stream.lower()}-{seq}"
