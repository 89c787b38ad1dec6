"""Retry delays and the consumer's ack wait, as a manifest decides them; no server."""

from __future__ import annotations

from typing import Any

import pytest

from runtime.durations import format_duration, parse_duration
from runtime.manifest import FunctionManifest, RetryPolicy


def function(**fields: Any) -> FunctionManifest:
    return FunctionManifest.model_validate({"name": "f", "handler": "m:f", **fields})


# ------------------------------------------------------------------ RetryPolicy.delay_before


@pytest.mark.parametrize(("attempt", "delay"), [(1, 0.0), (2, 1.0), (3, 10.0), (4, 60.0), (5, 60.0), (100, 60.0)])
def test_default_backoff_waits_1s_10s_then_a_minute(attempt: int, delay: float) -> None:
    assert RetryPolicy().delay_before(attempt) == delay


@pytest.mark.parametrize("attempt", [-1, 0, 1])
def test_the_first_attempt_and_nonsense_attempts_wait_nothing(attempt: int) -> None:
    assert RetryPolicy(backoff=[5.0]).delay_before(attempt) == 0.0


@pytest.mark.parametrize("attempt", [1, 2, 3, 50])
def test_an_empty_backoff_retries_at_once(attempt: int) -> None:
    assert RetryPolicy(backoff=[]).delay_before(attempt) == 0.0


def test_a_single_backoff_value_applies_to_every_retry() -> None:
    policy = RetryPolicy(max_deliver=5, backoff=[2.5])
    assert [policy.delay_before(a) for a in range(1, 6)] == [0.0, 2.5, 2.5, 2.5, 2.5]


def test_backoff_written_as_durations_is_in_seconds() -> None:
    policy = function(retry={"backoff": ["250ms", "5s", "2m"]}).retry
    assert [policy.delay_before(a) for a in (2, 3, 4, 5)] == [0.25, 5.0, 120.0, 120.0]



# ------------------------------------------------------------------ effective_ack_wait


@pytest.mark.parametrize(("timeout", "ack_wait"), [
    ("30s", 30.0),     # the default timeout
    ("5s", 5.0),       # follows the timeout
    ("2.5s", 2.5),
    ("200ms", 1.0),    # never below a second
    ("1s", 1.0),
    ("31s", 30.0),     # never above 30 s: in-progress acks keep long runs alive
    ("1h", 30.0),
])
def test_ack_wait_follows_the_timeout_between_1s_and_30s(timeout: str, ack_wait: float) -> None:
    assert function(timeout=timeout).effective_ack_wait == ack_wait


@pytest.mark.parametrize(("explicit", "ack_wait"), [("90s", 90.0), ("2m", 120.0), ("500ms", 0.5), (0, 0.1),
                                                     ("10ms", 0.1)])
def test_an_explicit_ack_wait_is_used_as_given_but_at_least_100ms(explicit: str | int, ack_wait: float) -> None:
    assert function(timeout="5s", ack_wait=explicit).effective_ack_wait == ack_wait


# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(("text", "seconds"), [("0s", 0.0), (" 10 ms ", 0.01), ("2d", 172800.0), (1.5, 1.5),
                                               ("0.5m", 30.0)])
def test_more_duration_spellings(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["1S", "1 sec", "1e3s", "s", None, [1], -0.5])
def test_more_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "250ms"), (60, "1m"), (90, "90s"), (7200, "2h"), (0, "0ms"),
                                               (86400, "24h")])
def test_durations_are_written_in_the_largest_exact_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
