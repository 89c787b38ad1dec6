"""Follows the deploy registry: every runtime serves what is deployed, without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from .errors import FnRuntimeError
from .loop import cancel_and_wait, spawn
from .manifest import FunctionManifest, Schedule, ScheduleManifest, TriggerManifest, with_triggers
from .protocol import entry_value
from .registry import SCHEDULE_PREFIX, TRIGGER_PREFIX, Deployment, Registry, deployed_set
from .state import RuntimeState

log = logging.getLogger("runtime.follower")

Apply = Callable[[FunctionManifest], Awaitable[None]]   # serve a function, or apply its new settings
Remove = Callable[[str], Coroutine[Any, Any, None]]     # stop serving a function (it runs as a task)
ScheduleSink = Callable[[list[Schedule]], None]


class RegistryFollower:
    """Watches ``fn_manifests`` and hands each change to the runtime's callbacks.

    ``apply`` serves a deployed function (or applies its new settings), ``remove`` stops serving
    an undeployed one, and ``on_schedules`` gets every schedule deployed after each change.
    ``start()`` returns once ``apply`` has run for everything deployed at that moment.
    """

    def __init__(self, state: RuntimeState, *, apply: Apply, remove: Remove, replicas: int = 1,
                 on_schedules: ScheduleSink | None = None) -> None:
        self.state = state
        self.apply = apply
        self.remove = remove
        self.replicas = replicas
        self.on_schedules = on_schedules
        self.functions: dict[str, FunctionManifest] = {}
        self.schedules: dict[str, ScheduleManifest] = {}
        self.triggers: dict[str, TriggerManifest] = {}   # standalone ones, by name
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None
        self._removals: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        _, js = self.state.connection
        registry = await Registry.open(js, self.replicas)
        expected = await registry.stored_keys()
        self._watcher = await registry.kv.watchall()
        # The current state first. nats-py's end-of-initial-values marker can come ahead of the
        # values (it reads the consumer's pending count, which may be 0 before they arrive): the
        # start waits for every key stored before the watch began, as well.
        seen: set[str] = set()
        marked = False
        while not (marked and expected <= seen):
            try:
                entry = await self._watcher.updates(timeout=10)
            except TimeoutError:
                if not marked:
                    raise
                log.warning("the registry did not deliver %s within 10 s; following it from here",
                            ", ".join(sorted(expected - seen)))
                break
            if entry is None:
                marked = True
                continue
            seen.add(entry.key)
            await self._handle(entry)
        self._publish_schedules()
        self._task = asyncio.create_task(self._follow(), name="registry-follower")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
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
        deleted = entry_value(entry) is None
        if key.startswith(SCHEDULE_PREFIX):
            name = key[len(SCHEDULE_PREFIX):]
            if deleted:
                self.schedules.pop(name, None)
            else:
                dep = self._decode(entry)
                if dep is not None and isinstance(dep.manifest, ScheduleManifest):
                    self.schedules[name] = dep.manifest
            return
        if key.startswith(TRIGGER_PREFIX):
            await self._handle_trigger(key[len(TRIGGER_PREFIX):], None if deleted else self._decode(entry))
            return
        if deleted:
            self.functions.pop(key, None)
            if key in self.state.workers:
                log.info("%s was undeployed; stopping it once in-flight invocations finish", key)
            else:
                # Also the tombstone of a function undeployed before this runtime started.
                log.info("%s is no longer deployed (this runtime was not serving it)", key)
            # Removal waits for in-flight work: keep following meanwhile.
            spawn(self._removals, self.remove(key), name=f"remove-{key}")
            return
        dep = self._decode(entry)
        if dep is None or not isinstance(dep.manifest, FunctionManifest):
            return
        self.functions[key] = dep.manifest
        await self.apply(with_triggers(dep.manifest, self.triggers.values()))

    async def _handle_trigger(self, name: str, dep: Deployment | None) -> None:
        """A standalone trigger changed: its function (if deployed) is applied again with it, or without it."""
        before = self.triggers.pop(name, None)
        if dep is not None and isinstance(dep.manifest, TriggerManifest):
            self.triggers[name] = dep.manifest
        targets = {t.function for t in (before, self.triggers.get(name)) if t is not None}
        for function in sorted(targets):
            manifest = self.functions.get(function)
            if manifest is not None:
                await self.apply(with_triggers(manifest, self.triggers.values()))

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
        if self.on_schedules is not None:
            self.on_schedules(self.current_schedules())
