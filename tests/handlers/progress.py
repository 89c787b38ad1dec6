"""Handlers that report progress while they run (``ctx.progress``)."""

from __future__ import annotations

from typing import Any

from runtime import Context


async def steps(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Sends ``n`` updates; with ``fail_first``, the first attempt fails after sending them."""
    sent = [await ctx.progress({"step": i + 1, "of": event["n"]}) for i in range(event["n"])]
    if event.get("fail_first") and ctx.attempt == 1:
        raise RuntimeError("the first attempt fails after its updates")
    return {"done": event["n"], "followed": all(sent)}
