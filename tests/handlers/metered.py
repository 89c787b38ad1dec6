"""Handlers whose attempts end as the payload says: for the metrics and the probes."""

from __future__ import annotations

import asyncio
from typing import Any

from runtime import Context


async def planned(event: dict[str, Any], ctx: Context) -> dict[str, int]:
    """Fails its first ``fail`` attempts, then succeeds."""
    if ctx.attempt <= int(event.get("fail", 0)):
        raise ValueError(f"planned failure of attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


async def slow(event: dict[str, Any]) -> str:
    await asyncio.sleep(float(event.get("seconds", 2)))
    return "done"
