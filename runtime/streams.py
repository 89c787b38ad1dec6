"""Idempotent provisioning of the streams, buckets and consumers the runtime relies on."""

from __future__ import annotations

import dataclasses
import logging

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from .manifest import FunctionManifest
from .protocol import STREAM_NAME_IN_USE, kv_stream, kv_subject

log = logging.getLogger("runtime.streams")

INVOKE_STREAM = "FN"
INVOKE_PREFIX = "fn.invoke."
DUPLICATE_WINDOW = 120.0


def invoke_stream_config(replicas: int = 1) -> StreamConfig:
    """``FN``: every invocation, kept until a function's consumer acknowledges it.

    Limits an operator sets (``max_msgs``, ``max_bytes``...) are kept; once one is reached, new
    invocations are refused to their publisher (``discard: new``) rather than the oldest queued
    ones being dropped without anyone being told.
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
    )


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


async def ensure_stream(js: JetStreamContext, config: StreamConfig, update: bool = True) -> None:
    """Create ``config.name``, or bring an existing stream in line with ``config`` if ``update``."""
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            log.info("created stream %s", config.name)
            return
        except BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:  # created meanwhile by another runtime
                raise
            info = await js.stream_info(config.name)
    if not update:
        return
    merged = merged_config(info.config, config)
    have, want = info.config.as_dict(), merged.as_dict()
    changed = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
    if changed:
        await js.update_stream(merged)
        log.info("updated stream %s: %s", config.name, ", ".join(changed))


def consumer_config(manifest: FunctionManifest) -> ConsumerConfig:
    """The durable pull consumer that feeds one function."""
    return ConsumerConfig(
        durable_name=manifest.name,
        description=manifest.description or None,
        filter_subject=manifest.subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=manifest.effective_ack_wait,
        max_deliver=manifest.retry.max_deliver,
        max_ack_pending=manifest.concurrency,
        max_waiting=512,
    )


async def ensure_consumer(js: JetStreamContext, manifest: FunctionManifest) -> None:
    """Create the function's consumer, or update its settings in place."""
    await js.add_consumer(INVOKE_STREAM, consumer_config(manifest))


# ------------------------------------------------------------------ other streams and buckets

DLQ_STREAM = "FN_DLQ"
DLQ_PREFIX = "fn.dead."
EVENTS_STREAM = "FN_EVENTS"
ADVISORY_SUBJECTS = [
    f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{INVOKE_STREAM}.>",
    f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{INVOKE_STREAM}.>",
]
RESULTS_BUCKET = "fn_results"
ERRORS_BUCKET = "fn_errors"
DLQ_BODIES_BUCKET = "fn_dlq_bodies"  # the full originals of dead letters too large to carry them
MANIFESTS_BUCKET = "fn_manifests"
CRON_BUCKET = "fn_cron"

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


def kv_stream_config(bucket: str, history: int = 1, ttl: float | None = None,
                     replicas: int = 1) -> StreamConfig:
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
                    replicas: int = 1) -> None:
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
                         replicas: int = 1) -> None:
    """Everything a runtime needs before serving, created or updated in place."""
    await ensure_stream(js, invoke_stream_config(replicas))
    await ensure_stream(js, dlq_stream_config(dlq_retention, replicas))
    await ensure_stream(js, object_stream_config(DLQ_BODIES_BUCKET, ttl=dlq_retention, replicas=replicas))
    await ensure_stream(js, events_stream_config(replicas))
    await ensure_kv(js, RESULTS_BUCKET, ttl=results_ttl, replicas=replicas)
    await ensure_kv(js, ERRORS_BUCKET, ttl=DAY, replicas=replicas)
    await ensure_kv(js, MANIFESTS_BUCKET, history=16, replicas=replicas)
    await ensure_kv(js, CRON_BUCKET, replicas=replicas)
