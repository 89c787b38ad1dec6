"""Handlers for the cron tests: each run reports its tick on ``test.cron.<function>``."""

from __future__ import annotations

import os
import time
from typing import Any

from runtime import Context
from runtime.crontab import format_tick


async def tick(event: Any, ctx: Context) -> None:
    scheduled = format_tick(ctx.scheduled_at) if ctx.scheduled_at else None
    await ctx.publish(f"test.cron.{ctx.function}", {"schedule": ctx.schedule, "scheduled_at": scheduled,
                                                   "payload": event, "attempt": ctx.attempt,
                                                   "pid": os.getpid(), "t": time.time()})
    await ctx.nc.flush()


async def noop(event: Any) -> None:
    return None


async def failing_tick(event: Any, ctx: Context) -> None:
    await tick(event, ctx)
    raise ValueError("the nightly job broke")
