"""Dead letters: one per failed message, whatever the failure, with why it failed; replay and crash safety."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from runtime.app import Runtime
from runtime.deadletter import WORKER_LOST, dead_letter_headers, write_dead_letter
from runtime.dlq import DeadLetter, get_dead_letter, list_dead_letters, replay_all
from runtime.mover import DeadLetterMover
from runtime.results import fetch_response
from runtime.streams import DLQ_STREAM, EVENTS_STREAM, INVOKE_STREAM, provision_base

from .conftest import RuntimeFactory, RuntimeProcess, collect, eventually


def fn(name: str, handler: str, **extra: Any) -> str:
    module = "core" if handler in ("always_fail", "greet", "reject") else "deadletters"
    lines = [f"name: {name}", f"handler: tests.handlers.{module}:{handler}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


async def stream_count(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def settled_letters(nc: NATS, js: JetStreamContext, expected: int, timeout: float = 15.0,
                          bodies: bool = True) -> list[DeadLetter]:
    """The dead letters, once ``expected`` exist, every advisory is handled and ``FN`` is empty."""
    await eventually(lambda: _at_least(js, DLQ_STREAM, expected), timeout=timeout, message=f"{expected} dead letters")
    await eventually(lambda: _is_empty(js, EVENTS_STREAM), timeout=timeout, message="every advisory handled")
    await eventually(lambda: _is_empty(js, INVOKE_STREAM), timeout=timeout, message="FN empty")
    listing = await list_dead_letters(nc, js)
    assert listing.shortfall is None
    if not bodies:
        return listing.letters
    return [await get_dead_letter(js, d.seq) for d in listing.letters]


async def _at_least(js: JetStreamContext, stream: str, count: int) -> bool:
    return await stream_count(js, stream) >= count


async def _is_empty(js: JetStreamContext, stream: str) -> bool:
    return await stream_count(js, stream) == 0


def attempts(msgs: list[Any]) -> list[int]:
    return [json.loads(m.data)["attempt"] for m in msgs]


async def test_always_raising_function_leaves_one_dead_letter(runtime: RuntimeFactory, nc: NATS,
                                                              js: JetStreamContext) -> None:
    await runtime(fails=fn("fails", "always_fail", retry={"max_deliver": 3, "backoff": ["50ms"]}))
    seen, _ = await collect(nc, "test.events.fails")
    body = b'{"n": 7,   "note": "caf\xc3\xa9"}\n'
    ack = await js.publish("fn.invoke.fails", body, headers={"Nats-Msg-Id": "fails-1", "X-Trace": "t-42"})
    [letter] = await settled_letters(nc, js, 1)
    assert attempts(seen) == [1, 2, 3]
    assert letter.body == body, "the body is kept byte for byte"
    h = letter.headers
    assert h["Fn-Error"] == "ValueError: boom 7"
    assert (h["Fn-Reason"], h["Fn-Deliveries"], h["Fn-Function"]) == ("max_deliver", "3", "fails")
    assert (h["Fn-Original-Subject"], h["Fn-Original-Seq"]) == ("fn.invoke.fails", str(ack.seq))
    assert h["Fn-Call-Id"] == "fails-1" and h["X-Trace"] == "t-42"
    failed_at = datetime.fromisoformat(h["Fn-Failed-At"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - failed_at) < timedelta(seconds=30)
    result = await fetch_response(js, "fails-1")
    assert result is not None and result.error is not None
    assert result.error.described == h["Fn-Error"], "the stored result and the dead letter agree"


async def test_poison_payloads_and_reject_are_dead_lettered_after_one_delivery(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    await runtime(greet=fn("greet", "greet", retry={"max_deliver": 5}),
                  nope=fn("nope", "reject", retry={"max_deliver": 5}))
    greeted, _ = await collect(nc, "test.events.greet")
    bodies = {"bad-json": b"{not json", "bad-schema": b'{"age": "old"}', "nope": b'{"x": 1}'}
    for call_id, body in bodies.items():
        await js.publish(f"fn.invoke.{'nope' if call_id == 'nope' else 'greet'}", body,
                         headers={"Fn-Call-Id": call_id})
    letters = {d.call_id: d for d in await settled_letters(nc, js, 3)}
    assert len(letters) == 3 and not greeted, "invalid input never reaches the function"
    for call_id, body in bodies.items():
        assert letters[call_id].body == body
        assert letters[call_id].deliveries == 1
    assert letters["bad-json"].reason == "invalid_input" and "Invalid JSON" in letters["bad-json"].error
    schema = letters["bad-schema"]
    assert schema.reason == "invalid_input"
    assert "name: Field required" in schema.error and "age: Input should be a valid integer" in schema.error
    assert (letters["nope"].reason, letters["nope"].error) == ("rejected", "Rejected: not today")
    assert letters["nope"].function == "nope"


async def wait_attempt(seen: list[Any], attempt: int, proc: RuntimeProcess) -> None:
    await eventually(lambda: attempt in attempts(seen), timeout=20, message=f"attempt {attempt} on {proc.pid}")


async def test_runtime_killed_during_every_attempt(runtime_process: Callable[..., RuntimeProcess],
                                                   manifest_dir: Callable[..., Path], nc: NATS,
                                                   js: JetStreamContext) -> None:
    manifests = manifest_dir(hang=fn("hang", "hang", timeout="60s", ack_wait="1s", retry={"max_deliver": 2}))
    seen, _ = await collect(nc, "test.events.hang")
    replies, _ = await collect(nc, "test.replies.crash")
    await nc.flush()
    for attempt in (1, 2):
        proc = runtime_process(manifests)
        await proc.wait_ready()
        if attempt == 1:
            await js.publish("fn.invoke.hang", b'{"job": 1}',
                             headers={"Fn-Call-Id": "crash-1", "Fn-Reply-To": "test.replies.crash"})
        await wait_attempt(seen, attempt, proc)
        proc.signal(signal.SIGKILL)
        await proc.wait_exit(10)
    # A runtime is up again while the last attempt's ack_wait runs out.
    await runtime_process(manifests).wait_ready()
    [letter] = await settled_letters(nc, js, 1)
    assert (letter.reason, letter.deliveries, letter.function) == ("max_deliver", 2, "hang")
    assert letter.error == WORKER_LOST and letter.body == b'{"job": 1}'
    assert attempts(seen) == [1, 2], "no attempt beyond max_deliver"
    # The caller hears the final failure with its call id; the stored result says the same.
    [reply] = await eventually(lambda: replies, message="the failure reply")
    assert reply.headers["Fn-Call-Id"] == "crash-1" and reply.headers["Nats-Service-Error-Code"] == "500"
    stored = await fetch_response(js, "crash-1")
    assert stored is not None and stored.error is not None and stored.error.message == letter.error
    assert json.loads(reply.data)["error"]["message"] == letter.error


async def test_failure_while_no_runtime_runs_is_dead_lettered_when_one_starts(
        runtime_process: Callable[..., RuntimeProcess], manifest_dir: Callable[..., Path], nc: NATS,
        js: JetStreamContext) -> None:
    manifests = manifest_dir(hang=fn("hang", "hang", timeout="60s", ack_wait="500ms", retry={"max_deliver": 1}))
    seen, _ = await collect(nc, "test.events.hang")
    proc = runtime_process(manifests)
    await proc.wait_ready()
    await js.publish("fn.invoke.hang", b'{"job": 2}', headers={"Fn-Call-Id": "alone-1"})
    await wait_attempt(seen, 1, proc)
    proc.signal(signal.SIGKILL)
    await proc.wait_exit(10)
    await asyncio.sleep(1.0)  # the last attempt's ack_wait runs out with no runtime up
    assert await stream_count(js, DLQ_STREAM) == 0 and await stream_count(js, INVOKE_STREAM) == 1
    await runtime_process(manifests).wait_ready()
    [letter] = await settled_letters(nc, js, 1)
    assert (letter.reason, letter.deliveries, letter.call_id) == ("max_deliver", 1, "alone-1")
    assert letter.error == WORKER_LOST
    assert attempts(seen) == [1]


async def test_replay_after_the_fix_produces_the_result_and_empties_the_dlq(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext, scratch: Path) -> None:
    await runtime(fixable=fn("fixable", "fixable", retry={"max_deliver": 2, "backoff": ["50ms"]}))
    seen, _ = await collect(nc, "test.events.fixable")
    await js.publish("fn.invoke.fixable", b'{"item": "tea", "quantity": 3}', headers={"Fn-Call-Id": "order-1"})
    [letter] = await settled_letters(nc, js, 1)
    assert letter.error == "LookupError: no stock of tea"
    failed = await fetch_response(js, "order-1")
    assert failed is not None and failed.error is not None
    (scratch / "fixed").touch()  # the fix is deployed
    [(replayed, new_seq)] = await replay_all(nc, js)
    assert replayed.seq == letter.seq and new_seq > letter.original_seq
    result = await eventually(lambda: _succeeded(js, "order-1"), message="the replayed call to succeed")
    assert result.value() == {"shipped": "tea", "quantity": 3}
    assert attempts(seen) == [1, 2, 1], "the replay is a fresh invocation"
    assert (await list_dead_letters(nc, js)).letters == []
    await eventually(lambda: _is_empty(js, INVOKE_STREAM), message="FN empty")


async def _succeeded(js: JetStreamContext, call_id: str) -> Any:
    response = await fetch_response(js, call_id)
    return response if response is not None and response.error is None else None


async def test_a_thousand_failures_across_two_runtimes(runtime_process: Callable[..., RuntimeProcess],
                                                       manifest_dir: Callable[..., Path], nc: NATS,
                                                       js: JetStreamContext) -> None:
    manifests = manifest_dir(doomed=fn("doomed", "doomed", concurrency=64,
                                       retry={"max_deliver": 2, "backoff": ["10ms"]}))
    procs = [runtime_process(manifests) for _ in range(2)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    seqs: set[int] = set()
    for chunk in range(0, 1000, 250):
        acks = await asyncio.gather(*(js.publish("fn.invoke.doomed", b'{"id": %d}' % i)
                                      for i in range(chunk, chunk + 250)))
        seqs.update(a.seq for a in acks)
    letters = await settled_letters(nc, js, 1000, timeout=60, bodies=False)
    assert len(letters) == 1000
    assert {d.original_seq for d in letters} == seqs, "one dead letter per message, no duplicates"
    assert {(d.reason, d.deliveries) for d in letters} == {("max_deliver", 2)}
    assert {d.error for d in letters} == {f"ValueError: doomed {i}" for i in range(1000)}
    for proc in procs:
        assert "failed for good" in proc.output(), "both runtimes took part"


async def test_a_mover_that_died_mid_move_leaves_no_duplicate_and_loses_nothing(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    # 120 messages of a consumer whose deliveries ran out while nothing moved them.
    await provision_base(js)
    await js.add_consumer(INVOKE_STREAM, ConsumerConfig(durable_name="lost", filter_subject="fn.invoke.lost",
                                                        ack_policy=AckPolicy.EXPLICIT, ack_wait=0.3, max_deliver=1))
    acks = await asyncio.gather(*(js.publish("fn.invoke.lost", b"%d" % i, headers=(
        {"Fn-Call-Id": "lost-0", "Fn-Reply-To": "test.replies.lost"} if i == 0 else None)) for i in range(120)))
    sub = await js.pull_subscribe_bind(durable="lost", stream=INVOKE_STREAM)
    assert len(await sub.fetch(120, timeout=5)) == 120  # and never acked

    async def advisories() -> bool:
        # A pull after ack_wait makes JetStream notice the exhausted deliveries.
        await nc.request("$JS.API.CONSUMER.MSG.NEXT.FN.lost", b'{"batch": 1, "no_wait": true}', timeout=2)
        return await stream_count(js, EVENTS_STREAM) == 120

    await eventually(advisories, message="120 max-deliveries advisories")
    # A mover died after writing the first 40 dead letters; it had also deleted originals 20..39.
    for ack in acks[:40]:
        original = await js.get_msg(INVOKE_STREAM, ack.seq)
        dead = dead_letter_headers(original.headers or {}, function="lost", subject="fn.invoke.lost",
                                   seq=ack.seq, deliveries=1, reason="max_deliver", error="ValueError: first try",
                                   call_id=(original.headers or {}).get("Fn-Call-Id") or f"fn-{ack.seq}")
        await write_dead_letter(js, "lost", original.data or b"", dead, max_payload=nc.max_payload)
    for ack in acks[20:40]:
        await js.delete_msg(INVOKE_STREAM, ack.seq)
    replies, _ = await collect(nc, "test.replies.lost")

    # Two runtimes share the mover's consumer and finish the job.
    runtimes: list[Runtime] = [await runtime(), await runtime()]
    letters = await settled_letters(nc, js, 120)
    assert sorted(d.original_seq for d in letters) == [a.seq for a in acks]
    assert [d.error for d in letters[:40]] == ["ValueError: first try"] * 40
    assert {d.error for d in letters[40:]} == {WORKER_LOST}
    movers = [c for rt in runtimes for c in rt.components if isinstance(c, DeadLetterMover)]
    assert sum(m.moved for m in movers) == 100, "each advisory handled once (20 originals were gone already)"
    [reply] = await eventually(lambda: replies, message="the caller's failure reply")
    assert json.loads(reply.data)["error"] == {"type": "ValueError", "message": "first try", "code": 500}, \
        "it says what the letter says"
