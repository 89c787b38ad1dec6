"""Handlers for the tests of replayed calls."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any


async def held_fix(event: dict[str, Any]) -> dict[str, Any]:
    """Fails until ``fixed`` appears in the test's scratch directory; then runs until ``release`` appears."""
    scratch = Path(os.environ["RUNTIME_TEST_DIR"])
    if not (scratch / "fixed").exists():
        raise LookupError("not fixed yet")
    while not (scratch / "release").exists():   # bounded by the manifest's timeout
        await asyncio.sleep(0.02)
    return {"fixed": True, "order": event["order"]}
