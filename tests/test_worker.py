"""``FunctionWorker``: one function served, its settings changed while it runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from runtime import Client
from runtime.manifest import ManifestSet
from runtime.registry import Registry

from .conftest import RuntimeFactory, eventually
from .handlers import resize


@pytest.fixture
def gate() -> Iterator[None]:
    resize.started.clear()
    resize.release.clear()
    yield
    resize.release.set()   # never leave a thread waiting


async def test_a_sync_function_resized_while_a_call_runs(runtime: RuntimeFactory, nc: NATS, tmp_path: Path,
                                                        gate: None) -> None:
    manifest = "name: gate\nhandler: tests.handlers.resize:gate\nconcurrency: {}\n"
    await runtime(gate=manifest.format(1))
    async with Client(nc) as fn:
        first = asyncio.create_task(fn.invoke("gate", {"n": 1}, timeout=15))
        await eventually(lambda: resize.started == ["1"], message="the first call to start")
        (tmp_path / "gate.yaml").write_text(manifest.format(3))
        registry = await Registry.open(nc.jetstream())
        assert [r.status for r in await registry.deploy(ManifestSet.load([tmp_path / "gate.yaml"]))] == ["updated"]
        later = [asyncio.create_task(fn.invoke("gate", {"n": n}, timeout=15)) for n in (2, 3)]
        # Three at once: the running call kept its thread, the new ones got threads of their own.
        await eventually(lambda: sorted(resize.started) == ["1", "2", "3"], message="three calls at once")
        resize.release.set()
        results = await asyncio.gather(first, *later)
    assert [r["n"] for r in results] == [1, 2, 3]
    assert all(r["thread"].startswith("fn-gate") for r in results), json.dumps(results)
