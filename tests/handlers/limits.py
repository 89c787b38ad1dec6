"""Handlers for the rate-limit and cache tests: each run reports itself on ``test.events.<function>``."""

from __future__ import annotations

import os
import time
from typing import Any

from runtime import Context

from .core import report


async def started(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Reports when it started (``time.time()``, taken first) and in which process."""
    at = time.time()
    await report(ctx, start=at, pid=os.getpid())
    return {"n": event.get("n"), "attempt": ctx.attempt}


async def computed(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Reports each run; fails when asked to."""
    await report(ctx, event=event)
    if event.get("fail"):
        raise ValueError("asked to fail")
    return {"text": event.get("text"), "call_id": ctx.call_id}
