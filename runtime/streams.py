"""Idempotent provisioning of the streams, buckets and consumers the runtime relies on."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DiscardPolicy,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
    SubjectTransform,
)
from nats.js.errors import APIError, NotFoundError

from . import priority
from .errors import ConfigError
from .manifest import FunctionManifest
from .protocol import (
    INSUFFICIENT_RESOURCES,
    NO_PEERS_FOR_PLACEMENT,
    QUEUED_PREFIX,
    REPLICAS_NOT_CLUSTERED,
    SLOT_PREFIX,
    STREAM_NAME_IN_USE,
    kv_stream,
    kv_subject,
)
from .protocol import INVOKE_PREFIX as INVOKE_PREFIX  # where the other modules have always found it

log = logging.getLogger("runtime.streams")

INVOKE_STREAM = "FN"
MAX_REPLICAS = 5   # JetStream keeps at most five copies of a stream
DUPLICATE_WINDOW = 120.0


def invoke_stream_config(replicas: int = 1, max_queued: int | None = None) -> StreamConfig:
    """``FN``: every invocation, kept until a function's consumer acknowledges it.

    Limits an operator sets (``max_msgs``, ``max_bytes``...) are kept; once one is reached, new
    invocations are refused to their publisher (``discard: new``) rather than the oldest queued
    ones being dropped without anyone being told.

    ``max_queued`` bounds the invocations stored per subject (per function and priority level)
    the same way. It is the runtime's setting, not the operator's: None removes the limit, so a
    runtime started without it lifts a limit an earlier one set (every runtime of a fleet should
    be given the same value).

    Delayed calls come in from ``FN_DELAYED`` once due (see ``delayed_stream_config``): a full
    queue holds them back there until it has room, rather than refusing them.
    """
    return StreamConfig(
        name=INVOKE_STREAM,
        subjects=[f"{INVOKE_PREFIX}>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        duplicate_window=DUPLICATE_WINDOW,
        num_replicas=replicas,
        allow_direct=True,
        # The headers of every stored invocation, on fn.queued.<function>[.<level>]: an idle
        # runtime learns that a level has work without holding a pull request open on each.
        republish=RePublish(src=f"{INVOKE_PREFIX}>", dest=f"{QUEUED_PREFIX}>", headers_only=True),
        max_msgs_per_subject=max_queued or -1,
        discard_new_per_subject=max_queued is not None,
        sources=[StreamSource(name=DELAYED_STREAM, subject_transforms=[
            SubjectTransform(src=f"{DUE_PREFIX}>", dest=f"{INVOKE_PREFIX}>")])],
    )


DELAYED_STREAM = "FN_DELAYED"
DELAYED_PREFIX = "fn.delayed."   # fn.delayed.<function>.<key>: a pending delayed call, until it is due
DUE_PREFIX = "fn.due."           # fn.due.<function>[.<level>]: what the server publishes when it is due


def delayed_stream_config(replicas: int = 1) -> StreamConfig:
    """``FN_DELAYED``: delayed calls, held by the server's message scheduler until they are due.

    The server refuses message schedules on a stream that discards new messages, and ``FN``
    must (a full queue refuses its publishers), so they live here: at its time the server
    publishes a call to ``fn.due.<function>[.<level>]``, and ``FN`` sources that subject as
    ``fn.invoke.<function>[.<level>]``. Message TTLs let the published copy expire here once
    ``FN`` has long had it (``Nats-Schedule-TTL``).
    """
    return StreamConfig(
        name=DELAYED_STREAM,
        subjects=[f"{DELAYED_PREFIX}>", f"{DUE_PREFIX}>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW,
        num_replicas=replicas,
        allow_direct=True,
        allow_msg_schedules=True,
        allow_msg_ttl=True,
        allow_rollup_hdrs=True,   # the server turns it on with schedules (one schedule per subject)
    )


SLOTS_STREAM = "FN_SLOTS"


def slots_stream_config(replicas: int = 1) -> StreamConfig:
    """``FN_SLOTS``: ``concurrency`` messages per function; a runtime runs an invocation only while it holds one.

    Priority levels need a consumer each (a consumer hands out messages in stream order), so
    no single consumer's ``max_ack_pending`` bounds a function across levels. Holding one of
    these messages (delivered, not yet acknowledged) is what a slot is: the slot consumer's
    ``max_ack_pending`` bounds the fleet, and JetStream hands back the slots of a runtime that
    dies after ``ack_wait``.
    """
    return StreamConfig(
        name=SLOTS_STREAM,
        subjects=[f"{SLOT_PREFIX}>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        duplicate_window=SLOT_DUPLICATE_WINDOW,
        num_replicas=replicas,
        allow_direct=True,
    )


SLOT_DUPLICATE_WINDOW = 10.0
# How soon the slots of a runtime that died are free again. Short, because JetStream does not
# keep a nak across a server restart: a slot given back just before one waits this long.
SLOT_ACK_WAIT = 5.0   # long enough for runtimes provisioning at once, short enough for quick resizes


def merged_config(current: StreamConfig, wanted: StreamConfig) -> StreamConfig:
    """``current`` with every field ``wanted`` sets; what it leaves unset (None) stays as it is.

    An update replaces the whole configuration, so sending ``wanted`` alone would reset the
    limits an operator chose (such as ``max_msgs``) to the server's defaults.
    """
    changes = {f.name: getattr(wanted, f.name) for f in dataclasses.fields(wanted)
               if getattr(wanted, f.name) is not None}
    if not wanted.duplicate_window:
        # 0 asks for the server's default window, which the server then reports as its value.
        del changes["duplicate_window"]
    return dataclasses.replace(current, **changes)


def placement_error(exc: APIError, config: StreamConfig) -> ConfigError | None:
    """The server's refusal to keep ``config.num_replicas`` copies of a stream, said in the user's
    terms; None for any other error."""
    replicas, name = config.num_replicas, config.name
    if exc.err_code == REPLICAS_NOT_CLUSTERED:
        return ConfigError(f"cannot keep {replicas} replicas of stream {name}: the NATS server is not part of a "
                           f"cluster (more than one replica needs a JetStream cluster of at least that many "
                           f"nodes); use --replicas 1, or connect to a cluster")
    if exc.err_code in (NO_PEERS_FOR_PLACEMENT, INSUFFICIENT_RESOURCES):
        return ConfigError(f"cannot keep {replicas} replicas of stream {name}: the cluster has fewer than "
                           f"{replicas} JetStream nodes available ({exc.description}); start more nodes or "
                           f"lower --replicas")
    return None


SCALE_WAIT = 30.0   # seconds a scaled stream gets to have its replicas in place
# Streams scaled during provision_base, waited for together at its end (one at a time would add a
# second or so per stream).
_SCALED: contextvars.ContextVar[list[tuple[str, int]] | None] = contextvars.ContextVar("scaled", default=None)


async def settled(js: JetStreamContext, name: str, replicas: int) -> None:
    """Wait until ``name`` has ``replicas`` current copies: while a stream is being scaled, the
    server refuses to add consumers to it ("insufficient resources")."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SCALE_WAIT
    while True:
        cluster = (await js.stream_info(name)).cluster
        peers = list(cluster.replicas or []) if cluster else []
        if cluster is None or (cluster.leader and len(peers) + 1 == replicas and all(p.current for p in peers)):
            return
        if loop.time() > deadline:
            log.warning("stream %s: its %d replicas are not all in place after %gs; going on", name, replicas,
                        SCALE_WAIT)
            return
        await asyncio.sleep(0.1)


async def ensure_stream(js: JetStreamContext, config: StreamConfig, update: bool = True,
                        kept: Callable[[StreamConfig], list[str]] | None = None) -> None:
    """Create ``config.name``, or bring an existing stream in line with ``config`` if ``update``.

    A different ``num_replicas`` scales the stream in place (JetStream copies it to the new
    peers, or drops some); None leaves an existing stream's as it is. Replicas the server cannot
    place raise ``ConfigError``. ``kept``: the subjects of the existing stream's configuration
    that stay captured beside ``config``'s (added to it at run time).
    """
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            log.info("created stream %s (%d replica%s)", config.name, config.num_replicas or 1,
                     "s" * ((config.num_replicas or 1) > 1))
            return
        except APIError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:  # created meanwhile by another runtime
                raise placement_error(exc, config) or exc from None
            info = await js.stream_info(config.name)
    have_replicas = info.config.num_replicas or 1
    if not update:
        if config.num_replicas and config.num_replicas != have_replicas:
            log.warning("stream %s has %d replica(s), not %d: it is left as the runtimes configured it "
                        "(runtime serve --replicas %d scales it)", config.name, have_replicas,
                        config.num_replicas, config.num_replicas)
        return
    wanted = config
    if kept is not None:
        subjects = list(config.subjects or [])
        wanted = dataclasses.replace(config, subjects=[*subjects, *(s for s in kept(info.config) if s not in subjects)])
    merged = merged_config(info.config, wanted)
    have, want = info.config.as_dict(), merged.as_dict()
    changed = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
    if changed:
        try:
            await js.update_stream(merged)
        except APIError as exc:
            raise placement_error(exc, config) or exc from None
        if "num_replicas" in changed:
            log.info("scaled stream %s from %d to %d replica(s)", config.name, have_replicas,
                     merged.num_replicas or 1)
            batch = _SCALED.get()
            if batch is None:
                await settled(js, config.name, merged.num_replicas or 1)
            else:
                batch.append((config.name, merged.num_replicas or 1))
        log.info("updated stream %s: %s", config.name, ", ".join(changed))


def consumer_config(manifest: FunctionManifest, level: int | None = None) -> ConsumerConfig:
    """The durable pull consumer that feeds one priority level of a function (its default level if None)."""
    level = manifest.priority if level is None else level
    subjects = priority.level_subjects(manifest.name, level, manifest.priority)
    return ConsumerConfig(
        durable_name=priority.consumer_name(manifest.name, level, manifest.priority),
        description=manifest.description or None,
        filter_subject=subjects[0] if len(subjects) == 1 else None,
        filter_subjects=subjects if len(subjects) > 1 else None,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=manifest.effective_ack_wait,
        max_deliver=manifest.retry.max_deliver,
        max_ack_pending=manifest.concurrency,
        max_waiting=512,
    )


def slot_consumer_config(manifest: FunctionManifest) -> ConsumerConfig:
    """The consumer that hands out a function's slots; a slot goes back with a nak, never an ack."""
    return ConsumerConfig(
        durable_name=manifest.name,
        filter_subject=f"{SLOT_PREFIX}{manifest.name}",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=SLOT_ACK_WAIT,
        max_deliver=-1,
        max_ack_pending=manifest.concurrency,
        max_waiting=512,
    )


def filter_subjects(config: ConsumerConfig) -> list[str]:
    """The subjects a consumer takes (a default level of ``FN`` takes two); [] when it takes all."""
    return [config.filter_subject] if config.filter_subject else list(config.filter_subjects or [])


async def ensure_consumer(js: JetStreamContext, manifest: FunctionManifest) -> None:
    """Create the function's consumer for its default level and its slots; bring the consumers of
    its other levels that exist in line with ``manifest``.

    The other levels get a consumer only once an invocation waits there (``ensure_level_consumer``,
    from the runtime's dispatch): on a cluster each consumer is a replicated group of its own, and
    most functions are called at one level.
    """
    default = priority.consumer_name(manifest.name, manifest.priority, manifest.priority)
    configs = {c.durable_name: c for c in (consumer_config(manifest, level) for level in priority.LEVELS)}
    wanted = [configs[default]]
    pause_until = None
    for name in priority.consumer_names(manifest.name):
        try:
            info = await js.consumer_info(INVOKE_STREAM, name)
        except NotFoundError:
            continue
        if info.paused:   # an update keeps a pause; a consumer made again gets it too (queue.pause)
            pause_until = info.config.pause_until
        config = configs.get(name)   # None: the level it fed is now the default one's
        if config is None or sorted(filter_subjects(info.config)) != sorted(filter_subjects(config)):
            # A WorkQueue stream refuses consumers whose filters overlap: when the default level
            # moves, the consumers whose subjects change are removed before the new ones exist.
            await js.delete_consumer(INVOKE_STREAM, name)
            log.info("removed consumer %s: the subjects of %s's levels changed", name, manifest.name)
        elif name != default:
            wanted.append(config)
    for config in wanted:
        config.pause_until = pause_until
    # At once: on a cluster with a node down, a new replicated consumer can take several seconds to
    # elect its leader (one of its peers cannot vote).
    await asyncio.gather(*(js.add_consumer(INVOKE_STREAM, config, timeout=CONSUMER_CREATE_TIMEOUT)
                           for config in wanted), ensure_slots(js, manifest))


async def ensure_level_consumer(js: JetStreamContext, manifest: FunctionManifest, level: int) -> None:
    """Create (or update) the consumer of one priority level of the function; paused like its
    default level's consumer, if that one is (see queue.pause)."""
    config = consumer_config(manifest, level)
    with contextlib.suppress(NotFoundError):
        default = await js.consumer_info(INVOKE_STREAM, manifest.name)
        if default.paused:
            config.pause_until = default.config.pause_until
    await js.add_consumer(INVOKE_STREAM, config, timeout=CONSUMER_CREATE_TIMEOUT)


CONSUMER_CREATE_TIMEOUT = 20.0   # seconds; see ensure_consumer
_LIST_PAGE = 256   # consumers per JetStream list reply


async def all_consumers(js: JetStreamContext, stream: str) -> list[ConsumerInfo]:
    """Every consumer of ``stream``, all pages of the list."""
    infos: list[ConsumerInfo] = []
    while True:
        page = await js.consumers_info(stream, offset=len(infos) or None)
        infos.extend(page)
        if len(page) < _LIST_PAGE:
            return infos


async def invoke_consumers(js: JetStreamContext) -> list[ConsumerInfo]:
    """Every consumer of ``FN`` (a function has one per priority level)."""
    return await all_consumers(js, INVOKE_STREAM)


async def ensure_slots(js: JetStreamContext, manifest: FunctionManifest) -> None:
    """Make ``FN_SLOTS`` hold exactly ``concurrency`` slots of the function, and its slot consumer."""
    subject = f"{SLOT_PREFIX}{manifest.name}"
    want = manifest.concurrency
    await js.add_consumer(SLOTS_STREAM, slot_consumer_config(manifest), timeout=CONSUMER_CREATE_TIMEOUT)
    state = (await js.stream_info(SLOTS_STREAM, subjects_filter=subject)).state
    have = (state.subjects or {}).get(subject, 0)
    if have < want:
        # Runtimes provisioning at the same moment send the same ids: the duplicate window
        # keeps one copy of each slot.
        for first in range(have + 1, want + 1, 500):   # pipelined: a large concurrency is many slots
            await asyncio.gather(*(js.publish(subject, b"", headers={"Nats-Msg-Id": f"slot:{manifest.name}:{want}:{i}"})
                                   for i in range(first, min(first + 500, want + 1))))
    elif have > want:
        seqs: list[int] = []
        seq = 0
        while True:
            try:
                msg = await js.get_msg(SLOTS_STREAM, seq + 1, subject=subject, next=True)
            except NotFoundError:
                break
            assert msg.seq is not None
            seq = msg.seq
            seqs.append(seq)
        # Slots held by running invocations go too: those finish, and the slots they give
        # back no longer exist.
        for extra in seqs[want:]:
            with contextlib.suppress(NotFoundError):
                await js.delete_msg(SLOTS_STREAM, extra)
    if have != want:
        log.info("%s has %d slot(s), was %d", manifest.name, want, have)


# ------------------------------------------------------------------ other streams and buckets

DLQ_STREAM = "FN_DLQ"
DLQ_PREFIX = "fn.dead."
EVENTS_STREAM = "FN_EVENTS"
TRIGGERS_STREAM = "FN_TRIGGERS"   # events for function triggers (see triggers.py)
# The streams every runtime creates (besides the KV_ and OBJ_ streams of its buckets). FN_TRIGGERS
# is the runtime's too, created with the first trigger.
OWNED_STREAMS = frozenset({INVOKE_STREAM, DELAYED_STREAM, SLOTS_STREAM, DLQ_STREAM, EVENTS_STREAM})
MAX_DELIVERIES_ADVISORIES = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES."
ADVISORY_SUBJECTS = [
    f"{MAX_DELIVERIES_ADVISORIES}{INVOKE_STREAM}.>",
    f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{INVOKE_STREAM}.>",
    # An event no runtime got to settle, not even on the extra delivery a runtime dead-letters it on
    # (see triggers.trigger_consumer_config). Those settled were dead-lettered by the runtime, and a
    # terminated event is nothing to move. A stream of the user's own that triggers read from is
    # added by the runtimes serving them (see capture_advisories).
    f"{MAX_DELIVERIES_ADVISORIES}{TRIGGERS_STREAM}.>",
]
OVERLAPS_OTHER_STREAM = 10065   # JetStream's "subjects overlap with an existing stream"
ADVISORY_UPDATES = 5            # tries at adding a subject to FN_EVENTS while other runtimes change it
RESULTS_BUCKET = "fn_results"
ERRORS_BUCKET = "fn_errors"
DLQ_BODIES_BUCKET = "fn_dlq_bodies"  # the full originals of dead letters too large to carry them
MANIFESTS_BUCKET = "fn_manifests"
CRON_BUCKET = "fn_cron"
CACHE_BUCKET = "fn_cache"   # results kept by input (manifest ``cache``), each entry with its own TTL
RATE_BUCKET = "fn_rate"     # per function: when its next invocation may start (manifest ``rate_limit``)

DAY = 86400.0


def dlq_stream_config(retention: float = 30 * DAY, replicas: int = 1) -> StreamConfig:
    """``FN_DLQ``: dead letters, one per failed message, kept for ``retention`` seconds."""
    return StreamConfig(
        name=DLQ_STREAM,
        subjects=[f"{DLQ_PREFIX}>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=retention,
        duplicate_window=min(3600.0, retention),
        num_replicas=replicas,
        allow_direct=True,
    )


def events_stream_config(replicas: int = 1) -> StreamConfig:
    """``FN_EVENTS``: the consumer advisories that drive the dead-letter mover."""
    return StreamConfig(
        name=EVENTS_STREAM,
        subjects=ADVISORY_SUBJECTS,
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_age=30 * DAY,
        num_replicas=replicas,
    )


def trigger_advisories(stream: str) -> str:
    """The subject of the ``MAX_DELIVERIES`` advisories of ``stream``'s consumers."""
    return f"{MAX_DELIVERIES_ADVISORIES}{stream}.*"


def user_stream_advisories(config: StreamConfig) -> list[str]:
    """The subjects ``capture_advisories`` added to ``FN_EVENTS`` (``config``): kept by every update."""
    own = {trigger_advisories(INVOKE_STREAM), trigger_advisories(TRIGGERS_STREAM)}
    return [subject for subject in config.subjects or []
            if subject.startswith(MAX_DELIVERIES_ADVISORIES) and subject.endswith(".*") and subject not in own]


async def capture_advisories(js: JetStreamContext, stream: str) -> bool:
    """Make ``FN_EVENTS`` keep the ``MAX_DELIVERIES`` advisories of ``stream``'s consumers.

    A trigger's event whose runtimes all died holding it, even on the extra delivery (see
    ``triggers.trigger_consumer_config``), is then dead-lettered by the mover, as one of
    ``FN_TRIGGERS`` is. Best effort: False (with a warning) when another stream already
    captures those advisories, when ``FN_EVENTS`` cannot be read or changed (permissions), or
    kept changing; the trigger works all the same.
    """
    subject = trigger_advisories(stream)
    missed = "an event of a trigger on it whose runtimes all die while holding it is not dead-lettered"
    for _ in range(ADVISORY_UPDATES):
        try:
            info = await js.stream_info(EVENTS_STREAM)
        except NotFoundError:
            return False   # made by the next runtime start, which keeps what triggers need
        except Exception as exc:   # no permission, no JetStream: the trigger works all the same
            log.warning("cannot read %s to keep the advisories of stream %s (%s); %s", EVENTS_STREAM, stream,
                        exc or type(exc).__name__, missed)
            return False
        subjects = list(info.config.subjects or [])
        if subject in subjects:
            return True
        info.config.subjects = [*subjects, subject]
        try:
            await js.update_stream(info.config)
        except APIError as exc:
            if exc.err_code == OVERLAPS_OTHER_STREAM:
                log.warning("%s cannot keep the advisories of stream %s's consumers, another stream captures them "
                            "(%s); %s", EVENTS_STREAM, stream, exc.description, missed)
                return False
            await asyncio.sleep(0.05)   # raced by another runtime changing FN_EVENTS: read it again
        except Exception as exc:
            log.warning("cannot update %s to keep the advisories of stream %s (%s); %s", EVENTS_STREAM, stream,
                        exc or type(exc).__name__, missed)
            return False
    log.warning("%s kept changing while the advisories of stream %s were added to it; the next runtime start "
                "adds them", EVENTS_STREAM, stream)
    return False


def kv_stream_config(bucket: str, history: int = 1, ttl: float | None = None,
                     replicas: int | None = 1) -> StreamConfig:
    """The stream behind a key-value bucket, shaped as nats-py's ``create_key_value`` makes it."""
    return StreamConfig(
        name=kv_stream(bucket),
        subjects=[kv_subject(bucket, ">")],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_msgs_per_subject=history,
        max_age=ttl,
        discard=DiscardPolicy.NEW,
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=True,
        num_replicas=replicas,
        duplicate_window=min(120.0, ttl) if ttl else 120.0,
    )


async def ensure_kv(js: JetStreamContext, bucket: str, history: int = 1, ttl: float | None = None,
                    replicas: int | None = 1) -> None:
    """Create or update a bucket; ``replicas`` None keeps an existing bucket's replicas."""
    await ensure_stream(js, kv_stream_config(bucket, history, ttl, replicas))


def object_stream_config(bucket: str, ttl: float | None = None, replicas: int = 1) -> StreamConfig:
    """The stream behind an object store bucket, shaped as nats-py's ``create_object_store`` makes it."""
    return StreamConfig(
        name=f"OBJ_{bucket}",
        subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=ttl,
        discard=DiscardPolicy.NEW,
        allow_rollup_hdrs=True,
        allow_direct=True,
        num_replicas=replicas,
    )


async def provision_base(js: JetStreamContext, *, results_ttl: float = DAY, dlq_retention: float = 30 * DAY,
                         replicas: int = 1, max_queued: int | None = None) -> None:
    """Everything a runtime needs before serving, created or updated in place (and, for streams
    scaled to other replicas, in place on every peer)."""
    batch: list[tuple[str, int]] = []
    token = _SCALED.set(batch)
    try:
        await _provision(js, results_ttl=results_ttl, dlq_retention=dlq_retention, replicas=replicas,
                         max_queued=max_queued)
    finally:
        _SCALED.reset(token)
    await asyncio.gather(*(settled(js, name, n) for name, n in batch))


async def _provision(js: JetStreamContext, *, results_ttl: float, dlq_retention: float,
                     replicas: int, max_queued: int | None) -> None:
    await ensure_stream(js, delayed_stream_config(replicas))
    await ensure_stream(js, invoke_stream_config(replicas, max_queued))
    await ensure_stream(js, slots_stream_config(replicas))
    await ensure_stream(js, dlq_stream_config(dlq_retention, replicas))
    await ensure_stream(js, object_stream_config(DLQ_BODIES_BUCKET, ttl=dlq_retention, replicas=replicas))
    await ensure_stream(js, events_stream_config(replicas), kept=user_stream_advisories)
    await ensure_kv(js, RESULTS_BUCKET, ttl=results_ttl, replicas=replicas)
    await ensure_kv(js, ERRORS_BUCKET, ttl=DAY, replicas=replicas)
    await ensure_kv(js, MANIFESTS_BUCKET, history=16, replicas=replicas)
    await ensure_kv(js, CRON_BUCKET, replicas=replicas)
    # Entries of one function live as long as its own cache ttl says: a message TTL each (Nats-TTL).
    await ensure_stream(js, dataclasses.replace(kv_stream_config(CACHE_BUCKET, replicas=replicas), allow_msg_ttl=True))
    await ensure_kv(js, RATE_BUCKET, replicas=replicas)
