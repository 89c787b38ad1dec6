"""Prometheus metrics and the HTTP monitoring of one runtime (``/healthz``, ``/readyz``, ``/metrics``).

Nothing here runs per invocation. The executor keeps plain counters (``stats.py``); a
collector turns them into metric families when Prometheus scrapes. What only JetStream knows
(queue depth, acks pending, dead letters) is read by one background task every few seconds,
for every deployed function, whether this runtime serves it or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .dashboard import dashboard_routes
from .errors import ConfigError
from .http import HttpServer, Route, probe_routes
from .loop import cancel_and_wait
from .priority import function_of_consumer, split_subject
from .state import RuntimeState
from .stats import OUTCOMES, Histogram
from .streams import DLQ_PREFIX, DLQ_STREAM, INVOKE_PREFIX, INVOKE_STREAM, filter_subjects, invoke_consumers

log = logging.getLogger("runtime.metrics")

REFRESH = 3.0   # seconds between two readings of the consumers and the dead letters


@dataclass
class QueueNumbers:
    """What JetStream said at the last reading, per function."""

    pending: dict[str, int] = field(default_factory=dict)       # stored, not yet delivered
    ack_pending: dict[str, int] = field(default_factory=dict)   # delivered, not yet acknowledged
    dead_letters: dict[str, int] = field(default_factory=dict)  # kept in FN_DLQ
    # (function, trigger) -> (events not yet delivered, delivered and not yet acknowledged)
    events: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    read: bool = False   # at least one reading succeeded

    async def refresh(self, state: RuntimeState) -> None:
        _, js = state.connection
        pending: dict[str, int] = {}
        ack_pending: dict[str, int] = {}
        # One listing for every consumer of FN (paged), not a request per function and level.
        taken: set[str] = set()
        for info in await invoke_consumers(js):
            function = function_of_consumer(info.name)
            pending[function] = pending.get(function, 0) + (info.num_pending or 0)
            ack_pending[function] = ack_pending.get(function, 0) + (info.num_ack_pending or 0)
            taken.update(filter_subjects(info.config))
        # Calls at a level that has no consumer yet (no runtime serving the function has made it).
        stored = (await js.stream_info(INVOKE_STREAM, subjects_filter=f"{INVOKE_PREFIX}>")).state.subjects or {}
        for subject, count in stored.items():
            if subject not in taken:
                with contextlib.suppress(ValueError):
                    function = split_subject(subject)[0]
                    pending[function] = pending.get(function, 0) + count
        subjects = (await js.stream_info(DLQ_STREAM, subjects_filter=f"{DLQ_PREFIX}>")).state.subjects or {}
        self.pending, self.ack_pending = pending, ack_pending
        self.dead_letters = {subject.removeprefix(DLQ_PREFIX): count for subject, count in subjects.items()}
        self.events = await _trigger_numbers(js, state)
        self.read = True


async def _trigger_numbers(js: JetStreamContext, state: RuntimeState) -> dict[tuple[str, str], tuple[int, int]]:
    """The consumer of every trigger served here: a request each (a function has few triggers)."""
    numbers: dict[tuple[str, str], tuple[int, int]] = {}
    for worker in list(state.workers.values()):
        for binding in worker.bindings:
            try:
                info = await js.consumer_info(binding.stream, binding.consumer)
            except NotFoundError:
                continue
            numbers[(binding.function, binding.trigger)] = (info.num_pending or 0, info.num_ack_pending or 0)
    return numbers


def _histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    family.add_metric(labels, histogram.cumulative(), histogram.sum)


class RuntimeCollector(Collector):
    """The runtime's metric families, built from its state at each scrape."""

    def __init__(self, state: RuntimeState, queues: QueueNumbers) -> None:
        self.state = state
        self.queues = queues

    def collect(self) -> Iterator[Metric]:
        yield from self._functions()
        yield from self._queues()
        yield from self._cron()
        yield from self._connection()

    def _functions(self) -> Iterator[Metric]:
        state = self.state
        invocations = CounterMetricFamily("fn_invocations", "Attempts by what became of them",
                                          labels=["function", "outcome"])
        duration = HistogramMetricFamily("fn_duration_seconds", "Duration of every attempt",
                                         labels=["function"])
        redeliveries = CounterMetricFamily("fn_redeliveries", "Attempts of messages delivered before",
                                           labels=["function"])
        for name, stats in list(state.stats.items()):
            for outcome, count in zip(OUTCOMES, stats.outcomes, strict=True):
                invocations.add_metric([name, outcome], count)
            _histogram(duration, [name], stats.duration)
            redeliveries.add_metric([name], stats.redeliveries)
        in_flight = GaugeMetricFamily("fn_in_flight", "Invocations held by this runtime (running or about to)",
                                      labels=["function"])
        for name, worker in list(state.workers.items()):
            in_flight.add_metric([name], worker.in_flight)
        functions = GaugeMetricFamily("runtime_functions", "Deployed functions by what this runtime does with them",
                                      labels=["state"])
        functions.add_metric(["served"], len(state.workers))
        functions.add_metric(["failing"], len(state.failing))
        functions.add_metric(["refused"], len(state.refused))
        yield from (invocations, duration, redeliveries, in_flight, functions)

    def _queues(self) -> Iterator[Metric]:
        queues = self.queues
        if not queues.read:
            return
        depth = GaugeMetricFamily("fn_queue_depth", "Invocations stored, not yet delivered (all priority levels)",
                                  labels=["function"])
        acks = GaugeMetricFamily("fn_ack_pending", "Invocations delivered, not yet acknowledged",
                                 labels=["function"])
        dead = GaugeMetricFamily("fn_dead_letters", "Dead letters kept in FN_DLQ", labels=["function"])
        deployed = list(self.state.deployed)
        for name in deployed:
            depth.add_metric([name], queues.pending.get(name, 0))
            acks.add_metric([name], queues.ack_pending.get(name, 0))
        for name in sorted(set(deployed) | queues.dead_letters.keys()):
            dead.add_metric([name], queues.dead_letters.get(name, 0))
        yield from (depth, acks, dead)
        if queues.events:
            waiting = GaugeMetricFamily("fn_trigger_queue_depth", "Events stored for a trigger, not yet delivered",
                                        labels=["function", "trigger"])
            held = GaugeMetricFamily("fn_trigger_ack_pending", "Events delivered to a trigger, not yet acknowledged",
                                     labels=["function", "trigger"])
            for (function, trigger), (pending, ack_pending) in sorted(queues.events.items()):
                waiting.add_metric([function, trigger], pending)
                held.add_metric([function, trigger], ack_pending)
            yield from (waiting, held)

    def _cron(self) -> Iterator[Metric]:
        cron = self.state.cron
        ticks = CounterMetricFamily("fn_cron_ticks", "Cron ticks this runtime stored", labels=["schedule"])
        lateness = HistogramMetricFamily("fn_cron_lateness_seconds", "How long after its time a tick was stored",
                                         labels=["schedule"])
        for name, count in list(cron.ticks.items()):
            ticks.add_metric([name], count)
            _histogram(lateness, [name], cron.lateness[name])
        yield from (ticks, lateness)

    def _connection(self) -> Iterator[Metric]:
        nc = self.state.nc
        connected = GaugeMetricFamily("runtime_nats_connected", "1 while connected to NATS")
        connected.add_metric([], 1 if nc is not None and nc.is_connected else 0)
        reconnects = CounterMetricFamily("runtime_nats_reconnects", "Reconnections to NATS")
        reconnects.add_metric([], 0 if nc is None else nc.stats["reconnects"])
        draining = GaugeMetricFamily("runtime_draining", "1 while shutting down")
        draining.add_metric([], 1 if self.state.draining else 0)
        yield from (connected, reconnects, draining)


def registry_for(state: RuntimeState, queues: QueueNumbers) -> CollectorRegistry:
    """A registry of its own per runtime (several can run in one process), with process metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(RuntimeCollector(state, queues))
    return registry


class Monitoring:
    """The HTTP listener with the probes and ``/metrics``, and the task that reads JetStream's numbers.

    ``open()`` / ``close()`` bound the listener (before the connection, after everything else);
    ``start()`` / ``stop()`` bound the reading task, a component of the connected runtime.
    """

    def __init__(self, state: RuntimeState, expected: Callable[[], Collection[str]], host: str, port: int,
                 required: bool = True) -> None:
        self.state = state
        self.required = required
        self.queues = QueueNumbers()
        self.registry = registry_for(state, self.queues)
        metrics = Route("GET", "/metrics", self.metrics)
        self.server: HttpServer | None = HttpServer(host, port, [*probe_routes(state, expected), metrics,
                                                                 *dashboard_routes(state)])
        self._task: asyncio.Task[None] | None = None

    async def metrics(self, request: web.Request) -> web.Response:
        # The format the scraper asks for (Prometheus text by default, OpenMetrics if it prefers).
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})

    async def open(self) -> None:
        server = self.server
        if server is None:   # given up at an earlier start
            return
        try:
            await server.start()
        except OSError as exc:
            if self.required:
                raise ConfigError(f"cannot serve health and metrics on {server.url}: {exc.strerror or exc}") from None
            log.warning("cannot serve health and metrics on %s (%s); going on without them "
                        "(choose another address with --http HOST:PORT, or --http off)", server.url,
                        exc.strerror or exc)
            self.server = None

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop()

    async def start(self) -> None:
        if self.server is not None:
            self._task = asyncio.create_task(self._read_forever(), name="metrics-refresh")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _read_forever(self) -> None:
        while True:
            try:
                await self.queues.refresh(self.state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # a reconnect, a slow server: the previous reading stays
                log.debug("cannot read queue depths: %s", exc)
            await asyncio.sleep(REFRESH)


def monitoring_for(settings_http: tuple[str, int, bool] | None, state: RuntimeState,
                   expected: Callable[[], Collection[str]]) -> Monitoring | None:
    """The monitoring for ``Settings.http_address(...)``; None when it is off."""
    if settings_http is None:
        return None
    host, port, required = settings_http
    return Monitoring(state, expected, host, port, required)
