"""Handlers for the dead-letter tests."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from runtime import Context

from .core import report


class Order(BaseModel):
    item: str
    quantity: int


def doomed(event: dict[str, Any]) -> None:
    """Fails every attempt, quietly (used in bulk)."""
    raise ValueError(f"doomed {event.get('id')}")


async def hang(event: dict[str, Any], ctx: Context) -> None:
    """Says it started, then runs until its process is killed."""
    await report(ctx)
    await asyncio.sleep(3600)


async def fixable(event: Order, ctx: Context) -> dict[str, Any]:
    """Broken until the file ``fixed`` appears in the test's scratch directory."""
    await report(ctx)
    if not (Path(os.environ["RUNTIME_TEST_DIR"]) / "fixed").exists():
        raise LookupError(f"no stock of {event.item}")
    return {"shipped": event.item, "quantity": event.quantity}
