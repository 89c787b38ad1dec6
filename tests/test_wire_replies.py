"""What a plain NATS client gets back from ``fn.call.<name>``: headers, error types and STATS."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.micro.service import EndpointConfig, ServiceConfig

from runtime.client import Client
from runtime.errors import FunctionError
from runtime.micro import MicroService
from runtime.results import fetch_response
from runtime.streams import DLQ_PREFIX, DLQ_STREAM, INVOKE_STREAM

from .conftest import RuntimeFactory, collect, eventually
from .test_client import fn

SUCCESS = {"Fn-Call-Id", "Content-Type"}
FAILURE = SUCCESS | {"Nats-Service-Error", "Nats-Service-Error-Code"}
FAILS = fn("fails", "core:always_fail", retry={"max_deliver": 1})
GREET = fn("greet", "core:greet")


def body(msg: Msg) -> Any:
    return json.loads(msg.data)


async def stats(nc: NATS) -> dict[str, dict[str, Any]]:
    """The STATS of the one runtime serving, by endpoint name."""
    received, sub = await collect(nc, inbox := nc.new_inbox())
    await nc.publish("$SRV.STATS.runtime", b"", reply=inbox)
    await eventually(lambda: len(received) >= 1, timeout=5, message="a STATS answer")
    await sub.unsubscribe()
    return {e["name"]: e for e in body(received[0])["endpoints"]}


async def errors_become(nc: NATS, name: str, count: int) -> dict[str, Any]:
    """``name``'s endpoint STATS once they count ``count`` errors."""
    seen: dict[str, Any] = {}

    async def counted() -> bool:
        seen.update((await stats(nc))[name])
        return bool(seen["num_errors"] == count)

    await eventually(counted, timeout=5, message=f"{count} errors counted for {name}")
    return seen


# ------------------------------------------------------------------ STATS count answered errors


async def test_stats_count_the_errors_answered_on_fn_call(runtime: RuntimeFactory, nc: NATS) -> None:
    await runtime(greet=GREET, fails=FAILS)
    assert body(await nc.request("fn.call.greet", b'{"name": "Ada"}', timeout=10)) == {"greeting": "Hello, Ada!"}
    invalid = await nc.request("fn.call.greet", b'{"age": 1}', timeout=10)
    assert invalid.headers and invalid.headers["Nats-Service-Error-Code"] == "400"
    greet = await errors_become(nc, "greet", 1)
    assert greet["num_requests"] == 2
    assert greet["last_error"] == "400:InvalidInput: name: Field required"
    failed = await nc.request("fn.call.fails", b'{"n": 7}', timeout=10)
    assert failed.headers and failed.headers["Nats-Service-Error-Code"] == "500"
    assert (await errors_become(nc, "fails", 1))["last_error"] == "500:ValueError: boom 7"
    # The same call id again: answered with the stored failure by the endpoint, counted again.
    again = await nc.request("fn.call.fails", b'{"n": 8}', timeout=10, headers={"Nats-Msg-Id": "f-1"})
    duplicate = await nc.request("fn.call.fails", b'{"n": 9}', timeout=10, headers={"Nats-Msg-Id": "f-1"})
    assert again.data == duplicate.data and body(duplicate)["error"]["message"] == "boom 8"
    assert (await errors_become(nc, "fails", 3))["num_requests"] == 3
    assert (await stats(nc))["greet"]["num_errors"] == 1


async def test_stats_count_the_endpoints_own_503(runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    await runtime(greet=GREET)
    await js.delete_stream(INVOKE_STREAM)
    reply = await nc.request("fn.call.greet", b'{"name": "Ada"}', timeout=10)
    assert reply.headers and reply.headers["Nats-Service-Error-Code"] == "503"
    assert (await errors_become(nc, "greet", 1))["last_error"].startswith("503:Unavailable: ")


async def test_calls_through_the_python_client_are_not_endpoint_errors(runtime: RuntimeFactory, nc: NATS) -> None:
    await runtime(fails=FAILS)
    async with Client(nc) as client:
        with pytest.raises(FunctionError):
            await client.invoke("fails", {"n": 1}, timeout=10)
    await nc.request("fn.call.fails", b'{"n": 2}', timeout=10)
    # Only the endpoint's own request is counted.
    assert (await errors_become(nc, "fails", 1))["last_error"] == "500:ValueError: boom 2"


async def test_record_error_pins_what_nats_micro_reports(nc: NATS) -> None:
    """The private attributes ``MicroService.record_error`` writes are the ones STATS reads."""

    async def handler(request: Any) -> None:
        await request.respond(b"ok")

    service = MicroService(nc, ServiceConfig(name="pinned", version="0.0.1"), may_answer=lambda _: True)
    await service.start()
    try:
        await service.add_endpoint(EndpointConfig(name="ep", subject="pinned.ep", handler=handler))
        assert service.record_error("ep", "400:InvalidInput: nope")
        assert not service.record_error("other", "500:x")
        [endpoint] = service.stats().endpoints
        assert (endpoint.num_errors, endpoint.last_error) == (1, "400:InvalidInput: nope")
    finally:
        await service.stop()


# ------------------------------------------------------------------ exactly the documented headers


async def test_replies_carry_exactly_the_documented_headers(runtime: RuntimeFactory, nc: NATS,
                                                            js: JetStreamContext) -> None:
    await runtime(greet=GREET, fails=FAILS)
    ok = await nc.request("fn.call.greet", b'{"name": "Ada"}', timeout=10, headers={"Nats-Msg-Id": "ok-1"})
    assert ok.headers is not None and set(ok.headers) == SUCCESS
    assert ok.headers["Content-Type"] == "application/json"
    # A duplicate's reply is read back from fn_results: nothing of the store shows.
    dup = await nc.request("fn.call.greet", b'{"name": "Bob"}', timeout=10, headers={"Nats-Msg-Id": "ok-1"})
    assert dup.data == ok.data and dup.headers == ok.headers
    bad = await nc.request("fn.call.fails", b"{}", timeout=10, headers={"Nats-Msg-Id": "bad-1"})
    assert bad.headers is not None and set(bad.headers) == FAILURE
    dup_bad = await nc.request("fn.call.fails", b"{}", timeout=10, headers={"Nats-Msg-Id": "bad-1"})
    assert dup_bad.data == bad.data and dup_bad.headers == bad.headers
    unknown = await nc.request("fn.call.nothing", b"{}", timeout=5)
    assert unknown.headers is not None and set(unknown.headers) == FAILURE
    for call_id in ("ok-1", "bad-1"):
        stored = await fetch_response(js, call_id)
        assert stored is not None and set(stored.headers) <= FAILURE and stored.headers["Fn-Call-Id"] == call_id


async def test_a_msgpack_reply_names_its_content_type(runtime: RuntimeFactory, nc: NATS) -> None:
    await runtime(echo=fn("echo", "core:echo", encoding="msgpack"))
    reply = await nc.request("fn.call.echo", b'{"x": 1}', timeout=10, headers={"Nats-Msg-Id": "mp-1"})
    assert reply.headers is not None and set(reply.headers) == SUCCESS
    assert reply.headers["Content-Type"] == "application/msgpack"
    dup = await nc.request("fn.call.echo", b'{"x": 2}', timeout=10, headers={"Nats-Msg-Id": "mp-1"})
    assert dup.headers == reply.headers and dup.data == reply.data


# ------------------------------------------------------------------ one scheme of error types


async def test_wire_error_types_follow_the_documented_scheme(runtime: RuntimeFactory, nc: NATS,
                                                             js: JetStreamContext) -> None:
    await runtime(greet=GREET, fails=FAILS, rejects=fn("rejects", "core:reject"),
                  sleeps=fn("sleeps", "core:sleepy", timeout="100ms", retry={"max_deliver": 1}))
    calls = {
        "UnknownFunction": ("fn.call.nothing", b"{}", 404, "no function named 'nothing' is deployed"),
        "InvalidInput": ("fn.call.greet", b'{"age": 1}', 400, "name: Field required"),
        "Rejected": ("fn.call.rejects", b"{}", 422, "not today"),
        "ValueError": ("fn.call.fails", b'{"n": 3}', 500, "boom 3"),
        "InvocationTimeout": ("fn.call.sleeps", b'{"seconds": 5}', 504, "attempt exceeded the timeout of 0.1s"),
    }
    replies = await asyncio.gather(*(nc.request(subject, data, timeout=10)
                                     for subject, data, _, _ in calls.values()))
    for (type_, (_, _, code, message)), reply in zip(calls.items(), replies, strict=True):
        assert body(reply) == {"error": {"type": type_, "message": message, "code": code}}, type_
        assert reply.headers is not None and reply.headers["Nats-Service-Error"] == f"{type_}: {message}"
    # Dead letters keep one readable line: type, then message.
    errors = {}
    for function in ("greet", "rejects", "fails", "sleeps"):
        letter = await js.get_last_msg(DLQ_STREAM, DLQ_PREFIX + function)
        errors[function] = (letter.headers or {})["Fn-Error"]
    assert errors == {"greet": "InvalidInput: name: Field required", "rejects": "Rejected: not today",
                      "fails": "ValueError: boom 3",
                      "sleeps": "InvocationTimeout: attempt exceeded the timeout of 0.1s"}


async def test_the_endpoints_own_refusals_are_typed_by_class(runtime: RuntimeFactory, nc: NATS,
                                                             js: JetStreamContext) -> None:
    await runtime(echo=fn("echo", "core:raw"))
    too_large = await nc.request("fn.call.echo", b"x" * (nc.max_payload - 40), timeout=5)
    assert body(too_large)["error"]["type"] == "PayloadTooLarge" and body(too_large)["error"]["code"] == 413
    await js.delete_stream(INVOKE_STREAM)
    unavailable = await nc.request("fn.call.echo", b"x", timeout=10)
    assert body(unavailable)["error"]["type"] == "Unavailable" and body(unavailable)["error"]["code"] == 503
    assert not body(unavailable)["error"]["message"].startswith("Unavailable")
