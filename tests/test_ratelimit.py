"""Fleet-wide rate limits (manifest ``rate_limit``): invocation starts across every runtime together,
measured inside the function; waiting work stays queued and is neither failed nor dead-lettered."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from runtime import Client
from runtime.errors import ManifestError
from runtime.manifest import parse_manifest
from runtime.server import EmbeddedServer

from .conftest import RuntimeFactory, RuntimeProcess, collect, eventually

LIMITED = """\
name: limited
handler: tests.handlers.limits:started
concurrency: 50
rate_limit: 10/s
"""


def busiest_second(starts: list[float]) -> int:
    """The most starts any window of one second holds."""
    starts = sorted(starts)
    return max(sum(1 for t in starts[i:] if t - start < 1.0) for i, start in enumerate(starts))


async def test_ten_per_second_holds_across_two_runtimes_at_concurrency_50(
        runtime: RuntimeFactory, runtime_process: Callable[..., RuntimeProcess], manifest_dir: Callable[..., Path],
        nats_server: EmbeddedServer, nc: NATS) -> None:
    events, _ = await collect(nc, "test.events.limited")
    await runtime(limited=LIMITED)
    other = runtime_process(manifest_dir(limited=LIMITED))
    await other.wait_ready()
    began = time.monotonic()
    async with Client(nats_server.url) as fn:
        results = await asyncio.gather(*(fn.invoke("limited", {"n": i}, timeout=30) for i in range(100)))
    took = time.monotonic() - began
    assert sorted(r["n"] for r in results) == list(range(100))
    assert {r["attempt"] for r in results} == {1}, "no invocation failed or was redelivered while it waited"
    runs = [json.loads(m.data) for m in events]
    starts = [run["start"] for run in runs]
    assert len(starts) == 100
    assert took >= 9.0, took
    assert busiest_second(starts) <= 11, sorted(starts)
    assert len({run["pid"] for run in runs}) == 2, "both runtimes started invocations"


async def test_waiting_for_a_permit_is_not_counted_against_the_timeout_or_ack_wait(
        runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS) -> None:
    # The last call waits about 3 s for its start: longer than its timeout and its ack_wait.
    await runtime(limited="name: limited\nhandler: tests.handlers.limits:started\nconcurrency: 8\n"
                          "rate_limit: 2/s\ntimeout: 1s\nack_wait: 1s\nretry:\n  max_deliver: 1\n")
    async with Client(nats_server.url) as fn:
        results = await asyncio.gather(*(fn.invoke("limited", {"n": i}, timeout=20) for i in range(8)))
    assert sorted(r["n"] for r in results) == list(range(8))
    assert {r["attempt"] for r in results} == {1}


async def test_a_function_without_a_limit_is_not_paced(runtime: RuntimeFactory, nats_server: EmbeddedServer,
                                                        nc: NATS) -> None:
    events, _ = await collect(nc, "test.events.free")
    await runtime(free="name: free\nhandler: tests.handlers.limits:started\nconcurrency: 20\n")
    async with Client(nats_server.url) as fn:
        await asyncio.gather(*(fn.invoke("free", {"n": i}, timeout=10) for i in range(40)))
    await eventually(lambda: len(events) == 40, message="40 starts")
    assert busiest_second([json.loads(m.data)["start"] for m in events]) > 11


@pytest.mark.parametrize("text,interval", [("60/m", 1.0), ("10/s", 0.1), (" 7200 / h ", 0.5), ("1/h", 3600.0)])
def test_rates_read_as_the_interval_between_starts(text: str, interval: float) -> None:
    manifest = parse_manifest({"name": "f", "handler": "m:f", "rate_limit": text}, "f.yaml")
    assert manifest.start_interval == interval
    assert manifest.model_dump(mode="json")["rate_limit"] == text.replace(" ", "")


@pytest.mark.parametrize("value,problem", [
    ("60/min", "'60/min' is not a rate; use <count>/<s|m|h>, such as 60/m"),
    (60, "60 is not a rate; use <count>/<s|m|h>, such as 60/m"),
    ("0/s", "the count must be between 1 and 1,000,000"),
])
def test_a_bad_rate_names_the_file_and_the_field(value: Any, problem: str) -> None:
    with pytest.raises(ManifestError) as raised:
        parse_manifest({"name": "f", "handler": "m:f", "rate_limit": value}, "manifests/f.yaml")
    assert str(raised.value) == f"manifests/f.yaml: rate_limit: {problem}"
