"""Handlers for the request-reply tests."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from runtime import Context


async def square(event: dict[str, Any]) -> dict[str, Any]:
    """Answers with something only this payload produces."""
    return {"token": event["token"], "square": event["n"] * event["n"]}


async def counted(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Writes a line per run to the scratch directory, so runs can be counted across processes."""
    with open(Path(os.environ["RUNTIME_TEST_DIR"]) / f"runs-{ctx.function}", "a") as f:
        f.write(f"{ctx.call_id}\n")
    await asyncio.sleep(float(event.get("seconds", 0.0)))
    return {"call_id": ctx.call_id, "pid": os.getpid(), "value": event.get("value")}
