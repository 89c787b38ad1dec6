"""A plain (sync) handler that holds its thread until the test lets it go."""

from __future__ import annotations

import threading
from typing import Any

started: list[str] = []        # call numbers, in the order their threads picked them up
release = threading.Event()


def gate(event: dict[str, Any]) -> dict[str, Any]:
    started.append(str(event["n"]))
    if not release.wait(10):
        raise TimeoutError("the test never released the gate")
    return {"n": event["n"], "thread": threading.current_thread().name}
