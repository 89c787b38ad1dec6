"""Dead letters: the original message, byte for byte, with why and when it failed."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from . import headers as H
from .streams import DLQ_PREFIX, ERRORS_BUCKET

log = logging.getLogger("runtime.deadletter")

REASONS = ("max_deliver", "rejected", "invalid_input", "timeout", "undeployed")
WORKER_LOST = "worker lost: the attempt ended without a result (process crash or lost connection)"
# Headers of the original message that must not be replayed into another stream.
_DROP = {"Nats-Msg-Id", "Nats-Expected-Stream", "Nats-Expected-Last-Msg-Id", "Nats-Expected-Last-Sequence",
         "Nats-Expected-Last-Subject-Sequence", "Nats-Rollup", "Nats-TTL", "Status", "Description"}


# What a dead letter adds to the original headers; the call id stays, it names the call.
DEAD_LETTER_HEADERS = (H.FUNCTION, H.ORIGINAL_SUBJECT, H.ORIGINAL_SEQ, H.DELIVERIES, H.REASON, H.ERROR,
                       H.FAILED_AT)


def dead_letter_id(stream_seq: int) -> str:
    """The deterministic ``Nats-Msg-Id`` of the dead letter of one ``FN`` message."""
    return f"dlq:{stream_seq}"


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dead_letter_headers(original: dict[str, str], *, function: str, subject: str, seq: int, deliveries: int,
                        reason: str, error: str, call_id: str | None) -> dict[str, str]:
    hdrs = {k: v for k, v in original.items() if k not in _DROP}
    if original.get("Nats-Msg-Id") and not call_id:
        call_id = original["Nats-Msg-Id"]
    hdrs.update({
        H.MSG_ID: dead_letter_id(seq),
        H.FUNCTION: function,
        H.ORIGINAL_SUBJECT: subject,
        H.ORIGINAL_SEQ: str(seq),
        H.DELIVERIES: str(deliveries),
        H.REASON: reason,
        H.ERROR: " ".join(error.split())[:2048],
        H.FAILED_AT: now_rfc3339(),
    })
    if call_id:
        hdrs[H.CALL_ID] = call_id
    return hdrs


def original_headers(dead: dict[str, str]) -> dict[str, str]:
    """The headers of a dead letter without what dead-lettering added: those of a fresh invocation."""
    return {k: v for k, v in dead.items()
            if k not in DEAD_LETTER_HEADERS and not (k == H.MSG_ID and v.startswith("dlq:"))}


async def write_dead_letter(js: JetStreamContext, function: str, body: bytes, headers: dict[str, str]) -> int:
    """Store a dead letter; a repeat within the duplicate window stores nothing new."""
    ack = await js.publish(f"{DLQ_PREFIX}{function}", body, headers=headers)
    return int(ack.seq)


async def record_error(nc: NATS, stream_seq: int, attempt: int, error: str) -> None:
    """Remember an attempt's error by stream sequence, so a dead letter can name it later."""
    payload = json.dumps({"attempt": attempt, "error": error}).encode()
    await nc.publish(f"$KV.{ERRORS_BUCKET}.{stream_seq}", payload)


async def last_error(js: JetStreamContext, stream_seq: int, deliveries: int) -> str:
    """The error recorded for the last attempt, or ``worker lost`` if that attempt left none."""
    from nats.js.errors import NotFoundError

    try:
        raw = await js.get_msg(f"KV_{ERRORS_BUCKET}", subject=f"$KV.{ERRORS_BUCKET}.{stream_seq}", direct=True)
    except NotFoundError:
        return WORKER_LOST
    try:
        data = json.loads(raw.data or b"{}")
    except ValueError:
        return WORKER_LOST
    if int(data.get("attempt", 0)) < deliveries:
        return WORKER_LOST
    return str(data.get("error", WORKER_LOST))
