"""No message, reply subject or handler may take a runtime down or make it act with its own rights.

Every test runs against a real nats-server with ``max_payload: 8MB`` (the project's nats.conf),
sends the exact trigger that once closed the runtime's connection or misused it, then checks
that the same runtime still serves another function within 5 s and that the poison call can
be found (as a dead letter or a stored outcome).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime import Client, FunctionError, InvalidInput, InvocationTimeout, PayloadTooLarge
from runtime.app import Runtime
from runtime.dlq import list_dead_letters
from runtime.results import fetch_response
from runtime.server import EmbeddedServer
from runtime.settings import Settings
from runtime.streams import DLQ_STREAM, INVOKE_STREAM

from .conftest import ROOT, RuntimeFactory, collect, configured_server, eventually

MAX_PAYLOAD = 8 * 1024 * 1024

GREET = "name: greet\nhandler: tests.handlers.core:greet\n"
ECHO = "name: echo\nhandler: tests.handlers.core:echo\nretry: {max_deliver: 1}\n"


def fn(name: str, handler: str, **extra: Any) -> str:
    lines = [f"name: {name}", f"handler: tests.handlers.hardening:{handler}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    """A server configured like production: ``max_payload: 8MB``."""
    async with configured_server(tmp_path, "max_payload: 8MB\n") as server:
        yield server


async def still_serving(rt: Runtime, nc: NATS) -> None:
    """The runtime's connection never dropped, and another function answers within 5 s."""
    assert rt.nc is not None and rt.nc.is_connected and rt.nc.stats["reconnects"] == 0
    async with Client(nc) as fn:
        started = time.monotonic()
        assert await fn.invoke("greet", {"name": "Ada"}, timeout=5) == {"greeting": "Hello, Ada!"}
        assert time.monotonic() - started < 5


async def test_a_5000_character_msg_id_is_served_and_its_outcome_found_by_that_id(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    rt = await runtime(greet=GREET, echo=ECHO)
    long_id = "x" * 5000
    await js.publish("fn.invoke.echo", b'{"n": 1}', headers={"Nats-Msg-Id": long_id})
    await js.publish("fn.invoke.echo", b'not json', headers={"Nats-Msg-Id": "y" * 5000})
    async with Client(nc) as fn:
        assert await fn.result(long_id, wait=15) == {"n": 1}
        with pytest.raises(InvalidInput):
            await fn.result("y" * 5000, wait=15)
    [letter] = await eventually(lambda: list_dead_letters(nc, js), message="the invalid call dead-lettered")
    assert letter.reason == "invalid_input" and letter.call_id is not None and len(letter.call_id) < 100
    await still_serving(rt, nc)


async def test_an_invalid_body_just_under_max_payload_is_dead_lettered_whole(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    rt = await runtime(greet=GREET, echo=ECHO)
    body = b"{" * (MAX_PAYLOAD - 176)
    await js.publish("fn.invoke.echo", body, headers={"Nats-Msg-Id": "huge-1", "X-Trace": "t-1"})
    [letter] = await eventually(lambda: list_dead_letters(nc, js), timeout=15, message="the dead letter")
    assert letter.reason == "invalid_input" and letter.call_id == "huge-1"
    await still_serving(rt, nc)
    from runtime.dlq import get_dead_letter
    full = await get_dead_letter(js, letter.seq)
    assert full.body == body, "the original body stays recoverable"
    assert (await fetch_response(js, "huge-1")) is not None


async def test_a_result_20_bytes_under_max_payload_fails_as_result_too_large(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    rt = await runtime(greet=GREET, big=fn("big", "fill_up", retry={"max_deliver": 2, "backoff": ["100ms"]}))
    async with Client(nc) as client:
        with pytest.raises(FunctionError) as caught:
            await client.invoke("big", {"minus": 20}, timeout=15, call_id="big-1")
    assert caught.value.type == "ResultTooLarge" and "fit" in caught.value.message
    [letter] = await eventually(lambda: list_dead_letters(nc, js), message="the dead letter")
    assert letter.deliveries == 2 and "ResultTooLarge" in letter.error
    await still_serving(rt, nc)


async def test_a_core_request_just_under_max_payload_is_refused_with_413(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    rt = await runtime(greet=GREET, echo=ECHO)
    reply = await nc.request("fn.call.echo", b"[" * (MAX_PAYLOAD - 40), timeout=5)
    headers = reply.headers or {}
    assert headers.get("Nats-Service-Error-Code") == "413", headers
    call_id = headers["Fn-Call-Id"]
    await still_serving(rt, nc)
    async with Client(nc) as client:
        with pytest.raises(PayloadTooLarge):
            await client.result(call_id)


async def test_reply_subjects_cannot_make_the_runtime_purge_streams(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    rt = await runtime(greet=GREET, echo=ECHO)
    # Something in each stream that a purge would remove: a dead letter, and a queued call of
    # a function nobody serves.
    await js.publish("fn.invoke.echo", b"not json", headers={"Nats-Msg-Id": "dead-1"})
    await eventually(lambda: list_dead_letters(nc, js), message="a dead letter")
    await js.publish("fn.invoke.nobody", b"{}")
    fn_before = (await js.stream_info(INVOKE_STREAM)).state.messages

    await js.publish("fn.invoke.echo", b'{"n": 1}', headers={"Nats-Msg-Id": "deputy-1",
                                                             "Fn-Reply-To": f"$JS.API.STREAM.PURGE.{DLQ_STREAM}"})
    await nc.publish("fn.call.echo", b'{"n": 2}', reply=f"$JS.API.STREAM.PURGE.{INVOKE_STREAM}",
                     headers={"Nats-Msg-Id": "deputy-2"})
    await js.publish("fn.invoke.echo", b'{"n": 3}', headers={"Nats-Msg-Id": "deputy-3",
                                                             "Fn-Reply-To": "a reply with spaces"})
    for call_id, n in (("deputy-1", 1), ("deputy-2", 2), ("deputy-3", 3)):
        stored = await eventually(lambda c=call_id: fetch_response(js, c), message=f"the outcome of {call_id}")
        assert stored.value() == {"n": n}, "the invocation ran and its outcome is stored"
    # Discovery and status requests are answered on the requester's reply subject too.
    for subject in ("$SRV.PING", "$SRV.INFO.runtime", "$SRV.STATS", "fn.admin.status"):
        await nc.publish(subject, b"", reply=f"$JS.API.STREAM.PURGE.{INVOKE_STREAM}")
    await nc.flush()
    assert (await nc.request("$SRV.PING.runtime", b"", timeout=2)).data, "a real inbox is answered"
    assert (await js.stream_info(DLQ_STREAM)).state.messages == 1
    assert (await js.stream_info(INVOKE_STREAM)).state.messages == fn_before
    assert rt.outbox is not None and rt.outbox.refused_replies == 3 + 4
    await still_serving(rt, nc)


async def test_reply_prefix_allow_list(runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    rt = await runtime({"reply_prefixes": ("_INBOX.",)}, greet=GREET, echo=ECHO)
    seen, _ = await collect(nc, "elsewhere.>")
    await js.publish("fn.invoke.echo", b'{"n": 1}', headers={"Nats-Msg-Id": "p-1", "Fn-Reply-To": "elsewhere.x"})
    stored = await eventually(lambda: fetch_response(js, "p-1"), message="the outcome")
    assert stored.value() == {"n": 1}
    await nc.flush()
    assert seen == [] and rt.outbox is not None and rt.outbox.refused_replies == 1
    await still_serving(rt, nc)   # the Client's _INBOX. replies are answered


async def test_a_stored_outcome_cannot_be_overwritten_by_a_later_message(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    await runtime(greet=GREET, echo=ECHO)
    async with Client(nc) as client:
        assert await client.invoke("echo", {"amount": 100}, call_id="victim-1") == {"amount": 100}
        # Outside the duplicate window's reach: a plain message naming the call id in a header.
        await js.publish("fn.invoke.echo", b'{"amount": 999999}', headers={"Fn-Call-Id": "victim-1"})
        await eventually(lambda: _empty(js), message="the second message handled")
        assert await client.result("victim-1") == {"amount": 100}


async def _empty(js: JetStreamContext) -> bool:
    info = await js.consumer_info(INVOKE_STREAM, "echo")
    return info.num_pending == 0 and info.num_ack_pending == 0


@pytest.mark.parametrize("handler,how", [("exits", "exit"), ("exits", "interrupt"),
                                         ("exits_in_thread", "exit"), ("exits_in_thread", "interrupt")])
async def test_system_exit_and_keyboard_interrupt_from_a_handler_fail_the_attempt(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext, handler: str, how: str) -> None:
    rt = await runtime(greet=GREET, bye=fn("bye", handler, retry={"max_deliver": 1}))
    async with Client(nc) as client:
        with pytest.raises(FunctionError) as caught:
            await client.invoke("bye", {"how": how}, timeout=10)
    assert caught.value.type == ("KeyboardInterrupt" if how == "interrupt" else "SystemExit")
    await still_serving(rt, nc)
    started = time.monotonic()
    await rt.stop()
    assert time.monotonic() - started < 3, "shutdown is not delayed"


async def test_results_that_cannot_be_encoded_fail_with_their_real_error_and_the_normal_backoff(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    await runtime(greet=GREET, bad=fn("bad", "unencodable", ack_wait="30s",
                                      retry={"max_deliver": 2, "backoff": ["200ms"]}))
    seen, _ = await collect(nc, "test.events.bad")
    async with Client(nc) as client:
        with pytest.raises(FunctionError) as caught:
            await client.invoke("bad", {"kind": "object"}, timeout=10)
        assert "cannot be encoded" in caught.value.message and "object" in caught.value.message
        times = [json.loads(m.data)["t"] for m in seen]
        assert len(times) == 2 and 0.15 < times[1] - times[0] < 5, "retried after the backoff, not ack_wait"
        with pytest.raises(FunctionError, match=r"Out of range float|NaN|nan"):
            await client.invoke("bad", {"kind": "nan"}, timeout=10)


async def test_an_async_handler_blocking_past_its_deadline_times_out(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    rt = await runtime(greet=GREET, blocker=fn("blocker", "blocks", timeout="300ms", ack_wait="30s",
                                               retry={"max_deliver": 1}))
    async with Client(nc) as client:
        with pytest.raises(InvocationTimeout) as caught:
            await client.invoke("blocker", {"seconds": 0.8}, timeout=10)
    assert "past the timeout" in caught.value.message
    [letter] = await eventually(lambda: list_dead_letters(nc, js), message="the dead letter")
    assert letter.reason == "timeout"
    await still_serving(rt, nc)


async def test_a_1ms_timeout_does_not_spin_an_idle_runtime(runtime: RuntimeFactory, nc: NATS) -> None:
    await runtime(greet=GREET, quick=fn("quick", "sized", timeout="1ms"))
    await asyncio.sleep(0.2)   # let start-up work settle
    cpu = time.process_time()
    await asyncio.sleep(1.0)
    assert time.process_time() - cpu < 0.25, "the timeout watchdog sleeps while nothing runs"


async def test_handlers_cannot_publish_what_the_server_would_refuse(
        runtime: RuntimeFactory, nc: NATS) -> None:
    rt = await runtime(greet=GREET, pub=fn("pub", "publishes"))
    async with Client(nc) as client:
        assert (await client.invoke("pub", {"subject": "has spaces in it"})).startswith("refused")
        assert "max_payload" in await client.invoke("pub", {"subject": "ok.subject", "size": MAX_PAYLOAD})
        assert await client.invoke("pub", {"subject": "ok.subject"}) == "published"
    await still_serving(rt, nc)


async def test_a_runtime_whose_connection_is_closed_for_good_exits_non_zero(
        runtime_process: Any, manifest_dir: Any, nats_server: EmbeddedServer) -> None:
    directory = manifest_dir(breaker=fn("breaker", "breaks_connection"), greet=GREET)
    proc = runtime_process(directory)
    await proc.wait_ready()
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().publish("fn.invoke.breaker", b"{}")
    finally:
        await nc.close()
    code = await proc.wait_exit(timeout=20)
    assert code == 5, proc.output()
    assert "closed for good" in proc.output()
    # The invocation running then is cancelled, and left for redelivery: no error to report.
    assert "could not be settled" not in proc.output()


async def test_a_handler_that_swallows_its_cancellation_does_not_hold_up_shutdown(
        runtime: RuntimeFactory, js: JetStreamContext) -> None:
    """Past the grace period the runtime cancels what still runs; a handler that catches that and
    returns must not keep the shutdown waiting for ever."""
    from tests.handlers import hardening

    hardening.stubborn_started.clear()
    rt = await runtime({"grace": 0.2}, stubborn=fn("stubborn", "swallows_cancel", timeout="120s"))
    await js.publish("fn.invoke.stubborn", b"{}")
    await asyncio.wait_for(hardening.stubborn_started.wait(), 10)
    started = time.monotonic()
    await asyncio.wait_for(rt.stop(), 10)
    assert time.monotonic() - started < 5


async def test_handlers_run_only_once_the_runtime_has_started(
        runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, tmp_path: Path) -> None:
    first = await runtime(blocker=fn("blocker", "blocks", timeout="10s"))
    await first.stop()
    await js.publish("fn.invoke.blocker", b'{"seconds": 2.0}')
    rt = Runtime(Settings(project_root=ROOT, data_dir=tmp_path / "rt2", grace=5.0, trust=("tests",)),
                 nats_server.url)
    started = time.monotonic()
    await rt.start()
    try:
        # A queued call of a handler that blocks the loop for 2 s would stall a start-up that
        # ran handlers before every component was up.
        assert time.monotonic() - started < 1.5
        worker = await eventually(lambda: rt.workers.get("blocker"), message="blocker served")
        assert worker.feed.delivered <= 1
    finally:
        await rt.stop()


async def test_a_part_that_does_not_stop_leaves_the_shutdown_bounded(
        runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import runtime.app as app

    monkeypatch.setattr(app, "COMPONENT_STOP", 0.3)
    rt = await runtime({"grace": 0.2}, greet=GREET)

    class Stuck:
        async def start(self) -> None:
            pass

        async def stop(self) -> None:
            await asyncio.Event().wait()

    rt.components.append(Stuck())
    started = time.monotonic()
    await rt.stop()
    assert time.monotonic() - started < 5
    assert "Stuck did not stop within 0.5s; shutting down without it" in caplog.text
    assert rt.nc is None or rt.nc.is_closed
