"""Handlers used by the tests. They report what happened on ``test.events.<function>``."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from runtime import Context, Reject, Retry


class Person(BaseModel):
    name: str
    age: int = 0


class Greeting(BaseModel):
    greeting: str


async def report(ctx: Context, **extra: Any) -> None:
    await ctx.publish(f"test.events.{ctx.function}", {"call_id": ctx.call_id, "attempt": ctx.attempt,
                                                      "t": time.time(), **extra})
    await ctx.nc.flush()


async def greet(event: Person, ctx: Context) -> Greeting:
    await report(ctx, name=event.name, age=event.age)
    return Greeting(greeting=f"Hello, {event.name}!")


async def echo(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    await report(ctx, event=event)
    return event


async def raw(event: bytes, ctx: Context) -> bytes:
    await report(ctx, size=len(event))
    return event[::-1]


async def noop(event: Person) -> None:
    return None


def sync_sleep(event: dict[str, Any]) -> dict[str, Any]:
    time.sleep(float(event.get("seconds", 1.0)))  # blocks its thread, never the event loop
    return {"slept": event.get("seconds", 1.0)}


async def always_fail(event: dict[str, Any], ctx: Context) -> None:
    await report(ctx)
    raise ValueError(f"boom {event.get('n', '')}".strip())


async def reject(event: dict[str, Any], ctx: Context) -> None:
    await report(ctx)
    raise Reject("not today")


async def retry_later(event: dict[str, Any], ctx: Context) -> dict[str, int]:
    await report(ctx)
    if ctx.attempt < 2:
        raise Retry(delay=float(event.get("delay", 0.5)))
    return {"attempt": ctx.attempt}


async def sleepy(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    await report(ctx, phase="start")
    await asyncio.sleep(float(event.get("seconds", 1.0)))
    await report(ctx, phase="end")
    return {"slept": event.get("seconds", 1.0)}


async def slow_first(event: dict[str, Any], ctx: Context) -> dict[str, int]:
    """Sleeps past any timeout on attempt 1, returns at once after that."""
    await report(ctx)
    if ctx.attempt == 1:
        await asyncio.sleep(60)
    return {"attempt": ctx.attempt}


def _scratch() -> Path:
    return Path(os.environ["RUNTIME_TEST_DIR"])


def _bump(delta: int) -> int:
    """Move a counter shared by every process under a file lock; returns the new value."""
    with open(_scratch() / "inflight", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        current = int(f.read() or 0) + delta
        f.seek(0)
        f.truncate()
        f.write(str(current))
        if delta > 0:
            with open(_scratch() / "peak", "a") as peak:
                peak.write(f"{current}\n")
        return current


async def tracked(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Counts invocations in flight across processes; logs each run's id as it starts (with the
    time) and as it ends."""
    with open(_scratch() / f"started-{os.getpid()}", "a") as f:
        f.write(f"{event['id']}:{ctx.attempt}:{time.time():.3f}\n")
    _bump(+1)
    try:
        await asyncio.sleep(float(event.get("seconds", 0.05)))
    finally:
        _bump(-1)
    with open(_scratch() / f"runs-{os.getpid()}", "a") as f:
        f.write(f"{event['id']}:{ctx.attempt}\n")
    return {"id": event["id"]}
