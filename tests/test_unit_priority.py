"""Priority levels in subjects and consumer names, without a server."""

from __future__ import annotations

import pytest

from runtime import priority
from runtime.protocol import parse_ack


def test_subjects_carry_the_level_and_the_plain_subject_belongs_to_the_default() -> None:
    assert priority.invoke_subject("report") == "fn.invoke.report"
    assert priority.invoke_subject("report", 10) == "fn.invoke.report.10"
    assert priority.level_subjects("report", 5, 5) == ["fn.invoke.report", "fn.invoke.report.5"]
    assert priority.level_subjects("report", 7, 5) == ["fn.invoke.report.7"]
    assert priority.doorbell_subjects("report", 5, 5) == ["fn.queued.report", "fn.queued.report.5"]
    assert priority.split_subject("fn.invoke.report.3") == ("report", 3)
    assert priority.split_subject("fn.invoke.report") == ("report", None)


@pytest.mark.parametrize("bad", [0, 11, -1, True, 2.5, "3"])
def test_levels_outside_one_to_ten_are_refused_with_the_range(bad: object) -> None:
    with pytest.raises(ValueError, match=r"from 1 \(least urgent\) to 10 \(most urgent\)"):
        priority.invoke_subject("report", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("subject", ["fn.invoke.report.11", "fn.invoke.report.x", "fn.invoke.a.b.c", "fn.call.a",
                                     "fn.invoke."])
def test_other_subjects_are_not_invocation_subjects(subject: str) -> None:
    with pytest.raises(ValueError):
        priority.split_subject(subject)


def test_consumer_names_cannot_collide_with_function_names() -> None:
    assert priority.consumer_name("report", 5, 5) == "report"
    assert priority.consumer_name("report", 9, 5) == "report_L9"
    # Function names are lower case: "report_l9" is a function of its own, not a level.
    assert priority.function_of_consumer("report_L9") == "report"
    assert priority.function_of_consumer("report_l9") == "report_l9"
    assert priority.function_of_consumer("report") == "report"
    assert priority.split_consumer("report_L9") == ("report", 9)
    assert priority.consumer_names("report")[:2] == ["report", "report_L10"]
    assert priority.LEVELS[0] == 10 and priority.LEVELS[-1] == 1


def test_the_consumer_and_pending_count_are_read_from_both_ack_subject_forms() -> None:
    short = parse_ack("$JS.ACK.FN.report_L10.1.4.1.1795657393804182762.7")
    assert (short.consumer, short.pending) == ("report_L10", 7)
    long = parse_ack("$JS.ACK.hub.ACCHASH.FN.report.1.4.1.1795657393804182762.0.token")
    assert (long.consumer, long.pending) == ("report", 0)
    with pytest.raises(ValueError):
        parse_ack("_INBOX.abc")
