"""One view of the whole fleet: what every runtime says it serves, beside what JetStream holds.

The runtimes answer ``fn.admin.status`` (``status.gather_status``); a runtime that does not answer
within the gather window is simply not in the view, so a stopped one disappears from the next
look. JetStream adds what no runtime can see alone: the work queued for each function (served or
not), what its consumers have delivered and wait to hear back about, and its stored dead letters.

``assemble`` is the policy (pure: the answers and the stream facts in, the view out);
``fleet_status`` reads them, the JetStream part while the runtimes answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

from .priority import function_of_consumer
from .queue import QueueState, now, queue_states
from .status import gather_status
from .streams import DLQ_PREFIX, DLQ_STREAM, invoke_consumers

__all__ = ["OUTCOMES", "Fleet", "FunctionView", "RuntimeView", "assemble", "dead_letter_counts", "fleet_status"]

# The outcomes a runtime counts per function, as its status names them.
OUTCOMES = ("ok", "retry", "dead_letter", "invalid_input", "rejected", "timeout", "expired")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _total(values: Iterable[int | None]) -> int | None:
    """The sum of the known values; None when no runtime said."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


@dataclass(frozen=True)
class RuntimeView:
    """One runtime as it answered; None for what it did not say (an older runtime says less)."""

    id: str
    host: str | None
    pid: int | None
    version: str | None
    started: str | None
    uptime: float | None
    serving: dict[str, dict[str, Any]]   # per function, as the runtime reported it
    failing: dict[str, str]              # function -> why it cannot be served
    refused: dict[str, str]              # function -> why its handler is not imported here

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[str, Any], at: datetime) -> RuntimeView:
        rid = str(snapshot.get("runtime") or "?")
        # The id is ``host:pid``: a runtime that does not name them apart still says them.
        id_host, _, id_pid = rid.rpartition(":")
        host = _str(snapshot.get("host")) or id_host or None
        pid = _int(snapshot.get("pid")) or (int(id_pid) if id_pid.isdigit() else None)
        started = _str(snapshot.get("started"))
        uptime = _float(snapshot.get("uptime"))
        if uptime is None and started is not None:
            try:
                uptime = max(0.0, (at - datetime.fromisoformat(started)).total_seconds())
            except (ValueError, TypeError):  # not RFC 3339, or without a time zone
                uptime = None
        serving = snapshot.get("serving")
        return cls(id=rid, host=host, pid=pid, version=_str(snapshot.get("version")), started=started,
                   uptime=uptime,
                   serving={str(k): dict(v) for k, v in serving.items() if isinstance(v, Mapping)}
                   if isinstance(serving, Mapping) else {},
                   failing=_reasons(snapshot.get("failing")), refused=_reasons(snapshot.get("refused")))

    @property
    def in_flight(self) -> int | None:
        return _total(_int(s.get("in_flight")) for s in self.serving.values())

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "host": self.host, "pid": self.pid, "version": self.version, "started": self.started,
                "uptime": self.uptime, "in_flight": self.in_flight, "serving": self.serving,
                "failing": self.failing, "refused": self.refused}


def _reasons(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class FunctionView:
    """One function across the fleet. Counts no runtime reported are None (shown as ``-``)."""

    name: str
    deployed: bool
    runtimes: list[str]          # the runtimes serving it
    failing: dict[str, str]      # runtime -> why it cannot serve it (failing or refused there)
    queued: int                  # in FN, not yet delivered to any runtime
    ack_pending: int             # delivered by its consumers, not yet acknowledged
    in_flight: int | None        # held by the runtimes serving it (the sum of what they say)
    completed_1m: int | None
    failed_1m: int | None
    p50: float | None            # seconds
    p99: float | None
    dead_letters: int | None     # stored in FN_DLQ
    outcomes: dict[str, int] = field(default_factory=dict)   # attempts by outcome since each runtime started
    paused: bool = False         # runtime queue pause: no runtime starts its calls

    @property
    def status(self) -> str:
        """One word: ``paused``, ``serving``, ``failing`` (somewhere, served nowhere), ``no runtime``,
        ``undeployed``."""
        if self.paused:
            return "paused"
        if self.runtimes:
            return "serving"
        if self.failing:
            return "failing"
        return "no runtime" if self.deployed else "undeployed"

    def to_json(self) -> dict[str, Any]:
        return {"function": self.name, "status": self.status, "deployed": self.deployed, "runtimes": self.runtimes,
                "failing": self.failing, "queued": self.queued, "in_flight": self.in_flight,
                "ack_pending": self.ack_pending, "completed_1m": self.completed_1m, "failed_1m": self.failed_1m,
                "p50": self.p50, "p99": self.p99, "dead_letters": self.dead_letters, "outcomes": self.outcomes,
                "paused": self.paused}


@dataclass(frozen=True)
class Fleet:
    """The functions (by name) and the runtimes (by id) that answered, at ``at``."""

    at: datetime
    functions: list[FunctionView]
    runtimes: list[RuntimeView]

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "functions": [f.to_json() for f in self.functions],
                "runtimes": [r.to_json() for r in self.runtimes]}


def _percentiles(reports: Sequence[Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """p50 and p99 across runtimes, from each runtime's own over the last minute.

    Percentiles do not add up: the p50 is the runtimes' p50s weighted by what each completed,
    the p99 the slowest runtime's (an upper bound, which is what a p99 is watched for).
    """
    p50s = [(p, _int(r.get("completed_1m")) or 0) for r in reports if (p := _float(r.get("p50"))) is not None]
    p99s = [p for r in reports if (p := _float(r.get("p99"))) is not None]
    weight = sum(w for _, w in p50s)
    if not p50s:
        p50 = None
    elif weight:
        p50 = sum(p * w for p, w in p50s) / weight
    else:
        p50 = sum(p for p, _ in p50s) / len(p50s)
    return p50, max(p99s) if p99s else None


def _function(name: str, deployed: bool, queue: QueueState | None, ack_pending: int,
              runtimes: Sequence[RuntimeView], dead_letters: Mapping[str, int] | None) -> FunctionView:
    serving = [r for r in runtimes if name in r.serving]
    reports = [r.serving[name] for r in serving]
    failing = {r.id: r.failing.get(name) or f"refused: {r.refused[name]}"
               for r in runtimes if name not in r.serving and (name in r.failing or name in r.refused)}
    outcomes: dict[str, int] = {}
    for report in reports:
        # Counted under ``outcomes``, or beside the other counts.
        counts = report.get("outcomes")
        counts = counts if isinstance(counts, Mapping) else report
        for outcome in OUTCOMES:
            if (count := _int(counts.get(outcome))) is not None:
                outcomes[outcome] = outcomes.get(outcome, 0) + count
    p50, p99 = _percentiles(reports)
    return FunctionView(
        name=name, deployed=deployed, runtimes=[r.id for r in serving], failing=failing,
        queued=queue.queued if queue else 0, ack_pending=ack_pending,
        in_flight=_total(_int(r.get("in_flight")) for r in reports),
        completed_1m=_total(_int(r.get("completed_1m")) for r in reports),
        failed_1m=_total(_int(r.get("failed_1m")) for r in reports),
        p50=p50, p99=p99, dead_letters=None if dead_letters is None else dead_letters.get(name, 0),
        outcomes=outcomes, paused=queue is not None and queue.paused_until is not None)


def assemble(snapshots: Iterable[Mapping[str, Any]], queues: Iterable[QueueState],
             consumers: Iterable[ConsumerInfo], dead_letters: Mapping[str, int] | None,
             at: datetime) -> Fleet:
    """The fleet view from the runtimes' status answers and what JetStream holds.

    Every function appears that is deployed, served, failing, queued for or dead-lettered;
    ``dead_letters`` None means they could not be counted (no ``FN_DLQ``).
    """
    runtimes = sorted((RuntimeView.from_snapshot(s, at) for s in snapshots if isinstance(s, Mapping)),
                      key=lambda r: r.id)
    by_name = {q.function: q for q in queues}
    ack_pending: dict[str, int] = {}
    for consumer in consumers:
        function = function_of_consumer(consumer.name)
        ack_pending[function] = ack_pending.get(function, 0) + (consumer.num_ack_pending or 0)
    names = set(by_name) | set(dead_letters or {})
    for r in runtimes:
        names |= set(r.serving) | set(r.failing) | set(r.refused)
    functions = [_function(n, n in by_name and by_name[n].deployed, by_name.get(n), ack_pending.get(n, 0), runtimes,
                           dead_letters) for n in sorted(names)]
    return Fleet(at, functions, runtimes)


async def dead_letter_counts(js: JetStreamContext) -> dict[str, int] | None:
    """Dead letters stored per function, from the stream's per-subject totals; None without ``FN_DLQ``."""
    try:
        info = await js.stream_info(DLQ_STREAM, subjects_filter=f"{DLQ_PREFIX}>")
    except NotFoundError:
        return None
    counts: dict[str, int] = {}
    for subject, count in (info.state.subjects or {}).items():
        name = subject.removeprefix(DLQ_PREFIX)
        counts[name] = counts.get(name, 0) + count
    return counts


async def fleet_status(nc: NATS, js: JetStreamContext, wait: float = 0.5) -> Fleet:
    """Ask the runtimes (answers within ``wait`` seconds count) and read JetStream meanwhile."""

    answers = asyncio.ensure_future(gather_status(nc, wait))
    try:
        queues, consumers = await queue_states(js), await invoke_consumers(js)
        dead = await dead_letter_counts(js)
    except BaseException:
        # Stop listening before the error reaches the caller, who closes the connection.
        answers.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await answers
        raise
    return assemble(await answers, queues, consumers, dead, now())
