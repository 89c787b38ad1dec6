"""Handlers for the priority tests: each run reports its start and end with the level it came from."""

from __future__ import annotations

import asyncio
from typing import Any

from runtime import Context, QueueFull


async def tracked(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    # Both events go out before the function returns, so before its slot is given back: in the
    # server's order of arrival, no start can come after a release it depends on and before its end.
    await ctx.nc.publish("prio.start", f"{ctx.subject} {event.get('i', '')}".encode())
    await asyncio.sleep(float(event.get("seconds", 0.01)))
    await ctx.nc.publish("prio.end", ctx.subject.encode())
    return {"i": event.get("i")}


async def relay(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Queues an invocation of ``event["to"]`` at ``event["priority"]``; says so if its queue is full."""
    try:
        seq = await ctx.invoke(event["to"], {"i": event.get("i")}, priority=event.get("priority"))
    except QueueFull as exc:
        return {"full": exc.code}
    return {"seq": seq}
