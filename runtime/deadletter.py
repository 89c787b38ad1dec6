"""Dead letters: the original message, byte for byte, with why and when it failed.

The server refuses (and closes the connection over) a message larger than ``max_payload``,
headers included. A dead letter adds headers to the original, so one built from a large
enough original cannot be stored as it is: it is stored without its body, which goes, with
every header, into an object of ``fn_dlq_bodies`` named by the letter's ``Fn-Body-Ref``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, ObjectMetaOptions
from nats.js.errors import NotFoundError

from . import headers as H
from .errors import Expired, FnRuntimeError, FunctionError, InvalidInput, InvocationError, InvocationTimeout, Rejected
from .logs import call_fields
from .protocol import kv_stream, kv_subject
from .streams import DLQ_BODIES_BUCKET, DLQ_PREFIX, ERRORS_BUCKET, INVOKE_STREAM
from .wire import STATUS_LINE, header_line, header_size, sendable_header_name

log = logging.getLogger("runtime.deadletter")

REASONS = ("max_deliver", "rejected", "invalid_input", "timeout", "expired")
WORKER_LOST = "worker lost: the attempt ended without a result (process crash or lost connection)"


# What a dead letter adds to the original headers; the call id stays, it names the call.
DEAD_LETTER_HEADERS = (H.FUNCTION, H.ORIGINAL_SUBJECT, H.ORIGINAL_SEQ, H.DELIVERIES, H.REASON, H.ERROR,
                       H.FAILED_AT, H.BODY_REF, H.BODY_SIZE, H.DROPPED_HEADERS)
ERROR_LENGTH = 2048       # Fn-Error of a letter that fits
SHORT_ERROR_LENGTH = 256  # Fn-Error of a letter whose headers alone are too large
_DROPPED_LENGTH = 512     # Fn-Dropped-Headers names at most this many characters of header names
_CHUNK = 128 * 1024       # object store chunks, as nats-py cuts them by default


class DeadLetterTooLarge(FnRuntimeError):
    """Raised when even a dead letter without its body and original headers exceeds ``max_payload``."""


def dead_letter_id(stream_seq: int, stream: str = INVOKE_STREAM, function: str = "") -> str:
    """The deterministic ``Nats-Msg-Id`` of the dead letter of one message: of one ``FN`` message,
    or of one event for one function (an event fans out to several, each may fail on it)."""
    if stream == INVOKE_STREAM:
        return f"dlq:{stream_seq}"
    return f"dlq:{stream}:{stream_seq}:{function}"


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dead_letter_headers(original: dict[str, str], *, function: str, subject: str, seq: int, deliveries: int,
                        reason: str, error: str, call_id: str | None, stream: str = INVOKE_STREAM,
                        trigger: str | None = None) -> dict[str, str]:
    hdrs = {k: v for k, v in original.items() if k not in H.NOT_CARRIED_OVER}
    if original.get(H.MSG_ID) and not call_id:
        call_id = original[H.MSG_ID]
    if trigger:
        # Kept by a replay, which goes to this function alone: it still sees the event's subject
        # and trigger (the original subject is the event's only on the first letter of an event).
        hdrs.setdefault(H.EVENT_SUBJECT, subject)
        hdrs[H.TRIGGER] = trigger
    hdrs.update({
        H.MSG_ID: dead_letter_id(seq, stream, function),
        H.FUNCTION: function,
        H.ORIGINAL_SUBJECT: subject,
        H.ORIGINAL_SEQ: str(seq),
        H.DELIVERIES: str(deliveries),
        H.REASON: reason,
        H.ERROR: " ".join(error.split())[:ERROR_LENGTH],
        H.FAILED_AT: now_rfc3339(),
    })
    if call_id:
        hdrs[H.CALL_ID] = call_id
    return hdrs


def original_headers(dead: Mapping[str, str]) -> dict[str, str]:
    """The headers of a dead letter without what dead-lettering added: those of a fresh invocation."""
    return {k: v for k, v in dead.items()
            if k not in DEAD_LETTER_HEADERS and not (k == H.MSG_ID and v.startswith("dlq:"))}


# ------------------------------------------------------------------ sizes and the stored header block


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """The header block as it travels: ``NATS/1.0``, one ``name: value`` line each, an empty line."""
    return STATUS_LINE + b"".join(header_line(k, v) for k, v in headers.items() if k.strip()) + b"\r\n"


def decode_headers(block: bytes) -> dict[str, str]:
    """The headers of a block made by ``encode_headers``."""
    hdrs: dict[str, str] = {}
    for line in block.decode().split("\r\n")[1:]:
        key, sep, value = line.partition(":")
        if sep:
            hdrs[key.strip()] = value.strip()
    return hdrs


@dataclass(frozen=True, slots=True)
class Fit:
    """A dead letter as it can be stored: body, headers and, if something was left out, where it is."""

    body: bytes
    headers: dict[str, str]
    ref: str | None = None            # the object holding the full letter; None if nothing was left out
    dropped: tuple[str, ...] = ()     # original headers the letter does not carry


def fit_dead_letter(body: bytes, headers: Mapping[str, str], max_payload: int) -> Fit:
    """How a dead letter is stored within ``max_payload`` (headers count, not only the body).

    A letter that fits is stored as it is. One that does not is stored with an empty body and
    ``Fn-Body-Ref``/``Fn-Body-Size``: the body and every header go into that object. If the
    headers alone are still too large, ``Fn-Error`` is cut further and the largest original
    headers (the call id last) are left out too, named in ``Fn-Dropped-Headers``. Header names
    nats-py would refuse to send are always left out that way.
    """
    hdrs = dict(headers)
    unsendable = [k for k in hdrs if not sendable_header_name(k)]
    if not unsendable and header_size(hdrs) + len(body) <= max_payload:
        return Fit(body, hdrs)
    ref = hdrs.get(H.MSG_ID)
    if not ref:
        raise ValueError(f"a dead letter needs its {H.MSG_ID} to name the object holding its body")
    for key in unsendable:
        del hdrs[key]
    hdrs.pop(H.DROPPED_HEADERS, None)  # only this function writes it
    hdrs.update({H.BODY_REF: ref, H.BODY_SIZE: str(len(body))})
    dropped = list(unsendable)
    # Sizes line by line: a letter may carry thousands of headers.
    size = len(STATUS_LINE) + 2 + sum(len(header_line(k, v)) for k, v in hdrs.items())

    def fits() -> bool:
        hdrs.pop(H.DROPPED_HEADERS, None)
        names = _dropped_value(dropped)
        if names:
            hdrs[H.DROPPED_HEADERS] = names
        return size + (len(header_line(H.DROPPED_HEADERS, names)) if names else 0) <= max_payload

    def fitted() -> Fit:
        return Fit(b"", hdrs, ref, tuple(dropped))

    if fits():
        return fitted()
    error = hdrs.get(H.ERROR, "")
    if len(error) > SHORT_ERROR_LENGTH:
        short = error[:SHORT_ERROR_LENGTH - 1] + "…"
        size += len(header_line(H.ERROR, short)) - len(header_line(H.ERROR, error))
        hdrs[H.ERROR] = short
        if fits():
            return fitted()
    kept = {H.MSG_ID, *DEAD_LETTER_HEADERS}
    droppable = sorted((k for k in hdrs if k not in kept),
                       key=lambda k: (k == H.CALL_ID, -len(header_line(k, hdrs[k]))))
    for key in droppable:
        size -= len(header_line(key, hdrs.pop(key)))
        dropped.append(key)
        if fits():
            return fitted()
    raise DeadLetterTooLarge(f"the dead letter {ref} does not fit in {max_payload} bytes even without its "
                             f"body and original headers")


def _dropped_value(names: list[str]) -> str:
    value = ", ".join(n.strip() or "(empty)" for n in names)
    if len(value) <= _DROPPED_LENGTH:
        return value
    cut = value[:_DROPPED_LENGTH].rsplit(", ", 1)[0]
    return f"{cut}, … ({len(names)} in all)"


# ------------------------------------------------------------------ storing and reading

async def write_dead_letter(js: JetStreamContext, function: str, body: bytes, headers: dict[str, str], *,
                            max_payload: int) -> int:
    """Store a dead letter; a repeat within the duplicate window stores nothing new.

    ``max_payload`` is the server's, as the connection learned it (``nc.max_payload``). A letter
    too large for it keeps its full content in ``fn_dlq_bodies`` (see ``fit_dead_letter``).
    Returns the letter's sequence in ``FN_DLQ`` (the first one stored, for a repeat).
    """
    fit = fit_dead_letter(body, headers, max_payload)
    if fit.ref is not None:
        await store_original(js, fit.ref, encode_headers(headers) + body, max_payload=max_payload)
        log.info("dead letter %s of %s is too large to carry its body (%d bytes); stored as %s/%s%s",
                 fit.ref, function, len(body), DLQ_BODIES_BUCKET, fit.ref,
                 f", without headers {', '.join(fit.dropped)}" if fit.dropped else "",
                 extra=call_fields(function, headers.get(H.CALL_ID), _number(headers.get(H.DELIVERIES)),
                                   _number(headers.get(H.ORIGINAL_SEQ))))
    ack = await js.publish(f"{DLQ_PREFIX}{function}", fit.body, headers=fit.headers)
    return int(ack.seq)


def _number(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _digest(data: bytes) -> str:
    # The object store's own notation, so a stored object's digest compares equal.
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


async def store_original(js: JetStreamContext, name: str, data: bytes, *, max_payload: int) -> None:
    """Keep ``data`` (header block + body) as object ``name``; storing the same data again does nothing."""
    store = await js.object_store(DLQ_BODIES_BUCKET)
    with contextlib.suppress(NotFoundError):
        if (await store.get_info(name)).digest == _digest(data):
            return
    options = ObjectMetaOptions(max_chunk_size=min(_CHUNK, max_payload))
    await store.put(name, data, meta=ObjectMeta(name=name, options=options))


async def load_original(js: JetStreamContext, name: str) -> tuple[dict[str, str], bytes]:
    """The headers and body kept as object ``name``; raises ``NotFoundError`` if it is gone."""
    store = await js.object_store(DLQ_BODIES_BUCKET)
    data = bytes((await store.get(name)).data or b"")
    end = data.find(b"\r\n\r\n") + 4
    return decode_headers(data[:end]), data[end:]


async def delete_original(js: JetStreamContext, name: str) -> bool:
    """Drop object ``name``; False if it was gone already."""
    store = await js.object_store(DLQ_BODIES_BUCKET)
    try:
        await store.delete(name)
    except NotFoundError:
        return False
    return True


async def record_error(nc: NATS, key: int | str, attempt: int, error: str) -> None:
    """Remember an attempt's error by message (``Invocation.error_key``), so a dead letter can name it later."""
    payload = json.dumps({"attempt": attempt, "error": error}).encode()
    await nc.publish(kv_subject(ERRORS_BUCKET, str(key)), payload)


async def last_error(js: JetStreamContext, key: int | str, deliveries: int) -> str:
    """The error recorded for the last attempt, or ``worker lost`` if that attempt left none."""
    try:
        raw = await js.get_msg(kv_stream(ERRORS_BUCKET), subject=kv_subject(ERRORS_BUCKET, str(key)),
                               direct=True)
    except NotFoundError:
        return WORKER_LOST
    try:
        data = json.loads(raw.data or b"{}")
    except ValueError:
        return WORKER_LOST
    if int(data.get("attempt", 0)) < deliveries:
        return WORKER_LOST
    return str(data.get("error", WORKER_LOST))


def failure_of(reason: str, error: str) -> InvocationError:
    """The caller's error for a dead letter's ``Fn-Reason`` and ``Fn-Error``, as the executor reports it."""
    type_, sep, message = error.partition(": ")
    if not sep or not type_.isidentifier():
        type_, message = "", error
    if error.startswith("worker lost"):
        return FunctionError(error, type="worker_lost")
    if reason == "expired":
        return Expired(message, type=type_ or None)
    if reason == "timeout" or type_ == "InvocationTimeout":
        return InvocationTimeout(message, type=type_ or None)
    if reason == "invalid_input":
        return InvalidInput(message, type=type_ or None)
    if reason == "rejected":
        return Rejected(message, type=type_ or None)
    return FunctionError(message, type=type_ or None)
