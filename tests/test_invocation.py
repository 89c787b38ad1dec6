"""Invocation by plain publish, decoding, outcomes, retries, timeouts: against a real server."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import msgpack
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from runtime.results import fetch_response

from .conftest import RuntimeFactory, collect, eventually


def fn(name: str, handler: str, **extra: Any) -> str:
    lines = [f"name: {name}", f"handler: tests.handlers.core:{handler}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


async def events(nc: NATS, function: str) -> list[dict[str, Any]]:
    received, _ = await collect(nc, f"test.events.{function}")
    return received


def payloads(msgs: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(m.data) for m in msgs]


async def test_plain_publish_runs_the_function(runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    await runtime(greet=fn("greet", "greet", store_results="always"))
    seen = await events(nc, "greet")
    await nc.publish("fn.invoke.greet", b'{"name": "Ada", "age": 36}')
    await eventually(lambda: seen, message="the function to run")
    assert payloads(seen)[0]["name"] == "Ada" and payloads(seen)[0]["age"] == 36
    # With store_results: always its result is kept by call id, which a plain publish gets from
    # the stream sequence (the default keeps it only for calls that carry an id: test_store_policy).
    response = await eventually(lambda: fetch_response(js, payloads(seen)[0]["call_id"]))
    assert response.value() == {"greeting": "Hello, Ada!"}


async def test_msgpack_body(runtime: RuntimeFactory, nc: NATS) -> None:
    await runtime(greet=fn("greet", "greet"))
    seen = await events(nc, "greet")
    body = msgpack.packb({"name": "Grace", "age": 85})
    await nc.publish("fn.invoke.greet", body, headers={"Content-Type": "application/msgpack"})
    await eventually(lambda: seen)
    assert payloads(seen)[0]["name"] == "Grace"


async def test_raw_bytes_and_dict_inputs(runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    await runtime(raw=fn("raw", "raw"), echo=fn("echo", "echo"))
    raw_seen, echo_seen = await events(nc, "raw"), await events(nc, "echo")
    await js.publish("fn.invoke.raw", b"\x00\x01not json", headers={"Nats-Msg-Id": "raw-1"})
    await js.publish("fn.invoke.echo", b'{"any": ["shape", 1]}', headers={"Nats-Msg-Id": "echo-1"})
    await eventually(lambda: raw_seen and echo_seen)
    assert payloads(raw_seen)[0]["size"] == 10
    assert payloads(echo_seen)[0]["event"] == {"any": ["shape", 1]}
    raw_result = await eventually(lambda: fetch_response(js, "raw-1"))
    assert raw_result.body == b"nosj ton\x01\x00", "bytes in, bytes out, untouched by any codec"


async def test_sync_function_does_not_block_other_invocations(runtime: RuntimeFactory, nc: NATS,
                                                              js: JetStreamContext) -> None:
    await runtime(blocker=fn("blocker", "sync_sleep", concurrency=1), greet=fn("greet", "greet"))
    greeted = await events(nc, "greet")
    await js.publish("fn.invoke.blocker", b'{"seconds": 2}', headers={"Nats-Msg-Id": "block-1"})
    await asyncio.sleep(0.2)  # let the blocking call start in its thread
    started = time.monotonic()
    await nc.publish("fn.invoke.greet", b'{"name": "Ada"}')
    await eventually(lambda: greeted, timeout=5)
    assert time.monotonic() - started < 1.0, "the async function waited for the sync one"
    assert await fetch_response(js, "block-1") is None, "the sync function should still be running"
    done = await eventually(lambda: fetch_response(js, "block-1"), timeout=5)
    assert done.value() == {"slept": 2}


async def test_retries_follow_backoff_and_stop_at_max_deliver(runtime: RuntimeFactory, nc: NATS,
                                                              js: JetStreamContext) -> None:
    await runtime(fails=fn("fails", "always_fail", retry={"max_deliver": 4, "backoff": ["300ms", "800ms"]}))
    seen = await events(nc, "fails")
    await js.publish("fn.invoke.fails", b'{"n": 1}', headers={"Nats-Msg-Id": "call-fails"})
    response = await eventually(lambda: fetch_response(js, "call-fails"), timeout=10)
    times = [p["t"] for p in payloads(seen)]
    assert [p["attempt"] for p in payloads(seen)] == [1, 2, 3, 4]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, expected in zip(gaps, [0.3, 0.8, 0.8], strict=True):
        assert expected - 0.05 <= gap <= expected + 0.5, (gaps, expected)
    err = response.error
    assert err is not None and err.code == 500 and err.message == "boom 1"
    await asyncio.sleep(1.2)  # longer than the last backoff: no fifth attempt comes
    assert len(seen) == 4
    info = await js.consumer_info("FN", "fails")
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_retry_and_reject_from_the_handler(runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    await runtime(later=fn("later", "retry_later", retry={"max_deliver": 3, "backoff": ["10s"]}),
                  nope=fn("nope", "reject", retry={"max_deliver": 5}))
    later, nope = await events(nc, "later"), await events(nc, "nope")
    await js.publish("fn.invoke.later", b'{"delay": 0.4}', headers={"Nats-Msg-Id": "later-1"})
    await js.publish("fn.invoke.nope", b"{}", headers={"Nats-Msg-Id": "nope-1"})
    result = await eventually(lambda: fetch_response(js, "later-1"), timeout=5)
    assert result.value() == {"attempt": 2}
    t = [p["t"] for p in payloads(later)]
    assert 0.35 <= t[1] - t[0] <= 1.0, "Retry(delay) overrides the manifest backoff"
    rejected = await eventually(lambda: fetch_response(js, "nope-1"))
    assert rejected.error is not None and rejected.error.message == "not today"
    assert len(nope) == 1


async def test_invalid_input_is_terminated_once_and_serving_goes_on(runtime: RuntimeFactory, nc: NATS,
                                                                   js: JetStreamContext) -> None:
    await runtime(greet=fn("greet", "greet", retry={"max_deliver": 5, "backoff": ["100ms"]}))
    seen = await events(nc, "greet")
    await js.publish("fn.invoke.greet", b"{not json", headers={"Nats-Msg-Id": "bad-json"})
    await js.publish("fn.invoke.greet", b'{"age": "old"}', headers={"Nats-Msg-Id": "bad-schema"})
    await js.publish("fn.invoke.greet", b'{"name": "Ada"}', headers={"Nats-Msg-Id": "good"})
    good = await eventually(lambda: fetch_response(js, "good"))
    assert good.value() == {"greeting": "Hello, Ada!"}
    bad_json = await eventually(lambda: fetch_response(js, "bad-json"))
    bad_schema = await eventually(lambda: fetch_response(js, "bad-schema"))
    assert bad_json.error is not None and bad_json.error.code == 400
    assert bad_schema.error is not None and bad_schema.error.code == 400
    assert "name: Field required" in bad_schema.error.message
    assert "age: Input should be a valid integer" in bad_schema.error.message
    assert len(seen) == 1, "invalid inputs never reach the function"
    info = await eventually(lambda: _settled(js, "greet"))
    assert info.num_redelivered == 0, "no retries burned on invalid input"


async def _settled(js: JetStreamContext, name: str) -> Any:
    info = await js.consumer_info("FN", name)
    return info if info.num_pending == 0 and info.num_ack_pending == 0 else None


async def test_timeout_cancels_the_attempt_and_retries(runtime: RuntimeFactory, nc: NATS,
                                                       js: JetStreamContext) -> None:
    await runtime(slow=fn("slow", "slow_first", timeout="500ms", retry={"max_deliver": 3, "backoff": ["100ms"]}))
    seen = await events(nc, "slow")
    started = time.monotonic()
    await js.publish("fn.invoke.slow", b"{}", headers={"Nats-Msg-Id": "slow-1"})
    result = await eventually(lambda: fetch_response(js, "slow-1"), timeout=10)
    assert result.value() == {"attempt": 2}
    assert time.monotonic() - started < 3, "attempt 1 was cancelled at its timeout"
    assert [p["attempt"] for p in payloads(seen)] == [1, 2]


async def test_timeout_on_the_last_attempt_fails_with_504(runtime: RuntimeFactory, js: JetStreamContext) -> None:
    await runtime(slow=fn("slow", "slow_first", timeout="300ms", retry={"max_deliver": 1}))
    await js.publish("fn.invoke.slow", b"{}", headers={"Nats-Msg-Id": "slow-2"})
    result = await eventually(lambda: fetch_response(js, "slow-2"), timeout=10)
    assert result.error is not None and result.error.code == 504


async def acked(js: JetStreamContext, consumer: str) -> ConsumerInfo | None:
    """The consumer's info once it has no invocation waiting for an ack, else None."""
    info = await js.consumer_info("FN", consumer)
    return info if info.num_ack_pending == 0 else None


async def test_long_invocation_is_delivered_once(runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    # ack_wait 1s, the function runs 5s: in-progress acks keep JetStream from redelivering it.
    await runtime(sleepy=fn("sleepy", "sleepy", timeout="20s", ack_wait="1s", concurrency=2))
    seen = await events(nc, "sleepy")
    await js.publish("fn.invoke.sleepy", b'{"seconds": 5}', headers={"Nats-Msg-Id": "long-1"})
    result = await eventually(lambda: fetch_response(js, "long-1"), timeout=15)
    assert result.value() == {"slept": 5}
    assert [(p["attempt"], p["phase"]) for p in payloads(seen)] == [(1, "start"), (1, "end")]
    # Acked once the outcome is stored: a moment after it can be read.
    info = await eventually(lambda: acked(js, "sleepy"), timeout=5, message="the invocation to be acked")
    assert info.config.ack_wait == 1.0
    assert info.num_redelivered == 0
