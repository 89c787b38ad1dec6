"""runtime.testing: one attempt in-process with call(), the whole path with serve()."""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from runtime import Context, InvalidInput, ManifestError, Rejected, Retry
from runtime.errors import ConfigError, LoadError
from runtime.manifest import FunctionManifest
from runtime.policy import Ack, RetryAfter
from runtime.server import port_is_free
from runtime.testing import acall, call, serve

from .conftest import ROOT

HELLO = ROOT / "manifests" / "hello.yaml"
FLAKY = ROOT / "manifests" / "flaky.yaml"


# ------------------------------------------------------------------ handlers defined right here


async def notify(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    await ctx.publish(f"orders.{event['id']}.accepted", {"id": event["id"]}, headers={"X-Trace": "t-1"})
    await ctx.nc.flush()
    seq = await ctx.invoke("ship", {"id": event["id"]}, msg_id=f"ship-{event['id']}")
    again = await ctx.invoke("ship", {"id": event["id"]}, msg_id=f"ship-{event['id']}")
    return {"seq": seq, "again": again, "call_id": ctx.call_id, "attempt": ctx.attempt,
            "max_attempts": ctx.max_attempts, "schedule": ctx.schedule,
            "scheduled_at": ctx.scheduled_at.isoformat() if ctx.scheduled_at else None}


async def asks(event: dict[str, Any], ctx: Context) -> None:
    await ctx.nc.request("elsewhere", b"")


async def sleeps(event: dict[str, Any]) -> str:
    await asyncio.sleep(float(event["seconds"]))
    return "done"


def sleeps_in_a_thread(event: dict[str, Any]) -> str:
    time.sleep(float(event["seconds"]))
    return "done"


async def blocks_the_loop(event: dict[str, Any]) -> str:
    time.sleep(float(event["seconds"]))
    return "done"


async def exits(event: dict[str, Any]) -> None:
    raise SystemExit(3)


async def later(event: dict[str, Any]) -> None:
    raise Retry(delay=42, reason="come back later")


async def echo(event: Any) -> Any:
    return event


async def reverse(event: bytes) -> bytes:
    return event[::-1]


async def not_a_number(event: dict[str, Any]) -> dict[str, float]:
    return {"x": float("nan")}


async def huge(event: dict[str, Any], ctx: Context) -> bytes:
    return b"r" * (ctx.nc.max_payload - int(event["minus"]))


# ------------------------------------------------------------------ call()


def test_a_manifest_file_runs_its_handler_and_returns_the_result_a_caller_gets() -> None:
    out = call(HELLO, {"name": "Ada"})
    assert out.result == {"greeting": "Hello, Ada!"}
    assert out.acked and out.decision == Ack() and out.retry_in is None and out.dead_letter is None
    assert out.error is None and out.call_id == "fn-1" and out.attempt == 1


def test_the_policys_decision_comes_back_without_waiting_for_the_retry() -> None:
    started = time.monotonic()
    assert call(FLAKY, {"succeed_on": 4}, attempt=1).retry_in == 0.5
    third = call(FLAKY, {"succeed_on": 4}, attempt=3)
    assert third.retry_in == 2.0 and third.result is None
    assert third.error is not None and third.error.described == "ConnectionError: upstream unavailable (attempt 3 of 4)"
    assert call(FLAKY, {"succeed_on": 4}, attempt=4).result == {"attempts": 4}
    last = call(FLAKY, {"succeed_on": 9}, attempt=4)
    assert last.dead_letter is not None and last.dead_letter.reason == "max_deliver"
    assert time.monotonic() - started < 2


def test_reject_and_invalid_input_are_dead_letters_with_reason_and_error() -> None:
    rejected = call(FLAKY, {"reject": True})
    assert rejected.dead_letter is not None and rejected.dead_letter.reason == "rejected"
    assert rejected.dead_letter.error.message == "asked to reject" and rejected.dead_letter.error.code == 422
    invalid = call(HELLO, b"{not json", call_id="bad-1")
    assert invalid.dead_letter is not None and invalid.dead_letter.reason == "invalid_input"
    assert invalid.dead_letter.error.code == 400 and invalid.dead_letter.error.call_id == "bad-1"


def test_a_handler_spec_a_function_or_a_manifest_object_can_be_called() -> None:
    assert call("functions.hello:main", {"name": "Bob"}).result == {"greeting": "Hello, Bob!"}
    assert call(echo, [1, "two"]).result == [1, "two"]
    manifest = FunctionManifest(name="later", handler="tests.test_testing:later")
    out = call(manifest, {})
    assert isinstance(out.decision, RetryAfter) and out.retry_in == 42.0
    assert out.error is not None and out.error.type == "Retry" and out.error.message == "come back later"


def test_manifest_fields_can_be_changed_for_one_call() -> None:
    out = call(FLAKY, {"succeed_on": 9}, attempt=1, retry={"max_deliver": 1})
    assert out.dead_letter is not None and out.dead_letter.reason == "max_deliver"
    with pytest.raises(ManifestError, match="timeout: must be greater than zero"):
        call(FLAKY, {}, timeout=0)


def test_what_the_handler_publishes_through_ctx_is_recorded_not_sent() -> None:
    out = call(notify, {"id": 7}, attempt=2, call_id="order-7", retry={"max_deliver": 3},
               headers={"Fn-Schedule": "nightly", "Fn-Scheduled-At": "2026-01-02T03:04:05Z"})
    [event] = out.published
    assert event.subject == "orders.7.accepted" and event.value == {"id": 7}
    assert event.headers == {"X-Trace": "t-1"}
    [invocation] = out.invoked
    assert invocation.subject == "fn.invoke.ship" and invocation.value == {"id": 7}
    assert out.result == {"seq": 1, "again": 1, "call_id": "order-7", "attempt": 2, "max_attempts": 3,
                          "schedule": "nightly", "scheduled_at": "2026-01-02T03:04:05+00:00"}


def test_ctx_publish_refuses_what_the_server_would_refuse_as_in_a_runtime() -> None:
    out = call(notify, {"id": "x" * 2000})
    assert out.retry_in is not None and out.error is not None and "cannot publish" in out.error.message
    assert out.published == ()


def test_what_needs_a_server_fails_the_attempt_and_points_to_serve() -> None:
    out = call(asks, {})
    assert out.error is not None and out.error.type == "AttributeError"
    assert "ctx.nc.request is not available" in out.error.message and "serve" in out.error.message


@pytest.mark.parametrize("handler", [sleeps, sleeps_in_a_thread])
def test_the_manifests_timeout_cancels_the_attempt(handler: Any) -> None:
    started = time.monotonic()
    out = call(handler, {"seconds": 1}, timeout="200ms")
    assert time.monotonic() - started < 0.8, "the attempt is not waited for past its timeout"
    assert isinstance(out.decision, RetryAfter) and out.error is not None
    assert out.error.code == 504 and out.error.message == "attempt exceeded the timeout of 0.2s"
    last = call(handler, {"seconds": 1}, timeout="200ms", retry={"max_deliver": 1})
    assert last.dead_letter is not None and last.dead_letter.reason == "timeout"


def test_an_async_handler_that_blocks_past_its_timeout_times_out_when_it_returns() -> None:
    out = call(blocks_the_loop, {"seconds": 0.4}, timeout="100ms", retry={"max_deliver": 1})
    assert out.dead_letter is not None and out.dead_letter.reason == "timeout"
    assert "past the timeout of 0.1s, without yielding" in out.dead_letter.error.message


def test_system_exit_from_a_handler_is_a_failed_attempt() -> None:
    out = call(exits, {})
    assert out.retry_in == 1.0 and out.error is not None and out.error.type == "SystemExit"


def test_results_the_server_could_not_take_fail_the_attempt() -> None:
    too_large = call(huge, {"minus": 20})
    assert too_large.error is not None and too_large.error.type == "ResultTooLarge"
    assert call(huge, {"minus": 200}).acked
    small = call(huge, {"minus": 20}, max_payload=4096)
    assert small.error is not None and "max_payload is 4096" in small.error.message
    with pytest.raises(InvalidInput, match="cannot encode the payload"):
        call(echo, {"x": float("nan")})
    nan = call(not_a_number, {})
    assert isinstance(nan.decision, RetryAfter) and nan.error is not None and "NaN" in nan.error.message


def test_payloads_are_encoded_as_a_client_sends_them() -> None:
    assert call(reverse, b"\x00raw").result == b"war\x00", "bytes in, bytes out, untouched by any codec"
    assert call(echo, b'{"a": 1}').result == {"a": 1}
    packed = call(echo, {"a": [1, 2]}, headers={"Content-Type": "application/msgpack"})
    assert packed.result == {"a": [1, 2]}
    assert call(echo, {"a": 1}, encoding="msgpack").content_type == "application/msgpack"


def test_what_cannot_be_called_says_why() -> None:
    with pytest.raises(ValueError, match="attempt counts from 1"):
        call(echo, {}, attempt=0)
    with pytest.raises(LoadError, match="must take"):
        call(lambda: None, {})
    with pytest.raises(ManifestError, match=r"no-such\.yaml"):
        call(ROOT / "manifests" / "no-such.yaml", {})


async def test_call_and_acall_work_inside_an_event_loop() -> None:
    assert call(HELLO, {"name": "Ada"}).result == {"greeting": "Hello, Ada!"}
    out = await acall(HELLO, {"name": "Grace"})
    assert out.result == {"greeting": "Hello, Grace!"}
    timed_out = await acall(sleeps, {"seconds": 5}, timeout="100ms")
    assert isinstance(timed_out.decision, RetryAfter)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0, "the test's own task is not left cancelled"


# ------------------------------------------------------------------ serve()


async def test_serve_runs_the_functions_for_real() -> None:
    async with serve(ROOT / "manifests", project_root=ROOT) as fn:
        assert await fn.invoke("hello", {"name": "Ada"}, timeout=5) == {"greeting": "Hello, Ada!"}
        assert await fn.invoke("flaky", {"succeed_on": 2}, timeout=10) == {"attempts": 2}  # 0.5 s backoff
        with pytest.raises(Rejected, match="asked to reject"):
            await fn.invoke("flaky", {"reject": True}, timeout=10)
        assert fn.url.startswith("nats://127.0.0.1:")


async def test_serve_starts_and_stops_in_well_under_a_second_and_a_half() -> None:
    async with serve(HELLO, project_root=ROOT):
        pass  # the handler's module is imported (and checked) once per process
    durations = []
    for _ in range(5):
        started = time.monotonic()
        async with serve(HELLO, project_root=ROOT) as fn:
            ready = time.monotonic()
            assert await fn.invoke("hello", {"name": "Ada"}, timeout=5) == {"greeting": "Hello, Ada!"}
            answered = time.monotonic()
        durations.append((ready - started) + (time.monotonic() - answered))
    assert statistics.median(durations) < 1.5, durations


def _children() -> list[int]:
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat.rpartition(")")[2].split()[1] == me:
                found.append(int(entry))
    return found


async def _settled(read: Any, before: set[Any]) -> set[Any]:
    """What ``read()`` holds that was not there ``before``, once it stops shrinking (up to 2 s)."""
    # Worker threads and closed sockets go away a moment after they are released.
    for _ in range(100):
        new = read() - before
        if not new:
            break
        await asyncio.sleep(0.02)
    return new


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_twenty_sequential_serves_leak_no_process_port_thread_or_file() -> None:
    async with serve(ROOT / "manifests", project_root=ROOT):
        pass
    children, threads, fds = set(_children()), set(threading.enumerate()), _fds()
    urls, stores = [], []
    for _ in range(20):
        async with serve(ROOT / "manifests", project_root=ROOT) as fn:
            assert await fn.invoke("primes", {"limit": 10}, timeout=5) == {"limit": 10, "count": 4, "largest": 7}
            urls.append(fn.url)
            stores.append(fn.runtime.settings.data_dir.parent)
    assert await _settled(lambda: set(_children()), children) == set(), "a nats-server outlived its serve()"
    assert await _settled(lambda: set(threading.enumerate()), threads) == set()
    assert await _settled(_fds, fds) == set()
    for url in urls:
        host, _, port = url.removeprefix("nats://").partition(":")
        assert port_is_free(host, int(port)), url
    assert not any(store.exists() for store in stores), "the temporary stores are removed"


async def test_serve_refuses_bad_settings_before_starting_anything() -> None:
    children = _children()
    with pytest.raises(ConfigError, match="invalid settings: grace: 'soon' is not a duration"):
        async with serve(HELLO, grace="soon"):
            pass
    assert _children() == children
