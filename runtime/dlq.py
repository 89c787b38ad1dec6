"""Inspect, replay and purge the dead letters kept in ``FN_DLQ``; listing them is ``dlqlist.py``."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from . import headers as H
from .deadletter import delete_original, load_original
from .dlqlist import (
    DeadLetter,
    DeadLetterScan,
    Listing,
    ListingStalled,
    check_function,
    list_dead_letters,
)
from .errors import FnRuntimeError
from .priority import invoke_subject, split_subject
from .protocol import NO_MESSAGE_FOUND, SEQUENCE_NOT_FOUND, STREAM_NOT_FOUND, purge_subject
from .results import clear_for_replay
from .streams import DLQ_BODIES_BUCKET, DLQ_PREFIX, DLQ_STREAM
from .wire import header_size

__all__ = [
    "BodyMissing", "DeadLetter", "DeadLetterNotFound", "DeadLetterScan", "Listing", "ListingStalled",
    "ReplayTooLarge", "check_function", "delete_dead_letter", "get_dead_letter", "list_dead_letters", "purge",
    "replay", "replay_all", "replay_seq",
]

log = logging.getLogger("runtime.dlq")


class DeadLetterNotFound(FnRuntimeError):
    """Raised when no dead letter has the given sequence number."""


class BodyMissing(FnRuntimeError):
    """Raised when the object holding a dead letter's body is gone."""


class ReplayTooLarge(FnRuntimeError):
    """Raised when a dead letter's original no longer fits the server's ``max_payload`` as an invocation."""


# ------------------------------------------------------------------ one letter


def _gone(exc: APIError) -> bool:
    """Whether a get or delete failed because the message is not there (rather than the stream)."""
    if exc.err_code == STREAM_NOT_FOUND:
        return False
    return exc.err_code in (NO_MESSAGE_FOUND, SEQUENCE_NOT_FOUND) or isinstance(exc, NotFoundError)


async def get_dead_letter(js: JetStreamContext, seq: int) -> DeadLetter:
    """The dead letter with sequence ``seq``, with its full body and headers (from its object if referenced)."""
    try:
        raw = await js.get_msg(DLQ_STREAM, seq)
    except NotFoundError as exc:
        if not _gone(exc):
            raise  # no FN_DLQ at all: not the same as no such letter
        raise DeadLetterNotFound(f"no dead letter with sequence {seq}") from None
    hdrs = dict(raw.headers or {})
    ref = hdrs.get(H.BODY_REF)
    if not ref:
        return DeadLetter.from_stored(seq, raw.subject or "", hdrs, raw.data or b"")
    try:
        full, body = await load_original(js, ref)
    except NotFoundError:
        raise BodyMissing(f"the body of dead letter {seq} is gone: no object {ref} in {DLQ_BODIES_BUCKET}") from None
    # Everything the letter could not carry, plus where it came from.
    full.update({H.BODY_REF: ref, H.BODY_SIZE: str(len(body))})
    return DeadLetter.from_stored(seq, raw.subject or "", full, body)


async def delete_dead_letter(js: JetStreamContext, seq: int) -> None:
    try:
        await js.delete_msg(DLQ_STREAM, seq)
    except APIError as exc:
        # Which code says "gone" depends on how it went: deleted before, or never stored.
        if _gone(exc):
            raise DeadLetterNotFound(f"no dead letter with sequence {seq}") from None
        raise


async def _drop_body(js: JetStreamContext, letter: DeadLetter) -> None:
    if letter.body_ref:
        try:
            await delete_original(js, letter.body_ref)
        except Exception as exc:  # the bucket's max_age removes it with the letter's retention
            log.warning("could not delete %s/%s of dead letter %d: %s", DLQ_BODIES_BUCKET, letter.body_ref,
                        letter.seq, exc)


# ------------------------------------------------------------------ replay and purge


async def replay(nc: NATS, js: JetStreamContext, letter: DeadLetter) -> int:
    """Invoke the function again with the original body and headers, then drop the letter.

    Returns the new message's sequence in ``FN``. The call id is kept, so the call's stored
    result becomes the outcome of the replay.
    """
    if letter.body is None:
        letter = await get_dead_letter(js, letter.seq)
    body = letter.body or b""
    hdrs = letter.replay_headers()
    size = header_size(hdrs) + len(body)
    if size > nc.max_payload:
        raise ReplayTooLarge(f"dead letter {letter.seq} cannot be replayed: with its headers it takes {size} "
                             f"bytes, the server takes at most {nc.max_payload}")
    if letter.call_id:
        # A call's outcome is stored once; clearing it is what lets the replay's outcome replace it.
        # The marker left in its place tells `runtime result` the call is pending again, and why.
        await clear_for_replay(js, letter.call_id, letter.seq)
    ack = await js.publish(replay_subject(letter), body, headers=hdrs)
    with contextlib.suppress(DeadLetterNotFound):  # replayed and removed meanwhile by someone else
        await delete_dead_letter(js, letter.seq)
    await _drop_body(js, letter)
    log.info("replayed dead letter %d of %s as message %d", letter.seq, letter.function, ack.seq)
    return int(ack.seq)


def replay_subject(letter: DeadLetter) -> str:
    """Where a replay goes: the priority level the original was queued at, if the letter says so."""
    function = check_function(letter.function)
    try:
        named, level = split_subject(letter.original_subject)
    except ValueError:
        level = None
    else:
        level = level if named == function else None
    return invoke_subject(function, level)


async def replay_seq(nc: NATS, js: JetStreamContext, seq: int) -> tuple[DeadLetter, int]:
    letter = await get_dead_letter(js, seq)
    return letter, await replay(nc, js, letter)


async def replay_all(nc: NATS, js: JetStreamContext, function: str | None = None) -> list[tuple[DeadLetter, int]]:
    """Replay every dead letter (of ``function`` when given), oldest first, one body in memory at a time."""
    replayed = []
    for listed in (await list_dead_letters(nc, js, function)).letters:
        try:
            letter = await get_dead_letter(js, listed.seq)
        except DeadLetterNotFound:
            continue  # replayed or purged meanwhile
        replayed.append((letter, await replay(nc, js, letter)))
    return replayed


async def purge(nc: NATS, js: JetStreamContext, seq: int | None = None, function: str | None = None) -> int:
    """Delete one dead letter by ``seq``, all of ``function``'s, or (neither given) all; returns how many.

    The objects holding the bodies of the purged letters go with them; letters stored while
    purging are kept, with theirs.
    """
    if seq is not None:
        try:
            raw = await js.get_msg(DLQ_STREAM, seq)
        except NotFoundError as exc:
            if not _gone(exc):
                raise
            raise DeadLetterNotFound(f"no dead letter with sequence {seq}") from None
        await delete_dead_letter(js, seq)
        await _drop_body(js, DeadLetter.from_stored(seq, raw.subject or "", raw.headers, None))
        return 1
    scan = DeadLetterScan(nc, js, function)
    referenced = [letter async for batch in scan.batches() for letter in batch if letter.body_ref]
    if not scan.expected:
        return 0
    # Up to the last letter the scan saw stored: what arrives meanwhile keeps its body.
    request: dict[str, Any] = {"seq": scan.last_seq + 1}
    if function:
        request["filter"] = f"{DLQ_PREFIX}{check_function(function)}"
    # The purge reply counts what it removed; nats-py's helper only says whether it succeeded.
    reply = await nc.request(purge_subject(DLQ_STREAM), json.dumps(request).encode(), timeout=10)
    data = json.loads(reply.data)
    if "error" in data:
        raise FnRuntimeError(f"purging {DLQ_STREAM} failed: {data['error'].get('description', data['error'])}")
    for letter in referenced:
        await _drop_body(js, letter)
    return int(data.get("purged", 0))
