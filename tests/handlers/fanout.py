"""Handlers for the trigger acceptance tests: each run is one line in a file of RUNTIME_TEST_DIR.

Files are per function and per process (``<function>-<pid>.runs``), so runtimes in other
processes can be counted without a lock; ``runs`` reads them all back.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from runtime.context import Context


def _scratch() -> Path:
    return Path(os.environ["RUNTIME_TEST_DIR"])


def _record(event: Any, ctx: Context, **extra: Any) -> None:
    line = json.dumps({"id": event.get("id") if isinstance(event, dict) else None, "call_id": ctx.call_id,
                       "attempt": ctx.attempt, "subject": ctx.subject, "trigger": ctx.trigger,
                       "caused_by": ctx.headers.get("Fn-Call-Id"), "pid": os.getpid(), "t": time.time(), **extra})
    with open(_scratch() / f"{ctx.function}-{os.getpid()}.runs", "a") as f:
        f.write(line + "\n")


def runs(scratch: Path, function: str) -> list[dict[str, Any]]:
    """Every recorded run of ``function``, in every process; a line still being written is left out."""
    found: list[dict[str, Any]] = []
    for path in sorted(scratch.glob(f"{function}-*.runs")):
        found.extend(json.loads(line) for line in path.read_text().split("\n")[:-1])
    return found


async def record(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    _record(event, ctx)
    return {"id": event.get("id")}


async def broken_until_fixed(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Raises until the file ``fixed`` exists in the scratch directory."""
    ok = (_scratch() / "fixed").exists()
    _record(event, ctx, ok=ok)
    if not ok:
        raise ValueError("the mail server is down")
    return {"id": event.get("id")}


async def fails_twice(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Fails the first two attempts of every event; its result names the event."""
    _record(event, ctx, ok=ctx.attempt >= 3)
    if ctx.attempt < 3:
        raise RuntimeError(f"attempt {ctx.attempt} fails")
    return {"id": event.get("id")}


async def record_then_hang(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Records the run, then waits far past any test: the runtime running it is killed meanwhile."""
    _record(event, ctx)
    await asyncio.sleep(3600)
    return {"id": event.get("id")}
