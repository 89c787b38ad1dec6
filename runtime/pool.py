"""A bounded set of worker tasks draining a queue of messages, without a task per message."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .loop import spawn

T = TypeVar("T")

# How many items a worker runs in a row without waiting before it lets the event loop run once:
# until then nothing else runs, so the connection does not write the acks the burst published and
# the pull request for the next invocations waits for the end of the burst, leaving the runtime
# idle while the server answers it. An eighth of the pool (the dispatcher asks again once a quarter
# of its slots are free), at least 16: measured best on a no-op function at 100 and 512 slots.
YIELD_MIN = 16


def yield_every(size: int) -> int:
    return max(YIELD_MIN, size // 8)


class WorkerPool(Generic[T]):
    """Runs ``process(item)`` for queued items with at most ``size`` running at once.

    A worker drains the queue for as long as what it runs does not wait: a burst of handlers
    that return without waiting runs in one worker, with no task switch per item (it only lets
    the loop run once every ``yield_every(size)`` items). More workers
    are woken only once the running ones are seen waiting with items still queued (``_balance``
    runs as a loop callback, so between task steps), and then one per queued item.
    """

    def __init__(self, process: Callable[[T], Awaitable[None]], size: int, name: str = "pool") -> None:
        self.process = process
        self.size = size
        self._yield_every = yield_every(size)
        self.name = name
        self.queue: deque[T] = deque()
        self.running = 0
        self._idle: deque[asyncio.Future[None]] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._waking = 0          # workers woken (or created) that have not looked at the queue yet
        self._balancing = False   # a _balance callback is scheduled
        self._drained = asyncio.Event()
        self._drained.set()

    def submit(self, item: T) -> None:
        self.queue.append(item)
        self._drained.clear()
        self._balance_soon()

    def resize(self, size: int) -> None:
        self.size = size
        self._yield_every = yield_every(size)

    @property
    def busy(self) -> int:
        return self.running + len(self.queue)

    def _balance_soon(self) -> None:
        if not self._balancing:
            self._balancing = True
            asyncio.get_running_loop().call_soon(self._balance)

    def _balance(self) -> None:
        self._balancing = False
        if self._waking or not self.queue:
            return   # a worker about to run takes the queue (and balances again if it has to wait)
        # Running workers are waiting (we run between task steps): one worker per queued item.
        # With none running, one worker first: it may well drain the queue without waiting.
        wanted = min(len(self.queue), max(0, self.size - self.running)) if self.running else 1
        while wanted > 0 and self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._waking += 1
                wanted -= 1
        while wanted > 0 and len(self._workers) < self.size:
            spawn(self._workers, self._work(), name=f"{self.name}-worker")
            self._waking += 1
            wanted -= 1

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        while True:
            self._waking -= 1
            streak = 0
            while self.queue:
                item = self.queue.popleft()
                if self.queue:
                    self._balance_soon()   # runs only once this worker waits, or has drained the queue
                self.running += 1
                try:
                    await self.process(item)
                finally:
                    self.running -= 1
                if task.cancelling():
                    # Cancelled while it ran, and the cancellation was swallowed on the way (a
                    # handler that catches it): stop all the same, or cancel() would wait forever.
                    raise asyncio.CancelledError
                streak += 1
                if streak >= self._yield_every and self.queue:
                    streak = 0
                    await self._step_aside()
            if self.running == 0:
                self._drained.set()
            if len(self._workers) > self.size:
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._idle.append(waiter)
            await waiter

    async def _step_aside(self) -> None:
        # Counted as waking, so that the balancing this lets run does not take the pool for idle
        # and wake another worker for the rest of the burst: this one goes on with it.
        self._waking += 1
        try:
            await asyncio.sleep(0)
        finally:
            self._waking -= 1

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
        self._idle.clear()
        self._waking = 0   # a worker cancelled between its wake-up and its first look counts no more
