"""Advisory parsing and the caller's error for a dead letter, without a server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from runtime.deadletter import failure_of
from runtime.errors import FunctionError, InvalidInput, InvocationTimeout, Rejected
from runtime.mover import Advisory, _milliseconds

# The advisory types as nats-server spells them.
MAX_DELIVERIES = "io.nats.jetstream.advisory.v1.max_deliver"
TERMINATED = "io.nats.jetstream.advisory.v1.terminated"


def advisory(**fields: Any) -> bytes:
    """An advisory as nats-server publishes it for a message of ``FN``."""
    raw: dict[str, Any] = {"type": MAX_DELIVERIES, "id": "x2hT", "timestamp": "2024-05-01T12:34:56.123456789Z",
                           "stream": "FN", "consumer": "greet", "consumer_seq": 9, "stream_seq": 17,
                           "deliveries": 3, "domain": "hub"}
    raw.update(fields)
    return json.dumps({k: v for k, v in raw.items() if v is not None}).encode()


def test_max_deliveries_advisory_names_function_sequence_and_deliveries() -> None:
    parsed = Advisory.parse(advisory())
    assert parsed == Advisory(type=MAX_DELIVERIES, function="greet", stream_seq=17, deliveries=3, reason="",
                              timestamp="2024-05-01T12:34:56.123Z")
    assert parsed.dead_letter_reason == "max_deliver"


@pytest.mark.parametrize("reason", ["invalid_input", "rejected", "timeout"])
def test_terminated_advisory_keeps_a_known_reason(reason: str) -> None:
    parsed = Advisory.parse(advisory(type=TERMINATED, reason=reason, deliveries=1))
    assert parsed is not None
    assert (parsed.type, parsed.reason, parsed.deliveries) == (TERMINATED, reason, 1)
    assert parsed.dead_letter_reason == reason


@pytest.mark.parametrize("reason", [None, "", "because I said so", "max_deliver "])
def test_terminated_advisory_with_another_reason_counts_as_rejected(reason: str | None) -> None:
    parsed = Advisory.parse(advisory(type=TERMINATED, reason=reason))
    assert parsed is not None and parsed.dead_letter_reason == "rejected"


@pytest.mark.parametrize("deliveries", [None, 0])
def test_missing_delivery_count_means_one(deliveries: int | None) -> None:
    parsed = Advisory.parse(advisory(deliveries=deliveries))
    assert parsed is not None and parsed.deliveries == 1


@pytest.mark.parametrize("type_", [
    "io.nats.jetstream.advisory.v1.nak",
    "io.nats.jetstream.advisory.v1.consumer_action",
    "io.nats.jetstream.metric.v1.consumer_ack",
    None,
])
def test_other_advisory_types_are_ignored(type_: str | None) -> None:
    assert Advisory.parse(advisory(type=type_)) is None


@pytest.mark.parametrize("stream", ["FN_DLQ", "KV_fn_results", "fn", None])
def test_advisories_of_other_streams_are_ignored(stream: str | None) -> None:
    assert Advisory.parse(advisory(stream=stream)) is None


@pytest.mark.parametrize("stream", ["FN_TRIGGERS", "PAYMENTS"])
def test_a_trigger_consumers_max_deliveries_advisory_names_function_and_trigger(stream: str) -> None:
    parsed = Advisory.parse(advisory(stream=stream, consumer="fn_payout_ON_payments-all"))
    assert parsed is not None
    assert (parsed.stream, parsed.function, parsed.trigger, parsed.stream_seq) == (stream, "payout", "payments-all", 17)


@pytest.mark.parametrize(("stream", "consumer", "type_"), [
    ("PAYMENTS", "billing", MAX_DELIVERIES),                          # the user's own consumer
    ("PAYMENTS", "fn_payout_ON_payments-all", TERMINATED),            # terminated: settled by a runtime
    ("FN_TRIGGERS", "fn_payout_ON_payments-all", TERMINATED),
    (None, "fn_payout_ON_payments-all", MAX_DELIVERIES),
])
def test_other_advisories_of_event_streams_are_ignored(stream: str | None, consumer: str, type_: str) -> None:
    assert Advisory.parse(advisory(stream=stream, consumer=consumer, type=type_)) is None


@pytest.mark.parametrize("data", [
    b"", b"{", b"not json", b"\xff\xfe", b"null", b"[]", b'"max_deliver"', b"17",
])
def test_data_that_is_not_a_json_object_is_ignored(data: bytes) -> None:
    assert Advisory.parse(data) is None


@pytest.mark.parametrize("fields", [
    {"consumer": None},
    {"stream_seq": None},
    {"stream_seq": "seventeen"},
    {"stream_seq": [17]},
    {"deliveries": "three"},
])
def test_an_advisory_missing_or_mangling_a_field_is_ignored(fields: dict[str, Any]) -> None:
    assert Advisory.parse(advisory(**fields)) is None


@pytest.mark.parametrize(("timestamp", "expected"), [
    ("2024-05-01T12:34:56.123456789Z", "2024-05-01T12:34:56.123Z"),
    ("2024-05-01T12:34:56.987Z", "2024-05-01T12:34:56.987Z"),
    ("2024-05-01T12:34:56.5Z", "2024-05-01T12:34:56.500Z"),
    ("2024-05-01T12:34:56Z", "2024-05-01T12:34:56.000Z"),
    ("2024-05-01T12:34:56.123+02:00", ""),
    ("2024-05-01 12:34:56Z", ""),
    ("yesterday", ""),
    ("", ""),
])
def test_timestamps_are_cut_to_milliseconds(timestamp: str, expected: str) -> None:
    assert _milliseconds(timestamp) == expected


def test_an_advisory_with_an_odd_timestamp_is_still_handled_without_one() -> None:
    parsed = Advisory.parse(advisory(timestamp="12 May"))
    assert parsed is not None and parsed.timestamp == ""


# ------------------------------------------------------------------ the caller's error for a dead letter


def test_a_failure_keeps_the_exception_type_and_message() -> None:
    err = failure_of("max_deliver", "ValueError: boom")
    assert isinstance(err, FunctionError) and (err.type, err.message) == ("ValueError", "boom")


@pytest.mark.parametrize(("reason", "error", "cls", "message"), [
    ("timeout", "InvocationTimeout: took longer than 1s", InvocationTimeout, "took longer than 1s"),
    ("max_deliver", "InvocationTimeout: took longer than 1s", InvocationTimeout, "took longer than 1s"),
    ("invalid_input", "ValidationError: age must be a number", InvalidInput, "age must be a number"),
    ("rejected", "Reject: not today", Rejected, "not today"),
    ("rejected", "no type here", Rejected, "no type here"),
])
def test_the_reason_picks_the_error_class(reason: str, error: str, cls: type, message: str) -> None:
    err = failure_of(reason, error)
    assert type(err) is cls and err.message == message


def test_a_lost_worker_is_reported_as_such() -> None:
    err = failure_of("max_deliver", "worker lost: the attempt ended without a result")
    assert isinstance(err, FunctionError) and err.type == "worker_lost"


def test_an_error_without_a_type_prefix_keeps_its_whole_text() -> None:
    err = failure_of("max_deliver", "it broke: badly")
    assert isinstance(err, FunctionError) and err.message == "it broke: badly" and err.type == FunctionError.kind
