"""Per-function revision numbers, what each revision changed, and what a rollback restores.

Every write of a key in ``fn_manifests`` (a deploy that changed something, a rollback, an
undeploy) is the next revision of that function or schedule: 1, 2, 3 … Records store their own
number; undeploys (bucket tombstones, which carry no value) and records written before numbers
were stored get theirs from their place in the history, so every runtime and CLI agree.
Pure rules over a key's kept history; ``registry.py`` reads and writes the bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from .deployment import CREATED, ROLLED_BACK, UPDATED, Deployment, changed_fields
from .errors import FnRuntimeError

UNDEPLOYED = "undeployed"
HISTORY = 16        # entries the bucket keeps per key: the last 16 changes of each function or schedule


class RegistryError(FnRuntimeError):
    """Raised when a registry operation cannot be done (unknown name, nothing to roll back to)."""


class NotDeployed(RegistryError):
    """Raised when a name, or a revision of it, is not in the registry's kept history."""


@dataclass(frozen=True)
class Revision:
    """One kept entry of a key's history: a deployment, or an undeploy (``deployment`` is None)."""

    revision: int
    deployment: Deployment | None
    at: str                                 # when it was written, ISO 8601 UTC
    description: str                        # what changed versus the revision before
    seq: int                                # the entry's sequence in the bucket's stream

    def to_json(self) -> dict[str, Any]:
        dep = self.deployment
        return {"revision": self.revision, "deployed_at": self.at, "change": self.description,
                "undeployed": dep is None, "changed": list(dep.changed) if dep else [],
                "restored": dep.restored if dep else None, "source": dep.source if dep else ""}


def number(stored: Sequence[int]) -> list[int]:
    """The revision of each kept entry, oldest first, given the numbers stored (0 where none is).

    An entry without a number counts back from the next numbered one, else on from the last
    numbered one, else from 1 at the oldest kept entry. Counting back keeps the numbers of old
    records stable while the bucket drops its oldest entries.
    """
    out = list(stored)
    following: int | None = None
    for i in range(len(out) - 1, -1, -1):
        if out[i] > 0:
            following = i
        elif following is not None:
            out[i] = max(1, out[following] - (following - i))
    previous = 0
    for i, value in enumerate(out):
        if value <= 0:
            out[i] = previous + 1
        previous = out[i]
    return out


def describe(change: str, changed: Sequence[str] = (), restored: int | None = None) -> str:
    """What a revision did, in one line: ``created``, ``concurrency, timeout``, ``rollback to 3 (code)``…"""
    fields = ", ".join(changed)
    if change == ROLLED_BACK and restored is not None:
        return f"rollback to {restored}" + (f" ({fields})" if fields else "")
    if change in (CREATED, UNDEPLOYED):
        return change
    return fields or "redeployed"


def history(entries: Sequence[tuple[Deployment | None, datetime | None, int]]) -> list[Revision]:
    """Number and describe a key's kept entries: (deployment or None for an undeploy, written at, sequence)."""
    numbers = number([dep.revision if dep is not None else 0 for dep, _, _ in entries])
    out: list[Revision] = []
    previous: Deployment | None = None
    for (dep, written, seq), revision in zip(entries, numbers, strict=True):
        at = written.astimezone(UTC).isoformat(timespec="seconds") if written else ""
        if dep is None:
            out.append(Revision(revision, None, at, UNDEPLOYED, seq))
        else:
            if not dep.change:  # written before changes were stored: compare with the entry before
                changed = changed_fields(previous, dep) if previous is not None else []
                dep = replace(dep, change=CREATED if previous is None else UPDATED, changed=tuple(changed))
            dep = replace(dep, revision=revision)
            out.append(Revision(revision, dep, dep.deployed_at or at,
                                describe(dep.change, dep.changed, dep.restored), seq))
        previous = dep
    return out


def target(name: str, kept: Sequence[Revision], to: int | None) -> Revision:
    """The revision a rollback of ``name`` restores: ``to``, or the one before the current one.

    Without ``to``: the latest earlier revision that differs from the current one; after an
    undeploy, the last one deployed (rolling back an undeployed function deploys it again).
    """
    current = kept[-1]
    if to is None:
        for candidate in reversed(kept[:-1]):
            dep = candidate.deployment
            if dep is not None and (current.deployment is None or not dep.same_as(current.deployment)):
                return candidate
        raise RegistryError(f"{name!r} has no earlier revision to roll back to")
    found = next((r for r in kept if r.revision == to), None)
    if found is None:
        span = f"revisions {kept[0].revision} to {current.revision}"
        if 0 < to < kept[0].revision:
            raise NotDeployed(f"revision {to} of {name!r} is no longer kept "
                              f"(the history keeps the last {HISTORY} changes: {span})")
        raise NotDeployed(f"{name!r} has no revision {to} ({span})")
    if found.deployment is None:
        raise RegistryError(f"revision {to} of {name!r} is an undeploy; use 'runtime undeploy {name}' for that")
    return found
