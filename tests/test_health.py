"""The HTTP probes of a runtime process: liveness, readiness while connecting, serving and draining."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js import JetStreamContext

from runtime.app import Runtime
from runtime.errors import ConfigError
from runtime.server import EmbeddedServer, free_port
from runtime.settings import Settings

from .conftest import RuntimeProcess, eventually

PLANNED = """\
name: planned
handler: tests.handlers.metered:planned
"""
SLOW = """\
name: slow
handler: tests.handlers.metered:slow
concurrency: 2
"""


async def get(url: str) -> tuple[int, Any]:
    """Status and JSON body of ``GET url``; status 0 while nothing listens."""
    try:
        async with aiohttp.ClientSession() as session, session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
            text = await r.text()
            return r.status, json.loads(text) if r.content_type == "application/json" else text
    except aiohttp.ClientConnectionError:
        return 0, None


async def status_is(url: str, status: int) -> bool:
    return (await get(url))[0] == status


async def test_healthz_and_readyz_answer_200_once_started(runtime_process: Callable[..., RuntimeProcess],
                                                          manifest_dir: Callable[..., Path]) -> None:
    http = f"127.0.0.1:{free_port()}"
    proc = runtime_process(manifest_dir(planned=PLANNED), extra=["--http", http])
    await proc.wait_ready()
    assert await get(f"http://{http}/healthz") == (200, {"status": "ok"})
    assert await get(f"http://{http}/readyz") == (200, {"ready": True})


async def test_readyz_is_503_until_the_server_it_waits_for_is_up(runtime_process: Callable[..., RuntimeProcess],
                                                                 manifest_dir: Callable[..., Path],
                                                                 tmp_path: Path) -> None:
    nats_port, http = free_port(), f"127.0.0.1:{free_port()}"
    proc = runtime_process(manifest_dir(planned=PLANNED), extra=["--http", http],
                           url=f"nats://127.0.0.1:{nats_port}")
    await eventually(lambda: status_is(f"http://{http}/healthz", 200), timeout=20, message="the listener")
    status, body = await get(f"http://{http}/readyz")
    assert status == 503 and body["ready"] is False
    assert "not connected to NATS" in body["reason"]
    async with EmbeddedServer(tmp_path / "later", port=nats_port).discarded():
        await eventually(lambda: status_is(f"http://{http}/readyz", 200), timeout=20, message="ready")
        await proc.wait_ready()


async def test_readyz_turns_503_within_a_second_of_sigterm_while_work_drains(
        runtime_process: Callable[..., RuntimeProcess], manifest_dir: Callable[..., Path],
        js: JetStreamContext) -> None:
    http = f"127.0.0.1:{free_port()}"
    proc = runtime_process(manifest_dir(slow=SLOW), extra=["--http", http])
    await proc.wait_ready()
    await js.publish("fn.invoke.slow", json.dumps({"seconds": 3}).encode())
    await eventually(lambda: in_flight(js), message="the slow invocation running")
    proc.signal(signal.SIGTERM)
    sent = time.monotonic()
    while (await get(f"http://{http}/readyz"))[0] != 503:
        assert time.monotonic() - sent < 1.0, "still ready a second after SIGTERM"
        await asyncio.sleep(0.02)
    status, body = await get(f"http://{http}/readyz")
    assert status == 503 and body["reason"].startswith("draining")
    assert proc.proc.poll() is None, "the runtime exited before its in-flight work finished"
    assert await proc.wait_exit(30) == 0, proc.output()
    info = await js.consumer_info("FN", "slow")
    assert info.num_ack_pending == 0 and info.ack_floor.stream_seq == 1, "the slow invocation finished"


async def in_flight(js: JetStreamContext) -> bool:
    return (await js.consumer_info("FN", "slow")).num_ack_pending == 1


async def test_an_explicit_address_that_is_taken_fails_the_start(nats_server: EmbeddedServer,
                                                                 tmp_path: Path) -> None:
    port = free_port()
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
    try:
        runtime = Runtime(Settings(data_dir=tmp_path, http=f"127.0.0.1:{port}"), nats_server.url)
        with pytest.raises(ConfigError, match=f"cannot serve health and metrics on http://127.0.0.1:{port}"):
            await runtime.start()
    finally:
        blocker.close()
        await blocker.wait_closed()


@pytest.mark.parametrize("given", ["9090", "localhost", "host:port", "127.0.0.1:70000", ":9090"])
def test_a_bad_http_address_says_what_to_give(given: str) -> None:
    with pytest.raises(ValueError, match="is not an HTTP listen address: give HOST:PORT"):
        Settings(http=given)


def test_http_is_on_by_default_only_beside_the_embedded_server() -> None:
    assert Settings().http_address(embedded=True) == ("127.0.0.1", 9090, False)
    assert Settings().http_address(embedded=False) is None
    assert Settings(http="off").http_address(embedded=True) is None
    assert Settings(http="0.0.0.0:8000").http_address(embedded=False) == ("0.0.0.0", 8000, True)
