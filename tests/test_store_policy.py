"""Which outcomes go to fn_results: ``store_results: auto`` (default), ``always``, ``never``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime import Client
from runtime.errors import ManifestError
from runtime.manifest import FunctionManifest, ManifestSet
from runtime.outbox import headers_at_most
from runtime.results import caller_holds_id, fetch_response, should_store
from runtime.server import EmbeddedServer
from runtime.wire import header_size

from .conftest import RuntimeFactory, collect, eventually


def fn(name: str, handler: str, **extra: Any) -> str:
    lines = [f"name: {name}", f"handler: tests.handlers.core:{handler}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


class Headers:
    def __init__(self, headers: dict[str, str] | None) -> None:
        self.headers = headers


def manifest(**extra: Any) -> FunctionManifest:
    return FunctionManifest(name="greet", handler="tests.handlers.core:greet", **extra)


# ------------------------------------------------------------------ the decision


@pytest.mark.parametrize(("headers", "stored"), [
    (None, False),
    ({}, False),
    ({"Content-Type": "application/json"}, False),
    ({"Nats-Msg-Id": "order-42"}, True),
    ({"Fn-Call-Id": "order-42"}, True),
    ({"Fn-Reply-To": "_INBOX.abc"}, True),
    ({"Nats-Msg-Id": ""}, False),
])
def test_auto_stores_what_someone_can_ask_for(headers: dict[str, str] | None, stored: bool) -> None:
    assert caller_holds_id(Headers(headers)) is stored
    assert should_store(manifest(), Headers(headers)) is stored
    assert should_store(None, Headers(headers)) is stored   # a function this runtime does not know


@pytest.mark.parametrize("headers", [None, {"Nats-Msg-Id": "order-42"}, {"Fn-Reply-To": "_INBOX.abc"}])
def test_always_and_never_ignore_the_headers(headers: dict[str, str] | None) -> None:
    assert should_store(manifest(store_results="always"), Headers(headers))
    assert not should_store(manifest(store_results="never"), Headers(headers))
    # model_copy does not validate: a bool left there means what it meant before "auto".
    assert should_store(manifest().model_copy(update={"store_results": True}), Headers(headers))
    assert not should_store(manifest().model_copy(update={"store_results": False}), Headers(headers))


def test_manifest_values(tmp_path: Any) -> None:
    assert manifest().store_results == "auto"
    # true and false, written before auto existed, keep their meaning.
    assert manifest(store_results=True).store_results == "always"
    assert manifest(store_results=False).store_results == "never"
    for value in ("auto", "always", "never"):
        (tmp_path / "greet.yaml").write_text(fn("greet", "greet", store_results=value))
        assert ManifestSet.load([tmp_path]).functions["greet"].store_results == value
    (tmp_path / "greet.yaml").write_text("name: greet\nhandler: tests.handlers.core:greet\nstore_results: true\n")
    assert ManifestSet.load([tmp_path]).functions["greet"].store_results == "always"
    (tmp_path / "greet.yaml").write_text(fn("greet", "greet", store_results="sometimes"))
    with pytest.raises(ManifestError, match="store_results"):
        ManifestSet.load([tmp_path])


# ------------------------------------------------------------------ against a server


async def settled(js: JetStreamContext, function: str) -> bool:
    """Every invocation of ``function`` is acked (the work queue removed it)."""
    info = await js.consumer_info("FN", function)
    return info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq > 0


async def test_default_skips_the_outcome_of_a_plain_publish(runtime: RuntimeFactory, nc: NATS,
                                                            js: JetStreamContext) -> None:
    await runtime(greet=fn("greet", "greet"))
    seen, _ = await collect(nc, "test.events.greet")
    ack = await js.publish("fn.invoke.greet", b'{"name": "Ada"}')
    await eventually(lambda: seen, message="the function to run")
    assert json.loads(seen[0].data)["call_id"] == f"fn-{ack.seq}"
    await eventually(lambda: settled(js, "greet"), message="the invocation to be acked")
    assert await fetch_response(js, f"fn-{ack.seq}") is None


async def test_default_keeps_calls_that_carry_an_id(runtime: RuntimeFactory, nats_server: EmbeddedServer,
                                                    js: JetStreamContext) -> None:
    await runtime(greet=fn("greet", "greet"))
    # A plain publish that names its call id can be asked for: its outcome is kept.
    await js.publish("fn.invoke.greet", b'{"name": "Ada"}', headers={"Nats-Msg-Id": "plain-with-id"})
    async with Client(nats_server.url) as client:
        assert await client.result("plain-with-id", wait=10) == {"greeting": "Hello, Ada!"}
        # A submitted call is always findable later; so is an invoked one.
        call = await client.submit("greet", {"name": "Bo"})
        assert await client.result(call.id, wait=10) == {"greeting": "Hello, Bo!"}
        assert await client.invoke("greet", {"name": "Cy"}, call_id="invoked") == {"greeting": "Hello, Cy!"}
        assert await client.result("invoked", wait=10) == {"greeting": "Hello, Cy!"}


async def test_always_keeps_the_outcome_of_a_plain_publish(runtime: RuntimeFactory, js: JetStreamContext) -> None:
    await runtime(greet=fn("greet", "greet", store_results="always"))
    ack = await js.publish("fn.invoke.greet", b'{"name": "Ada"}')
    await eventually(lambda: settled(js, "greet"), message="the invocation to be acked")
    # Written ahead of the ack on the same connection: stored by the time the message is gone.
    response = await fetch_response(js, f"fn-{ack.seq}")
    assert response is not None and response.value() == {"greeting": "Hello, Ada!"}
    assert response.headers == {"Fn-Call-Id": f"fn-{ack.seq}", "Content-Type": "application/json"}


async def test_never_keeps_nothing_but_still_answers(runtime: RuntimeFactory, nats_server: EmbeddedServer,
                                                     js: JetStreamContext) -> None:
    await runtime(greet=fn("greet", "greet", store_results="never"))
    async with Client(nats_server.url) as client:
        assert await client.invoke("greet", {"name": "Ada"}, call_id="unkept") == {"greeting": "Hello, Ada!"}
        await eventually(lambda: settled(js, "greet"), message="the invocation to be acked")
        assert await fetch_response(js, "unkept") is None


@pytest.mark.parametrize("headers", [
    {"Fn-Call-Id": "abc", "Content-Type": "application/json"},
    {"Fn-Call-Id": "é" * 256, "Nats-Service-Error": "ü€😀" * 300, "Nats-Service-Error-Code": "500"},
    {" Padded ": " line\r\nbreak "},
    {},
])
def test_the_cheap_header_bound_is_never_below_the_exact_size(headers: dict[str, str]) -> None:
    # The outbox measures an answer exactly only when this bound says it might not fit.
    assert header_size(headers) <= headers_at_most(headers)
