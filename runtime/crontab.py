"""Cron expressions: parsing (5 fields, 6 with leading seconds, @aliases) and ticks in a timezone.

Ticks are computed on the wall clock of the schedule's timezone and returned as UTC instants.
Daylight-saving transitions follow the usual cron conventions:

- a wall time the clock skips (spring forward) fires once, shifted by the size of the jump
  (a daily 02:30 in Europe/Paris fires at 03:30 CEST on that day);
- a wall time the clock shows twice (fall back) fires once, at its first occurrence, unless the
  expression's minute or hour field is a wildcard (``*`` or ``*/n``): such frequent expressions
  follow real time and fire in both passes.
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# `catchup: all` fires at most this many missed ticks, the most recent ones.
MAX_CATCHUP = 100

Catchup = Literal["none", "latest", "all"]

SECOND = timedelta(seconds=1)
# Offset changes of one zone are assumed to be more than a day apart (true of every zone in use).
DAY = timedelta(days=1)
_MAX_ROUNDS = 16


def to_croniter(expr: str) -> str:
    """Translate ``expr`` to croniter's syntax (seconds as a trailing sixth field).

    Raises ``ValueError`` naming the problem when the expression is not valid.
    """
    text = expr.strip()
    if text.startswith("@"):
        if text.lower() not in ALIASES:
            raise ValueError(f"unknown cron alias {text!r}; use one of {', '.join(sorted(ALIASES))}")
        text = ALIASES[text.lower()]
    fields = text.split()
    if len(fields) == 6:
        fields = [*fields[1:], fields[0]]
    elif len(fields) != 5:
        raise ValueError(f"{expr!r} has {len(fields)} fields; a cron expression has 5, or 6 with "
                         "seconds first")
    translated = " ".join(fields)
    if not croniter.is_valid(translated):
        raise ValueError(f"{expr!r} is not a valid cron expression")
    try:
        croniter(translated, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(f"{expr!r} never fires: no date matches it") from None
    return translated


def format_tick(tick: datetime) -> str:
    """RFC 3339 in UTC, to the second: ``2026-10-25T00:30:00Z``."""
    return tick.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_tick(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _offset(zone: ZoneInfo, instant: datetime) -> timedelta:
    offset = instant.astimezone(zone).utcoffset()
    assert offset is not None
    return offset


def _first_change(zone: ZoneInfo, lo: datetime, hi: datetime) -> datetime:
    """The first second in (lo, hi] whose offset differs from lo's; hi's offset must differ."""
    before = _offset(zone, lo)
    while hi - lo > SECOND:
        mid = lo + timedelta(seconds=(hi - lo).total_seconds() // 2)
        if _offset(zone, mid) == before:
            lo = mid
        else:
            hi = mid
    return hi


def next_transition(zone: ZoneInfo, start: datetime, end: datetime) -> datetime | None:
    """The first offset change of ``zone`` in (start, end], if any."""
    offset = _offset(zone, start)
    lo = start
    while lo < end:
        hi = min(lo + DAY, end)
        if _offset(zone, hi) != offset:
            return _first_change(zone, lo, hi)
        lo = hi
    return None


def _wall(instant: datetime, offset: timedelta) -> datetime:
    return (instant + offset).replace(tzinfo=None)


def _instant(wall: datetime, offset: timedelta) -> datetime:
    return (wall - offset).replace(tzinfo=UTC)


class Cron:
    """An expression evaluated in a timezone."""

    def __init__(self, expr: str, timezone: str = "UTC") -> None:
        self.expr = expr
        self.timezone = timezone
        self.zone = ZoneInfo(timezone)
        self.spec = to_croniter(expr)
        minute, hour = self.spec.split()[:2]
        self.follows_real_time = minute.startswith("*") or hour.startswith("*")

    def _match(self, wall: datetime, inclusive: bool = False) -> datetime:
        """The first wall time matching the expression after ``wall`` (or at it, if inclusive)."""
        start = wall - SECOND if inclusive else wall
        found: datetime = croniter(self.spec, start).get_next(datetime)
        return found

    def next_after(self, after: datetime) -> datetime:
        """The first tick strictly after ``after``, as a UTC instant."""
        lower = after.astimezone(UTC).replace(microsecond=0)
        at, inclusive = lower, False
        for _ in range(_MAX_ROUNDS):
            offset = _offset(self.zone, at)
            found: list[datetime] = []
            regular = self._match(_wall(at, offset), inclusive)
            change = next_transition(self.zone, at - DAY, at)
            if change is not None:
                before = _offset(self.zone, change - SECOND)
                if before < offset and at < change + (offset - before):
                    # Just after a jump forward: skipped wall times fire shifted by the jump.
                    skipped = self._match(_wall(at, before), inclusive)
                    if skipped < _wall(change, offset):
                        found.append(_instant(skipped, before))
                elif before > offset and not self.follows_real_time:
                    # Just after a fall back: wall times shown twice already fired on the first pass.
                    while regular < _wall(change, before):
                        regular = self._match(regular)
            candidate = _instant(regular, offset)
            upcoming = next_transition(self.zone, at, candidate)
            if upcoming is None:
                found.append(candidate)
            found = [t for t in found if t > lower and (upcoming is None or t < upcoming)]
            if found:
                return min(found)
            assert upcoming is not None
            at, inclusive = upcoming, True
        raise ValueError(f"cannot find the next tick of {self.expr!r} in {self.timezone}")

    def ticks(self, after: datetime, until: datetime, limit: int) -> list[datetime]:
        """The last ``limit`` ticks in (after, until], oldest first."""
        if limit <= 0 or until <= after:
            return []
        # Walk only the end of a long interval: a window sized from the tick spacing near ``until``.
        first = self.next_after(until)
        span = (self.next_after(first) - first) * (limit + 1)
        while True:
            start = max(after, until - span)
            recent: deque[datetime] = deque(maxlen=limit)
            tick = self.next_after(start)
            while tick <= until:
                recent.append(tick)
                tick = self.next_after(tick)
            if len(recent) >= limit or start == after:
                return list(recent)
            span *= 4


@lru_cache(maxsize=512)
def cron(expr: str, timezone: str = "UTC") -> Cron:
    return Cron(expr, timezone)


def next_tick(expr: str, timezone: str, after: datetime) -> datetime:
    """The first tick strictly after ``after``, computed in ``timezone``, returned in UTC."""
    return cron(expr, timezone).next_after(after)


def due_ticks(schedule: Cron, catchup: Catchup, cursor: datetime, now: datetime,
              live_since: datetime) -> list[datetime]:
    """The ticks to publish at ``now``, oldest first, given every tick up to ``cursor`` is handled.

    The newest tick in (cursor, now] is *current* when it came due after ``live_since`` (while this
    scheduler ran) and always fires. The others were missed and follow ``catchup``: ``none``
    fires none, ``latest`` the most recent, ``all`` each one (at most ``MAX_CATCHUP``).
    """
    recent = schedule.ticks(cursor, now, MAX_CATCHUP + 1)
    if not recent:
        return []
    current = recent[-1:] if recent[-1] > live_since else []
    missed = recent[:-1] if current else recent[-MAX_CATCHUP:]
    if catchup == "none":
        missed = []
    elif catchup == "latest":
        missed = missed[-1:]
    return missed + current
