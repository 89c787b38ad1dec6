"""The JetStream protocol details the runtime speaks, in one place: ack verbs, KV markers, error codes.

Header names are in ``headers.py``; what the server accepts (sizes, subjects) in ``wire.py``;
the runtime's own stream names and subject prefixes in ``streams.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

INVOKE_PREFIX = "fn.invoke."    # fn.invoke.<function>[.<priority level>]
QUEUED_PREFIX = "fn.queued."    # FN republishes the headers of every stored invocation here
SLOT_PREFIX = "fn.slot."        # fn.slot.<function>: one message per concurrency slot

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

DEFAULT_URL = "nats://127.0.0.1:4222"

# ------------------------------------------------------------------ acknowledgements of a delivered message

ACK = b"+ACK"
NAK = b"-NAK"
IN_PROGRESS = b"+WPI"
ACK_PREFIX = "$JS.ACK."   # the reply subject of every message a consumer delivers


def nak_after(delay: float) -> bytes:
    """A negative ack asking for redelivery after ``delay`` seconds (plain ``-NAK`` ignores backoff)."""
    return NAK if delay <= 0 else b'-NAK {"delay": %d}' % int(delay * 1e9)


def term(reason: str) -> bytes:
    """Terminate: no more deliveries; the reason reaches the ``MSG_TERMINATED`` advisory."""
    return b"+TERM " + reason.encode()


# ------------------------------------------------------------------ pull requests

def pull_subject(stream: str, consumer: str) -> str:
    """Where a pull request for ``consumer`` of ``stream`` is published."""
    return f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"


# Status lines the server answers a pull request with (``Status`` and ``Description`` headers).
STATUS_HEARTBEAT = "100"
STATUS_CONFLICT = "409"   # ended early: "Message Size Exceeds MaxBytes", "Consumer Deleted", ...


def purge_subject(stream: str) -> str:
    return f"$JS.API.STREAM.PURGE.{stream}"


# ------------------------------------------------------------------ consumer advisories

ADVISORY_MAX_DELIVERIES = "io.nats.jetstream.advisory.v1.max_deliver"
ADVISORY_TERMINATED = "io.nats.jetstream.advisory.v1.terminated"


# ------------------------------------------------------------------ key-value markers

KV_OPERATION = "KV-Operation"
KV_DELETE = "DEL"
KV_GONE = (KV_DELETE, "PURGE")   # a deleted or purged key: its last message is a marker, not a value


def is_tombstone(headers: Mapping[str, str] | None) -> bool:
    """Whether a KV message (by its headers) marks a deleted or purged key."""
    return (headers or {}).get(KV_OPERATION) in KV_GONE


def entry_value(entry: KeyValue.Entry) -> bytes | None:
    """A KV entry's value as nats-py reads it; None for the marker of a deleted or purged key."""
    return None if entry.operation in KV_GONE else entry.value


def kv_stream(bucket: str) -> str:
    """The stream behind a key-value bucket."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    return f"$KV.{bucket}.{key}"


# ------------------------------------------------------------------ JetStream API error codes

STREAM_NAME_IN_USE = 10058     # creating a stream that exists (another runtime created it meanwhile)
NO_MESSAGE_FOUND = 10057       # deleting a message that is gone
SEQUENCE_NOT_FOUND = 10043     # deleting a message that was deleted already
STREAM_NOT_FOUND = 10059       # a stream (or a bucket's stream) that does not exist
WRONG_LAST_SEQUENCE = 10071    # Nats-Expected-Last-Subject-Sequence did not match
STORE_FAILED = 10077           # a publish the stream refused to store; with the description below:
PER_SUBJECT_FULL = "maximum messages per subject exceeded"   # FN's queue limit (max_msgs_per_subject)
REPLICAS_NOT_CLUSTERED = 10074  # replicas > 1 asked of a server that is not part of a cluster
NO_PEERS_FOR_PLACEMENT = 10005  # fewer cluster nodes available than the replicas asked for
INSUFFICIENT_RESOURCES = 10023  # the nodes there are lack the room (or are too few) for the replicas


# ------------------------------------------------------------------ call ids

class AckSubject(NamedTuple):
    """What the ack subject of a JetStream delivery says about the message."""

    stream: str
    consumer: str
    delivered: int       # this delivery's number, from 1
    stream_seq: int
    pending: int         # messages the consumer had left to deliver after this one


# Every delivery is read twice in a row (the dispatcher, then its invocation): the second is a hit.
@functools.lru_cache(maxsize=1024)
def parse_ack(reply: str) -> AckSubject:
    """Read ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``, or the longer
    form with domain and account hash in front (and a random token at the end); ValueError otherwise."""
    tokens = reply.split(".")
    if tokens[:2] != ["$JS", "ACK"] or (len(tokens) != 9 and len(tokens) < 11):
        raise ValueError(f"{reply[:80]!r} is not a JetStream ack subject")
    offset = 2 if len(tokens) == 9 else 4
    # tuple.__new__ builds it without the Python-level __new__ a NamedTuple's constructor runs.
    return tuple.__new__(AckSubject, (tokens[offset], tokens[offset + 1], int(tokens[offset + 2]),
                                      int(tokens[offset + 3]), int(tokens[offset + 6])))


def fallback_call_id(stream: str, seq: int) -> str:
    """The call id of a message published without one (a plain ``nats pub``)."""
    return f"{stream.lower()}-{seq}"
