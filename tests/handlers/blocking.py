"""Handlers that block the event loop, and well-behaved ones to compare them with."""

from __future__ import annotations

import asyncio
import time
from typing import Any


async def hog(event: dict[str, Any]) -> dict[str, Any]:
    time.sleep(float(event.get("seconds", 1.5)))  # the mistake: a blocking call inside async def
    return {"slept": event.get("seconds", 1.5)}


def _wait_for_disk(seconds: float) -> None:
    time.sleep(seconds)


async def hog_in_helper(event: dict[str, Any]) -> dict[str, Any]:
    _wait_for_disk(float(event.get("seconds", 1.5)))  # blocks one frame further in
    return {"slept": event.get("seconds", 1.5)}


class Hogs:
    """Handlers as bound methods (``module:hogs.run``)."""

    async def run(self, event: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(event.get("seconds", 1.5)))
        return {"slept": event.get("seconds", 1.5)}


hogs = Hogs()


async def polite(event: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(float(event.get("seconds", 0.0)))
    return {"slept": event.get("seconds", 0.0)}
