"""Handlers for the delayed-call tests: each run is reported with the headers the function saw."""

from __future__ import annotations

from typing import Any

from runtime import Context

from .core import report


async def seen(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    await report(ctx, event=event, subject=ctx.subject,
                 headers={k: v for k, v in ctx.headers.items() if k.startswith(("Fn-", "X-"))})
    return event
