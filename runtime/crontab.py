"""Cron expressions: parsing (5 fields, 6 with leading seconds, @aliases) and next-tick computation."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import croniter

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


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
    return translated


def next_tick(expr: str, timezone: str, after: datetime) -> datetime:
    """The first tick strictly after ``after``, computed in ``timezone``, returned in UTC."""
    zone = ZoneInfo(timezone)
    local = after.astimezone(zone)
    it = croniter(to_croniter(expr), local)
    tick: datetime = it.get_next(datetime)
    return tick.astimezone(UTC)
