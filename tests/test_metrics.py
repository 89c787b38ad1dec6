"""``/metrics`` of a runtime process, read as Prometheus would, and the per-function status."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

from runtime.manifest import FunctionManifest, ManifestSet
from runtime.registry import Registry
from runtime.server import free_port
from runtime.status import gather_status

from .conftest import RuntimeFactory, RuntimeProcess, eventually

PLANNED = """\
name: planned
handler: tests.handlers.metered:planned
concurrency: 16
retry:
  max_deliver: 2
  backoff: ["100ms"]
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: str) -> Samples:
    """Every sample of ``/metrics``, by name and labels."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{http}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_attempts_are_counted_by_outcome_and_timed(runtime_process: Callable[..., RuntimeProcess],
                                                         manifest_dir: Callable[..., Path], nc: NATS,
                                                         js: JetStreamContext) -> None:
    http = f"127.0.0.1:{free_port()}"
    proc = runtime_process(manifest_dir(planned=PLANNED), extra=["--http", http])
    await proc.wait_ready()
    # 100 succeed, 10 fail once then succeed, 5 fail both of their two attempts.
    payloads = [{}] * 100 + [{"fail": 1}] * 10 + [{"fail": 2}] * 5
    await asyncio.gather(*(js.publish("fn.invoke.planned", json.dumps(p).encode()) for p in payloads))

    async def settled() -> Samples | None:
        samples = await scrape(http)
        done = [value(samples, "fn_invocations_total", function="planned", outcome=o) for o in ("ok", "dead_letter")]
        return samples if done == [110, 5] else None

    samples = await eventually(settled, timeout=20, message="110 ok and 5 dead letters")
    outcomes = {o: value(samples, "fn_invocations_total", function="planned", outcome=o)
                for o in ("ok", "retry", "dead_letter", "invalid_input", "rejected", "timeout", "expired")}
    assert outcomes == {"ok": 110, "retry": 15, "dead_letter": 5, "invalid_input": 0, "rejected": 0,
                        "timeout": 0, "expired": 0}
    assert value(samples, "fn_duration_seconds_count", function="planned") == 130
    assert value(samples, "fn_duration_seconds_bucket", function="planned", le="+Inf") == 130
    assert value(samples, "fn_redeliveries_total", function="planned") == 15
    # The last dead letters are still being written when their outcome is counted.
    async def drained() -> bool:
        return value(await scrape(http), "fn_in_flight", function="planned") == 0

    await eventually(drained, timeout=10, message="nothing in flight")
    assert value(samples, "runtime_nats_connected") == 1
    assert value(samples, "runtime_nats_reconnects_total") == 0
    assert (value(samples, "process_resident_memory_bytes") or 0) > 0

    async def dead_letters() -> bool:
        return value(await scrape(http), "fn_dead_letters", function="planned") == 5

    await eventually(dead_letters, timeout=10, message="fn_dead_letters 5")

    # The status responder reports the same numbers, and who answers.
    [status] = await gather_status(nc)
    planned = status["serving"]["planned"]
    assert planned["outcomes"] == outcomes
    assert planned["completed_1m"] == 110 and planned["failed_1m"] == 20
    assert 0 <= planned["p50"] <= planned["p99"] < 5
    assert status["pid"] == proc.pid and status["version"] and status["host"]
    assert status["uptime"] > 0 and status["started"].endswith("Z")


async def test_queue_depth_of_a_function_nobody_pulls(runtime_process: Callable[..., RuntimeProcess],
                                                      manifest_dir: Callable[..., Path],
                                                      js: JetStreamContext) -> None:
    http = f"127.0.0.1:{free_port()}"
    proc = runtime_process(manifest_dir(planned=PLANNED), extra=["--http", http])
    await proc.wait_ready()
    # Deployed, but its handler is outside the trusted prefixes: no runtime ever pulls it.
    registry = await Registry.open(js)
    await registry.deploy(ManifestSet(functions={"idle": FunctionManifest(name="idle", handler="elsewhere.mod:main")},
                                      schedules={}, sources={"Function:idle": "test"}))
    for start in range(0, 250, 50):
        await asyncio.gather(*(js.publish("fn.invoke.idle", b"{}") for _ in range(start, start + 50)))
    # At a level that has no consumer: no runtime serving it made one.
    await asyncio.gather(*(js.publish("fn.invoke.idle.9", b"{}") for _ in range(30)))

    async def depth() -> bool:
        return value(await scrape(http), "fn_queue_depth", function="idle") == 280

    await eventually(depth, timeout=10, interval=0.2, message="fn_queue_depth of idle at 280")
    samples = await scrape(http)
    assert value(samples, "fn_ack_pending", function="idle") == 0
    assert value(samples, "fn_queue_depth", function="planned") == 0
    assert value(samples, "runtime_functions", state="refused") == 1


async def test_cron_ticks_and_their_lateness(runtime: RuntimeFactory) -> None:
    http = f"127.0.0.1:{free_port()}"
    # Deployed as a user deploys it: a schedule set on the scheduler by hand is replaced by the
    # deployed set whenever the registry's watch reports a change, which it may do after the start.
    rt = await runtime({"http": http}, planned=PLANNED,
                       every="kind: Schedule\nname: every\nfunction: planned\ncron: '* * * * * *'\ncatchup: none\n")
    assert rt.scheduler is not None

    async def ticked() -> Samples | None:
        samples = await scrape(http)
        return samples if (value(samples, "fn_cron_ticks_total", schedule="every") or 0) >= 2 else None

    samples = await eventually(ticked, timeout=10, interval=0.2, message="two ticks counted")
    ticks = value(samples, "fn_cron_ticks_total", schedule="every")
    assert value(samples, "fn_cron_lateness_seconds_count", schedule="every") == ticks
    assert (value(samples, "fn_cron_lateness_seconds_sum", schedule="every") or 0) < (ticks or 0) * 1.0


async def test_the_events_waiting_for_each_trigger(runtime: RuntimeFactory, nc: NATS) -> None:
    from .handlers import events

    events.gate["open"] = opened = asyncio.Event()
    http = f"127.0.0.1:{free_port()}"
    await runtime({"http": http, "trust": ("tests",)}, held="""
        name: held
        handler: tests.handlers.events:gated
        concurrency: 1
        triggers:
          - subject: orders.>
    """)
    for i in range(5):
        await nc.publish("orders.created", json.dumps({"id": i}).encode())

    async def counted(waiting: int, running: int) -> bool:
        samples = await scrape(http)
        return (value(samples, "fn_trigger_queue_depth", function="held", trigger="orders-all") == waiting
                and value(samples, "fn_trigger_ack_pending", function="held", trigger="orders-all") == running)

    # One runs (its concurrency is 1), four wait in the trigger's consumer.
    await eventually(lambda: counted(4, 1), timeout=15, interval=0.2, message="4 events waiting, 1 running")
    opened.set()
    await eventually(lambda: counted(0, 0), timeout=15, interval=0.2, message="every event settled")
