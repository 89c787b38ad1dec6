"""Chaos: a runtime under steady load takes every poison at random moments and keeps its promises.

One ``runtime serve`` process serves a steady stream of calls while a second task sends, in a
random order and at random moments, each message that once disabled or misused a runtime: a
5,000-character message id, an invalid body just under ``max_payload``, a result too large, a
core request too large, three reply subjects naming JetStream API calls or holding spaces, a
handler raising ``SystemExit``, and a deploy of a module that calls ``os._exit`` at import.
Every valid call must complete exactly once with its right answer, no stream may lose what it
should keep, and the runtime process must never exit.
"""

from __future__ import annotations

import asyncio
import json
import random
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime import Client
from runtime.manifest import FunctionManifest, ManifestSet
from runtime.registry import Registry
from runtime.server import EmbeddedServer
from runtime.streams import DLQ_STREAM, INVOKE_STREAM

from .conftest import RuntimeProcess, collect, configured_server, eventually

MAX_PAYLOAD = 8 * 1024 * 1024
CALLS = 300

MANIFESTS = {
    "greet": "name: greet\nhandler: tests.handlers.core:greet\nconcurrency: 16\n",
    "echo": "name: echo\nhandler: tests.handlers.core:echo\nretry: {max_deliver: 1}\n",
    "big": "name: big\nhandler: tests.handlers.hardening:fill_up\nretry: {max_deliver: 1}\n",
    "bye": "name: bye\nhandler: tests.handlers.hardening:exits\nretry: {max_deliver: 1}\n",
}


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    async with configured_server(tmp_path, "max_payload: 8MB\n") as server:
        yield server


def poisons(nc: NATS, js: JetStreamContext, modules: Path) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Each poison, by name; the dead letters each one leaves are counted by the test."""

    async def deploy_exit_at_import() -> None:
        (modules / "exits_at_import.py").write_text(textwrap.dedent("""\
                        os._exit(9)
            def main(event: dict) -> None: ...
            """))
        manifest = FunctionManifest(name="doomed", handler="exits_at_import:main")
        registry = await Registry.open(js)
        await registry.deploy(ManifestSet(functions={"doomed": manifest}, schedules={},
                                          sources={"Function:doomed": "chaos"}))

    return {
        "long msg id": lambda: js.publish("fn.invoke.echo", b'{"p": 1}', headers={"Nats-Msg-Id": "m" * 5000}),
        "invalid body near max_payload": lambda: js.publish("fn.invoke.echo", b"{" * (MAX_PAYLOAD - 176)),
        "result too large": lambda: js.publish("fn.invoke.big", b'{"minus": 20}'),
        "core request too large": lambda: nc.publish("fn.call.echo", b"[" * (MAX_PAYLOAD - 40), reply="_INBOX.x"),
        "reply purges the DLQ": lambda: js.publish("fn.invoke.echo", b'{"p": 2}', headers={
            "Fn-Reply-To": f"$JS.API.STREAM.PURGE.{DLQ_STREAM}"}),
        "core reply purges FN": lambda: nc.publish("fn.call.echo", b'{"p": 3}',
                                                   reply=f"$JS.API.STREAM.PURGE.{INVOKE_STREAM}"),
        "reply with spaces": lambda: js.publish("fn.invoke.echo", b'{"p": 4}', headers={
            "Fn-Reply-To": "not a subject"}),
        "handler raises SystemExit": lambda: js.publish("fn.invoke.bye", b'{"code": 3}'),
        "module exits at import": deploy_exit_at_import,
    }


# Poisons that end as dead letters: the invalid body, the result too large, SystemExit.
DEAD_LETTERS = 3


async def test_a_runtime_under_load_survives_every_poison(
        nats_server: EmbeddedServer, manifest_dir: Callable[..., Path], runtime_process: Callable[..., RuntimeProcess],
        tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    proc = runtime_process(manifest_dir(**MANIFESTS), extra=["--trust", "exits_at_import"],
                           env={"PYTHONPATH": str(modules)})
    await proc.wait_ready()
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        # Something each stream must keep: an earlier dead letter, a call nobody serves yet.
        await js.publish("fn.invoke.echo", b"not json", headers={"Nats-Msg-Id": "earlier"})
        await eventually(lambda: _count(js, DLQ_STREAM, 1), message="the first dead letter")
        await js.publish("fn.invoke.nobody", b"{}")
        runs, _ = await collect(nc, "test.events.greet")

        seed = random.randrange(1 << 30)
        rng = random.Random(seed)
        todo = list(poisons(nc, js, modules).items())
        rng.shuffle(todo)

        async def inject() -> None:
            for _name, send in todo:
                await asyncio.sleep(rng.uniform(0.05, 0.6))
                await send()

        async with Client(nc) as fn:
            sem = asyncio.Semaphore(16)

            async def call(i: int) -> Any:
                async with sem:
                    return await fn.invoke("greet", {"name": f"n{i}"}, call_id=f"load-{i}", timeout=30)

            answers, _ = await asyncio.gather(asyncio.gather(*(call(i) for i in range(CALLS))), inject())
        assert answers == [{"greeting": f"Hello, n{i}!"} for i in range(CALLS)], f"seed {seed}"
        await nc.flush()
        per_call = Counter(json.loads(m.data)["call_id"] for m in runs)
        assert len(per_call) == CALLS and set(per_call.values()) == {1}, f"each call ran once (seed {seed})"

        await eventually(lambda: _count(js, DLQ_STREAM, 1 + DEAD_LETTERS), timeout=20,
                         message=f"every dead letter, none purged (seed {seed})")
        assert await _messages(js, INVOKE_STREAM) >= 1, "the queued call nobody serves is still there"
        assert proc.proc.poll() is None, f"the runtime process never exits (seed {seed})\n{proc.output()}"
        # The deploy may have been the last poison: its import check runs in a child for a moment.
        status = await eventually(lambda: _status_with_failing(nc, "doomed"), timeout=20,
                                  message=f"doomed reported as failing (seed {seed})")
        assert "greet" in status["serving"]
    finally:
        await nc.close()


async def _status_with_failing(nc: NATS, name: str) -> dict[str, Any] | None:
    status: dict[str, Any] = json.loads((await nc.request("fn.admin.status", b"", timeout=2)).data)
    return status if name in status["failing"] else None


async def _messages(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def _count(js: JetStreamContext, stream: str, expected: int) -> bool:
    return await _messages(js, stream) == expected
