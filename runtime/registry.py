"""The deploy registry: manifests stored in the ``fn_manifests`` bucket, with history.

Key = function name (``schedule.<name>`` for standalone schedules). Each value records the
manifest, a digest of the handler's module source (so a code-only change is a new revision
that makes runtimes reload the module), when it was deployed and from which file, and its
revision: the function's own number (1, 2, 3 …, see ``revisions.py``), what changed versus the
revision before and, for a rollback, which revision it restored. The bucket keeps the last 16
entries of each key; an undeploy is one of them.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from . import revisions, triggers
from .deployment import CREATED, ROLLED_BACK, UPDATED, changed_fields, module_digest, now
from .deployment import Deployment as Deployment  # the record, where the follower reads it
from .manifest import (
    MAX_NAME,
    NAME_PATTERN,
    FunctionManifest,
    Manifest,
    ManifestSet,
    ScheduleManifest,
    TriggerManifest,
    with_triggers,
)
from .protocol import entry_value, kv_stream, kv_subject
from .revisions import HISTORY, NotDeployed, RegistryError, Revision
from .streams import (
    MANIFESTS_BUCKET,
    ensure_consumer,
    ensure_kv,
    ensure_stream,
    invoke_stream_config,
    slots_stream_config,
)

SCHEDULE_PREFIX = "schedule."
TRIGGER_PREFIX = "trigger."
WRITE_ATTEMPTS = 5  # a write raced by another deploy is re-read and redone this many times
HISTORY_RETRY = 0.3  # seconds before a name with no revisions is looked up once more


def registry_key(manifest: Manifest) -> str:
    if isinstance(manifest, FunctionManifest):
        return manifest.name
    return (TRIGGER_PREFIX if isinstance(manifest, TriggerManifest) else SCHEDULE_PREFIX) + manifest.name


@dataclass
class DeployResult:
    name: str
    kind: str
    status: str                     # created | updated | unchanged | rolled back
    revision: int
    changed: list[str] = field(default_factory=list)
    restored: int | None = None     # a rollback: the revision it restored


@dataclass
class Undeployed:
    """What one undeploy removed."""

    name: str
    kind: str                       # Function | Schedule
    key: str
    own_schedules: list[str] = field(default_factory=list)   # declared in the function's manifest
    schedules: list[str] = field(default_factory=list)       # standalone schedules removed with it (--force)
    triggers: list[str] = field(default_factory=list)        # standalone triggers removed with it (--force)


@dataclass(frozen=True)
class _Head:
    """The latest entry of a key: what is deployed (None if nothing), its bucket sequence and revision."""

    deployment: Deployment | None = None
    seq: int = 0
    revision: int = 0


class Registry:
    """Read and write deployments."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, replicas: int | None = None) -> None:
        self.js = js
        self.kv = kv
        self.replicas = replicas   # of FN_TRIGGERS, if a deploy creates it (None: one, or as it is)

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int | None = None) -> Registry:
        """The registry; ``replicas`` None (a command not told how many) keeps what exists and
        creates what is missing with one replica."""
        await ensure_kv(js, MANIFESTS_BUCKET, history=HISTORY, replicas=replicas)
        # Deploying before any runtime ran needs the streams the consumers live on; an existing
        # stream is left as the runtimes configured it.
        for config in (invoke_stream_config(), slots_stream_config()):
            await ensure_stream(js, replace(config, num_replicas=replicas), update=False)
        return cls(js, await js.key_value(MANIFESTS_BUCKET), replicas)

    async def stored_keys(self) -> set[str]:
        """Every key the bucket holds a message for at this moment, a deleted one's marker included:
        the keys a watcher started after this delivers first."""
        prefix = kv_subject(MANIFESTS_BUCKET, "")
        info = await self.js.stream_info(kv_stream(MANIFESTS_BUCKET), subjects_filter=prefix + ">")
        return {subject[len(prefix):] for subject in info.state.subjects or {}}

    async def _head(self, key: str) -> _Head:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError as exc:
            if exc.entry is None:
                return _Head()
            # Undeployed: the tombstone carries no number, its place in the history does.
            kept = await self.history(key)
            return _Head(None, exc.entry.revision or 0, kept[-1].revision if kept else 0)
        except NotFoundError:
            return _Head()
        value = entry_value(entry)
        if value is None:
            return _Head()
        dep = Deployment.decode(value, 0, key)
        if dep.revision:
            return _Head(dep, entry.revision or 0, dep.revision)
        last = (await self.history(key))[-1]   # written before revisions were stored
        return _Head(last.deployment, last.seq, last.revision)

    async def get(self, key: str) -> Deployment | None:
        return (await self._head(key)).deployment

    async def all(self) -> dict[str, Deployment]:
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return {}
        out = {}
        for key in keys:
            dep = await self.get(key)
            if dep is not None:
                out[key] = dep
        return out

    async def _write(self, key: str, dep: Deployment, head: _Head) -> bool:
        """Store ``dep`` unless another write came after ``head``; False if one did."""
        try:
            await self.kv.update(key, dep.encode(), last=head.seq)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def deploy(self, manifests: ManifestSet) -> list[DeployResult]:
        """Store every manifest that changed; create or update function consumers."""
        results = []
        items: list[Manifest] = [*manifests.functions.values(), *manifests.schedules.values(),
                                 *manifests.triggers.values()]
        deployed = await self.all()
        standalone = [*manifests.triggers.values(), *_standalone(deployed).values()]
        _check_loops(deployed, manifests, standalone)
        for manifest in items:
            key = registry_key(manifest)
            code = module_digest(manifest.handler) if isinstance(manifest, FunctionManifest) else None
            source = manifests.sources.get(f"{manifest.kind}:{manifest.name}", "")
            if isinstance(manifest, FunctionManifest):
                await ensure_consumer(self.js, manifest)
                await self._drop_removed_triggers(manifest)
                await triggers.bind(self.js, with_triggers(manifest, standalone), self.replicas, advisories=False)
            elif isinstance(manifest, TriggerManifest):
                await self._bind_standalone(manifest, manifests)
            results.append(await self._deploy_one(key, Deployment(manifest, code, source=source)))
        return results

    async def _drop_removed_triggers(self, manifest: FunctionManifest) -> None:
        """A trigger taken out of a function's manifest (by a deploy or a rollback) is gone for good:
        its consumer goes, and the events kept for it with it. (Undeploying keeps them, for a redeploy.)"""
        current = await self.get(manifest.name)
        if current is None or not isinstance(current.manifest, FunctionManifest):
            return
        kept = {t.trigger_name for t in manifest.triggers}
        dropped = False
        for spec in current.manifest.triggers:
            if spec.trigger_name not in kept:
                dropped = await triggers.drop(self.js, manifest.name, spec) or dropped
        if dropped:   # a subject nobody reads now is freed for other streams
            await triggers.release_unread(self.js)

    async def standalone_triggers(self) -> dict[str, TriggerManifest]:
        """The deployed ``kind: Trigger`` manifests, by name."""
        return _standalone(await self.all())

    async def _bind_standalone(self, trigger: TriggerManifest, manifests: ManifestSet | None = None) -> None:
        """Bind a standalone trigger now, so that a deploy that cannot work says why at once."""
        function = manifests.functions.get(trigger.function) if manifests else None
        if function is None:
            dep = await self.get(trigger.function)
            function = dep.manifest if dep is not None and isinstance(dep.manifest, FunctionManifest) else None
        if function is None:
            raise RegistryError(f"trigger {trigger.name} targets function {trigger.function!r}, which is not deployed")
        await triggers.bind(self.js, function.model_copy(update={"triggers": [trigger.spec()]}), self.replicas,
                            advisories=False)

    async def _deploy_one(self, key: str, new: Deployment) -> DeployResult:
        name, kind = new.manifest.name, new.manifest.kind
        for _ in range(WRITE_ATTEMPTS):
            head = await self._head(key)
            current = head.deployment
            if current is not None and current.same_as(new):
                return DeployResult(name, kind, "unchanged", head.revision)
            changed = changed_fields(current, new) if current is not None else []
            status = CREATED if current is None else UPDATED
            stored = replace(new, deployed_at=now(), revision=head.revision + 1, change=status,
                             changed=tuple(changed))
            if await self._write(key, stored, head):
                return DeployResult(name, kind, status, stored.revision, changed)
        raise RegistryError(f"{name!r} kept changing while it was deployed; try again")

    async def undeploy(self, name: str, *, force: bool = False) -> Undeployed:
        """Remove a function (or a standalone schedule).

        A function that standalone schedules still target is refused, naming them, unless
        ``force``, which removes those schedules first: a schedule must never outlive its function
        in the registry, where ``ls`` would show it while no runtime runs it.
        """
        function = await self.get(name)
        if function is not None and isinstance(function.manifest, FunctionManifest):
            targeting = sorted(key for key, dep in (await self.all()).items()
                               if isinstance(dep.manifest, ScheduleManifest | TriggerManifest)
                               and dep.manifest.function == name)
            names = [f"{key.partition('.')[0]} {key.partition('.')[2]}" for key in targeting]
            if targeting and not force:
                them = "them" if len(names) > 1 else "it"
                raise RegistryError(f"function {name!r} is still the target of {', '.join(names)}; "
                                    f"undeploy {them} first, or use --force to undeploy {them} too")
            for key in targeting:
                await self.kv.delete(key)
            await self.kv.delete(name)
            own = [s.name for s in function.manifest.schedules]
            return Undeployed(name, "Function", name, own_schedules=own,
                              schedules=[k[len(SCHEDULE_PREFIX):] for k in targeting if k.startswith(SCHEDULE_PREFIX)],
                              triggers=[k[len(TRIGGER_PREFIX):] for k in targeting if k.startswith(TRIGGER_PREFIX)])
        for prefix, kind in ((SCHEDULE_PREFIX, "Schedule"), (TRIGGER_PREFIX, "Trigger")):
            if await self.get(prefix + name) is not None:
                await self.kv.delete(prefix + name)
                return Undeployed(name, kind, prefix + name)
        raise RegistryError(f"nothing named {name!r} is deployed")

    async def history(self, key: str) -> list[Revision]:
        """Every kept revision of a key, oldest first, numbered and described."""
        try:
            entries = await self.kv.history(key)
        except NoKeysError:
            return []
        kept = []
        for e in entries:
            value = entry_value(e)
            written: Any = e.created   # nats-py types it int; the watcher sets the message's datetime
            kept.append((None if value is None else Deployment.decode(value, 0, key),
                         written if isinstance(written, datetime) else None, e.revision or 0))
        return revisions.history(kept)

    async def revisions_of(self, name: str) -> tuple[str, list[Revision]]:
        """The registry key of ``name`` (a function, else a standalone schedule) and its kept revisions."""
        if re.fullmatch(NAME_PATTERN, name) and len(name) <= MAX_NAME:
            # nats-py's history watcher can end before the entries on a busy server: look twice.
            for pause in (0.0, HISTORY_RETRY):
                await asyncio.sleep(pause)
                for key in (name, SCHEDULE_PREFIX + name, TRIGGER_PREFIX + name):
                    kept = await self.history(key)
                    if kept:
                        return key, kept
        raise NotDeployed(f"nothing named {name!r} has been deployed")

    async def rollback(self, name: str, to: int | None = None) -> DeployResult:
        """Restore revision ``to``, or the revision before the current one, as a new revision.

        Without ``to``, the latest earlier revision that differs from the current one is restored;
        after an undeploy, the last deployed revision: rolling back an undeployed function
        deploys it again. Restoring what is deployed already writes nothing (``unchanged``).
        """
        for _ in range(WRITE_ATTEMPTS):
            key, kept = await self.revisions_of(name)
            current = kept[-1]
            target = revisions.target(name, kept, to)
            dep = target.deployment
            assert dep is not None
            manifest = dep.manifest
            if current.deployment is not None and current.deployment.same_as(dep):
                return DeployResult(name, manifest.kind, "unchanged", current.revision, restored=target.revision)
            changed = changed_fields(current.deployment, dep) if current.deployment is not None else []
            restored = Deployment(manifest, dep.code, now(), dep.source, revision=current.revision + 1,
                                  change=ROLLED_BACK, changed=tuple(changed), restored=target.revision)
            if isinstance(manifest, FunctionManifest):
                await ensure_consumer(self.js, manifest)
                await self._drop_removed_triggers(manifest)
                await triggers.bind(self.js, with_triggers(manifest, (await self.standalone_triggers()).values()),
                                    self.replicas, advisories=False)
            elif isinstance(manifest, TriggerManifest):
                await self._bind_standalone(manifest)
            if await self._write(key, restored, _Head(current.deployment, current.seq, current.revision)):
                return DeployResult(name, manifest.kind, ROLLED_BACK, restored.revision, changed,
                                    restored=target.revision)
        raise RegistryError(f"{name!r} kept changing while it was rolled back; try again")


def _standalone(deployments: dict[str, Deployment]) -> dict[str, TriggerManifest]:
    return {dep.manifest.name: dep.manifest for dep in deployments.values()
            if isinstance(dep.manifest, TriggerManifest)}


def _check_loops(deployments: dict[str, Deployment], manifests: ManifestSet,
                 standalone: list[TriggerManifest]) -> None:
    """Refuse a deploy after which functions would trigger each other through their outputs for ever."""
    functions = {dep.manifest.name: dep.manifest for dep in deployments.values()
                 if isinstance(dep.manifest, FunctionManifest)}
    functions.update(manifests.functions)
    # ``standalone`` lists the deploy's own first: read last here, they replace the deployed ones.
    merged = {t.name: t for t in reversed(standalone)}
    cycle = triggers.output_loop([with_triggers(f, merged.values()) for f in functions.values()])
    if cycle is not None:
        steps = "; ".join(f"{a}'s output {functions[a].output} triggers {b}" for a, b in itertools.pairwise(cycle))
        raise RegistryError(f"functions {' -> '.join(cycle)} would trigger each other without end ({steps}): "
                            "change an output or a trigger subject")


def deployed_set(functions: dict[str, FunctionManifest], schedules: dict[str, ScheduleManifest],
                 standalone: dict[str, TriggerManifest] | None = None) -> ManifestSet:
    """What is deployed, as a manifest set; a schedule or trigger whose function is not deployed is left out."""
    return ManifestSet(
        functions=functions,
        schedules={name: s for name, s in schedules.items() if s.function in functions},
        triggers={name: t for name, t in (standalone or {}).items() if t.function in functions},
        sources={**{f"Function:{n}": "registry" for n in functions},
                 **{f"Schedule:{n}": "registry" for n in schedules},
                 **{f"Trigger:{n}": "registry" for n in standalone or {}}})


def as_manifest_set(deployments: dict[str, Deployment]) -> ManifestSet:
    functions = {d.manifest.name: d.manifest for d in deployments.values()
                 if isinstance(d.manifest, FunctionManifest)}
    schedules = {d.manifest.name: d.manifest for d in deployments.values()
                 if isinstance(d.manifest, ScheduleManifest)}
    standalone = {d.manifest.name: d.manifest for d in deployments.values()
                  if isinstance(d.manifest, TriggerManifest)}
    return deployed_set(functions, schedules, standalone)
