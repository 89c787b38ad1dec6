"""Functions the benchmarks run."""

from __future__ import annotations

import time

from pydantic import BaseModel

from runtime import Context


class Payload(BaseModel):
    fn: str
    id: int
    args: list[int]
    pad: str


async def noop(event: Payload) -> None:
    return None


async def stamp(event: Payload, ctx: Context) -> None:
    await ctx.publish("bench.started", {"id": event.id, "t": time.time()})
