"""Event triggers: functions bound to subjects, each (function, trigger) pair on a durable consumer of its own.

Subjects no stream captures yet are captured by ``FN_TRIGGERS``, which the runtime owns. Its
retention is *interest*: an event stays until every trigger consumer whose subject matches it
has settled it (acknowledged, or dead-lettered), so each function gets every event once and a
slow or failing one holds nothing up for the others; an event no trigger listens to is not
kept at all. A subject a user's stream already captures is consumed from that stream (named in
the trigger, or found when it captures the whole subject): JetStream refuses a second stream
on the same subjects, and the user's stream and its data stay as they are.

Undeploying a trigger keeps its consumer, so events published meanwhile wait for it; a consumer
no runtime has pulled from for ``EVENT_RETENTION`` is removed by the server, and so are events
older than that. A subject no consumer of ``FN_TRIGGERS`` reads any more is released (when a
trigger is removed for good, and at a runtime's start): it would keep nothing, and it would keep
a stream of the user's from capturing it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import APIError, NotFoundError

from .errors import ConfigError
from .manifest import OWN_STREAM, FunctionManifest, TriggerSpec
from .streams import OVERLAPS_OTHER_STREAM, all_consumers, capture_advisories, ensure_stream, filter_subjects
from .streams import TRIGGERS_STREAM as TRIGGERS_STREAM
from .subjects import conflicts, covers, minimal_cover, overlaps

log = logging.getLogger("runtime.triggers")

EVENT_RETENTION = 7 * 86400.0   # seconds an event, and the consumer of an undeployed trigger, are kept
CONSUMER_PREFIX = "fn_"
CONSUMER_SEPARATOR = "_ON_"     # names are lower case: this cannot occur inside a function or trigger name
FUNCTION_KEY = "fn-function"    # consumer metadata
TRIGGER_KEY = "fn-trigger"
SUBJECT_UPDATES = 5             # a stream update raced by another runtime's is redone this many times
_LIST_PAGE = 256


class TriggerError(ConfigError):
    """A trigger cannot be bound: the reason names the function, the trigger and what to change."""


@dataclass(frozen=True, slots=True)
class Binding:
    """Where one trigger of one function takes its events from."""

    function: str
    trigger: str
    subject: str
    stream: str
    consumer: str

    @property
    def owned(self) -> bool:
        return self.stream == TRIGGERS_STREAM


def consumer_name(function: str, trigger: str) -> str:
    return f"{CONSUMER_PREFIX}{function}{CONSUMER_SEPARATOR}{trigger}"


def parse_consumer(name: str) -> tuple[str, str] | None:
    """(function, trigger) of a trigger consumer's name; None for any other consumer."""
    if not name.startswith(CONSUMER_PREFIX) or CONSUMER_SEPARATOR not in name:
        return None
    function, _, trigger = name[len(CONSUMER_PREFIX):].partition(CONSUMER_SEPARATOR)
    return (function, trigger) if function and trigger else None


def output_loop(functions: list[FunctionManifest]) -> list[str] | None:
    """A cycle of functions each of whose ``output`` triggers the next (``[a, b, a]``), or None.

    Every result of a function with an ``output`` is published there, so such a cycle would run
    for ever once one event entered it. ``functions`` carry all their triggers (standalone ones
    merged, see ``manifest.with_triggers``); a function triggering itself is refused by its manifest.
    """
    following = {f.name: sorted(g.name for g in functions if g.name != f.name and f.output
                                and any(overlaps(t.subject, f.output) for t in g.triggers))
                 for f in functions}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name):], name]
        if name in done:
            return None
        for nxt in following[name]:
            found = visit(nxt, [*path, name])
            if found is not None:
                return found
        done.add(name)
        return None

    for name in sorted(following):
        cycle = visit(name, [])
        if cycle is not None:
            return cycle
    return None


def triggers_stream_config(subjects: list[str], replicas: int | None = 1) -> StreamConfig:
    return StreamConfig(
        name=TRIGGERS_STREAM,
        description="events captured for function triggers; kept until every matching trigger settled them",
        subjects=subjects,
        retention=RetentionPolicy.INTEREST,
        storage=StorageType.FILE,
        max_age=EVENT_RETENTION,
        duplicate_window=120.0,   # outputs carry a Nats-Msg-Id: a retried function emits once
        num_replicas=replicas,
        allow_direct=True,
    )


def trigger_consumer_config(manifest: FunctionManifest, binding: Binding) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=binding.consumer,
        description=f"events on {binding.subject} for {manifest.name}",
        filter_subject=binding.subject,
        # A new trigger starts with the events published from now on, as a new queue bound to
        # an exchange does; a trigger deployed again resumes where its consumer stopped.
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=manifest.effective_ack_wait,
        # One delivery more than the attempts: an event whose last attempt was never settled (the
        # runtime running it died) comes back once more, and a live runtime dead-letters it without
        # running it (Executor._exhausted). JetStream's advisory alone would not do: none is kept
        # while the store is full, nor for a stream of the user's own whose advisories another
        # stream captures (see streams.capture_advisories). It covers a runtime that dies on that
        # extra delivery too: the mover dead-letters the event then.
        max_deliver=manifest.retry.max_deliver + 1,
        max_ack_pending=manifest.concurrency,
        max_waiting=512,
        inactive_threshold=EVENT_RETENTION,
        metadata={FUNCTION_KEY: manifest.name, TRIGGER_KEY: binding.trigger},
    )


async def all_streams(js: JetStreamContext) -> list[StreamInfo]:
    infos: list[StreamInfo] = []
    while True:
        page = await js.streams_info(offset=len(infos))
        infos.extend(page)
        if len(page) < _LIST_PAGE:
            return infos


def _where(function: str, spec: TriggerSpec) -> str:
    return f"trigger {spec.trigger_name} of {function} ({spec.subject})"


def choose_stream(function: str, spec: TriggerSpec, streams: list[StreamInfo]) -> str:
    """The stream a trigger consumes from, given every stream there is.

    A named stream must capture the subject. Otherwise a stream of the user's that captures the
    whole subject is used; one that captures only part of it is an error naming it, since two
    streams cannot capture one subject.
    """
    by_name = {s.config.name: s for s in streams if s.config.name}
    if spec.stream is not None:
        info = by_name.get(spec.stream)
        if info is None:
            raise TriggerError(f"{_where(function, spec)}: there is no stream {spec.stream}")
        _check_fan_out(function, spec, info)
        subjects = list(info.config.subjects or [])
        if not any(covers(s, spec.subject) for s in subjects):
            raise TriggerError(f"{_where(function, spec)}: stream {spec.stream} does not capture every subject "
                               f"of {spec.subject} (it captures {', '.join(subjects) or 'nothing'}); "
                               f"use a subject within those")
        return spec.stream
    whole: list[str] = []
    for name, info in sorted(by_name.items()):
        if name == TRIGGERS_STREAM:
            continue
        for subject in info.config.subjects or []:
            if not overlaps(subject, spec.subject):
                continue
            if OWN_STREAM.match(name):
                raise TriggerError(f"{_where(function, spec)}: {subject} belongs to the runtime's stream {name}")
            if not covers(subject, spec.subject):
                raise TriggerError(f"{_where(function, spec)}: stream {name} already captures {subject}, which "
                                   f"overlaps it, and two streams cannot capture one subject; name the stream "
                                   f"(stream: {name}) with a subject within {subject}, or choose another subject")
            whole.append(name)
    if whole:
        _check_fan_out(function, spec, by_name[whole[0]])
        return whole[0]
    return TRIGGERS_STREAM


def _check_fan_out(function: str, spec: TriggerSpec, info: StreamInfo) -> None:
    """A work queue hands each message to one consumer and deletes it once acknowledged: events
    there cannot reach every function that wants them, and consuming them would delete the
    user's data."""
    if info.config.retention == RetentionPolicy.WORK_QUEUE:
        raise TriggerError(f"{_where(function, spec)}: stream {info.config.name} is a work queue (each message goes "
                           f"to one consumer and is deleted when acknowledged), so triggers cannot take events from "
                           f"it; publish the events to a stream with limits or interest retention, or call the "
                           f"function on fn.invoke.{function}")


async def keep_in_shape(js: JetStreamContext, replicas: int) -> None:
    """At a runtime's start: ``FN_TRIGGERS``, if it exists, with the runtime's settings and replicas
    (it was created by whichever deploy or runtime bound the first trigger), capturing only what
    its consumers read (those of triggers idle for ``EVENT_RETENTION`` are gone)."""
    try:
        info = await js.stream_info(TRIGGERS_STREAM)
    except NotFoundError:
        return
    await ensure_stream(js, triggers_stream_config(list(info.config.subjects or []), replicas))
    await release_unread(js)


def _captured(info: StreamInfo) -> list[str]:
    """The subjects ``FN_TRIGGERS`` captures for triggers (not the placeholder it has with none)."""
    return [s for s in info.config.subjects or [] if s != TRIGGERS_STREAM]


async def _read_subjects(js: JetStreamContext) -> list[str] | None:
    """The subjects the consumers of ``FN_TRIGGERS`` read, whoever made them; None if one reads all."""
    subjects: list[str] = []
    for info in await all_consumers(js, TRIGGERS_STREAM):
        filters = filter_subjects(info.config)
        if not filters:
            return None
        subjects += filters
    return subjects


async def release_unread(js: JetStreamContext) -> list[str]:
    """Stop ``FN_TRIGGERS`` capturing subjects that no consumer of it reads; the subjects released.

    With interest retention nothing published there would be kept, yet the capture would keep
    any other stream (a stream of the user's, made once the trigger is gone) from taking them.
    With no consumer left, the stream keeps its own name as its only subject (as JetStream gives
    a stream created without subjects), which nobody publishes to.
    """
    for _ in range(SUBJECT_UPDATES):
        try:
            info = await js.stream_info(TRIGGERS_STREAM)
            read = await _read_subjects(js)
        except NotFoundError:
            return []
        if read is None:
            return []
        have = _captured(info)
        wanted = minimal_cover(read)
        released = [s for s in have if s not in wanted]
        if not released:
            return []
        config = info.config
        config.subjects = wanted   # [] -> the server sets the stream's name
        try:
            await js.update_stream(config)
        except NotFoundError:
            return []
        except APIError as exc:
            log.debug("updating %s failed (%s); trying again", TRIGGERS_STREAM, exc)
            await asyncio.sleep(0.05)
            continue
        log.info("stream %s no longer captures %s: no trigger reads it", TRIGGERS_STREAM, ", ".join(released))
        # A trigger bound meanwhile (its consumer made after they were listed) is captured again.
        unread = [s for s in await _read_subjects(js) or [] if not any(covers(w, s) for w in wanted)]
        if unread:
            await ensure_captured(js, unread)
        return released
    return []


async def ensure_captured(js: JetStreamContext, subjects: list[str], replicas: int | None = None) -> None:
    """Make ``FN_TRIGGERS`` capture ``subjects`` (creating it if needed), keeping what it captures."""
    for _ in range(SUBJECT_UPDATES):
        try:
            info: StreamInfo | None = await js.stream_info(TRIGGERS_STREAM)
        except NotFoundError:
            info = None
        have = _captured(info) if info else []
        if info is not None and all(any(covers(h, s) for h in have) for s in subjects):
            return
        wanted = minimal_cover([*have, *subjects])
        clash = conflicts(wanted)
        if clash:
            a, b = clash[0]
            raise TriggerError(f"trigger subjects {a} and {b} overlap without one containing the other; one stream "
                               f"cannot capture both: give the triggers subjects that do not overlap, or one that "
                               f"contains the other")
        try:
            if info is None:
                await js.add_stream(triggers_stream_config(wanted, replicas or 1))
                log.info("created stream %s capturing %s", TRIGGERS_STREAM, ", ".join(wanted))
            else:
                config = info.config
                config.subjects = wanted
                await js.update_stream(config)
                log.info("stream %s now captures %s", TRIGGERS_STREAM, ", ".join(wanted))
        except APIError as exc:
            if exc.err_code == OVERLAPS_OTHER_STREAM:   # another stream created meanwhile
                raise TriggerError(f"cannot capture {', '.join(subjects)}: {exc.description}") from None
            # Raced by another runtime adding its subjects: read again.
            log.debug("updating %s failed (%s); trying again", TRIGGERS_STREAM, exc)
            await asyncio.sleep(0.05)
    raise TriggerError(f"{TRIGGERS_STREAM} kept changing while its subjects were updated; try again")


async def bind(js: JetStreamContext, manifest: FunctionManifest, replicas: int | None = None,
               failed: dict[str, str] | None = None, *, advisories: bool = True) -> list[Binding]:
    """Create or update the consumer of every trigger of ``manifest``; its bindings, in order.

    A trigger that cannot be bound raises ``TriggerError``; with ``failed``, it is recorded there
    (trigger name -> why) and the others are bound. ``advisories``: also have ``FN_EVENTS`` keep the
    advisories of the user's streams the triggers read from (``streams.capture_advisories``), as
    every runtime serving the function does; a deploy leaves that to them (a deployer's user may
    not touch ``FN_EVENTS``).
    """
    if not manifest.triggers:
        return []
    streams = await all_streams(js)
    bindings = []
    for spec in manifest.triggers:
        try:
            bindings.append(await _bind_one(js, manifest, spec, streams, replicas, advisories))
        except TriggerError as exc:
            if failed is None:
                raise
            failed[spec.trigger_name] = str(exc)
    return bindings


async def _bind_one(js: JetStreamContext, manifest: FunctionManifest, spec: TriggerSpec, streams: list[StreamInfo],
                    replicas: int | None, advisories: bool) -> Binding:
    stream = choose_stream(manifest.name, spec, streams)
    if stream == TRIGGERS_STREAM:
        await ensure_captured(js, [spec.subject], replicas)
    else:
        if spec.stream is None:
            log.info("trigger %s of %s consumes %s from stream %s, which captures it", spec.trigger_name,
                     manifest.name, spec.subject, stream)
        if advisories:
            await capture_advisories(js, stream)
    binding = Binding(manifest.name, spec.trigger_name, spec.subject, stream,
                      consumer_name(manifest.name, spec.trigger_name))
    await add_consumer(js, manifest, binding)
    if stream == TRIGGERS_STREAM:
        # Released meanwhile by a deploy that listed the consumers before this one existed?
        await ensure_captured(js, [spec.subject], replicas)
    return binding


async def add_consumer(js: JetStreamContext, manifest: FunctionManifest, binding: Binding) -> None:
    """Create the binding's consumer, or update the one kept from an earlier deploy in place (every
    setting that differs between deploys can be). A refusal is an error: the consumer is never
    deleted to make room, since it holds the events kept for the trigger."""
    try:
        await js.add_consumer(binding.stream, trigger_consumer_config(manifest, binding))
    except APIError as exc:
        raise TriggerError(f"trigger {binding.trigger} of {binding.function}: stream {binding.stream} refused its "
                           f"consumer {binding.consumer}: {exc.description}") from None


async def drop(js: JetStreamContext, function: str, spec: TriggerSpec) -> bool:
    """Remove the consumer of a trigger taken out of its function's manifest; False if there was none."""
    stream, info = await find_binding(js, function, spec)
    if info is None or info.name is None:
        return False
    try:
        await js.delete_consumer(stream, info.name)
    except NotFoundError:
        return False
    log.info("removed consumer %s of %s: trigger %s is no longer in %s's manifest", info.name, stream,
             spec.trigger_name, function)
    return True


async def trigger_consumers(js: JetStreamContext, stream: str) -> list[ConsumerInfo]:
    """Every trigger consumer of ``stream``."""
    return [i for i in await all_consumers(js, stream) if parse_consumer(i.name or "")]


async def find_binding(js: JetStreamContext, function: str, spec: TriggerSpec,
                       streams: list[StreamInfo] | None = None) -> tuple[str, ConsumerInfo | None]:
    """The stream a deployed trigger takes its events from, and its consumer there (None if it has none yet).

    ``streams`` (every stream there is) is read when the consumer is not on the stream tried first.
    """
    name = consumer_name(function, spec.trigger_name)
    first = spec.stream or TRIGGERS_STREAM
    found = await _consumer(js, first, name)
    if found is not None or spec.stream is not None:
        return first, found
    try:
        chosen = choose_stream(function, spec, streams if streams is not None else await all_streams(js))
    except TriggerError:
        return first, None   # no runtime could bind it either: it has no consumer
    if chosen == first:
        return first, None
    return chosen, await _consumer(js, chosen, name)


async def _consumer(js: JetStreamContext, stream: str, name: str) -> ConsumerInfo | None:
    try:
        info: ConsumerInfo = await js.consumer_info(stream, name)
    except NotFoundError:   # no such stream, or no such consumer on it
        return None
    return info


def backlog(info: ConsumerInfo) -> int:
    """Events a trigger's consumer has not settled: not yet delivered, or delivered and not acknowledged."""
    return (info.num_pending or 0) + (info.num_ack_pending or 0)
