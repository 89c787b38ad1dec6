"""Follows the deploy registry: every runtime serves what is deployed, without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import FnRuntimeError
from .manifest import FunctionManifest, Schedule, ScheduleManifest
from .registry import SCHEDULE_PREFIX, Deployment, Registry, deployed_set

if TYPE_CHECKING:
    from .app import Runtime

log = logging.getLogger("runtime.follower")

ScheduleSink = Callable[[list[Schedule]], None]


class RegistryFollower:
    """Watches ``fn_manifests`` and applies each change to the runtime.

    ``start()`` returns once the runtime serves everything deployed at that moment.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.functions: dict[str, FunctionManifest] = {}
        self.schedules: dict[str, ScheduleManifest] = {}
        self.schedule_sinks: list[ScheduleSink] = []
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None
        self._removals: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        _, js = self.runtime.connection
        registry = await Registry.open(js, self.runtime.settings.replicas)
        self._watcher = await registry.kv.watchall()
        while True:  # the current state first, up to the end-of-initial-values marker
            entry = await self._watcher.updates(timeout=10)
            if entry is None:
                break
            await self._handle(entry)
        self._publish_schedules()
        self._task = asyncio.create_task(self._follow(), name="registry-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)

    async def _follow(self) -> None:
        while True:
            try:
                entry = await self._watcher.updates(timeout=60)
            except TimeoutError:
                continue
            if entry is None:
                continue
            try:
                await self._handle(entry)
            except Exception:
                log.exception("could not apply the registry change to %s", entry.key)
            self._publish_schedules()

    async def _handle(self, entry: Any) -> None:
        key: str = entry.key
        deleted = entry.operation in ("DEL", "PURGE") or entry.value is None
        if key.startswith(SCHEDULE_PREFIX):
            name = key[len(SCHEDULE_PREFIX):]
            if deleted:
                self.schedules.pop(name, None)
            else:
                dep = self._decode(entry)
                if dep is not None and isinstance(dep.manifest, ScheduleManifest):
                    self.schedules[name] = dep.manifest
            return
        if deleted:
            self.functions.pop(key, None)
            log.info("%s was undeployed; stopping it once in-flight invocations finish", key)
            # Removal waits for in-flight work: keep following meanwhile.
            task = asyncio.create_task(self.runtime.remove(key), name=f"remove-{key}")
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)
            return
        dep = self._decode(entry)
        if dep is None or not isinstance(dep.manifest, FunctionManifest):
            return
        self.functions[key] = dep.manifest
        await self.runtime.apply(dep.manifest)

    @staticmethod
    def _decode(entry: Any) -> Deployment | None:
        try:
            return Deployment.decode(entry.value, entry.revision or 0, entry.key)
        except (FnRuntimeError, ValueError, KeyError) as exc:
            log.error("ignoring registry entry %s: %s", entry.key, exc)
            return None

    def current_schedules(self) -> list[Schedule]:
        return deployed_set(self.functions, self.schedules).all_schedules()

    def _publish_schedules(self) -> None:
        schedules = self.current_schedules()
        for sink in self.schedule_sinks:
            sink(schedules)
