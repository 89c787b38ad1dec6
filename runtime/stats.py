"""Per-function and cron counters, kept with plain integer additions on the hot path.

The executor records every attempt here where its outcome is decided; nothing here locks,
allocates much or does I/O. The metrics collector (``metrics.py``) and the status responder
(``status.py``) read these numbers when asked, which is where any cost belongs.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque

from .policy import Ack, Decision, RetryAfter

# What became of an attempt, the ``outcome`` label of ``fn_invocations_total``: the policy's
# decision, a dead letter by its reason (``max_deliver`` is ``dead_letter``).
OUTCOMES = ("ok", "retry", "dead_letter", "invalid_input", "rejected", "timeout", "expired")
OK, RETRY, DEAD_LETTER, INVALID_INPUT, REJECTED, TIMEOUT, EXPIRED = range(len(OUTCOMES))
_BY_REASON = {"max_deliver": DEAD_LETTER, "invalid_input": INVALID_INPUT, "rejected": REJECTED,
              "timeout": TIMEOUT, "expired": EXPIRED}

# Upper bounds (seconds) of the duration histogram's buckets; +Inf is implied.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0)
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
WINDOW = 60          # seconds of the rolling counts and percentiles
RESERVOIR = 2048     # the latest durations kept for the percentiles


def outcome_of(decision: Decision) -> int:
    """The index in ``OUTCOMES`` of what ``decision`` makes of an attempt."""
    if isinstance(decision, Ack):
        return OK
    if isinstance(decision, RetryAfter):
        return RETRY
    return _BY_REASON[decision.reason]


class Histogram:
    """Fixed buckets, counted per bucket (not cumulative): ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus exposes them, ending with ``+Inf``."""
        pairs, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            pairs.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return pairs


class FunctionStats:
    """What one function's attempts came to in this runtime since it started."""

    __slots__ = ("_done", "_failed", "_second", "duration", "outcomes", "recent", "redeliveries")

    def __init__(self) -> None:
        self.outcomes = [0] * len(OUTCOMES)
        self.duration = Histogram(DURATION_BUCKETS)
        self.redeliveries = 0              # attempts of messages delivered before
        # The last minute, one slot per second (slot i holds second _second[i]).
        self._second = [-1] * WINDOW
        self._done = [0] * WINDOW
        self._failed = [0] * WINDOW
        self.recent: deque[tuple[float, float]] = deque(maxlen=RESERVOIR)   # (ended, seconds)

    def record(self, outcome: int, started: float | None, delivered: int) -> None:
        """One attempt ended with ``outcome``; it began at ``started`` (``time.monotonic()``),
        None when the handler was never called (an expired invocation)."""
        now = time.monotonic()
        self.outcomes[outcome] += 1
        if delivered > 1:
            self.redeliveries += 1
        if started is not None:
            seconds = now - started
            self.duration.observe(seconds)
            self.recent.append((now, seconds))
        second = int(now)
        i = second % WINDOW
        if self._second[i] != second:
            self._second[i] = second
            self._done[i] = self._failed[i] = 0
        if outcome == OK:
            self._done[i] += 1
        else:
            self._failed[i] += 1

    def counts(self) -> dict[str, int]:
        return dict(zip(OUTCOMES, self.outcomes, strict=True))

    def last_minute(self) -> tuple[int, int]:
        """Attempts that succeeded and that failed (any other outcome) in the last minute."""
        oldest = int(time.monotonic()) - WINDOW
        done = failed = 0
        for second, d, f in zip(self._second, self._done, self._failed, strict=True):
            if second > oldest:
                done += d
                failed += f
        return done, failed

    def percentiles(self, *qs: float) -> list[float | None]:
        """Durations at the quantiles ``qs`` of the attempts of the last minute (None: there were none)."""
        since = time.monotonic() - WINDOW
        values = sorted(seconds for ended, seconds in self.recent if ended >= since)
        if not values:
            return [None for _ in qs]
        return [values[min(len(values) - 1, int(q * len(values)))] for q in qs]


class CronStats:
    """The ticks this runtime stored for each schedule, and how late after their time."""

    __slots__ = ("lateness", "ticks")

    def __init__(self) -> None:
        self.ticks: dict[str, int] = {}
        self.lateness: dict[str, Histogram] = {}

    def fired(self, schedule: str, late: float) -> None:
        self.ticks[schedule] = self.ticks.get(schedule, 0) + 1
        histogram = self.lateness.get(schedule)
        if histogram is None:
            histogram = self.lateness[schedule] = Histogram(LATENESS_BUCKETS)
        histogram.observe(max(0.0, late))
