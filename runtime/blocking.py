"""Detect handlers that block the event loop, name them, and count how long they stalled it.

An ``async def`` handler runs on the runtime's one event loop. If it blocks (``time.sleep``, a
synchronous HTTP call, a long CPU loop), nothing else on that loop runs: every other function of
the runtime, in-progress acks, timeouts, replies. Python cannot preempt it, so the monitor makes it
visible instead: a WARNING names the function while the loop is blocked, a second one gives the
total once the loop runs again, and the counters appear in ``fn.admin.status``.

Synchronous handlers (plain ``def``) run in a thread pool and cannot block the loop; this is only
about ``async def`` handlers (and anything else running on the loop).

How: a task on the loop records a timestamp every ``interval``; a daemon thread checks it as often.
When the loop has not beaten for ``threshold + interval``, the thread samples the loop thread's
stack and matches its frames against the code of the served handlers. The thread reads only the
timestamp, the stack and the handlers; it never touches asyncio or nats objects. The loop itself
measures the gap when it runs again, so the duration and the counters are exact even when the
thread could not look in time (for instance while C code held the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

from .loader import Handler
from .loop import cancel_and_wait

log = logging.getLogger("runtime.blocking")

HandlerSource = Callable[[], Mapping[str, Handler]]   # function name -> the handler served for it


@dataclass(frozen=True, slots=True)
class Sample:
    """What the loop thread was running when the monitor looked, during the block that began at ``since``."""

    since: float                 # the last beat before the block
    function: str | None         # None: no served handler on the stack
    where: str                   # "functions.slow:main at functions/slow.py:12"


@dataclass(slots=True)
class BlockCount:
    blocked: int = 0
    blocked_seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.blocked += 1
        self.blocked_seconds += seconds

    def as_dict(self) -> dict[str, Any]:
        return {"blocked": self.blocked, "blocked_seconds": round(self.blocked_seconds, 3)}


def handler_codes(func: Callable[..., Any]) -> list[CodeType]:
    """The code objects whose frames mean "this handler is running", most specific first."""
    codes: list[CodeType] = []
    seen: set[int] = set()
    for obj in (inspect.unwrap(func), func):
        while isinstance(obj, functools.partial):
            obj = obj.func
        target = getattr(obj, "__func__", obj)   # bound methods
        code = getattr(target, "__code__", None)
        if code is None:                          # a callable object: its class's __call__
            call = getattr(type(obj), "__call__", None)  # noqa: B004 - we want the method itself
            code = getattr(inspect.unwrap(call), "__code__", None) if call is not None else None
        if isinstance(code, CodeType) and id(code) not in seen:
            seen.add(id(code))
            codes.append(code)
    return codes


def _relative(path: str) -> str:
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            return rel
    return path


def _location(frame: FrameType) -> str:
    return f"{_relative(frame.f_code.co_filename)}:{frame.f_lineno}"


def _stack(frame: FrameType | None) -> Iterator[FrameType]:
    while frame is not None:
        yield frame
        frame = frame.f_back


def running_frame(thread_id: int) -> FrameType | None:
    """The innermost Python frame of thread ``thread_id``.

    ``sys._current_frames`` is the documented (if underscored) way to see another thread's
    stack; it is used in this one place so a change in it fails one test.
    """
    return sys._current_frames().get(thread_id)


def find_culprit(frame: FrameType | None, handlers: Mapping[str, Handler]) -> tuple[str | None, str]:
    """Which served handler is on the stack (innermost first), and a description of where it is."""
    owners: dict[CodeType, tuple[str, Handler]] = {}
    for specific in (True, False):   # a shared decorator's wrapper never hides the real function
        for name, handler in handlers.items():
            codes = handler_codes(handler.func)
            for code in codes[:1] if specific else codes[1:]:
                owners.setdefault(code, (name, handler))
    innermost = frame
    for f in _stack(frame):
        owner = owners.get(f.f_code)
        if owner is None:
            continue
        name, handler = owner
        where = f"{handler.spec} at {_location(f)}"
        if innermost is not None and innermost is not f:
            where += f", in {innermost.f_code.co_qualname} at {_location(innermost)}"
        return name, where
    if innermost is None:
        return None, "no Python frame"
    return None, f"in {innermost.f_code.co_qualname} at {_location(innermost)}"


class LoopMonitor:
    """Warns when the event loop stops running for more than ``threshold`` seconds, and by whom."""

    def __init__(self, handlers: HandlerSource, threshold: float = 1.0, interval: float = 0.1) -> None:
        self.handlers = handlers
        self.threshold = threshold
        self.interval = interval
        self.total = BlockCount()
        self.by_function: dict[str, BlockCount] = {}
        self._beat = time.monotonic()       # written by the loop, read by the thread
        self._sample: Sample | None = None  # written by the thread, read by the loop
        self._loop_thread = 0
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def counts(self) -> dict[str, Any]:
        """Counters for the status report: totals and per function."""
        return {**self.total.as_dict(),
                "functions": {name: c.as_dict() for name, c in sorted(self.by_function.items())}}

    async def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._stopping.clear()
        self._task = asyncio.create_task(self._beating(), name="loop-monitor")
        self._thread = threading.Thread(target=self._watch, name="loop-monitor", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        await cancel_and_wait(self._task)
        self._task = None
        if self._thread is not None:
            self._thread.join(timeout=1.0)   # it wakes on the event at once
            self._thread = None

    async def __aenter__(self) -> LoopMonitor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- loop side

    async def _beating(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            since, self._beat = self._beat, now
            if now - since > self.threshold + self.interval:
                # The block began somewhere within the sleep before it: take the middle.
                self._blocked(since, now - since - self.interval / 2)

    def _blocked(self, since: float, seconds: float) -> None:
        sample = self._sample
        if sample is not None and sample.since != since:
            sample = None   # from an earlier block
        self.total.add(seconds)
        if sample is None:
            log.warning("event loop was blocked for %.1fs by unknown code (it ended before the monitor "
                        "could look); every function of this runtime was stalled", seconds)
            return
        if sample.function is None:
            log.warning("event loop was blocked for %.1fs outside any handler (%s); every function of this "
                        "runtime was stalled", seconds, sample.where)
            return
        self.by_function.setdefault(sample.function, BlockCount()).add(seconds)
        log.warning("event loop was blocked for %.1fs by function %s; every function of this runtime was "
                    "stalled", seconds, sample.function)

    # ---------------------------------------------------------------- monitor thread

    def _watch(self) -> None:
        warned_since: float | None = None
        while not self._stopping.wait(self.interval):
            since = self._beat
            if time.monotonic() - since <= self.threshold + self.interval:
                continue
            known = self._sample
            if known is not None and known.since == since and known.function is not None:
                continue   # already named; nothing more to learn until the loop runs
            sample = self._look(since)
            self._sample = sample
            if warned_since != since:
                warned_since = since
                self._warn(sample)

    def _look(self, since: float) -> Sample:
        try:
            handlers = dict(self.handlers())
        except Exception:   # the loop may be changing the set of functions; name none this time
            handlers = {}
        frame = running_frame(self._loop_thread)
        try:
            function, where = find_culprit(frame, handlers)
        finally:
            del frame   # frames keep their locals alive
        return Sample(since=since, function=function, where=where)

    def _warn(self, sample: Sample) -> None:
        if sample.function is None:
            log.warning("event loop blocked for more than %gs outside any handler (%s)", self.threshold,
                        sample.where)
        else:
            log.warning("event loop blocked for more than %gs by function %s (%s)", self.threshold,
                        sample.function, sample.where)

