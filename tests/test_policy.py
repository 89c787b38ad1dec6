"""The outcome policy on its own: every decision the executor carries out, in milliseconds."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from runtime.errors import (
    FunctionError,
    InvalidInput,
    InvocationTimeout,
    Reject,
    Rejected,
    ResultTooLarge,
    Retry,
)
from runtime.manifest import FunctionManifest
from runtime.policy import (
    HEADERS_AT_MOST,
    Ack,
    DeadLetter,
    Overran,
    RetryAfter,
    Undecodable,
    decide,
    encode_result,
    success_headers,
)
from runtime.wire import MAX_CALL_ID, WireLimits, header_size

MANIFEST = FunctionManifest(name="f", handler="m:f", timeout=2.0,
                            retry={"max_deliver": 4, "backoff": [0.5, 2.0]})  # type: ignore[arg-type]


class Person(BaseModel):
    name: str
    age: int = 0


def validation_error(data: Any) -> ValidationError:
    try:
        Person.model_validate(data)
    except ValidationError as exc:
        return exc
    raise AssertionError("expected a validation error")


def test_a_result_is_acked() -> None:
    assert decide(None, 1, MANIFEST) == Ack()
    assert decide(None, 4, MANIFEST) == Ack(), "even on the last attempt"


@pytest.mark.parametrize("attempt,delay", [(1, 0.5), (2, 2.0), (3, 2.0)])
def test_an_exception_is_retried_after_the_backoff_of_the_next_attempt(attempt: int, delay: float) -> None:
    decision = decide(ValueError("boom"), attempt, MANIFEST)
    assert isinstance(decision, RetryAfter) and decision.delay == delay
    assert isinstance(decision.error, FunctionError)
    assert decision.error.type == "ValueError" and decision.error.message == "boom"


def test_an_exception_on_the_last_attempt_is_dead_lettered_as_max_deliver() -> None:
    decision = decide(ConnectionError("down"), 4, MANIFEST)
    assert isinstance(decision, DeadLetter) and decision.reason == "max_deliver"
    assert decision.error.described == "ConnectionError: down"
    later = decide(ConnectionError("down"), 9, MANIFEST)
    assert isinstance(later, DeadLetter) and later.reason == "max_deliver", "past the last attempt too"


def test_invalid_input_is_dead_lettered_at_once_with_the_validation_message() -> None:
    decision = decide(Undecodable(validation_error({"age": "old"})), 1, MANIFEST)
    assert isinstance(decision, DeadLetter) and decision.reason == "invalid_input"
    assert isinstance(decision.error, InvalidInput) and decision.error.code == 400
    assert decision.error.type == "InvalidInput"
    assert decision.error.message == "name: Field required; age: Input should be a valid integer, unable to parse " \
                                     "string as an integer"


def test_input_that_is_not_json_names_the_input() -> None:
    try:
        Person.model_validate_json(b"{not json")
    except ValidationError as exc:
        decision = decide(Undecodable(exc), 1, MANIFEST)
    assert isinstance(decision, DeadLetter) and decision.error.message.startswith("input: Invalid JSON")


def test_input_that_fails_below_pydantic_is_described() -> None:
    decision = decide(Undecodable(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")), 1, MANIFEST)
    assert isinstance(decision, DeadLetter) and decision.reason == "invalid_input"
    assert decision.error.type == "InvalidInput"
    assert decision.error.message.startswith("UnicodeDecodeError: 'utf-8' codec can't decode")


def test_retry_overrides_the_backoff_and_still_counts_as_an_attempt() -> None:
    decision = decide(Retry(delay=7, reason="rate limited"), 1, MANIFEST)
    assert isinstance(decision, RetryAfter) and decision.delay == 7.0
    assert decision.error.type == "Retry" and decision.error.message == "rate limited"
    last = decide(Retry(delay=7), 4, MANIFEST)
    assert isinstance(last, DeadLetter) and last.reason == "max_deliver"
    zero = decide(Retry(delay=-3), 1, MANIFEST)
    assert isinstance(zero, RetryAfter) and zero.delay == 0.0, "a negative delay is no delay"


def test_reject_is_dead_lettered_at_once_whatever_the_attempt() -> None:
    decision = decide(Reject("not today"), 1, MANIFEST)
    assert isinstance(decision, DeadLetter) and decision.reason == "rejected"
    assert isinstance(decision.error, Rejected) and decision.error.code == 422
    assert decision.error.message == "not today" and decision.error.type == "Rejected"


def test_a_timeout_is_retried_then_dead_lettered_as_timeout() -> None:
    first = decide(Overran(2.0), 1, MANIFEST)
    assert isinstance(first, RetryAfter) and first.delay == 0.5
    assert isinstance(first.error, InvocationTimeout) and first.error.code == 504
    assert first.error.message == "attempt exceeded the timeout of 2s"
    last = decide(Overran(2.0), 4, MANIFEST)
    assert isinstance(last, DeadLetter) and last.reason == "timeout"


def test_a_late_return_past_the_deadline_is_a_timeout_that_says_why() -> None:
    decision = decide(Overran(2.0, took=3.26), 4, MANIFEST)
    assert isinstance(decision, DeadLetter) and decision.reason == "timeout"
    assert decision.error.message.startswith("attempt took 3.3s, past the timeout of 2s, without yielding")


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()])
def test_base_exceptions_are_failed_attempts_like_any_other(exc: BaseException) -> None:
    decision = decide(exc, 1, MANIFEST)
    assert isinstance(decision, RetryAfter) and decision.delay == 0.5
    assert decision.error.type == type(exc).__name__
    last = decide(exc, 4, MANIFEST)
    assert isinstance(last, DeadLetter) and last.reason == "max_deliver"


def test_the_runtimes_own_errors_keep_their_type() -> None:
    too_large = ResultTooLarge("the result is 2000 bytes; at most 1000 fit")
    decision = decide(too_large, 1, MANIFEST)
    assert isinstance(decision, RetryAfter) and decision.error is too_large
    last = decide(too_large, 4, MANIFEST)
    assert isinstance(last, DeadLetter) and last.reason == "max_deliver" and last.error.type == "ResultTooLarge"


def test_a_single_attempt_manifest_never_retries() -> None:
    once = FunctionManifest(name="f", handler="m:f", retry={"max_deliver": 1})  # type: ignore[arg-type]
    for outcome in (ValueError("x"), Retry(1), Overran(1.0), SystemExit(1)):
        assert isinstance(decide(outcome, 1, once), DeadLetter), outcome


# ------------------------------------------------------------------ results that cannot be sent


def test_encode_result_gives_the_body_the_runtime_sends() -> None:
    limits = WireLimits(1024)
    assert encode_result(Person(name="Ada"), MANIFEST, "c-1", limits) == b'{"name":"Ada","age":0}'
    assert encode_result(b"\x00raw", MANIFEST, "c-1", limits) == b"\x00raw"
    msgpack = MANIFEST.model_copy(update={"encoding": "msgpack"})
    assert encode_result({"a": 1}, msgpack, "c-1", limits) == b"\x81\xa1a\x01"


@pytest.mark.parametrize("value,words", [({"when": object()}, "cannot be encoded as json"),
                                         ({"x": math.nan}, "NaN")])
def test_a_result_that_cannot_be_encoded_fails_the_attempt_with_the_encoders_message(value: Any, words: str) -> None:
    with pytest.raises(FunctionError, match=words) as caught:
        encode_result(value, MANIFEST, "c-1", WireLimits(1024))
    decision = decide(caught.value, 1, MANIFEST)
    assert isinstance(decision, RetryAfter) and decision.delay == 0.5


def test_a_result_that_does_not_fit_beside_its_headers_is_too_large() -> None:
    limits = WireLimits(1000)
    # What a stored result carries besides its body: call id, content type, the write-once header.
    room = limits.room_for_body({"Fn-Call-Id": "c-1", "Content-Type": "application/json",
                                 "Nats-Expected-Last-Subject-Sequence": "18446744073709551615"})
    assert encode_result(b"r" * room, MANIFEST, "c-1", limits) == b"r" * room
    with pytest.raises(ResultTooLarge, match=f"at most {room} fit in a message") as caught:
        encode_result(b"r" * (room + 1), MANIFEST, "c-1", limits)
    assert caught.value.type == "ResultTooLarge" and caught.value.call_id == "c-1"


def test_results_near_the_limit_are_measured_with_the_longest_call_id() -> None:
    call_id = "é" * MAX_CALL_ID   # the longest id the runtime uses as it is, two bytes a character
    limits = WireLimits(1_000_000)
    headers = success_headers(call_id, MANIFEST)
    assert header_size(headers) < HEADERS_AT_MOST
    room = limits.room_for_body(headers)
    assert encode_result(b"r" * room, MANIFEST, call_id, limits) == b"r" * room
    with pytest.raises(ResultTooLarge):
        encode_result(b"r" * (room + 1), MANIFEST, call_id, limits)
