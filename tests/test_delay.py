"""Delayed calls: held by the server's message scheduler, they run at their time, survive restarts,
and can be cancelled before they fire."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime import Cancelled, Client, NotPending
from runtime.delay import Pending, delayed_count, due_time, rfc3339, schedule_key
from runtime.exitcodes import RET_NOT_PENDING, RET_OK, RET_USAGE
from runtime.server import EmbeddedServer
from runtime.streams import DELAYED_STREAM, INVOKE_STREAM, invoke_stream_config, provision_base

from .conftest import RuntimeFactory, collect, eventually
from .test_cli_invoke import cli, one_line
from .test_client import fn

LATE = 1.5   # the server fires to the second; this much after the due time still counts as on time
SEEN = fn("seen", "delayed:seen")


def runs(received: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(m.data) for m in received]


async def test_a_delayed_call_runs_at_its_time_and_not_before(runtime: RuntimeFactory, nats_server: EmbeddedServer,
                                                              nc: NATS) -> None:
    await runtime(seen=SEEN)
    received, _ = await collect(nc, "test.events.seen")
    async with Client(nats_server.url) as client:
        before = time.time()
        call = await client.submit("seen", {"n": 1}, delay=2)
        assert call.due is not None and before + 2 <= call.due.timestamp() < before + 3
        assert await delayed_count(client.js, "seen") == 1
        await eventually(lambda: received, timeout=6, message="the delayed call to run")
        ran = runs(received)[0]
        assert call.due.timestamp() <= ran["t"] < call.due.timestamp() + LATE
        assert ran["call_id"] == call.id
        assert await client.result(call.id, wait=2) == {"n": 1}
        assert await delayed_count(client.js, "seen") == 0
    assert len(received) == 1


async def test_the_wire_form_carries_headers_to_the_function_and_answers_the_caller(
        runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS) -> None:
    """What any NATS client does: publish to fn.delayed.<function>.<key> with the schedule headers."""
    await runtime(seen=SEEN)
    received, _ = await collect(nc, "test.events.seen")
    answers, _ = await collect(nc, "_INBOX.delayed-caller")
    due = datetime.fromtimestamp(int(time.time()) + 2, UTC)
    ack = await nc.jetstream().publish("fn.delayed.seen.anything-unique", b'{"via": "wire"}', headers={
        "Nats-Schedule": f"@at {rfc3339(due)}", "Nats-Schedule-Target": "fn.due.seen.7",
        "Nats-Schedule-TTL": "1h", "Nats-Msg-Id": "wire-1", "Fn-Call-Id": "wire-1",
        "Fn-Reply-To": "_INBOX.delayed-caller", "X-Trace": "abc"})
    assert ack.stream == DELAYED_STREAM
    await eventually(lambda: answers, timeout=6, message="the answer on Fn-Reply-To")
    ran = runs(received)[0]
    assert ran["t"] >= due.timestamp()
    assert ran["call_id"] == "wire-1"
    assert ran["subject"] == "fn.invoke.seen.7"   # queued at the level the target named
    assert ran["headers"]["X-Trace"] == "abc" and ran["headers"]["Fn-Reply-To"] == "_INBOX.delayed-caller"
    assert json.loads(answers[0].data) == {"via": "wire"}
    assert answers[0].headers["Fn-Call-Id"] == "wire-1"
    async with Client(nc) as client:
        assert await client.result("wire-1") == {"via": "wire"}


async def test_a_call_id_is_scheduled_once(runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS) -> None:
    await runtime(seen=SEEN)
    received, _ = await collect(nc, "test.events.seen")
    async with Client(nats_server.url) as client:
        first = await client.submit("seen", {"n": 1}, delay=1, call_id="once")
        again = await client.submit("seen", {"n": 2}, delay=1, call_id="once")
        assert not first.duplicate and again.duplicate
        assert await client.result("once", wait=5) == {"n": 1}
    await asyncio.sleep(0.5)   # a second run, if any, would come right after the first
    assert [r["event"] for r in runs(received)] == [{"n": 1}]


async def test_a_hundred_delayed_calls_survive_a_restart_of_every_runtime_and_the_server(
        runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    # A short timeout (so ack_wait): a slot the stopped runtime held comes back soon after the restart.
    manifest = fn("seen", "delayed:seen", concurrency=50, timeout=2)
    rt = await runtime(seen=manifest)
    due: dict[str, float] = {}
    async with Client(nats_server.url) as client:
        start = time.time()
        for i in range(100):
            call = await client.submit("seen", {"i": i}, delay=2 + (i % 4), call_id=f"r-{i}")
            assert call.due is not None
            due[call.id] = call.due.timestamp()
        assert await delayed_count(client.js, "seen") == 100
    await rt.stop()
    await nats_server.stop()
    await asyncio.sleep(max(0.0, start + 2.5 - time.time()))   # some calls come due while the server is down
    await nats_server.start()
    watcher = await nats.connect(nats_server.url)
    try:
        received, _ = await collect(watcher, "test.events.seen")
        await runtime(seen=manifest)
        await eventually(lambda: len(received) >= 100, timeout=15, message="all 100 delayed calls to run")
        await asyncio.sleep(0.3)   # nothing more comes
        ran = runs(received)
        assert sorted(r["call_id"] for r in ran) == sorted(due), "each call runs once"
        early = [(r["call_id"], r["t"] - due[r["call_id"]]) for r in ran if r["t"] < due[r["call_id"]]]
        assert not early, f"ran before their time: {early}"
        # Those due after the restart are on time as usual.
        restarted = max(due.values()) - 1
        late = [r["call_id"] for r in ran if due[r["call_id"]] > restarted and r["t"] > due[r["call_id"]] + LATE]
        assert not late, late
        async with Client(watcher) as client:
            results = await asyncio.gather(*(client.result(call_id, wait=5) for call_id in due))
        assert results == [{"i": int(call_id[2:])} for call_id in due]
    finally:
        await watcher.close()


async def test_cancel_before_it_fires(runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS) -> None:
    await runtime(seen=SEEN)
    received, _ = await collect(nc, "test.events.seen")
    answers, _ = await collect(nc, "_INBOX.waiting")
    async with Client(nats_server.url) as client:
        doomed = await client.submit("seen", {"n": "doomed"}, delay=2, headers={"Fn-Reply-To": "_INBOX.waiting"})
        kept = await client.submit("seen", {"n": "kept"}, delay=2)
        assert await delayed_count(client.js, "seen") == 2
        pending = await client.cancel(doomed.id)
        assert (pending.call_id, pending.function) == (doomed.id, "seen")
        assert await delayed_count(client.js, "seen") == 1
        # The caller waiting on its reply subject is told at once; the stored outcome says so too.
        await eventually(lambda: answers, timeout=2, message="the cancellation on Fn-Reply-To")
        assert answers[0].headers["Nats-Service-Error-Code"] == "409"
        with pytest.raises(Cancelled) as caught:
            await client.result(doomed.id)
        assert (caught.value.code, caught.value.type, caught.value.call_id) == (409, "Cancelled", doomed.id)
        with pytest.raises(NotPending):
            await client.cancel(doomed.id)
        # The call due at the same time runs; the cancelled one never does.
        assert await client.result(kept.id, wait=6) == {"n": "kept"}
    await asyncio.sleep(0.5)
    assert [r["event"] for r in runs(received)] == [{"n": "kept"}]


async def test_cancel_after_it_fired_or_of_an_unknown_call_is_an_error(
        runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(seen=SEEN)
    async with Client(nats_server.url) as client:
        call = await client.submit("seen", {"n": 1}, delay=0)
        assert await client.result(call.id, wait=4) == {"n": 1}
        with pytest.raises(NotPending, match="no delayed call"):
            await client.cancel(call.id)
        assert await client.result(call.id) == {"n": 1}, "the outcome stays"
        with pytest.raises(NotPending):
            await client.cancel("never-heard-of")


async def test_the_cli_delays_and_cancels(runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(seen=SEEN)
    submitted = time.time()
    delayed = await cli(nats_server, "invoke", "seen", '{"n": 1}', "--delay", "2s", "--async", "--json")
    assert delayed.returncode == RET_OK, delayed.stderr
    out = json.loads(delayed.stdout)
    assert datetime.fromisoformat(out["due"]).timestamp() >= submitted + 2
    at = rfc3339(datetime.now(UTC) + timedelta(seconds=30))
    later = await cli(nats_server, "invoke", "seen", '{"n": 2}', "--at", at, "--async", "--call-id", "cli-at")
    assert (later.returncode, later.stdout.strip()) == (RET_OK, "cli-at"), later.stderr
    cancelled = await cli(nats_server, "cancel", "cli-at")
    assert cancelled.returncode == RET_OK, cancelled.stderr
    assert cancelled.stdout.startswith("cancelled cli-at (seen, was due at ")
    again = await cli(nats_server, "cancel", "cli-at")
    assert again.returncode == RET_NOT_PENDING, (again.stdout, again.stderr)
    assert "no delayed call 'cli-at' is waiting" in one_line(again)
    waiting = await cli(nats_server, "invoke", "seen", "{}", "--delay", "5s")
    assert waiting.returncode == RET_USAGE and "--async" in one_line(waiting)
    result = await cli(nats_server, "result", out["call_id"], "--wait", "6s")
    assert (result.returncode, json.loads(result.stdout)) == (RET_OK, {"n": 1}), result.stderr
    outcome = await cli(nats_server, "result", "cli-at", "--json")
    assert json.loads(outcome.stdout)["error"]["type"] == "Cancelled"


async def test_an_existing_fn_stream_gets_delayed_calls_in_place(js: JetStreamContext) -> None:
    await js.add_stream(dataclasses.replace(invoke_stream_config(), sources=None))
    await js.publish("fn.invoke.old", b"{}")
    await provision_base(js)
    info = await js.stream_info(INVOKE_STREAM)
    assert info.state.messages == 1, "what was queued stays queued"
    assert [s.name for s in info.config.sources or []] == [DELAYED_STREAM]
    delayed = await js.stream_info(DELAYED_STREAM)
    assert delayed.config.allow_msg_schedules


def test_due_times_are_whole_seconds_never_early() -> None:
    assert due_time(delay=1.2, now=100.5) == datetime.fromtimestamp(102, UTC)
    assert due_time(delay=0, now=100.0) == datetime.fromtimestamp(100, UTC)
    moment = datetime(2026, 12, 1, 8, 0, 0, 1, tzinfo=UTC)
    assert rfc3339(due_time(at=moment)) == "2026-12-01T08:00:01Z"
    for bad in ({"delay": -1}, {"delay": float("nan")}, {}, {"delay": 1, "at": moment}):
        with pytest.raises(ValueError):
            due_time(**bad)
    pending = Pending("c", "seen", 1, "2026-12-01T08:00:00Z", {})
    assert not pending.due_by(moment.timestamp() - 1) and pending.due_by(moment.timestamp())
    # Ids of any shape name one subject token.
    assert schedule_key("a b.c*>") == schedule_key("a b.c*>") and schedule_key("a b.c*>").isalnum()
