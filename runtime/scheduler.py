"""Cron triggers: every runtime runs the scheduler; the stream keeps one invocation per tick.

Each due tick is published to ``fn.invoke.<function>`` with ``Nats-Msg-Id: cron:<name>:<tick>``, so
the FN stream's duplicate window stores it once however many runtimes publish it. The ``fn_cron``
bucket keeps, per schedule, the last fired tick; after a restart of the whole fleet the ticks
missed since then follow the schedule's ``catchup`` (see ``crontab.due_ticks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict

from . import codec
from . import headers as H
from .crontab import cron, due_ticks, format_tick
from .loop import cancel_and_wait
from .manifest import Schedule
from .priority import invoke_subject
from .protocol import entry_value
from .queuelimit import Throttle, held_back, is_queue_full
from .stats import CronStats
from .streams import CRON_BUCKET, DUPLICATE_WINDOW

log = logging.getLogger("runtime.scheduler")

MAX_SLEEP = 5.0          # the clock is read again at least this often (clock jumps, stops)
PUBLISH_TIMEOUT = 2.0
# A failed publish is retried for this long: a retry of a publish that was in fact stored must
# still fall inside the stream's duplicate window.
RETRY_FOR = DUPLICATE_WINDOW / 2
STOP_TIMEOUT = 5.0


def now() -> datetime:
    return datetime.now(UTC)


def tick_payload(schedule: Schedule) -> Any:
    """The body of every tick: ``payload``, or ``{}`` when the schedule has none.

    ``null`` would fail any function whose input is a model or a mapping, on every tick; an empty
    object validates against any model whose fields all have defaults.
    """
    return {} if schedule.payload is None else schedule.payload


class CronRecord(BaseModel):
    """The ``fn_cron`` entry of one schedule: its definition and the last tick fired."""

    model_config = ConfigDict(frozen=True)

    schedule: str
    function: str
    cron: str
    timezone: str
    catchup: str
    enabled: bool
    since: datetime                 # ticks before this were never due (new, changed or re-enabled)
    last: datetime | None = None    # the last tick published
    fired_at: datetime | None = None

    @classmethod
    def describe(cls, schedule: Schedule, since: datetime, previous: CronRecord | None) -> CronRecord:
        return cls(schedule=schedule.name, function=schedule.function, cron=schedule.cron,
                   timezone=schedule.timezone, catchup=schedule.catchup, enabled=schedule.enabled, since=since,
                   last=previous.last if previous else None, fired_at=previous.fired_at if previous else None)

    def same_times(self, schedule: Schedule) -> bool:
        return (self.cron, self.timezone, self.enabled) == (schedule.cron, schedule.timezone, schedule.enabled)

    @property
    def handled_until(self) -> datetime:
        return max(self.since, self.last) if self.last else self.since


async def read_record(kv: KeyValue, name: str) -> tuple[CronRecord | None, int]:
    try:
        entry = await kv.get(name)
    except KeyNotFoundError:
        return None, 0
    value = entry_value(entry)
    if not value:
        return None, entry.revision or 0
    return CronRecord.model_validate_json(value), entry.revision or 0


async def change_record(kv: KeyValue, name: str,
                        change: Callable[[CronRecord | None], CronRecord | None]) -> CronRecord | None:
    """Apply ``change`` with compare-and-set; ``change`` returns None to leave the entry as it is."""
    for _ in range(10):
        record, revision = await read_record(kv, name)
        new = change(record)
        if new is None:
            return record
        try:
            if revision:
                await kv.update(name, new.model_dump_json().encode(), last=revision)
            else:
                await kv.create(name, new.model_dump_json().encode())
            return new
        except KeyWrongLastSequenceError:
            continue  # another runtime wrote meanwhile: decide again on its value
    raise TimeoutError(f"{CRON_BUCKET}/{name} keeps changing")


async def read_records(kv: KeyValue) -> dict[str, CronRecord]:
    """Every record in the bucket, by schedule name."""
    try:
        keys = await kv.keys()
    except NoKeysError:
        return {}
    records = {}
    for key in keys:
        record, _ = await read_record(kv, key)
        if record is not None:
            records[key] = record
    return records


class _Runner:
    """The loop of one schedule: sleep until the next tick, publish what is due, repeat."""

    def __init__(self, scheduler: Scheduler, schedule: Schedule, resume: datetime | None) -> None:
        self.scheduler = scheduler
        self.schedule = schedule
        self.cron = cron(schedule.cron, schedule.timezone)
        self.cursor = resume            # every tick up to here is handled
        self.stopping = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"cron-{schedule.name}")

    async def stop(self) -> None:
        self.stopping.set()
        done, _ = await asyncio.wait([self.task], timeout=STOP_TIMEOUT)
        if not done:
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task

    async def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                await self._loop()
                return
            except Exception:
                log.exception("schedule %s failed; starting over in 1s", self.schedule.name)
                await self._sleep(1.0)

    async def _loop(self) -> None:
        # A runner that takes over from a changed definition was live all along.
        live_since = self.cursor or now()
        if self.cursor is None:
            self.cursor = await self._register(live_since)
        while not self.stopping.is_set():
            at = now()
            ticks = due_ticks(self.cron, self.schedule.catchup, self.cursor, at, live_since)
            if ticks and ticks[0] <= live_since:
                log.info("schedule %s: firing %d tick(s) missed since %s (catchup: %s)", self.schedule.name,
                         sum(t <= live_since for t in ticks), format_tick(self.cursor), self.schedule.catchup)
            for tick in ticks:
                await self.scheduler.fire(self.schedule, tick)
            self.cursor = at
            due = self.cron.next_after(at)
            # Sleep in slices computed from the wall clock: a late wake-up never shifts later ticks.
            while not self.stopping.is_set() and (delay := due.timestamp() - time.time()) > 0:
                await self._sleep(min(delay, MAX_SLEEP))

    async def _register(self, started: datetime) -> datetime:
        """Record this definition; returns the instant up to which ticks count as handled."""
        schedule = self.schedule

        def change(record: CronRecord | None) -> CronRecord | None:
            if record is None or not record.same_times(schedule):
                # New, changed or re-enabled: ticks before now were never due.
                return CronRecord.describe(schedule, started, record)
            if record != CronRecord.describe(schedule, record.since, record):
                return CronRecord.describe(schedule, record.since, record)
            return None

        kv = await self.scheduler.bucket()
        record = await change_record(kv, schedule.name, change)
        assert record is not None
        return min(record.handled_until, started)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)


class Scheduler:
    """Publishes the ticks of a set of schedules; ``set_schedules`` replaces the set at any time."""

    def __init__(self, js: JetStreamContext, schedules: Iterable[Schedule] = (),
                 stats: CronStats | None = None) -> None:
        self.js = js
        self.stats = CronStats() if stats is None else stats   # ticks stored, for the metrics
        self.schedules: dict[str, Schedule] = {s.name: s for s in schedules}
        self.runners: dict[str, _Runner] = {}
        self.kv: KeyValue | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._refusals = Throttle()   # ticks refused by a full queue, reported now and then

    async def bucket(self) -> KeyValue:
        if self.kv is None:
            self.kv = await self.js.key_value(CRON_BUCKET)
        return self.kv

    async def start(self) -> None:
        self._changed.clear()
        await self._reconcile()
        self._task = asyncio.create_task(self._follow_changes(), name="scheduler")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        runners, self.runners = list(self.runners.values()), {}
        await asyncio.gather(*(r.stop() for r in runners))

    def set_schedules(self, schedules: Iterable[Schedule]) -> None:
        """Run exactly ``schedules`` from now on; unchanged ones keep running undisturbed."""
        self.schedules = {s.name: s for s in schedules}
        self._changed.set()

    async def _follow_changes(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._reconcile()
            except Exception:
                log.exception("could not apply the new set of schedules")

    async def _reconcile(self) -> None:
        for name, runner in list(self.runners.items()):
            if self.schedules.get(name) != runner.schedule:
                del self.runners[name]
                await runner.stop()
                wanted = self.schedules.get(name)
                if wanted is not None and wanted.enabled and (wanted.cron, wanted.timezone) == (
                        runner.schedule.cron, runner.schedule.timezone):
                    # Same times, other payload or target: carry on from where the old one stopped.
                    self.runners[name] = _Runner(self, wanted, runner.cursor)
                    log.info("updated schedule %s", name)
                else:
                    log.info("stopped schedule %s", name)
        for name, schedule in self.schedules.items():
            if name not in self.runners and schedule.enabled:
                self.runners[name] = _Runner(self, schedule, None)
                log.info("schedule %s: %s %s (%s) -> %s", name, schedule.cron, schedule.timezone,
                         schedule.catchup, schedule.function)
            elif not schedule.enabled:
                await self._note_disabled(schedule)

    async def _note_disabled(self, schedule: Schedule) -> None:
        def change(record: CronRecord | None) -> CronRecord | None:
            if record is not None and record.same_times(schedule):
                return None
            return CronRecord.describe(schedule, now(), record)

        try:
            await change_record(await self.bucket(), schedule.name, change)
        except Exception as exc:
            log.warning("cannot record that schedule %s is disabled: %s", schedule.name, exc)

    async def fire(self, schedule: Schedule, tick: datetime) -> None:
        """Publish one tick (retrying while the duplicate window covers it), then record it."""
        stamp = format_tick(tick)
        headers = {H.SCHEDULE: schedule.name, H.SCHEDULED_AT: stamp, H.MSG_ID: f"cron:{schedule.name}:{stamp}",
                   H.CONTENT_TYPE: codec.JSON}
        body = codec.encode(tick_payload(schedule))
        subject = invoke_subject(schedule.function, schedule.priority)
        delay, first_try = 0.1, time.monotonic()
        while True:
            try:
                ack = await self.js.publish(subject, body, headers=headers, timeout=PUBLISH_TIMEOUT)
                break
            except Exception as exc:
                if is_queue_full(exc):
                    # Retrying would add to the load the limit is there to refuse: this tick is skipped.
                    held = self._refusals.due(schedule.function)
                    if held is not None:
                        log.warning("skipped tick %s of %s: the queue of %s is full%s", stamp, schedule.name,
                                    schedule.function, held_back(held))
                    return
                if time.monotonic() - first_try > RETRY_FOR:
                    log.error("gave up publishing tick %s of %s: %s", stamp, schedule.name, exc)
                    return
                log.warning("cannot publish tick %s of %s (%s); retrying", stamp, schedule.name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.debug("tick %s of %s -> %s (seq %d%s)", stamp, schedule.name, subject, ack.seq,
                  ", duplicate" if ack.duplicate else "")
        if not ack.duplicate:   # every runtime publishes each tick; the one whose copy was stored counts it
            self.stats.fired(schedule.name, (now() - tick).total_seconds())
        try:
            await self._record(schedule, tick)
        except Exception as exc:
            log.warning("cannot record tick %s of %s: %s", stamp, schedule.name, exc)

    async def _record(self, schedule: Schedule, tick: datetime) -> None:
        fired_at = now()

        def change(record: CronRecord | None) -> CronRecord | None:
            if record is not None and record.last is not None and record.last >= tick:
                return None  # the bucket only moves forward
            base = record or CronRecord.describe(schedule, tick, None)
            return base.model_copy(update={"last": tick, "fired_at": fired_at})

        await change_record(await self.bucket(), schedule.name, change)
