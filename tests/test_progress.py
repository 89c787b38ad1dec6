"""Progress updates: ``ctx.progress`` while a function runs, followed by ``Client.stream``,
``on_progress``, ``runtime invoke --follow`` and any NATS client that names a subject for them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

from nats.aio.client import Client as NATS

from runtime import Client, Final, Progress
from runtime.server import EmbeddedServer
from runtime.testing import call

from .conftest import ROOT, RuntimeFactory

STEPS = """\
name: steps
handler: tests.handlers.progress:steps
retry:
  max_deliver: 2
  backoff: [200ms]
"""


async def test_stream_yields_the_updates_in_order_then_the_result(
        runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(steps=STEPS)
    async with Client(nats_server.url) as fn:
        events = [event async for event in fn.stream("steps", {"n": 4})]
    *updates, final = events
    assert all(isinstance(u, Progress) for u in updates)
    assert [u.data for u in updates] == [{"step": i, "of": 4} for i in range(1, 5)]
    assert [(u.attempt, u.seq) for u in updates] == [(1, 1), (1, 2), (1, 3), (1, 4)]
    assert isinstance(final, Final) and final.value == {"done": 4, "followed": True}
    assert {u.call_id for u in updates} == {final.call_id}


async def test_a_retried_attempt_marks_its_updates_with_its_number(
        runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(steps=STEPS)
    seen: list[Progress] = []

    async def on_progress(update: Progress) -> None:   # a coroutine callback is scheduled
        seen.append(update)

    async with Client(nats_server.url) as fn:
        result = await fn.invoke("steps", {"n": 3, "fail_first": True}, on_progress=on_progress, timeout=20)
    assert result == {"done": 3, "followed": True}
    await asyncio.sleep(0)   # let the last scheduled callback run
    assert [(u.attempt, u.seq) for u in seen] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]


async def test_without_a_follower_no_update_is_sent(runtime: RuntimeFactory, nats_server: EmbeddedServer,
                                                    nc: NATS) -> None:
    await runtime(steps=STEPS)
    async with Client(nats_server.url) as fn:
        assert await fn.invoke("steps", {"n": 2}) == {"done": 2, "followed": False}


async def test_any_nats_client_can_follow_by_the_wire_form(runtime: RuntimeFactory, nc: NATS) -> None:
    await runtime(steps=STEPS)
    updates: list[Any] = []
    answered = asyncio.get_running_loop().create_future()

    async def on_update(msg: Any) -> None:
        updates.append((msg.headers["Fn-Progress"], msg.headers["Fn-Attempt"], msg.headers["Fn-Call-Id"],
                        json.loads(msg.data)))

    async def on_answer(msg: Any) -> None:
        answered.set_result(json.loads(msg.data))

    await nc.subscribe("_INBOX.follower.progress", cb=on_update)
    await nc.subscribe("_INBOX.follower.answer", cb=on_answer)
    await nc.jetstream().publish("fn.invoke.steps", json.dumps({"n": 3}).encode(), headers={
        "Nats-Msg-Id": "follow-1", "Fn-Reply-To": "_INBOX.follower.answer",
        "Fn-Progress-To": "_INBOX.follower.progress"})
    assert await asyncio.wait_for(answered, 10) == {"done": 3, "followed": True}
    assert updates == [(str(i), "1", "follow-1", {"step": i, "of": 3}) for i in range(1, 4)]


async def test_updates_never_go_to_a_subject_the_runtime_may_not_answer_on(runtime: RuntimeFactory,
                                                                          nc: NATS) -> None:
    await runtime(steps=STEPS)
    answered = asyncio.get_running_loop().create_future()

    async def on_answer(msg: Any) -> None:
        answered.set_result(json.loads(msg.data))

    await nc.subscribe("_INBOX.x.answer", cb=on_answer)
    await nc.jetstream().publish("fn.invoke.steps", json.dumps({"n": 1}).encode(), headers={
        "Fn-Reply-To": "_INBOX.x.answer", "Fn-Progress-To": "$JS.API.STREAM.DELETE.FN"})
    assert await asyncio.wait_for(answered, 10) == {"done": 1, "followed": False}
    assert (await nc.jetstream().stream_info("FN")).config.name == "FN"   # nothing was sent there


async def test_invoke_follow_prints_the_updates_then_the_result(
        runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(steps=STEPS)
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "runtime", "invoke", "steps", '{"n": 3}', "--follow",
                         "--server", nats_server.url], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f'progress [attempt 1] {{"step": {i}, "of": 3}}' for i in range(1, 4)]
    assert json.loads(result.stdout) == {"done": 3, "followed": True}


def test_the_testing_harness_records_progress() -> None:
    outcome = call("tests.handlers.progress:steps", {"n": 2}, root=ROOT)
    assert outcome.progress == ({"step": 1, "of": 2}, {"step": 2, "of": 2})
    assert outcome.result == {"done": 2, "followed": True}
    assert outcome.published == ()
