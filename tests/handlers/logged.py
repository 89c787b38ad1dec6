"""Handlers for the structured-log tests: each logs through ``ctx.logger`` and fails in its own way."""

from __future__ import annotations

import warnings
from typing import Any

from runtime import Context


async def flaky(event: dict[str, Any], ctx: Context) -> dict[str, int]:
    """Fails its first attempt and succeeds on the next; also raises a Python warning once."""
    ctx.logger.info("working on order %s", event.get("order"))
    if ctx.attempt == 1:
        warnings.warn("the first attempt is about to fail", UserWarning, stacklevel=1)
        raise ConnectionError("the warehouse did not answer")
    return {"attempt": ctx.attempt}


async def broken(event: dict[str, Any], ctx: Context) -> None:
    """Fails every attempt."""
    ctx.logger.warning("giving up on order %s", event.get("order"))
    raise LookupError(f"no order {event.get('order')}")
