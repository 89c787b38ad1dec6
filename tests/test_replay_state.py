"""A replayed call is pending until its replayed run stores an outcome, and says so."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime.client import Client
from runtime.errors import FunctionError, NoResult
from runtime.exitcodes import RET_FAILED, RET_NO_RESULT, RET_OK
from runtime.results import Replayed, fetch_response, fetch_state
from runtime.server import EmbeddedServer
from runtime.streams import DLQ_STREAM, EVENTS_STREAM

from .conftest import ROOT, RuntimeFactory, eventually

HELD_FIX = "name: heldfix\nhandler: tests.handlers.replays:held_fix\nretry: {max_deliver: 1}\n"
TAKES = 2.0   # seconds the replayed run takes at least


async def cli(server: EmbeddedServer, *args: str) -> subprocess.CompletedProcess[str]:
    # In a thread: the in-process runtime keeps serving while the command runs.
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "runtime", *args, "--server", server.url],
                                   cwd=ROOT, capture_output=True, text=True, timeout=30)


async def dead_lettered(js: JetStreamContext) -> bool:
    return ((await js.stream_info(DLQ_STREAM)).state.messages == 1
            and (await js.stream_info(EVENTS_STREAM)).state.messages == 0)


async def test_a_replayed_call_is_pending_until_the_replayed_run_stores_its_outcome(
        runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext,
        scratch: Path) -> None:
    await runtime(heldfix=HELD_FIX)
    await js.publish("fn.invoke.heldfix", b'{"order": 7}', headers={"Fn-Call-Id": "order-7"})
    await eventually(lambda: dead_lettered(js), message="the dead letter")
    failed = await cli(nats_server, "result", "order-7")
    assert failed.returncode == RET_FAILED and "LookupError: not fixed yet" in failed.stderr
    [letter] = json.loads((await cli(nats_server, "dlq", "ls", "--json")).stdout)

    (scratch / "fixed").touch()
    replay = await cli(nats_server, "dlq", "replay", str(letter["seq"]))
    assert replay.returncode == RET_OK, replay.stderr
    waiting = asyncio.ensure_future(cli(nats_server, "result", "order-7", "--wait", "30s", "--json"))
    started = time.monotonic()

    # Without --wait: pending, because of the replay, in one line; exit 4.
    pending = await cli(nats_server, "result", "order-7")
    assert pending.returncode == RET_NO_RESULT, (pending.stdout, pending.stderr)
    [line] = pending.stderr.splitlines()
    assert "'order-7' is pending: replayed from dead letter" in line and f"dead letter {letter['seq']} at " in line
    assert pending.stdout == ""
    as_json = json.loads((await cli(nats_server, "result", "order-7", "--json")).stdout)
    assert as_json["status"] == "pending" and as_json["replayed_from"] == letter["seq"]
    assert as_json["replayed_at"].endswith("Z")
    async with Client(nc) as fn:
        with pytest.raises(NoResult) as caught:
            await fn.result("order-7")
    assert caught.value.replayed_from == letter["seq"] and caught.value.replayed_at == as_json["replayed_at"]
    state = await fetch_state(js, "order-7")
    assert isinstance(state, Replayed) and await fetch_response(js, "order-7") is None

    # With --wait: the replayed run's outcome once it ends, not the old failure at once.
    await asyncio.sleep(max(0.0, started + TAKES - time.monotonic()))   # the replayed run takes a while
    assert not waiting.done(), "result --wait returned before the replayed run ended"
    (scratch / "release").touch()
    waited = await waiting
    assert waited.returncode == RET_OK, (waited.stdout, waited.stderr)
    assert json.loads(waited.stdout)["result"] == {"fixed": True, "order": 7}
    async with Client(nc) as fn:
        assert await fn.result("order-7") == {"fixed": True, "order": 7}


async def test_a_call_that_was_never_replayed_says_nothing_of_replays(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext, scratch: Path) -> None:
    await runtime(heldfix=HELD_FIX)
    async with Client(nc) as fn:
        with pytest.raises(FunctionError):
            await fn.invoke("heldfix", {"order": 8}, call_id="order-8", timeout=10)
        with pytest.raises(NoResult) as caught:
            await fn.result("order-9")
    assert caught.value.replayed_at is None and caught.value.replayed_from is None
    assert "replayed" not in str(caught.value)
    # A plain KV delete (no replay) is not a replay either.
    kv = await js.key_value("fn_results")
    await kv.delete("order-8")
    assert await fetch_state(js, "order-8") is None
