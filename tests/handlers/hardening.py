"""Handlers that misbehave, for the hardening tests."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from runtime import Context

from .core import report


async def sized(event: dict[str, Any]) -> bytes:
    """Returns ``size`` bytes (or ``max_payload - minus`` when ``minus`` is given)."""
    return b"r" * int(event["size"])


async def fill_up(event: dict[str, Any], ctx: Context) -> bytes:
    """Returns a body ``minus`` bytes under the server's max_payload."""
    return b"r" * (ctx.nc.max_payload - int(event["minus"]))


async def exits(event: dict[str, Any], ctx: Context) -> None:
    await report(ctx)
    if event.get("how") == "interrupt":
        raise KeyboardInterrupt
    sys.exit(int(event.get("code", 3)))


def exits_in_thread(event: dict[str, Any]) -> None:
    if event.get("how") == "interrupt":
        raise KeyboardInterrupt
    sys.exit(4)


async def unencodable(event: dict[str, Any], ctx: Context) -> Any:
    await report(ctx)
    if event.get("kind") == "nan":
        return {"value": float("nan")}
    return {"when": object()}


async def blocks(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Blocks the event loop (a blocking call inside async def), then returns."""
    await report(ctx)
    time.sleep(float(event.get("seconds", 1.0)))
    return {"blocked": event.get("seconds", 1.0)}


async def publishes(event: dict[str, Any], ctx: Context) -> str:
    """Publishes where the input says; the runtime must refuse what the server would not take."""
    try:
        await ctx.publish(event["subject"], "x" * int(event.get("size", 1)))
    except Exception as exc:
        return f"refused: {exc}"
    return "published"


async def breaks_connection(event: dict[str, Any], ctx: Context) -> None:
    """Bypasses the runtime and sends the server a protocol line it answers by closing the connection."""
    await ctx.nc.publish("x" * 5000, b"")
    await ctx.nc.flush()


stubborn_started = asyncio.Event()


async def swallows_cancel(event: dict[str, Any], ctx: Context) -> str:
    """Catches its own cancellation and returns, as careless handler code does."""
    stubborn_started.set()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        return "swallowed"
    return "slept"
