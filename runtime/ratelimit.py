"""Fleet-wide rate limits (manifest ``rate_limit: 60/m``): a function's invocation starts, evenly
spaced across every runtime together.

The state is one entry per function in the KV bucket ``fn_rate``: the earliest time (Unix
seconds) the next invocation may start. Taking a permit reserves a start: read the entry, write
it one interval later, on condition that nobody wrote it meanwhile (compare-and-set on the
revision read); the loser of a race reads again. The winner then sleeps until its reserved time.
A waiting invocation writes once and never polls, however long it waits; within a runtime,
reservations are made one at a time, so runtimes race only with each other, and a runtime that
won the last write reserves the next start without reading first.

Starts are spaced ``period / count`` apart, without bursts: that is what makes the limit hold for
every window, not only for aligned ones. No window of one period holds more than ``count + 1``
starts, whatever the number of runtimes and their concurrency.

The reserved times come from the hosts' clocks: keep them in sync (NTP); a host whose clock is
ahead by some milliseconds starts that much early. An invocation cancelled while it waits (its
runtime stops) leaves its reserved start unused: the limit is then briefly below its rate, never above.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from .manifest import FunctionManifest
from .streams import RATE_BUCKET

log = logging.getLogger("runtime.ratelimit")

RETRY_AFTER_ERROR = 0.5   # seconds before a reservation JetStream could not take is tried again


class RateLimiter:
    """Permits to start invocations of one function, shared through ``fn_rate`` with every runtime."""

    def __init__(self, js: JetStreamContext, function: str) -> None:
        self.js = js
        self.function = function
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()
        self._known: tuple[float, int] | None = None   # (next free start, revision) as this runtime last wrote it

    async def acquire(self, manifest: FunctionManifest) -> float:
        """Wait until one invocation may start under ``manifest.rate_limit``, one interval after the
        fleet's previous start; returns how long it waited. The caller's message stays held meanwhile."""
        interval = manifest.start_interval or 0.0
        async with self._lock:
            start = await self._reserve(interval)
        wait = start - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        return max(0.0, wait)

    async def _reserve(self, interval: float) -> float:
        """Reserve the next start (Unix seconds) in the shared entry."""
        while True:
            try:
                kv = self._kv or await self._bucket()
                if self._known is None:
                    self._known = await self._read(kv)
                next_free, revision = self._known
                start = max(next_free, time.time())
                value = repr(start + interval).encode()
                try:
                    if revision:
                        written = await kv.update(self.function, value, last=revision)
                    else:
                        written = await kv.create(self.function, value)
                except KeyWrongLastSequenceError:
                    self._known = None   # another runtime reserved one meanwhile: read again
                    continue
                self._known = (start + interval, written)
                return start
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The message stays held (in-progress acks) while JetStream is unavailable.
                log.warning("could not reserve a start of %s (%s); trying again in %gs", self.function,
                            exc or type(exc).__name__, RETRY_AFTER_ERROR)
                self._known = None
                await asyncio.sleep(RETRY_AFTER_ERROR)

    async def _bucket(self) -> KeyValue:
        self._kv = await self.js.key_value(RATE_BUCKET)
        return self._kv

    async def _read(self, kv: KeyValue) -> tuple[float, int]:
        try:
            entry = await kv.get(self.function)
        except KeyNotFoundError:
            return 0.0, 0
        try:
            next_free = float(entry.value or b"0")
        except ValueError:
            next_free = 0.0   # not ours to read: replaced by the next write
        return next_free, entry.revision or 0
