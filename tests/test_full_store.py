"""A full JetStream store delays work; it never loses it.

The store is filled for real (a server with a small ``max_file_store`` and a stream of filler),
invocations run while nothing can be written, then space is freed: every outcome is stored,
every invalid call is dead-lettered, and nothing is left behind in ``FN``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError

from runtime.app import Runtime
from runtime.server import EmbeddedServer
from runtime.settings import Settings
from runtime.streams import DLQ_STREAM, EVENTS_STREAM, INVOKE_STREAM, RESULTS_BUCKET

from .conftest import ROOT, RuntimeFactory, configured_server, eventually

ECHO = """\
name: echo
handler: tests.handlers.core:echo
concurrency: 64
retry: {max_deliver: 2, backoff: ["100ms"]}
"""
VALID, INVALID = 1000, 200


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    async with configured_server(tmp_path, "jetstream { max_file_store: 48MB }\n") as server:
        yield server


async def fill(js: JetStreamContext) -> int:
    """Fill the store to the last byte; returns the bytes written."""
    await js.add_stream(name="FILLER", subjects=["filler"])
    written = 0
    for size in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
        blob = b"f" * size
        while True:
            try:
                await js.publish("filler", blob)
            except ServiceUnavailableError:
                break
            written += size
    return written


async def messages(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def test_a_full_store_delays_outcomes_and_dead_letters_without_losing_any(
        runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, tmp_path: Path) -> None:
    first = await runtime(echo=ECHO)
    await first.stop()   # the function stays deployed, its consumer durable
    for i in range(VALID):
        await js.publish("fn.invoke.echo", b'{"i": %d}' % i, headers={"Nats-Msg-Id": f"ok-{i}"})
    for i in range(INVALID):
        await js.publish("fn.invoke.echo", b"not json %d" % i, headers={"Nats-Msg-Id": f"bad-{i}"})
    assert await fill(js) > 0

    url = nats_server.url
    rt = Runtime(Settings(project_root=ROOT, data_dir=tmp_path / "rt", grace=5.0, trust=("tests",)), url)
    await rt.start()
    try:
        assert rt.outbox is not None
        outbox = rt.outbox
        await eventually(lambda: outbox.write_failures >= 64, timeout=20, message="writes refused by the full store")
        # Nothing was acknowledged without its outcome, and no delivery was burnt waiting.
        info = await js.consumer_info(INVOKE_STREAM, "echo")
        assert await messages(js, INVOKE_STREAM) == VALID + INVALID
        assert info.num_redelivered == 0
        assert await messages(js, DLQ_STREAM) == 0

        await js.delete_stream("FILLER")
        await eventually(lambda: _all_done(js), timeout=60, message="every outcome stored once space returned")
        assert await messages(js, f"KV_{RESULTS_BUCKET}") == VALID + INVALID
        assert await messages(js, DLQ_STREAM) == INVALID
        kv = await js.key_value(RESULTS_BUCKET)
        entry = await kv.get("ok-999")
        assert entry.value == b'{"i":999}'
    finally:
        with contextlib.suppress(Exception):
            await rt.stop()


async def _all_done(js: JetStreamContext) -> bool:
    return (await messages(js, INVOKE_STREAM) == 0 and await messages(js, EVENTS_STREAM) == 0
            and await messages(js, DLQ_STREAM) == INVALID)
