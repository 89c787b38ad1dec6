"""``Client``: invoke, submit and result through JetStream, against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime import (
    Client,
    FunctionError,
    InvalidInput,
    InvocationError,
    InvocationTimeout,
    NoResult,
    Rejected,
    Unavailable,
    UnknownFunction,
)
from runtime.manifest import FunctionManifest, ManifestSet
from runtime.registry import Registry
from runtime.server import EmbeddedServer
from runtime.streams import INVOKE_STREAM, ensure_consumer, provision_base

from .conftest import ROOT, RuntimeFactory, RuntimeProcess, collect, eventually
from .handlers.core import Person


def fn(name: str, handler: str, **extra: Any) -> str:
    lines = [f"name: {name}", f"handler: tests.handlers.{handler}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)


def runs(scratch: Path, function: str) -> list[str]:
    path = scratch / f"runs-{function}"
    return path.read_text().split() if path.exists() else []


async def test_invoke_returns_the_decoded_result(runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(greet=fn("greet", "core:greet"), raw=fn("raw", "core:raw"))
    async with Client(nats_server.url) as client:
        assert await client.invoke("greet", {"name": "Ada"}) == {"greeting": "Hello, Ada!"}
        # A pydantic model goes out as JSON; bytes go out (and come back) untouched.
        assert await client.invoke("greet", Person(name="Bob", age=3)) == {"greeting": "Hello, Bob!"}
        assert await client.invoke("raw", b"\x00\x01abc") == b"cba\x01\x00"


async def test_msgpack_both_ways_on_an_existing_connection(runtime: RuntimeFactory, nc: NATS) -> None:
    await runtime(greet=fn("greet", "core:greet", encoding="msgpack"))
    async with Client(nc, encoding="msgpack") as client:
        assert await client.invoke("greet", {"name": "Grace"}) == {"greeting": "Hello, Grace!"}
    assert not nc.is_closed, "a connection handed to the client stays open"


async def test_failure_is_raised_after_the_last_attempt_only(runtime: RuntimeFactory, nats_server: EmbeddedServer,
                                                             nc: NATS) -> None:
    await runtime(fails=fn("fails", "core:always_fail", retry={"max_deliver": 3, "backoff": ["200ms"]}))
    attempts, _ = await collect(nc, "test.events.fails")
    async with Client(nats_server.url) as client:
        started = time.monotonic()
        with pytest.raises(FunctionError) as caught:
            await client.invoke("fails", {"n": 7}, timeout=10)
    err = caught.value
    assert [json.loads(m.data)["attempt"] for m in attempts] == [1, 2, 3]
    assert time.monotonic() - started >= 0.4, "the caller waits for the retries"
    assert (err.code, err.type, err.message) == (500, "ValueError", "boom 7")
    assert err.call_id


async def test_invalid_payload_raises_at_once_with_400(runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(greet=fn("greet", "core:greet", retry={"max_deliver": 5, "backoff": ["3s"]}))
    async with Client(nats_server.url) as client:
        started = time.monotonic()
        with pytest.raises(InvalidInput) as caught:
            await client.invoke("greet", {"age": "old"})
        assert time.monotonic() - started < 2.0, "invalid input is not retried"
        assert caught.value.code == 400 and "name: Field required" in caught.value.message
        # A payload that cannot even be encoded never leaves the client.
        with pytest.raises(InvalidInput):
            await client.invoke("greet", {"when": object()})


async def test_rejected_and_client_side_timeout(runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(nope=fn("nope", "core:reject"), sleepy=fn("sleepy", "core:sleepy"))
    async with Client(nats_server.url) as client:
        with pytest.raises(Rejected) as rejected:
            await client.invoke("nope", {})
        assert rejected.value.code == 422 and rejected.value.message == "not today"
        started = time.monotonic()
        with pytest.raises(InvocationTimeout) as timed_out:
            await client.invoke("sleepy", {"seconds": 1.5}, timeout=0.4)
        assert 0.35 <= time.monotonic() - started <= 1.0
        assert timed_out.value.code == 504
        # The call went on: its outcome can be read by the id the error carries.
        call_id = timed_out.value.call_id
        assert call_id is not None
        assert await client.result(call_id, wait=10) == {"slept": 1.5}


async def test_unknown_function_is_404_at_once(nats_server: EmbeddedServer, js: JetStreamContext) -> None:
    await provision_base(js)
    # Known by its consumer alone (deployed without the registry): the call is queued, not refused.
    await ensure_consumer(js, FunctionManifest(name="bare", handler="tests.handlers.rpc:square"))
    async with Client(nats_server.url) as client:
        for name in ("nothing-here", "Bad.Name"):
            with pytest.raises(UnknownFunction) as caught:
                await client.invoke(name, {}, timeout=5)
            assert caught.value.code == 404
        call = await client.submit("bare", {"n": 2, "token": "t"})
        assert not call.duplicate

        async def queued() -> bool:
            return (await js.consumer_info(INVOKE_STREAM, "bare")).num_pending == 1
        await eventually(queued)


async def test_undeployed_function_is_unknown(nats_server: EmbeddedServer, js: JetStreamContext,
                                              manifest_dir: Callable[..., Path]) -> None:
    await provision_base(js)
    registry = await Registry.open(js)
    await registry.deploy(ManifestSet.load([manifest_dir(gone=fn("gone", "rpc:square"))]))
    await registry.undeploy("gone")
    async with Client(nats_server.url) as client:
        with pytest.raises(UnknownFunction):
            await client.submit("gone", {})


async def test_unavailable_when_the_invocation_cannot_be_stored(nats_server: EmbeddedServer, js: JetStreamContext,
                                                                manifest_dir: Callable[..., Path]) -> None:
    await provision_base(js)
    registry = await Registry.open(js)
    await registry.deploy(ManifestSet.load([manifest_dir(square=fn("square", "rpc:square"))]))
    await js.delete_stream(INVOKE_STREAM)
    async with Client(nats_server.url) as client:
        with pytest.raises(Unavailable) as caught:
            await client.invoke("square", {"n": 1, "token": "x"})
    assert caught.value.code == 503 and caught.value.call_id


async def test_result_of_a_call_nobody_made(runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(greet=fn("greet", "core:greet"))
    async with Client(nats_server.url) as client:
        with pytest.raises(NoResult):
            await client.result("no-such-call")
        started = time.monotonic()
        with pytest.raises(NoResult):
            await client.result("no-such-call", wait=0.3)
        assert time.monotonic() - started >= 0.25


async def test_submit_exit_then_another_process_reads_the_result(runtime: RuntimeFactory,
                                                                 nats_server: EmbeddedServer) -> None:
    await runtime(sleepy=fn("sleepy", "core:sleepy"))
    submitted = await asyncio.to_thread(run_python, """
        import asyncio, sys
        from runtime import Client

        async def main():
            async with Client(sys.argv[1]) as client:
                call = await client.submit("sleepy", {"seconds": 0.8})
                print(call.id)

        asyncio.run(main())
        """, nats_server.url)
    assert submitted.returncode == 0, submitted.stderr
    call_id = submitted.stdout.strip()
    read = await asyncio.to_thread(run_python, """
        import asyncio, json, sys
        from runtime import Client

        async def main():
            async with Client(sys.argv[1]) as client:
                print(json.dumps(await client.result(sys.argv[2], wait=20)))

        asyncio.run(main())
        """, nats_server.url, call_id)
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout) == {"slept": 0.8}


async def test_same_call_id_runs_once_and_both_callers_get_its_result(
        runtime: RuntimeFactory, nats_server: EmbeddedServer, scratch: Path) -> None:
    await runtime(counted=fn("counted", "rpc:counted"))
    async with Client(nats_server.url) as first, Client(nats_server.url) as second:
        # At the same time, from two connections...
        a, b = await asyncio.gather(first.invoke("counted", {"seconds": 0.3, "value": 1}, call_id="order-42"),
                                    second.invoke("counted", {"seconds": 0.3, "value": 2}, call_id="order-42"))
        # ...and again once it is done.
        c = await second.invoke("counted", {"value": 3}, call_id="order-42")
        resubmitted = await second.submit("counted", {"value": 4}, call_id="order-42")
    assert a == b == c and a["call_id"] == "order-42"
    assert resubmitted.duplicate
    assert runs(scratch, "counted") == ["order-42"]


async def test_thousand_concurrent_calls_from_ten_connections(runtime: RuntimeFactory,
                                                             nats_server: EmbeddedServer) -> None:
    await runtime(square=fn("square", "rpc:square", concurrency=64))
    clients = [Client(nats_server.url) for _ in range(10)]
    for client in clients:
        await client.start()
    try:
        payloads: list[dict[str, Any]] = [{"n": i, "token": uuid.uuid4().hex} for i in range(1000)]
        results = await asyncio.gather(*(clients[i % 10].invoke("square", p, timeout=60)
                                         for i, p in enumerate(payloads)))
    finally:
        for client in clients:
            await client.stop()
    assert results == [{"token": p["token"], "square": p["n"] ** 2} for p in payloads]


async def test_call_waits_in_the_queue_until_a_runtime_starts(
        nats_server: EmbeddedServer, js: JetStreamContext, manifest_dir: Callable[..., Path],
        runtime_process: Callable[..., RuntimeProcess]) -> None:
    await provision_base(js)
    registry = await Registry.open(js)
    await registry.deploy(ManifestSet.load([manifest_dir(square=fn("square", "rpc:square"))]))
    async with Client(nats_server.url) as client:
        call = asyncio.create_task(client.invoke("square", {"n": 12, "token": "late"}, timeout=60))
        await eventually(lambda: _pending(js, "square"), message="the call to be queued")
        assert not call.done()
        # No manifests: it serves what the registry holds, from the package it is told to trust.
        proc = runtime_process(None, env={"RUNTIME_TRUST": "tests"})
        assert await call == {"token": "late", "square": 144}
        assert "serving square" in proc.output()


async def _pending(js: JetStreamContext, name: str) -> bool:
    info = await js.consumer_info(INVOKE_STREAM, name)
    return bool(info.num_pending == 1)


async def test_typed_errors_share_one_tree() -> None:
    for cls in (FunctionError, InvalidInput, UnknownFunction, InvocationTimeout, Unavailable, Rejected):
        assert issubclass(cls, InvocationError)
    with pytest.raises(ValueError):
        Client(encoding="yaml")  # type: ignore[arg-type]
