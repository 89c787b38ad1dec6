"""Inspect, replay and purge the dead letters kept in ``FN_DLQ``."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ServerError
from pydantic import BaseModel, ConfigDict

from . import headers as H
from .deadletter import original_headers
from .errors import FnRuntimeError
from .manifest import NAME_PATTERN
from .streams import DLQ_PREFIX, DLQ_STREAM, INVOKE_PREFIX

log = logging.getLogger("runtime.dlq")

_NAME = re.compile(NAME_PATTERN)
_NO_MESSAGE = 10057  # JetStream's "no message found" on delete


class DeadLetterNotFound(FnRuntimeError):
    """Raised when no dead letter has the given sequence number."""


class DeadLetter(BaseModel):
    """One stored dead letter: the original message plus why and when it failed."""

    model_config = ConfigDict(frozen=True)

    seq: int                      # its sequence in FN_DLQ, the handle for show/replay/purge
    function: str
    reason: str
    error: str
    failed_at: str
    deliveries: int
    original_seq: int
    original_subject: str
    call_id: str | None
    headers: dict[str, str]
    body: bytes

    @classmethod
    def from_stored(cls, seq: int, subject: str, headers: dict[str, str] | None, body: bytes | None) -> DeadLetter:
        hdrs = dict(headers or {})
        function = hdrs.get(H.FUNCTION) or subject.removeprefix(DLQ_PREFIX)
        return cls(seq=seq, function=function, reason=hdrs.get(H.REASON, ""), error=hdrs.get(H.ERROR, ""),
                   failed_at=hdrs.get(H.FAILED_AT, ""), deliveries=_int(hdrs.get(H.DELIVERIES)),
                   original_seq=_int(hdrs.get(H.ORIGINAL_SEQ)),
                   original_subject=hdrs.get(H.ORIGINAL_SUBJECT, f"{INVOKE_PREFIX}{function}"),
                   call_id=hdrs.get(H.CALL_ID), headers=hdrs, body=body or b"")

    def replay_headers(self) -> dict[str, str]:
        """The original headers, for a fresh invocation; a repeated replay of this letter is dropped."""
        return {**original_headers(self.headers), H.MSG_ID: f"replay:{self.seq}"}

    def summary(self) -> dict[str, Any]:
        return self.model_dump(exclude={"headers", "body"})

    def to_json(self) -> dict[str, Any]:
        """Everything, with the body as text when it is UTF-8 and as base64 otherwise."""
        data = self.model_dump(exclude={"body"})
        try:
            data["body"] = self.body.decode()
        except UnicodeDecodeError:
            data["body_base64"] = base64.b64encode(self.body).decode()
        return data


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def check_function(name: str) -> str:
    """``name`` if it is a valid function name (it becomes part of a subject)."""
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a function name (lowercase letters, digits, '-' and '_')")
    return name


async def list_dead_letters(js: JetStreamContext, function: str | None = None) -> list[DeadLetter]:
    """Every dead letter, oldest first; only ``function``'s when given."""
    subject = f"{DLQ_PREFIX}{check_function(function) if function else '>'}"
    # A throwaway consumer reads in batches; it removes itself if this process dies mid-way.
    sub = await js.pull_subscribe(subject, stream=DLQ_STREAM, config=ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0, mem_storage=True))
    letters: list[DeadLetter] = []
    info = await sub.consumer_info()
    try:
        remaining = info.num_pending or 0
        while remaining > 0:
            for msg in await sub.fetch(min(remaining, 512), timeout=5):
                letters.append(DeadLetter.from_stored(msg.metadata.sequence.stream, msg.subject, msg.headers,
                                                      msg.data))
                remaining = msg.metadata.num_pending
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
            await js.delete_consumer(DLQ_STREAM, info.name)
    return letters


async def get_dead_letter(js: JetStreamContext, seq: int) -> DeadLetter:
    try:
        raw = await js.get_msg(DLQ_STREAM, seq)
    except NotFoundError:
        raise DeadLetterNotFound(f"no dead letter with sequence {seq}") from None
    return DeadLetter.from_stored(seq, raw.subject or "", raw.headers, raw.data)


async def delete_dead_letter(js: JetStreamContext, seq: int) -> None:
    try:
        await js.delete_msg(DLQ_STREAM, seq)
    except ServerError as exc:
        if exc.err_code == _NO_MESSAGE:
            raise DeadLetterNotFound(f"no dead letter with sequence {seq}") from None
        raise


async def replay(js: JetStreamContext, letter: DeadLetter) -> int:
    """Invoke the function again with the original body and headers, then drop the letter.

    Returns the new message's sequence in ``FN``. The call id is kept, so the call's stored
    result becomes the outcome of the replay.
    """
    ack = await js.publish(f"{INVOKE_PREFIX}{check_function(letter.function)}", letter.body,
                           headers=letter.replay_headers())
    with contextlib.suppress(DeadLetterNotFound):  # replayed and removed meanwhile by someone else
        await delete_dead_letter(js, letter.seq)
    log.info("replayed dead letter %d of %s as message %d", letter.seq, letter.function, ack.seq)
    return int(ack.seq)


async def replay_seq(js: JetStreamContext, seq: int) -> tuple[DeadLetter, int]:
    letter = await get_dead_letter(js, seq)
    return letter, await replay(js, letter)


async def replay_all(js: JetStreamContext, function: str | None = None) -> list[tuple[DeadLetter, int]]:
    """Replay every dead letter (of ``function`` when given), oldest first."""
    return [(letter, await replay(js, letter)) for letter in await list_dead_letters(js, function)]


async def purge(nc: NATS, js: JetStreamContext, seq: int | None = None, function: str | None = None) -> int:
    """Delete one dead letter by ``seq``, all of ``function``'s, or (neither given) all; returns how many."""
    if seq is not None:
        await delete_dead_letter(js, seq)
        return 1
    request: dict[str, Any] = {"filter": f"{DLQ_PREFIX}{check_function(function)}"} if function else {}
    # The purge reply counts what it removed; nats-py's helper only says whether it succeeded.
    reply = await nc.request(f"$JS.API.STREAM.PURGE.{DLQ_STREAM}", json.dumps(request).encode(), timeout=10)
    data = json.loads(reply.data)
    if "error" in data:
        raise FnRuntimeError(f"purging {DLQ_STREAM} failed: {data['error'].get('description', data['error'])}")
    return int(data.get("purged", 0))
