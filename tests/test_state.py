"""The runtime's parts share a small state and act on the runtime only through explicit callbacks."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.js import JetStreamContext

from runtime.app import Component, Runtime
from runtime.follower import RegistryFollower
from runtime.manifest import FunctionManifest, ManifestSet, Schedule
from runtime.registry import Registry
from runtime.server import EmbeddedServer
from runtime.settings import Settings
from runtime.state import RuntimeState
from runtime.status import StatusResponder, gather_status
from runtime.streams import provision_base

from .conftest import ROOT, eventually

PING = "name: ping\nhandler: tests.handlers.deploy:ping\n"
TICK = "kind: Schedule\nname: tick\ncron: '0 0 1 1 *'\nfunction: ping\n"


def test_status_of_a_runtime_not_yet_started() -> None:
    snapshot = StatusResponder(RuntimeState()).snapshot()
    assert snapshot["runtime"] == f"{snapshot['host']}:{snapshot['pid']}" and snapshot["pid"] == os.getpid()
    assert snapshot["uptime"] >= 0 and snapshot["started"].endswith("Z")
    assert {k: v for k, v in snapshot.items() if k not in ("runtime", "host", "pid", "version", "started", "uptime")} \
        == {"serving": {}, "failing": {}, "refused": {}, "trusted": [], "loop": None, "outbox": None}


async def test_the_follower_hands_every_change_to_its_callbacks(nc: NATS, js: JetStreamContext,
                                                                manifest_dir: Callable[..., Path]) -> None:
    await provision_base(js)
    registry = await Registry.open(js)
    await registry.deploy(ManifestSet.load([manifest_dir(ping=PING, tick=TICK)]))
    state = RuntimeState(nc=nc, js=js)
    applied: list[str] = []
    removed: list[str] = []
    schedules: list[list[str]] = []

    async def apply(manifest: FunctionManifest) -> None:
        applied.append(manifest.name)

    async def remove(name: str) -> None:
        removed.append(name)

    def on_schedules(current: list[Schedule]) -> None:
        schedules.append([s.name for s in current])

    follower = RegistryFollower(state, apply=apply, remove=remove, on_schedules=on_schedules)
    await follower.start()
    try:
        assert applied == ["ping"] and schedules == [["tick"]]   # all deployed, before start returns
        await registry.undeploy("ping", force=True)   # "tick" targets it
        await eventually(lambda: removed == ["ping"])
    finally:
        await follower.stop()


async def test_every_start_of_the_follower_applies_everything_deployed_before_it_returns(
        nc: NATS, js: JetStreamContext, manifest_dir: Callable[..., Path]) -> None:
    """nats-py's end-of-initial-values marker can come ahead of the values (about once in a few
    hundred watches here): a runtime must not say it is ready, nor answer "no function named ..."
    for a deployed function, before it serves it. Many followers start at once, to make that
    ordering likelier."""
    await provision_base(js)
    registry = await Registry.open(js)
    names = ["ping", "pong", "pang"]
    await registry.deploy(ManifestSet.load([manifest_dir(**{n: PING.replace("ping", n, 1) for n in names})]))
    state = RuntimeState(nc=nc, js=js)

    async def remove(name: str) -> None:
        raise AssertionError(f"{name} was removed")

    async def started() -> list[str]:
        applied: list[str] = []

        async def apply(manifest: FunctionManifest) -> None:
            applied.append(manifest.name)

        follower = RegistryFollower(state, apply=apply, remove=remove)
        await follower.start()
        seen = sorted(applied)
        await follower.stop()
        return seen

    for _ in range(40):
        assert await asyncio.gather(*(started() for _ in range(20))) == [sorted(names)] * 20


class _Broken:
    """A component whose start fails after it started something."""

    def __init__(self) -> None:
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True
        raise ConnectionError("half way")

    async def stop(self) -> None:
        self.stopped = True


async def test_a_start_that_fails_half_way_stops_everything_it_started(nats_server: EmbeddedServer, nc: NATS,
                                                                        tmp_path: Path) -> None:
    broken = _Broken()

    class Failing(Runtime):
        def _components(self) -> list[Component]:
            return [*super()._components(), broken]

    rt = Failing(Settings(project_root=ROOT, data_dir=tmp_path / "rt", grace=1.0), nats_server.url)
    with pytest.raises(ConnectionError):
        await rt.start()
    assert broken.started and broken.stopped
    assert rt.state.nc is None and rt.components == []
    assert await gather_status(nc, wait=0.3) == []          # the status responder was stopped
    with pytest.raises(NoRespondersError):                   # and so was the gateway
        await nc.request("$SRV.PING.runtime", b"", timeout=2)
