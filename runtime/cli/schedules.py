"""``runtime schedules``: each schedule's function, expression, timezone, next fire and last fire."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from nats.js.errors import BucketNotFoundError

from ..crontab import format_tick, next_tick
from ..exitcodes import RET_OK
from ..loop import run
from ..manifest import ManifestSet
from ..registry import Registry, as_manifest_set
from ..scheduler import CronRecord, read_records
from ..streams import CRON_BUCKET
from . import common


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "schedules", help="list cron schedules with their next and last fire",
        description="List schedules from manifests (--manifests) or, without them, those deployed on a server. "
                    "With --manifests only, nothing is fetched unless --server or $NATS_URL is given.")
    p.add_argument("--manifests", "-m", action="append", default=[], metavar="PATH",
                   help="manifest file or directory to read schedules from (repeatable)")
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_schedules)


async def fetch(args: argparse.Namespace) -> tuple[ManifestSet, dict[str, CronRecord]]:
    """The deployed schedules (from the registry) and every record of the ``fn_cron`` bucket."""
    async with common.connection(args) as (_, js):
        deployed = as_manifest_set(await (await Registry.open(js)).all())
        try:
            return deployed, await read_records(await js.key_value(CRON_BUCKET))
        except BucketNotFoundError:
            return deployed, {}


@dataclass(frozen=True)
class Entry:
    """One schedule as listed: its definition, next fire and last fire."""

    name: str
    function: str
    cron: str
    timezone: str
    catchup: str
    enabled: bool
    source: str
    next: datetime | None = None
    last: datetime | None = None

    def local(self, instant: datetime | None) -> datetime | None:
        return instant.astimezone(ZoneInfo(self.timezone)) if instant else None

    def to_json(self) -> dict[str, Any]:
        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t else None

        return {"name": self.name, "function": self.function, "cron": self.cron, "timezone": self.timezone,
                "catchup": self.catchup, "enabled": self.enabled, "source": self.source,
                "next": format_tick(self.next) if self.next else None, "next_local": iso(self.local(self.next)),
                "last": format_tick(self.last) if self.last else None, "last_local": iso(self.local(self.last))}


def entries(manifests: ManifestSet, records: dict[str, CronRecord], at: datetime) -> list[Entry]:
    """Schedules from ``manifests``, with next fire and (from the bucket's records) last fire."""
    found = [Entry(name=s.name, function=s.function, cron=s.cron, timezone=s.timezone, catchup=s.catchup,
                   enabled=s.enabled, source=s.source) for s in manifests.all_schedules()]
    out = []
    for e in sorted(found, key=lambda e: e.name):
        record = records.get(e.name)
        upcoming = next_tick(e.cron, e.timezone, at) if e.enabled else None
        out.append(replace(e, next=upcoming, last=record.last if record else None))
    return out


def _when(instant: datetime | None, fmt: str = "%Y-%m-%d %H:%M:%SZ") -> str:
    return instant.strftime(fmt) if instant else "-"


def cmd_schedules(args: argparse.Namespace) -> int:
    # A bad manifest fails before any connection attempt.
    local = ManifestSet.load(args.manifests) if args.manifests else None
    online = local is None or bool(args.server or os.environ.get("NATS_URL"))
    deployed, records = run(fetch(args)) if online else (None, {})
    manifests = local or deployed
    assert manifests is not None
    listing = entries(manifests, records, datetime.now(UTC))
    if args.json:
        common.print_json([e.to_json() for e in listing])
        return RET_OK
    if not listing:
        print("no schedules")
        return RET_OK
    never = "never" if online else "-"
    rows = [[e.name, e.function, e.cron, e.timezone,
             _when(e.local(e.next), "%Y-%m-%d %H:%M:%S %Z") if e.enabled else "disabled",
             _when(e.next), _when(e.last) if e.last else never]
            for e in listing]
    common.print_table(["name", "function", "cron", "timezone", "next (local)", "next (utc)", "last fire"], rows)
    return RET_OK
