"""The benchmark's lean HTTP load generator against a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from bench.httpload import HttpStatusError, LoadClient
from runtime.server import free_port


@pytest.fixture
async def server():
    seen: list[tuple[str, bytes, str]] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.path, body, request.headers.get("Content-Type", "")))
        if body == b"fail":
            return web.Response(status=422, text="no")
        return web.Response(body=body[::-1])

    app = web.Application()
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port, seen
    await runner.cleanup()


async def test_posts_over_kept_alive_connections(server) -> None:
    port, seen = server
    client = LoadClient("127.0.0.1", port, "/echo", b"hello", {"Content-Type": "application/json"})
    try:
        answers = await asyncio.gather(*(client.post() for _ in range(20)))
        answers += [await client.post() for _ in range(20)]
        # The sequential calls reused the 20 connections the concurrent ones opened.
        assert client.connections == 20
    finally:
        client.close()
    assert answers == [b"olleh"] * 40
    assert seen == [("/echo", b"hello", "application/json")] * 40


async def test_a_status_other_than_2xx_raises(server) -> None:
    port, _ = server
    client = LoadClient("127.0.0.1", port, "/echo", b"fail")
    try:
        with pytest.raises(HttpStatusError, match="HTTP 422"):
            await client.post()
    finally:
        client.close()
