"""Tick computation with fixed clocks: expressions, timezones, daylight-saving days, catch-up plans."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from runtime.crontab import MAX_CATCHUP, Cron, due_ticks, format_tick, next_tick, parse_tick, to_croniter


def utc(text: str) -> datetime:
    return parse_tick(text)


def walk(expr: str, tz: str, start: str, end: str) -> list[datetime]:
    c, out = Cron(expr, tz), []
    tick, stop = utc(start), utc(end)
    while (tick := c.next_after(tick)) <= stop:
        out.append(tick)
    return out


def local(ticks: list[datetime], tz: str) -> list[str]:
    return [t.astimezone(ZoneInfo(tz)).strftime("%m-%d %H:%M:%S%z") for t in ticks]


@pytest.mark.parametrize(("expr", "translated"), [
    ("*/5 * * * *", "*/5 * * * *"),
    ("*/2 * * * * *", "* * * * * */2"),
    ("0 30 2 * * 1-5", "30 2 * * 1-5 0"),
    ("@hourly", "0 * * * *"),
    ("@DAILY", "0 0 * * *"),
    ("@weekly", "0 0 * * 0"),
    ("@monthly", "0 0 1 * *"),
    ("@yearly", "0 0 1 1 *"),
])
def test_expressions_translate_to_croniter(expr: str, translated: str) -> None:
    assert to_croniter(expr) == translated


@pytest.mark.parametrize(("expr", "problem"), [
    ("* * * *", "has 4 fields"),
    ("* * * * * * *", "has 7 fields"),
    ("61 * * * *", "not a valid cron expression"),
    ("*/0 * * * *", "not a valid cron expression"),
    ("@fortnightly", "unknown cron alias"),
    ("0 0 30 2 *", "never fires"),
])
def test_bad_expressions_say_why(expr: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        to_croniter(expr)


def test_six_fields_put_seconds_first() -> None:
    assert walk("*/20 * * * * *", "UTC", "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z") == [
        utc("2026-01-01T00:00:20Z"), utc("2026-01-01T00:00:40Z"), utc("2026-01-01T00:01:00Z")]


def test_next_tick_is_strictly_after_and_ignores_fractions() -> None:
    at = utc("2026-05-01T10:00:00Z")
    assert next_tick("*/2 * * * * *", "UTC", at) == utc("2026-05-01T10:00:02Z")
    assert next_tick("*/2 * * * * *", "UTC", at + timedelta(microseconds=1)) == utc("2026-05-01T10:00:02Z")
    assert next_tick("@hourly", "UTC", at - timedelta(microseconds=1)) == at


def test_timezone_moves_the_tick() -> None:
    at = utc("2026-07-01T00:00:00Z")
    assert next_tick("0 9 * * *", "Europe/Paris", at) == utc("2026-07-01T07:00:00Z")       # CEST, +2
    assert next_tick("0 9 * * *", "America/New_York", at) == utc("2026-07-01T13:00:00Z")   # EDT, -4
    assert next_tick("0 9 * * *", "Asia/Kolkata", at) == utc("2026-07-01T03:30:00Z")       # +5:30
    assert next_tick("0 9 * * *", "Europe/Paris", utc("2026-01-15T00:00:00Z")) == utc("2026-01-15T08:00:00Z")


def test_day_of_week_is_read_in_the_schedule_timezone() -> None:
    # Monday 00:30 in Tokyo is still Sunday in UTC.
    assert next_tick("30 0 * * 1", "Asia/Tokyo", utc("2026-06-06T00:00:00Z")) == utc("2026-06-07T15:30:00Z")


def test_daily_fires_once_on_the_fall_back_day() -> None:
    ticks = walk("30 2 * * *", "Europe/Paris", "2026-10-23T00:00:00Z", "2026-10-27T00:00:00Z")
    assert local(ticks, "Europe/Paris") == ["10-23 02:30:00+0200", "10-24 02:30:00+0200",
                                            "10-25 02:30:00+0200", "10-26 02:30:00+0100"]
    assert utc("2026-10-25T01:30:00Z") not in ticks  # the second 02:30 of that night


def test_daily_fires_once_on_the_spring_forward_day_shifted_by_the_jump() -> None:
    ticks = walk("30 2 * * *", "Europe/Paris", "2026-03-27T00:00:00Z", "2026-03-31T00:00:00Z")
    assert local(ticks, "Europe/Paris") == ["03-27 02:30:00+0100", "03-28 02:30:00+0100",
                                            "03-29 03:30:00+0200", "03-30 02:30:00+0200"]


def test_new_york_transitions() -> None:
    spring = walk("30 2 * * *", "America/New_York", "2026-03-07T12:00:00Z", "2026-03-10T12:00:00Z")
    assert local(spring, "America/New_York") == ["03-08 03:30:00-0400", "03-09 02:30:00-0400",
                                                 "03-10 02:30:00-0400"]
    fall = walk("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", "2026-11-03T12:00:00Z")
    assert local(fall, "America/New_York") == ["11-01 01:30:00-0400", "11-02 01:30:00-0500",
                                               "11-03 01:30:00-0500"]


def test_frequent_expressions_follow_real_time_across_transitions() -> None:
    for start, end in [("2026-03-29T00:30:00Z", "2026-03-29T01:30:00Z"),
                       ("2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z")]:
        every2 = walk("*/2 * * * * *", "Europe/Paris", start, end)
        assert len(every2) == 1800
        assert {b - a for a, b in pairwise(every2)} == {timedelta(seconds=2)}
        quarter = walk("*/15 * * * *", "Europe/Paris", start, end)
        assert {b - a for a, b in pairwise(quarter)} == {timedelta(minutes=15)}
    # Fall back: the repeated hour 02:00-03:00 runs twice for an hourly expression.
    hourly = walk("@hourly", "Europe/Paris", "2026-10-24T22:30:00Z", "2026-10-25T03:30:00Z")
    assert local(hourly, "Europe/Paris") == ["10-25 01:00:00+0200", "10-25 02:00:00+0200",
                                             "10-25 02:00:00+0100", "10-25 03:00:00+0100",
                                             "10-25 04:00:00+0100"]


def test_half_hour_transition_lord_howe() -> None:
    # Australia/Lord_Howe moves by 30 minutes: 02:00 -> 02:30 in October, 02:00 -> 01:30 in April.
    spring = walk("15 2 * * *", "Australia/Lord_Howe", "2026-10-02T12:00:00Z", "2026-10-05T12:00:00Z")
    assert local(spring, "Australia/Lord_Howe") == ["10-03 02:15:00+1030", "10-04 02:45:00+1100",
                                                    "10-05 02:15:00+1100"]
    fall = walk("45 1 * * *", "Australia/Lord_Howe", "2026-04-03T12:00:00Z", "2026-04-06T12:00:00Z")
    assert local(fall, "Australia/Lord_Howe") == ["04-04 01:45:00+1100", "04-05 01:45:00+1100",
                                                  "04-06 01:45:00+1030"]


@pytest.mark.parametrize("tz", ["Europe/Paris", "America/New_York", "Australia/Sydney", "America/Santiago",
                                "Australia/Lord_Howe", "UTC"])
def test_a_year_of_daily_ticks_is_one_per_local_day(tz: str) -> None:
    ticks = walk("30 2 * * *", tz, "2026-01-01T12:00:00Z", "2027-01-01T12:00:00Z")
    assert ticks == sorted(set(ticks))
    days = Counter(t.astimezone(ZoneInfo(tz)).date() for t in ticks)
    assert set(days.values()) == {1}
    assert len(days) == 365


def test_monthly_and_yearly_aliases() -> None:
    assert next_tick("@monthly", "Europe/Paris", utc("2026-03-15T00:00:00Z")) == utc("2026-03-31T22:00:00Z")
    assert next_tick("@yearly", "Europe/Paris", utc("2026-06-01T00:00:00Z")) == utc("2026-12-31T23:00:00Z")
    assert next_tick("@weekly", "UTC", utc("2026-06-03T00:00:00Z")).date() == date(2026, 6, 7)


def test_format_tick_is_rfc3339_utc() -> None:
    tick = datetime(2026, 10, 25, 2, 30, tzinfo=ZoneInfo("Europe/Paris"))
    assert format_tick(tick) == "2026-10-25T00:30:00Z"
    assert parse_tick("2026-10-25T00:30:00Z") == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)


# ------------------------------------------------------------------ what fires at a given moment

EVERY_SECOND = Cron("* * * * * *")
T0 = utc("2026-05-01T12:00:00Z")


def sec(n: int) -> datetime:
    return T0 + timedelta(seconds=n)


@pytest.mark.parametrize(("catchup", "expected"), [
    ("none", []),
    ("latest", [sec(10)]),
    ("all", [sec(n) for n in range(1, 11)]),
])
def test_after_a_restart_missed_ticks_follow_catchup(catchup: str, expected: list[datetime]) -> None:
    # Last fired at T0; the scheduler starts at T0+10.5s: ticks 1..10 came due while nothing ran.
    assert due_ticks(EVERY_SECOND, catchup, sec(0), sec(10) + timedelta(milliseconds=500),  # type: ignore[arg-type]
                     live_since=sec(10) + timedelta(milliseconds=500)) == expected


@pytest.mark.parametrize("catchup", ["none", "latest", "all"])
def test_a_tick_due_while_running_always_fires(catchup: str) -> None:
    late = sec(5) + timedelta(milliseconds=30)
    assert due_ticks(EVERY_SECOND, catchup, sec(4), late, live_since=sec(0)) == [sec(5)]  # type: ignore[arg-type]
    assert due_ticks(EVERY_SECOND, catchup, sec(5), late, live_since=sec(0)) == []  # type: ignore[arg-type]


def test_a_stall_while_running_treats_older_ticks_as_missed() -> None:
    now = sec(4) + timedelta(milliseconds=100)
    assert due_ticks(EVERY_SECOND, "none", sec(0), now, live_since=sec(0)) == [sec(4)]
    assert due_ticks(EVERY_SECOND, "latest", sec(0), now, live_since=sec(0)) == [sec(3), sec(4)]
    assert due_ticks(EVERY_SECOND, "all", sec(0), now, live_since=sec(0)) == [sec(1), sec(2), sec(3), sec(4)]


def test_catchup_all_is_bounded() -> None:
    now = sec(86400)
    fired = due_ticks(EVERY_SECOND, "all", sec(0), now, live_since=now)
    assert len(fired) == MAX_CATCHUP
    assert fired[-1] == now and fired[0] == now - timedelta(seconds=MAX_CATCHUP - 1)
    # A month-old cursor on a per-second schedule is still cheap to evaluate.
    assert len(due_ticks(EVERY_SECOND, "all", sec(-30 * 86400), now, live_since=now)) == MAX_CATCHUP


def test_catchup_across_a_transition_in_the_schedule_timezone() -> None:
    daily = Cron("30 2 * * *", "Europe/Paris")
    fired = due_ticks(daily, "all", utc("2026-10-23T00:30:00Z"), utc("2026-10-27T12:00:00Z"),
                      live_since=utc("2026-10-27T12:00:00Z"))
    assert [format_tick(t) for t in fired] == ["2026-10-24T00:30:00Z", "2026-10-25T00:30:00Z",
                                               "2026-10-26T01:30:00Z", "2026-10-27T01:30:00Z"]
    assert due_ticks(daily, "latest", utc("2026-10-23T00:30:00Z"), utc("2026-10-27T12:00:00Z"),
                     live_since=utc("2026-10-27T12:00:00Z")) == [utc("2026-10-27T01:30:00Z")]


def test_cron_objects_are_plain_utc() -> None:
    tick = Cron("0 12 * * *", "Asia/Tokyo").next_after(datetime(2026, 1, 1, tzinfo=UTC))
    assert tick.tzinfo is UTC
