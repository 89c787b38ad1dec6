"""Handlers for the deploy tests."""

from __future__ import annotations

import asyncio
from typing import Any

from runtime import Context

from .core import report


async def ping(event: dict[str, Any], ctx: Context) -> dict[str, str]:
    await report(ctx)
    return {"pong": str(event.get("n", ""))}


async def fail(event: dict[str, Any], ctx: Context) -> None:
    await report(ctx)
    raise RuntimeError("always fails")


async def slow(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    await report(ctx, phase="start", n=event.get("n"))
    await asyncio.sleep(float(event.get("seconds", 1.0)))
    await report(ctx, phase="end", n=event.get("n"))
    return {"n": event.get("n")}


async def three(event: dict[str, Any], ctx: Context, extra: int) -> None:
    """Does not fit the contract: a handler takes (event) or (event, ctx)."""
