"""The HTTP gateway of a runtime process: synchronous and asynchronous calls, callbacks, stored outcomes, token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web

from runtime.server import free_port

from .conftest import RuntimeProcess, eventually

FUNCTIONS = {
    "greet": "name: greet\nhandler: tests.handlers.core:greet\n",
    "raw": "name: raw\nhandler: tests.handlers.core:raw\n",
    "echo": "name: echo\nhandler: tests.handlers.core:echo\n",
    "reject": "name: reject\nhandler: tests.handlers.core:reject\n",
    "fails": "name: fails\nhandler: tests.handlers.core:always_fail\nretry:\n  max_deliver: 1\n",
    "sleepy": "name: sleepy\nhandler: tests.handlers.core:sleepy\n",
    "tracked": "name: tracked\nhandler: tests.handlers.core:tracked\n",
}


async def start(runtime_process: Callable[..., RuntimeProcess], manifest_dir: Callable[..., Path],
                *extra: str, env: dict[str, str] | None = None) -> tuple[str, RuntimeProcess]:
    address = f"127.0.0.1:{free_port()}"
    proc = runtime_process(manifest_dir(**FUNCTIONS), extra=["--http", address, *extra], env=env)
    await proc.wait_ready()
    return f"http://{address}", proc


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, body: Any = None, **headers: str) -> tuple[int, Any, Any]:
    """Status, body (JSON decoded when it is JSON) and headers of a POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    if not isinstance(body, bytes):
        headers.setdefault("Content-Type", "application/json")
    async with http.post(url, data=data, headers={k.replace("_", "-"): v for k, v in headers.items()}) as r:
        return r.status, decoded(await r.read(), r.content_type), r.headers


def decoded(raw: bytes, content_type: str) -> Any:
    """JSON bodies decoded; others (and a bytes result, which the runtime labels JSON) as they came."""
    try:
        return json.loads(raw) if content_type == "application/json" else raw
    except ValueError:
        return raw


async def get(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, Any]:
    async with http.get(url, headers=headers) as r:
        return r.status, decoded(await r.read(), r.content_type)


async def test_sync_calls_pass_bodies_through_and_map_errors_to_statuses(
        runtime_process: Callable[..., RuntimeProcess], manifest_dir: Callable[..., Path],
        http: aiohttp.ClientSession, scratch: Path) -> None:
    base, _ = await start(runtime_process, manifest_dir, "--http-max-body", "2000")
    status, body, headers = await post(http, f"{base}/function/greet", {"name": "Ada"})
    assert (status, body) == (200, {"greeting": "Hello, Ada!"})
    assert headers["X-Call-Id"]
    # Bytes and msgpack go through as they came, with their content type.
    status, body, _ = await post(http, f"{base}/function/raw", b"abc", Content_Type="application/octet-stream")
    assert (status, body) == (200, b"cba")
    status, body, headers = await post(http, f"{base}/function/echo", msgpack.packb({"n": 1}),
                                       Content_Type="application/msgpack")
    # Decoded as msgpack; answered in the function's own encoding (its manifest's, JSON here).
    assert (status, headers["Content-Type"], body) == (200, "application/json", {"n": 1})

    async def error_of(function: str, payload: Any, **headers: str) -> tuple[int, dict[str, Any]]:
        status, body, _ = await post(http, f"{base}/function/{function}", payload, **headers)
        assert body["error"]["code"] == status, body
        return status, body["error"]

    assert (await error_of("greet", {"age": "old"}))[0] == 400
    status, error = await error_of("nothing", {})
    assert (status, error["type"]) == (404, "UnknownFunction")
    assert (await error_of("reject", {}))[0] == 422
    status, error = await error_of("fails", {"n": 3})
    assert (status, error["type"], error["message"]) == (500, "ValueError", "boom 3")
    status, error = await error_of("echo", {"big": "x" * 3000})
    assert (status, error["type"]) == (413, "PayloadTooLarge")
    assert (await error_of("echo", {}, X_Timeout="soon"))[0] == 400

    # Too late: 504 with the call id, whose outcome is 202 (pending) and then stored.
    status, body, headers = await post(http, f"{base}/function/sleepy", {"seconds": 1}, X_Timeout="200ms")
    assert status == 504 and body["error"]["type"] == "InvocationTimeout"
    call_id = headers["X-Call-Id"]
    assert (await get(http, f"{base}/calls/{call_id}"))[0] == 202
    await eventually(lambda: status_of(http, f"{base}/calls/{call_id}", 200), message="the late outcome")
    assert await get(http, f"{base}/calls/{call_id}") == (200, {"slept": 1})
    assert (await get(http, f"{base}/calls/never-submitted"))[0] == 404

    # The same idempotency key twice: one run, the same answer.
    for _ in range(2):
        status, body, headers = await post(http, f"{base}/function/tracked", {"id": "once", "seconds": 0},
                                           Idempotency_Key="order-17")
        assert (status, body, headers["X-Call-Id"]) == (200, {"id": "once"}, "order-17")
    runs = [line for f in scratch.glob("runs-*") for line in f.read_text().splitlines()]
    assert runs == ["once:1"]


async def status_of(http: aiohttp.ClientSession, url: str, status: int) -> bool:
    return (await get(http, url))[0] == status


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, asyncio.Queue[tuple[dict[str, str], bytes]]]]:
    """A loopback HTTP server that takes callbacks: its URL and the requests it received."""
    received: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()

    async def take(request: web.Request) -> web.Response:
        received.put_nowait((dict(request.headers), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/done", take)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/done", received
    await runner.cleanup()


async def test_async_calls_call_back_and_keep_the_outcome_when_the_callback_fails(
        runtime_process: Callable[..., RuntimeProcess], manifest_dir: Callable[..., Path],
        http: aiohttp.ClientSession, receiver: tuple[str, asyncio.Queue[tuple[dict[str, str], bytes]]]) -> None:
    base, proc = await start(runtime_process, manifest_dir, "--max-queued", "1")
    url, received = receiver
    status, body, headers = await post(http, f"{base}/async-function/greet", {"name": "Bo"}, X_Callback_Url=url)
    assert status == 202 and body["call_id"] == headers["X-Call-Id"]
    sent, payload = await asyncio.wait_for(received.get(), 10)
    assert json.loads(payload) == {"greeting": "Hello, Bo!"}
    assert (sent["X-Call-Id"], sent["X-Function-Name"], sent["X-Function-Status"]) == (body["call_id"], "greet", "200")

    # A failed call is called back with its error status and body.
    await post(http, f"{base}/async-function/reject", {}, X_Callback_Url=url)
    sent, payload = await asyncio.wait_for(received.get(), 10)
    assert sent["X-Function-Status"] == "422" and json.loads(payload)["error"]["code"] == 422

    # Nobody listens there: the callback fails (retried, logged), the outcome stays readable.
    dead = f"http://user:secret@127.0.0.1:{free_port()}/hook?key=hidden"
    status, body, _ = await post(http, f"{base}/async-function/echo", {"n": 5}, X_Callback_Url=dead)
    assert status == 202
    await eventually(lambda: status_of(http, f"{base}/calls/{body['call_id']}", 200), message="the outcome")
    assert await get(http, f"{base}/calls/{body['call_id']}") == (200, {"n": 5})
    await eventually(lambda: "failed after 4 attempts" in proc.output(), message="the callback failure logged")
    assert "secret" not in proc.output() and "hidden" not in proc.output()

    status, body, _ = await post(http, f"{base}/async-function/echo", {}, X_Callback_Url="file:///etc/passwd")
    assert status == 400

    # --max-queued 1: a second call while the first is stored is refused, nothing stored.
    first = await post(http, f"{base}/async-function/sleepy", {"seconds": 2})
    status, body, _ = await post(http, f"{base}/async-function/sleepy", {"seconds": 2})
    assert first[0] == 202 and (status, body["error"]["type"]) == (429, "QueueFull")


async def test_bearer_token_guards_everything_but_the_probes(
        runtime_process: Callable[..., RuntimeProcess], manifest_dir: Callable[..., Path],
        http: aiohttp.ClientSession) -> None:
    base, _ = await start(runtime_process, manifest_dir, env={"RUNTIME_HTTP_TOKEN": "s3cret"})
    status, body, headers = await post(http, f"{base}/function/greet", {"name": "Eve"})
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    status, _, _ = await post(http, f"{base}/function/greet", {"name": "Eve"}, Authorization="Bearer wrong")
    assert status == 401
    assert (await get(http, f"{base}/calls/x"))[0] == 401
    status, body, _ = await post(http, f"{base}/function/greet", {"name": "Eve"}, Authorization="Bearer s3cret")
    assert (status, body) == (200, {"greeting": "Hello, Eve!"})
    assert (await get(http, f"{base}/healthz"))[0] == 200
    assert (await get(http, f"{base}/readyz"))[0] == 200
    assert (await get(http, f"{base}/metrics"))[0] == 200
