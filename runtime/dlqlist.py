"""Dead letters as read back from ``FN_DLQ``, and the listing of them all from headers only."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ConfigDict

from . import headers as H
from .deadletter import original_headers
from .errors import FnRuntimeError
from .manifest import NAME_PATTERN
from .protocol import ACK_PREFIX, STATUS_CONFLICT, STATUS_HEARTBEAT, pull_subject
from .streams import DLQ_PREFIX, DLQ_STREAM, INVOKE_PREFIX

_NAME = re.compile(NAME_PATTERN)

LIST_BATCH = 256              # dead letters per pull
LIST_BATCH_BYTES = 1 << 20    # header bytes per pull (a letter larger than this gets a pull of its own)
LIST_STALL = 60.0             # a listing that makes no progress for this long gives up, saying so
_PULL_EXPIRES = 5.0


class ListingStalled(FnRuntimeError):
    """Raised when listing dead letters made no progress for ``LIST_STALL`` seconds."""


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
    size: int                     # bytes of the original body
    body_ref: str | None          # the fn_dlq_bodies object holding the original the letter could not carry
    headers: dict[str, str]
    body: bytes | None = None     # None in a listing: show and replay fetch it

    @classmethod
    def from_stored(cls, seq: int, subject: str, headers: dict[str, str] | None,
                    body: bytes | None) -> DeadLetter:
        """A letter as stored; ``body`` None for one read from headers only (``Nats-Msg-Size`` then says its size)."""
        hdrs = dict(headers or {})
        stored_size = hdrs.pop(H.MSG_SIZE, None)
        function = hdrs.get(H.FUNCTION) or subject.removeprefix(DLQ_PREFIX)
        size = _int(hdrs.get(H.BODY_SIZE) or stored_size) if body is None or H.BODY_REF in hdrs else len(body)
        return cls(seq=seq, function=function, reason=hdrs.get(H.REASON, ""), error=hdrs.get(H.ERROR, ""),
                   failed_at=hdrs.get(H.FAILED_AT, ""), deliveries=_int(hdrs.get(H.DELIVERIES)),
                   original_seq=_int(hdrs.get(H.ORIGINAL_SEQ)),
                   original_subject=hdrs.get(H.ORIGINAL_SUBJECT, f"{INVOKE_PREFIX}{function}"),
                   call_id=hdrs.get(H.CALL_ID), size=size, body_ref=hdrs.get(H.BODY_REF), headers=hdrs,
                   body=body)

    def replay_headers(self) -> dict[str, str]:
        """The original headers, for a fresh invocation; a repeated replay of this letter is dropped."""
        return {**original_headers(self.headers), H.MSG_ID: f"replay:{self.seq}"}

    def summary(self) -> dict[str, Any]:
        return self.model_dump(exclude={"headers", "body"})

    def to_json(self) -> dict[str, Any]:
        """Everything, with the body as text when it is UTF-8 and as base64 otherwise."""
        data = self.model_dump(exclude={"body"})
        if self.body is None:
            return data
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


# ------------------------------------------------------------------ listing


@dataclass(frozen=True, slots=True)
class Listing:
    """Dead letters without bodies, oldest first, and how many were stored when the listing began.

    Iterates over (and has the length of) its letters.
    """

    letters: list[DeadLetter]
    expected: int

    def __iter__(self) -> Iterator[DeadLetter]:
        return iter(self.letters)

    def __len__(self) -> int:
        return len(self.letters)

    @property
    def shortfall(self) -> str | None:
        """Why fewer letters were listed than were stored when the listing began; None if none are missing."""
        missing = self.expected - len(self.letters)
        if missing <= 0:
            return None
        return (f"listed {len(self.letters)} of the {self.expected} dead letters stored when the listing began: "
                f"{missing} were removed meanwhile (replayed, purged or expired)")


class DeadLetterScan:
    """Reads ``FN_DLQ`` from headers only, in pulls bounded by count and bytes.

    Everything stored when the scan begins is listed, however large the bodies: a throwaway
    ``headers_only`` consumer delivers each letter's headers and its size. A pull that runs
    out of time is followed by another from where it stopped; a delivery that went missing
    (the consumer's sequence skips) restarts the consumer after the last letter seen, so no
    letter is left out unless it was removed meanwhile.
    """

    def __init__(self, nc: NATS, js: JetStreamContext, function: str | None = None, *, batch: int = LIST_BATCH,
                 batch_bytes: int = LIST_BATCH_BYTES, stall: float = LIST_STALL) -> None:
        self.nc = nc
        self.js = js
        self.subject = f"{DLQ_PREFIX}{check_function(function) if function else '>'}"
        self.batch = batch
        self.batch_bytes = batch_bytes
        self.stall = stall
        self.expected = 0    # letters stored when the scan began
        self.last_seq = 0    # the newest of them; later letters are not listed
        self.listed = 0
        self._consumer: str | None = None
        self._next_seq = 1   # the first stream sequence not seen yet
        self._last_delivery = 0

    async def batches(self) -> AsyncIterator[list[DeadLetter]]:
        """The letters, oldest first, a pull's worth at a time."""
        every = self.subject == f"{DLQ_PREFIX}>"
        info = await self.js.stream_info(DLQ_STREAM, subjects_filter=None if every else self.subject)
        self.last_seq = info.state.last_seq
        self.expected = info.state.messages if every else sum((info.state.subjects or {}).values())
        if not self.expected:
            return
        try:
            await self._restart()
            progress = time.monotonic()
            max_bytes = self.batch_bytes
            while True:
                letters, done, status = await self._pull(max_bytes)
                max_bytes = self.batch_bytes
                if letters:
                    self.listed += len(letters)
                    progress = time.monotonic()
                    yield letters
                if done:
                    return
                if status == "too large" and not letters:
                    max_bytes = 2 * self.nc.max_payload  # the next letter's headers alone exceed a pull
                elif status == "restart":
                    await self._restart()
                elif not letters:
                    finished = await self._finished()
                    if finished is None:
                        await self._restart()
                    elif finished:
                        return
                if time.monotonic() - progress > self.stall:
                    raise ListingStalled(f"listing dead letters made no progress for {self.stall:g}s after "
                                         f"{self.listed} of {self.expected}")
        finally:
            await self._drop_consumer()

    async def _pull(self, max_bytes: int) -> tuple[list[DeadLetter], bool, str]:
        """One pull: its letters, whether the scan is done, and how the pull ended."""
        # An inbox of its own: what arrives late for an earlier pull (its last letters, its
        # "batch completed") cannot be taken for this one's.
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            return await self._receive(sub, inbox, max_bytes)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _receive(self, sub: Any, inbox: str, max_bytes: int) -> tuple[list[DeadLetter], bool, str]:
        assert self._consumer is not None
        request = {"batch": self.batch, "max_bytes": max_bytes, "expires": int(_PULL_EXPIRES * 1e9)}
        await self.nc.publish(pull_subject(DLQ_STREAM, self._consumer), json.dumps(request).encode(), reply=inbox)
        letters: list[DeadLetter] = []
        for _ in range(self.batch):
            try:
                msg: Msg = await sub.next_msg(timeout=_PULL_EXPIRES + 2)
            except NatsTimeout:
                return letters, False, "lost"  # the request or its answer went missing: ask again
            if not (msg.reply or "").startswith(ACK_PREFIX):
                status = (msg.headers or {}).get(H.STATUS, "")
                if status == STATUS_HEARTBEAT:
                    continue
                description = str((msg.headers or {}).get(H.DESCRIPTION, ""))
                if status == STATUS_CONFLICT and "MaxBytes" in description:
                    return letters, False, "too large"
                return letters, False, "restart" if "Deleted" in description else "ended"
            meta = msg.metadata
            if meta.consumer != self._consumer:
                continue  # left over from a consumer this scan replaced
            if meta.sequence.consumer != self._last_delivery + 1:
                return letters, False, "restart"  # a delivery never reached us
            self._last_delivery = meta.sequence.consumer
            seq = meta.sequence.stream
            if seq > self.last_seq:
                return letters, True, "ended"
            letters.append(DeadLetter.from_stored(seq, msg.subject, msg.headers, None))
            self._next_seq = seq + 1
            if seq == self.last_seq or meta.num_pending == 0:
                return letters, True, "ended"
        return letters, False, "full"

    async def _finished(self) -> bool | None:
        """Whether everything was delivered and received; None if the consumer must be restarted."""
        assert self._consumer is not None
        try:
            info = await self.js.consumer_info(DLQ_STREAM, self._consumer)
        except NotFoundError:
            return None
        if info.delivered.consumer_seq > self._last_delivery:
            return None  # delivered, never received: ask for those letters again
        return not info.num_pending

    async def _restart(self) -> None:
        await self._drop_consumer()
        info = await self.js.add_consumer(DLQ_STREAM, ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._next_seq,
            filter_subject=self.subject, headers_only=True, mem_storage=True, num_replicas=1,
            inactive_threshold=30.0))  # removes itself if this process dies mid-way
        self._consumer = info.name
        self._last_delivery = 0

    async def _drop_consumer(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(DLQ_STREAM, self._consumer)
            self._consumer = None


async def list_dead_letters(nc: NATS, js: JetStreamContext, function: str | None = None) -> Listing:
    """Every dead letter (only ``function``'s when given), oldest first, without bodies."""
    scan = DeadLetterScan(nc, js, function)
    letters = [letter async for batch in scan.batches() for letter in batch]
    return Listing(letters, scan.expected)
