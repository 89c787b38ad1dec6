"""Runs on a schedule: reports the period that ended at its tick (see manifests/digest.yaml)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel

from runtime import Context

# How far back each scope looks from the tick; "tick" (a schedule without payload) looks at nothing.
PERIODS = {"tick": timedelta(0), "hourly": timedelta(hours=1), "daily": timedelta(days=1),
           "weekly": timedelta(weeks=1)}


class DigestIn(BaseModel):
    scope: Literal["tick", "hourly", "daily", "weekly"] = "tick"


class DigestOut(BaseModel):
    scope: str
    schedule: str | None    # None when invoked by hand rather than by a schedule
    period_start: datetime
    period_end: datetime


async def main(event: DigestIn, ctx: Context) -> DigestOut:
    # A tick's time, not the clock: a retried or caught-up tick reports the same period.
    end = ctx.scheduled_at or datetime.now(UTC).replace(microsecond=0)
    start = end - PERIODS[event.scope]
    ctx.logger.info("%s digest for %s .. %s (schedule %s)", event.scope, start.isoformat(), end.isoformat(),
                    ctx.schedule or "none")
    return DigestOut(scope=event.scope, schedule=ctx.schedule, period_start=start, period_end=end)
