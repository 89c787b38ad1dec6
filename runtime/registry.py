"""The deploy registry: manifests stored in the ``fn_manifests`` bucket, with history.

Key = function name (``schedule.<name>`` for standalone schedules). Each value records the
manifest, a digest of the handler's module source (so a code-only change is a new revision
that makes runtimes reload the module), when it was deployed and from which file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from .documents import load_json_object
from .errors import FnRuntimeError
from .manifest import FunctionManifest, Manifest, ManifestSet, ScheduleManifest, parse_manifest
from .protocol import entry_value
from .streams import MANIFESTS_BUCKET, ensure_consumer, ensure_kv, ensure_stream, invoke_stream_config

SCHEDULE_PREFIX = "schedule."


class RegistryError(FnRuntimeError):
    """Raised when a registry operation cannot be done (unknown name, nothing to roll back to)."""


def registry_key(manifest: Manifest) -> str:
    return manifest.name if isinstance(manifest, FunctionManifest) else SCHEDULE_PREFIX + manifest.name


def module_digest(handler: str) -> str | None:
    """sha256 of the handler module's source file, or None if it has no file."""
    module = handler.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.has_location:
        return None
    try:
        with open(spec.origin, "rb") as f:
            return "sha256:" + hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return None


@dataclass(frozen=True)
class Deployment:
    """One stored revision of a manifest."""

    manifest: Manifest
    code: str | None = None
    deployed_at: str = ""
    source: str = ""
    revision: int = 0

    def encode(self) -> bytes:
        return json.dumps({"kind": self.manifest.kind, "manifest": self.manifest.model_dump(mode="json"),
                           "code": self.code, "deployed_at": self.deployed_at, "source": self.source}).encode()

    @classmethod
    def decode(cls, data: bytes, revision: int = 0, key: str = "") -> Deployment:
        # Read from the network: bounded in size and depth before anything uses it.
        source = f"registry entry {key!r}"
        raw = load_json_object(data, source)
        manifest = parse_manifest(raw.get("manifest"), source)
        return cls(manifest=manifest, code=raw.get("code"), deployed_at=raw.get("deployed_at", ""),
                   source=raw.get("source", ""), revision=revision)

    def same_as(self, other: Deployment) -> bool:
        return self.manifest == other.manifest and self.code == other.code


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def changed_fields(old: Deployment, new: Deployment) -> list[str]:
    before = _flatten(old.manifest.model_dump(mode="json"))
    after = _flatten(new.manifest.model_dump(mode="json"))
    fields = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if old.code != new.code:
        fields.append("code")
    return fields


@dataclass
class DeployResult:
    name: str
    kind: str
    status: str                     # created | updated | unchanged
    revision: int
    changed: list[str] = field(default_factory=list)


@dataclass
class Undeployed:
    """What one undeploy removed."""

    name: str
    kind: str                       # Function | Schedule
    key: str
    own_schedules: list[str] = field(default_factory=list)   # declared in the function's manifest
    schedules: list[str] = field(default_factory=list)       # standalone schedules removed with it (--force)


class Registry:
    """Read and write deployments."""

    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self.js = js
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1) -> Registry:
        await ensure_kv(js, MANIFESTS_BUCKET, history=16, replicas=replicas)
        # Deploying before any runtime ran needs the stream the consumers live on; an existing
        # stream is left as the runtimes configured it.
        await ensure_stream(js, invoke_stream_config(replicas), update=False)
        return cls(js, await js.key_value(MANIFESTS_BUCKET))

    async def get(self, key: str) -> Deployment | None:
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, NotFoundError):
            return None
        value = entry_value(entry)
        return None if value is None else Deployment.decode(value, entry.revision or 0, key)

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

    async def deploy(self, manifests: ManifestSet) -> list[DeployResult]:
        """Store every manifest that changed; create or update function consumers."""
        results = []
        items: list[Manifest] = [*manifests.functions.values(), *manifests.schedules.values()]
        for manifest in items:
            key = registry_key(manifest)
            code = module_digest(manifest.handler) if isinstance(manifest, FunctionManifest) else None
            source = manifests.sources.get(f"{manifest.kind}:{manifest.name}", "")
            new = Deployment(manifest, code, datetime.now(UTC).isoformat(timespec="seconds"), source)
            current = await self.get(key)
            if isinstance(manifest, FunctionManifest):
                await ensure_consumer(self.js, manifest)
            if current is not None and current.same_as(new):
                results.append(DeployResult(manifest.name, manifest.kind, "unchanged", current.revision))
                continue
            revision = await self.kv.put(key, new.encode())
            status = "created" if current is None else "updated"
            changed = changed_fields(current, new) if current is not None else []
            results.append(DeployResult(manifest.name, manifest.kind, status, revision, changed))
        return results

    async def undeploy(self, name: str, *, force: bool = False) -> Undeployed:
        """Remove a function (or a standalone schedule).

        A function that standalone schedules still target is refused, naming them, unless
        ``force``, which removes those schedules first: a schedule must never outlive its function
        in the registry, where ``ls`` would show it while no runtime runs it.
        """
        function = await self.get(name)
        if function is not None and isinstance(function.manifest, FunctionManifest):
            targeting = sorted(key for key, dep in (await self.all()).items()
                               if isinstance(dep.manifest, ScheduleManifest) and dep.manifest.function == name)
            names = [key[len(SCHEDULE_PREFIX):] for key in targeting]
            if targeting and not force:
                what, them = ("schedules", "them") if len(names) > 1 else ("schedule", "it")
                raise RegistryError(f"function {name!r} is still the target of {what} {', '.join(names)}; "
                                    f"undeploy {them} first, or use --force to undeploy {them} too")
            for key in targeting:
                await self.kv.delete(key)
            await self.kv.delete(name)
            own = [s.name for s in function.manifest.schedules]
            return Undeployed(name, "Function", name, own_schedules=own, schedules=names)
        schedule = await self.get(SCHEDULE_PREFIX + name)
        if schedule is not None:
            await self.kv.delete(SCHEDULE_PREFIX + name)
            return Undeployed(name, "Schedule", SCHEDULE_PREFIX + name)
        raise RegistryError(f"nothing named {name!r} is deployed")

    async def history(self, key: str) -> list[Deployment | None]:
        """Every kept revision, oldest first; None marks an undeploy."""
        try:
            entries = await self.kv.history(key)
        except NoKeysError:
            return []
        return [None if (value := entry_value(e)) is None else Deployment.decode(value, e.revision or 0, key)
                for e in entries]

    async def rollback(self, name: str) -> DeployResult:
        """Restore the revision before the current one (or the last one, after an undeploy)."""
        for key in (name, SCHEDULE_PREFIX + name):
            revisions = await self.history(key)
            if revisions:
                break
        else:
            raise RegistryError(f"{name!r} has never been deployed")
        current = revisions[-1]
        previous = next((r for r in reversed(revisions[:-1]) if r is not None and
                         (current is None or not r.same_as(current))), None)
        if previous is None:
            raise RegistryError(f"{name!r} has no earlier revision to roll back to")
        restored = Deployment(previous.manifest, previous.code, datetime.now(UTC).isoformat(timespec="seconds"),
                              previous.source)
        if isinstance(previous.manifest, FunctionManifest):
            await ensure_consumer(self.js, previous.manifest)
        revision = await self.kv.put(key, restored.encode())
        changed = changed_fields(current, restored) if current is not None else []
        return DeployResult(name, previous.manifest.kind, "rolled back", revision, changed)


def deployed_set(functions: dict[str, FunctionManifest], schedules: dict[str, ScheduleManifest]) -> ManifestSet:
    """What is deployed, as a manifest set; a schedule whose function is not deployed is left out."""
    return ManifestSet(
        functions=functions,
        schedules={name: s for name, s in schedules.items() if s.function in functions},
        sources={**{f"Function:{n}": "registry" for n in functions},
                 **{f"Schedule:{n}": "registry" for n in schedules}})


def as_manifest_set(deployments: dict[str, Deployment]) -> ManifestSet:
    functions = {d.manifest.name: d.manifest for d in deployments.values()
                 if isinstance(d.manifest, FunctionManifest)}
    schedules = {d.manifest.name: d.manifest for d in deployments.values()
                 if isinstance(d.manifest, ScheduleManifest)}
    return deployed_set(functions, schedules)
