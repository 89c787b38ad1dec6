"""The event loop: uvloop when importable, asyncio otherwise; and stopping background tasks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def spawn(tasks: set[asyncio.Task[Any]], work: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
    """Run ``work`` in a task kept in ``tasks`` until it is done (the loop holds tasks only weakly)."""
    task = asyncio.get_running_loop().create_task(work, name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


async def finish_within(tasks: Collection[asyncio.Task[Any]], grace: float) -> None:
    """Let ``tasks`` finish for up to ``grace`` seconds, then cancel the rest and wait until they have ended."""
    if not tasks:
        return
    _, pending = await asyncio.wait(list(tasks), timeout=grace) if grace > 0 else ((), set(tasks))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
