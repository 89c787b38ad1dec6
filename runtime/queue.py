"""The invocations waiting in ``FN``, per function: how many, the oldest, the next few, and purging them.

A function's invocations are the messages on ``fn.invoke.<name>`` and ``fn.invoke.<name>.*``
(one token more: a priority level). They stay in ``FN`` until a consumer acknowledges them,
whether the function is deployed or not. Everything here is counted from the stream's
per-subject totals and single direct gets, so a long queue is never read through.
"""

from __future__ import annotations

import base64
import dataclasses
import heapq
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, RawStreamMsg
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError

from .manifest import FunctionManifest
from .priority import function_of_consumer
from .protocol import QUEUED_PREFIX, purge_subject
from .registry import Registry
from .revisions import NotDeployed
from .streams import INVOKE_PREFIX, INVOKE_STREAM, MANIFESTS_BUCKET, invoke_consumers
from .wire import subject_problem

__all__ = ["Paused", "QueueState", "QueuedMessage", "check_name", "function_subjects", "pause", "peek", "purge",
           "queue_state", "queue_states", "resume"]

# What ``pause`` sets when it is given no end: the server has no pause without one.
UNTIL_RESUMED = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)

# What a direct get adds to the stored headers: where the message is, not what was published.
_STORED_AS = frozenset({"Nats-Stream", "Nats-Subject", "Nats-Sequence", "Nats-Time-Stamp"})


def check_name(name: str) -> str:
    """``name`` if it can be a function's token in ``fn.invoke.<name>``; queued work of any such name is shown."""
    if "." in name or subject_problem(f"{INVOKE_PREFIX}{name}") is not None:
        raise ValueError(f"{name!r} is not a function name")
    return name


def function_subjects(name: str) -> list[str]:
    """The subjects a function's invocations are published on, as stream filters."""
    return [f"{INVOKE_PREFIX}{name}", f"{INVOKE_PREFIX}{name}.*"]


def _function_of(subject: str) -> str | None:
    tokens = subject.removeprefix(INVOKE_PREFIX).split(".")
    return tokens[0] if subject.startswith(INVOKE_PREFIX) and len(tokens) <= 2 else None


def _matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches the subject filter ``pattern`` (``*`` one token, ``>`` the rest)."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


@dataclass(frozen=True)
class QueuedMessage:
    """One invocation as stored in ``FN``."""

    seq: int
    subject: str
    time: datetime | None
    headers: dict[str, str]
    body: bytes

    @classmethod
    def from_raw(cls, raw: RawStreamMsg) -> QueuedMessage:
        headers = {k: v for k, v in (raw.headers or {}).items() if k not in _STORED_AS}
        return cls(seq=raw.seq or 0, subject=raw.subject or "", time=raw.time, headers=headers, body=raw.data or b"")

    def age(self, now: datetime) -> float | None:
        # The server's clock stamped it; a little skew must not make an age negative.
        return None if self.time is None else max(0.0, (now - self.time).total_seconds())

    def to_json(self, now: datetime) -> dict[str, Any]:
        """Everything, with the body as text when it is UTF-8 and as base64 otherwise."""
        data: dict[str, Any] = {"seq": self.seq, "subject": self.subject, "age": self.age(now),
                                "published_at": self.time.isoformat() if self.time else None,
                                "headers": self.headers, "size": len(self.body)}
        try:
            data["body"] = self.body.decode()
        except UnicodeDecodeError:
            data["body_base64"] = base64.b64encode(self.body).decode()
        return data


@dataclass(frozen=True)
class QueueState:
    """What waits in ``FN`` for one function, counted up to ``FN`` sequence ``up_to``."""

    function: str
    deployed: bool
    queued: int                       # not yet delivered
    in_flight: int                    # delivered, not yet acknowledged (running, waiting to retry)
    subjects: dict[str, int]          # every message waiting, per subject (priority levels apart)
    up_to: int
    oldest: QueuedMessage | None = None   # the oldest queued message (headers and body left out)
    # Per subject, the sequence from which its messages are queued (those below were delivered).
    queued_from: dict[str, int] = field(default_factory=dict, repr=False)
    paused_until: datetime | None = None   # paused (see pause); UNTIL_RESUMED when given no end

    @property
    def total(self) -> int:
        return self.queued + self.in_flight

    def to_json(self, now: datetime) -> dict[str, Any]:
        oldest = self.oldest
        return {"function": self.function, "deployed": self.deployed, "queued": self.queued,
                "in_flight": self.in_flight, "subjects": self.subjects,
                "oldest_seq": oldest.seq if oldest else None,
                "oldest_published_at": oldest.time.isoformat() if oldest and oldest.time else None,
                "oldest_age": oldest.age(now) if oldest else None,
                "paused": self.paused_until is not None,
                "paused_until": _until_json(self.paused_until)}


def _until_json(until: datetime | None) -> str | None:
    return None if until is None or until >= UNTIL_RESUMED else until.isoformat()


def paused_until(consumer: ConsumerInfo) -> datetime | None:
    """Until when ``consumer`` is paused; None if it is not."""
    stamp = consumer.config.pause_until
    if not consumer.paused or not stamp:
        return None
    # The server writes nanoseconds; Python reads up to microseconds.
    whole, dot, fraction = stamp.removesuffix("Z").partition(".")
    return datetime.fromisoformat(whole + (dot + fraction[:6] if dot else "")).replace(tzinfo=UTC)


# ------------------------------------------------------------------ reading


async def _subject_counts(js: JetStreamContext, filters: list[str]) -> tuple[dict[str, int], int]:
    """Messages per subject matching ``filters``, and the stream's last sequence when counting began."""
    counts: dict[str, int] = {}
    last: int | None = None
    for subjects_filter in filters:
        info = await js.stream_info(INVOKE_STREAM, subjects_filter=subjects_filter)
        counts.update(info.state.subjects or {})
        last = info.state.last_seq if last is None else last
    return counts, last or 0


def _filters(consumer: ConsumerInfo) -> list[str]:
    config = consumer.config
    return [config.filter_subject] if config.filter_subject else list(config.filter_subjects or [">"])


async def _deployed(js: JetStreamContext) -> set[str]:
    """The deployed functions, read without creating the registry on a server that has none."""
    try:
        kv = await js.key_value(MANIFESTS_BUCKET)
    except BucketNotFoundError:
        return set()
    return {d.manifest.name for d in (await Registry(js, kv).all()).values()
            if isinstance(d.manifest, FunctionManifest)}


async def _next(js: JetStreamContext, subject: str, start: int) -> QueuedMessage | None:
    """The first message on ``subject`` at or after sequence ``start``: one direct get."""
    try:
        raw = await js.get_msg(INVOKE_STREAM, max(1, start), subject=subject, direct=True, next=True)
    except NotFoundError:
        return None
    return QueuedMessage.from_raw(raw)


def _state(name: str, deployed: bool, subjects: dict[str, int], up_to: int,
           consumers: list[ConsumerInfo]) -> QueueState:
    """Queued and in flight from the consumers that take the function's subjects.

    ``FN`` is a work queue, so at most one consumer takes each subject. A consumer counts what
    it has not delivered yet; a subject no consumer takes is never delivered, all of it queued.
    """
    taken_by = {s: next((c for c in consumers if any(_matches(f, s) for f in _filters(c))), None)
                for s in subjects}
    feeding = {c.name: c for c in taken_by.values() if c is not None}.values()
    total = sum(subjects.values())
    untaken = sum(n for s, n in subjects.items() if taken_by[s] is None)
    queued = min(total, untaken + sum(c.num_pending or 0 for c in feeding))
    # A pull consumer delivers in stream order: what it took is at or below its delivered sequence.
    starts = {s: (c.delivered.stream_seq if c is not None and c.delivered else 0) + 1 for s, c in taken_by.items()}
    own = next((c for c in consumers if c.name == name), None)   # its default level's: paused with the rest
    return QueueState(name, deployed, queued, total - queued, subjects, up_to, queued_from=starts,
                      paused_until=paused_until(own) if own is not None else None)


async def _with_oldest(js: JetStreamContext, state: QueueState) -> QueueState:
    if not state.queued:
        return state
    heads = [m for s, start in state.queued_from.items() if (m := await _next(js, s, start)) is not None]
    if not heads:
        return state
    first = min(heads, key=lambda m: m.seq)
    return dataclasses.replace(state, oldest=QueuedMessage(first.seq, first.subject, first.time, {}, b""))


async def queue_state(js: JetStreamContext, name: str) -> QueueState:
    """What waits for function ``name``, deployed or not."""
    subjects, up_to = await _subject_counts(js, function_subjects(check_name(name)))
    state = _state(name, name in await _deployed(js), subjects, up_to, await invoke_consumers(js))
    return await _with_oldest(js, state)


async def queue_states(js: JetStreamContext) -> list[QueueState]:
    """Every deployed function and every function with invocations waiting, by name."""
    counts, up_to = await _subject_counts(js, [f"{INVOKE_PREFIX}>"])
    deployed = await _deployed(js)
    per_function: dict[str, dict[str, int]] = {name: {} for name in deployed}
    for subject, count in counts.items():
        name = _function_of(subject)
        if name is not None:
            per_function.setdefault(name, {})[subject] = count
    consumers = await invoke_consumers(js)
    states = []
    for name in sorted(per_function):
        state = _state(name, name in deployed, per_function[name], up_to, consumers)
        states.append(await _with_oldest(js, state))
    return states


async def peek(js: JetStreamContext, state: QueueState, count: int) -> list[QueuedMessage]:
    """The next ``count`` queued invocations of ``state``'s function, oldest first (in flight ones left out)."""
    heads: list[tuple[int, str, QueuedMessage]] = []
    for subject, start in state.queued_from.items():
        if (m := await _next(js, subject, start)) is not None:
            heads.append((m.seq, subject, m))
    heapq.heapify(heads)
    found: list[QueuedMessage] = []
    while heads and len(found) < count:
        _, subject, message = heapq.heappop(heads)
        found.append(message)
        if (m := await _next(js, subject, message.seq + 1)) is not None:
            heapq.heappush(heads, (m.seq, subject, m))
    return found


# ------------------------------------------------------------------ purging


async def purge(nc: NATS, name: str, up_to: int | None = None) -> int:
    """Delete function ``name``'s invocations from ``FN`` (those up to sequence ``up_to`` when given).

    In flight ones go too: their running attempt finishes, but nothing is left to retry.
    Returns how many were removed.
    """
    purged = 0
    for subject in function_subjects(check_name(name)):
        request: dict[str, Any] = {"filter": subject}
        if up_to is not None:
            request["seq"] = up_to + 1   # the purge keeps this sequence and everything after it
        # The purge reply counts what it removed; nats-py's helper only says whether it succeeded.
        reply = await nc.request(purge_subject(INVOKE_STREAM), json.dumps(request).encode(), timeout=10)
        data = json.loads(reply.data)
        if "error" in data:
            APIError.from_error(data["error"])  # raises it as nats-py would: the CLI says it in plain words
        purged += int(data.get("purged", 0))
    return purged


# ------------------------------------------------------------------ pausing


@dataclass(frozen=True)
class Paused:
    """What ``pause`` or ``resume`` did: the function's consumers, and until when they are paused."""

    function: str
    consumers: list[str]
    until: datetime | None   # None: running (resume); UNTIL_RESUMED: paused with no end

    def to_json(self) -> dict[str, Any]:
        return {"function": self.function, "paused": self.until is not None,
                "paused_until": _until_json(self.until), "consumers": self.consumers}


async def _consumers_of(js: JetStreamContext, name: str) -> list[str]:
    names = [c.name for c in await invoke_consumers(js) if function_of_consumer(c.name) == name]
    if not names:
        raise NotDeployed(f"function {name!r} has no consumer in {INVOKE_STREAM}: it is not deployed")
    return sorted(names)


async def pause(js: JetStreamContext, name: str, until: datetime | None = None) -> Paused:
    """Stop every runtime starting ``name``'s calls until ``until`` (None: until :func:`resume`).

    Each of its consumers in ``FN`` is paused on the server, which then hands out nothing: calls
    keep queueing (within ``max_queued``), those running finish, retries wait. The server resumes
    them at ``until`` by itself. A priority level whose consumer is made meanwhile is made paused,
    and a deploy keeps the pause. Raises ``NotDeployed`` if the function has no consumer.
    """
    end = until or UNTIL_RESUMED
    stamp = end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    consumers: list[str] = []
    # Listed again afterwards: a level's consumer made by a runtime meanwhile, as its default
    # level's was paused, may have been made before and not seen the pause.
    while new := [c for c in await _consumers_of(js, check_name(name)) if c not in consumers]:
        for consumer in new:
            await js.pause_consumer(INVOKE_STREAM, consumer, stamp)
        consumers += new
    return Paused(name, sorted(consumers), end)


async def resume(nc: NATS, js: JetStreamContext, name: str) -> Paused:
    """Let the runtimes start ``name``'s calls again, at once: the calls stored during the pause rang
    for runtimes that could not take them, so each level with calls waiting rings once more."""
    consumers = await _consumers_of(js, check_name(name))
    for consumer in consumers:
        await js.resume_consumer(INVOKE_STREAM, consumer)
    counts, _ = await _subject_counts(js, function_subjects(name))
    for subject, count in counts.items():
        if count:
            await nc.publish(QUEUED_PREFIX + subject.removeprefix(INVOKE_PREFIX), b"")
    await nc.flush()
    return Paused(name, consumers, None)


def now() -> datetime:
    return datetime.now(UTC)
