"""A bounded set of worker tasks draining a queue of messages, without a task per message."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class WorkerPool(Generic[T]):
    """Runs ``process(item)`` for queued items with at most ``size`` running at once."""

    def __init__(self, process: Callable[[T], Awaitable[None]], size: int, name: str = "pool") -> None:
        self.process = process
        self.size = size
        self.name = name
        self.queue: deque[T] = deque()
        self.running = 0
        self._idle: deque[asyncio.Future[None]] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._drained = asyncio.Event()
        self._drained.set()

    def submit(self, item: T) -> None:
        self.queue.append(item)
        self._drained.clear()
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        if len(self._workers) < self.size:
            task = asyncio.get_running_loop().create_task(self._work(), name=f"{self.name}-worker")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    def resize(self, size: int) -> None:
        self.size = size

    @property
    def busy(self) -> int:
        return self.running + len(self.queue)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.queue:
                item = self.queue.popleft()
                self.running += 1
                try:
                    await self.process(item)
                finally:
                    self.running -= 1
            if self.running == 0:
                self._drained.set()
            if len(self._workers) > self.size:
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._idle.append(waiter)
            await waiter

    async def join(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def cancel(self) -> None:
        for task in list(self._workers):
            task.cancel()
        for task in list(self._workers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
