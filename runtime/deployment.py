"""One record of the deploy registry: a manifest, its handler's code digest, and its revision.

Stored as JSON under the function's key in ``fn_manifests`` (``registry.py`` reads and writes it).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .documents import load_json_object
from .manifest import Manifest, parse_manifest

CREATED = "created"
UPDATED = "updated"
ROLLED_BACK = "rolled back"
CHANGES = (CREATED, UPDATED, ROLLED_BACK)   # how a stored revision came about


def find_module_file(module: str) -> str | None:
    """The source file of ``module``, found without importing anything.

    ``importlib.util.find_spec("a.b")`` imports package ``a`` first, running its code; this walks
    the path finders package by package instead, so digesting a handler never runs module code.
    """
    spec = None
    search: list[str] | None = None   # None: sys.path, for the top-level package
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        try:
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth]), search)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        search = list(spec.submodule_search_locations or [])
    if spec is None or not spec.origin or not spec.has_location:
        return None
    return spec.origin


def module_digest(handler: str) -> str | None:
    """sha256 of the handler module's source file, or None if it has no file."""
    origin = find_module_file(handler.partition(":")[0])
    return None if origin is None else source_digest(origin)


def source_digest(path: str) -> str | None:
    """``sha256:<16 hex>`` of the file at ``path``, or None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return "sha256:" + hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return None


def now() -> str:
    """A deployment's time stamp: ISO 8601 UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Deployment:
    """One stored revision of a manifest.

    ``revision`` is 0 and ``change`` empty in records written before revisions were stored;
    the registry numbers and describes those from the key's history.
    """

    manifest: Manifest
    code: str | None = None
    deployed_at: str = ""
    source: str = ""
    revision: int = 0
    change: str = ""                        # created | updated | rolled back
    changed: tuple[str, ...] = ()           # field names (and ``code``) changed versus the revision before
    restored: int | None = None             # the revision a rollback restored

    def encode(self) -> bytes:
        return json.dumps({"kind": self.manifest.kind, "manifest": self.manifest.model_dump(mode="json"),
                           "code": self.code, "deployed_at": self.deployed_at, "source": self.source,
                           "revision": self.revision, "change": self.change, "changed": list(self.changed),
                           "restored": self.restored}).encode()

    @classmethod
    def decode(cls, data: bytes, revision: int = 0, key: str = "") -> Deployment:
        """A record read from the bucket; ``revision`` is used only if the record stores none."""
        # Read from the network: bounded in size and depth before anything uses it.
        source = f"registry entry {key!r}"
        raw = load_json_object(data, source)
        manifest = parse_manifest(raw.get("manifest"), source)
        changed, change = raw.get("changed"), raw.get("change")
        return cls(manifest=manifest, code=raw.get("code"), deployed_at=raw.get("deployed_at", ""),
                   source=raw.get("source", ""), revision=_positive(raw.get("revision")) or revision,
                   change=change if isinstance(change, str) and change in CHANGES else "",
                   changed=tuple(str(c)[:200] for c in changed[:100]) if isinstance(changed, list) else (),
                   restored=_positive(raw.get("restored")))

    def same_as(self, other: Deployment) -> bool:
        return self.manifest == other.manifest and self.code == other.code


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


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
