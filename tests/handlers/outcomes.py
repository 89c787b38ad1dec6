"""One handler per row of the README's outcome table (tests/test_agreement.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from runtime import Context, Reject, Retry

from .core import Person, report


async def returns(event: Person) -> dict[str, str]:
    return {"greeting": f"Hello, {event.name}!"}


async def raises(event: dict[str, Any]) -> None:
    raise ValueError(f"boom {event.get('n', '')}".strip())


async def retries(event: dict[str, Any]) -> None:
    raise Retry(delay=5)


async def rejects(event: dict[str, Any]) -> None:
    raise Reject("reason")


async def sleeps(event: dict[str, Any]) -> str:
    await asyncio.sleep(float(event["seconds"]))
    return "slept"


async def blocks(event: dict[str, Any]) -> str:
    time.sleep(float(event["seconds"]))  # the mistake the runtime must survive
    return "blocked"


async def unencodable(event: dict[str, Any]) -> Any:
    return {"value": float("nan")} if event.get("kind") == "nan" else {"when": object()}


async def too_large(event: dict[str, Any], ctx: Context) -> bytes:
    return b"r" * (ctx.nc.max_payload - 20)


async def exits(event: dict[str, Any]) -> None:
    if event.get("how") == "interrupt":
        raise KeyboardInterrupt
    raise SystemExit(3)


async def held(event: dict[str, Any], ctx: Context) -> None:
    """Runs until released on ``test.release.<call id>``, then rejects its input."""
    sub = await ctx.nc.subscribe(f"test.release.{ctx.call_id}")
    try:
        await report(ctx)
        await sub.next_msg(timeout=10)
    finally:
        await sub.unsubscribe()
    raise Reject("released")
