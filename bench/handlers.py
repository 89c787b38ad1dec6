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


# ``leveled`` notes when each invocation started, whether it came from level 10 and which one; the list is
# written to $BENCH_STARTS when the runtime exits, so recording costs no message per call.
_STARTS: list[tuple[float, bool, int]] = []


def _dump_starts() -> None:
    import json
    import os

    path = os.environ.get("BENCH_STARTS")
    if path:
        with open(path, "w") as out:
            json.dump(_STARTS, out)


if __name__ != "__main__":
    import atexit

    atexit.register(_dump_starts)


async def leveled(event: bytes, ctx: Context) -> None:
    urgent = ctx.subject.endswith(".10")
    _STARTS.append((time.time(), urgent, int(event[5:-1]) if urgent else -1))   # urgent bodies: {"i":N}
