"""A trigger's event whose runtime dies on every attempt is dead-lettered, on a stream of the user's own too.

JetStream's MAX_DELIVERIES advisory is kept (in ``FN_EVENTS``) for ``FN_TRIGGERS`` only, and not
at all while the store is full; so a trigger's consumer delivers an event once more than its
attempts, and the runtime that gets that delivery dead-letters the event without running it.
Runtimes are real processes, killed with SIGKILL by PID while they run the event.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from runtime.triggers import TRIGGERS_STREAM
from tests.conftest import RuntimeProcess, eventually, the_dead_letter
from tests.handlers.fanout import runs

pytestmark = pytest.mark.asyncio

MANIFEST = """\
name: payout
handler: tests.handlers.fanout:record_then_hang
timeout: 1h
ack_wait: 1s
retry: {max_deliver: 2}
triggers:
  - subject: payments.settled
"""


@pytest.mark.parametrize("stream", ["PAYMENTS", TRIGGERS_STREAM])
async def test_an_event_whose_runtime_died_on_every_attempt_is_dead_lettered_by_the_next_runtime(
        nc: NATS, js: JetStreamContext, manifest_dir: Callable[..., Path],
        runtime_process: Callable[..., RuntimeProcess], scratch: Path, stream: str) -> None:
    if stream == TRIGGERS_STREAM:
        manifests = manifest_dir(payout=MANIFEST)
    else:   # a stream of the user's own
        await js.add_stream(StreamConfig(name=stream, subjects=["payments.>"], storage=StorageType.FILE,
                                         retention=RetentionPolicy.LIMITS))
        manifests = manifest_dir(payout=MANIFEST + f"    stream: {stream}\n")

    async def attempt_runs_then_its_runtime_dies(attempts: int) -> None:
        rt = runtime_process(manifests, env={"RUNTIME_TEST_DIR": str(scratch)})
        await rt.wait_ready()
        if attempts == 1:
            await js.publish("payments.settled", json.dumps({"id": 42}).encode(), headers={"Fn-Note": "kept"})
        await eventually(lambda: len(runs(scratch, "payout")) == attempts, timeout=20)
        rt.signal(signal.SIGKILL)
        await rt.wait_exit()

    await attempt_runs_then_its_runtime_dies(1)
    await attempt_runs_then_its_runtime_dies(2)   # the last attempt: the runtime dies with it again

    survivor = runtime_process(manifests, env={"RUNTIME_TEST_DIR": str(scratch)})
    await survivor.wait_ready()
    letter = await the_dead_letter(nc, js, "payout", timeout=20)
    assert letter.reason == "max_deliver"
    assert letter.headers["Fn-Deliveries"] == "2"
    assert letter.headers["Fn-Error"].startswith("worker lost")
    assert letter.headers["Fn-Trigger"] == "payments-settled" and letter.headers["Fn-Note"] == "kept"
    assert letter.headers["Fn-Original-Subject"] == "payments.settled"
    assert letter.body == b'{"id": 42}'
    # Two attempts ran, none more; the survivor lives on, and the trigger's consumer holds nothing.
    assert [r["attempt"] for r in runs(scratch, "payout")] == [1, 2]
    assert survivor.proc.poll() is None

    async def settled() -> bool:
        info = await js.consumer_info(stream, "fn_payout_ON_payments-settled")
        return info.num_ack_pending == 0 and info.num_pending == 0
    await eventually(settled)
    if stream == TRIGGERS_STREAM:   # nobody else wants it: gone
        await eventually(lambda: _messages(js, stream, 0))
    else:   # the user's stream keeps its event: its own retention decides
        assert await _messages(js, stream, 1)
    assert "failed for good after 2 attempt(s) (max_deliver)" in survivor.output()


async def _messages(js: JetStreamContext, stream: str, count: int) -> bool:
    return (await js.stream_info(stream)).state.messages == count



async def test_a_trigger_consumer_made_with_as_many_deliveries_as_attempts_gets_the_extra_one_at_start(
        runtime: Any, js: JetStreamContext, scratch: Path) -> None:
    """A consumer made before triggers had the extra delivery (max_deliver = attempts) is updated
    in place when a runtime serving the function starts, and the event it held still runs."""
    import dataclasses

    from runtime.manifest import FunctionManifest
    from runtime.streams import provision_base
    from runtime.triggers import Binding, consumer_name, trigger_consumer_config

    await provision_base(js)
    await js.add_stream(StreamConfig(name="PAYMENTS", subjects=["payments.>"], storage=StorageType.FILE,
                                     retention=RetentionPolicy.LIMITS))
    manifest = FunctionManifest.model_validate({
        "name": "payout", "handler": "tests.handlers.fanout:record", "retry": {"max_deliver": 2},
        "triggers": [{"subject": "payments.settled", "stream": "PAYMENTS"}]})
    name = consumer_name("payout", "payments-settled")
    binding = Binding("payout", "payments-settled", "payments.settled", "PAYMENTS", name)
    await js.add_consumer("PAYMENTS", dataclasses.replace(trigger_consumer_config(manifest, binding), max_deliver=2))
    await js.publish("payments.settled", b'{"id": 1}')

    await runtime({"trust": ("tests",)}, payout=MANIFEST.replace("record_then_hang", "record")
                  + "    stream: PAYMENTS\n")
    assert (await js.consumer_info("PAYMENTS", name)).config.max_deliver == 3
    await eventually(lambda: [r["id"] for r in runs(scratch, "payout")] == [1])
