"""The queue length limit (``max_queued``): a publish over it is refused to its publisher; nothing queued is lost."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import APIError

from runtime import Client, QueueFull
from runtime.errors import ConfigError
from runtime.exitcodes import RET_QUEUE_FULL
from runtime.manifest import Schedule
from runtime.scheduler import Scheduler
from runtime.server import EmbeddedServer
from runtime.settings import Settings
from runtime.streams import INVOKE_STREAM, provision_base

from .conftest import ROOT, RuntimeFactory, collect, eventually

QUEUED = """\
name: queued
handler: tests.handlers.core:sleepy
concurrency: 1
"""
LIMIT = {"max_queued": 100}


def started(events: list[Any]) -> list[str]:
    return [json.loads(m.data)["call_id"] for m in events if json.loads(m.data)["phase"] == "start"]


async def test_a_full_queue_refuses_every_publisher_and_drains_without_losing_a_call(
        runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext) -> None:
    # Deployed (and FN limited) by a runtime that then stops: nothing runs while the queue fills.
    rt = await runtime(LIMIT, queued=QUEUED)
    await rt.stop()
    events, _ = await collect(nc, "test.events.queued")
    for i in range(100):
        # The first one holds the only slot for a while once a runtime is back.
        body = json.dumps({"seconds": 1.5 if i == 0 else 0}).encode()
        await js.publish("fn.invoke.queued", body, headers={"Nats-Msg-Id": f"call-{i}"})

    with pytest.raises(APIError) as refused:
        await js.publish("fn.invoke.queued", b"{}", headers={"Nats-Msg-Id": "call-100"})
    assert (refused.value.err_code, refused.value.description) == (10077, "maximum messages per subject exceeded")
    async with Client(nats_server.url) as client:
        with pytest.raises(QueueFull) as full:
            await client.submit("queued", {"seconds": 0}, call_id="submitted")
        assert (full.value.code, full.value.type, full.value.call_id) == (429, "QueueFull", "submitted")
        with pytest.raises(QueueFull):
            await client.invoke("queued", {"seconds": 0}, timeout=5)
    command = [sys.executable, "-m", "runtime", "invoke", "queued", "{}", "--async", "--server", nats_server.url]
    cli = await asyncio.to_thread(subprocess.run, command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert cli.returncode == RET_QUEUE_FULL, (cli.stdout, cli.stderr)
    assert cli.stdout == "" and len(cli.stderr.strip().splitlines()) == 1
    assert "QueueFull: the queue of queued is full" in cli.stderr and "(code 429)" in cli.stderr

    # A runtime is back (and its gateway with it); the first call keeps the queue full a while longer.
    await runtime(LIMIT, queued=QUEUED)
    answer = await nc.request("fn.call.queued", b'{"seconds": 0}', timeout=5)
    assert answer.headers is not None and answer.headers["Nats-Service-Error-Code"] == "429", answer.headers
    assert answer.headers["Nats-Service-Error"].startswith("QueueFull: the queue of queued is full")
    await eventually(lambda: started(events), message="the first call to start")
    assert started(events) == ["call-0"], "refused while the first call still ran"

    await eventually(lambda: len(started(events)) == 100, timeout=15, message="the queued calls to run")
    assert sorted(started(events)) == sorted(f"call-{i}" for i in range(100))
    await eventually(lambda: _stored(js, 0), message="the queue to empty")
    async with Client(nats_server.url) as client:
        assert await client.invoke("queued", {"seconds": 0}, timeout=10) == {"slept": 0}
    reply = await nc.request("fn.call.queued", b'{"seconds": 0}', timeout=10)
    assert json.loads(reply.data) == {"slept": 0}


async def _stored(js: JetStreamContext, count: int) -> bool:
    return (await js.stream_info(INVOKE_STREAM)).state.messages == count


async def test_the_limit_holds_per_function_and_per_priority_level(js: JetStreamContext) -> None:
    await provision_base(js, max_queued=2)
    for subject in ("fn.invoke.a", "fn.invoke.a", "fn.invoke.a.10", "fn.invoke.a.10", "fn.invoke.b"):
        await js.publish(subject, b"{}")
    for subject in ("fn.invoke.a", "fn.invoke.a.10"):
        with pytest.raises(APIError, match="maximum messages per subject exceeded"):
            await js.publish(subject, b"{}")
    await js.publish("fn.invoke.a.1", b"{}")
    await js.publish("fn.invoke.b", b"{}")


async def test_the_limit_is_set_changed_and_removed_in_place_keeping_the_operators_limits(
        js: JetStreamContext) -> None:
    await provision_base(js)
    # An operator's own limit on the stream as a whole.
    info = await js.stream_info(INVOKE_STREAM)
    await js.update_stream(dataclasses.replace(info.config, max_msgs=1000))

    await provision_base(js, max_queued=5)
    config = (await js.stream_info(INVOKE_STREAM)).config
    assert (config.max_msgs_per_subject, config.discard_new_per_subject, config.max_msgs) == (5, True, 1000)
    await provision_base(js, max_queued=7)
    assert (await js.stream_info(INVOKE_STREAM)).config.max_msgs_per_subject == 7

    await provision_base(js)   # a runtime started without the setting lifts the limit
    config = (await js.stream_info(INVOKE_STREAM)).config
    assert (config.max_msgs_per_subject, config.discard_new_per_subject, config.max_msgs) == (-1, False, 1000)


def test_max_queued_comes_from_the_command_line_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_MAX_QUEUED", "250")
    assert Settings.from_env().max_queued == 250
    assert Settings.from_env(max_queued=10).max_queued == 10
    monkeypatch.setenv("RUNTIME_MAX_QUEUED", "0")
    with pytest.raises(ConfigError, match="max_queued"):
        Settings.from_env()
    monkeypatch.delenv("RUNTIME_MAX_QUEUED")
    assert Settings.from_env().max_queued is None


async def test_cron_ticks_refused_by_a_full_queue_are_skipped_and_reported_now_and_then(
        js: JetStreamContext, caplog: pytest.LogCaptureFixture) -> None:
    await provision_base(js, max_queued=1)
    await js.publish("fn.invoke.report", b"{}")
    scheduler = Scheduler(js)
    schedule = Schedule(name="every-minute", cron="* * * * *", function="report")
    caplog.set_level(logging.WARNING, logger="runtime.scheduler")
    began = time.monotonic()
    for minute in range(5):
        await scheduler.fire(schedule, datetime(2026, 1, 1, 8, minute, tzinfo=UTC))
    assert time.monotonic() - began < 2, "a refused tick is not retried"
    reports = [r.getMessage() for r in caplog.records if r.name == "runtime.scheduler"]
    assert len(reports) == 1, reports
    assert "skipped tick 2026-01-01T08:00:00Z of every-minute: the queue of report is full" in reports[0]
    assert (await js.stream_info(INVOKE_STREAM)).state.messages == 1
