"""The queue length limit: how a publish refused by ``FN``'s per-subject limit is recognised and reported.

``Settings.max_queued`` becomes ``FN``'s ``max_msgs_per_subject`` with ``discard: new`` per
subject (see :func:`runtime.streams.invoke_stream_config`): the server refuses a publish over
the limit to its publisher and drops nothing queued. It is the one per-subject limit JetStream
offers on a stream, so it applies to every function and to every priority level of it alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from nats.js.errors import APIError

from .protocol import PER_SUBJECT_FULL, STORE_FAILED

REPORT_EVERY = 10.0   # seconds between two log lines about refusals for the same queue


def refused_for_full_queue(error: Mapping[str, Any]) -> bool:
    """Whether a publish acknowledgement's ``error`` object is the per-subject limit's refusal."""
    return error.get("err_code") == STORE_FAILED and error.get("description") == PER_SUBJECT_FULL


def is_queue_full(exc: BaseException) -> bool:
    """Whether a nats-py JetStream publish failed because the subject's queue is at its limit."""
    return isinstance(exc, APIError) and exc.err_code == STORE_FAILED and exc.description == PER_SUBJECT_FULL


class Throttle:
    """Allows one report per key every ``every`` seconds and counts the ones it held back.

    A full queue refuses every publish until it drains: one log line per refusal would flood the log.
    """

    def __init__(self, every: float = REPORT_EVERY) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def due(self, key: str) -> int | None:
        """None if a report about ``key`` was made recently; else how many were held back since then."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


def held_back(count: int) -> str:
    """What to add to a report about the reports :class:`Throttle` held back (nothing if none)."""
    return f" ({count} more since the last report)" if count else ""
