"""Result keys and responses, without a server."""

from __future__ import annotations

import base64
import json

import pytest

from runtime.errors import FunctionError, InvalidInput, InvocationError, Rejected
from runtime.results import Response, result_key, result_subject
from runtime.wire import MAX_CALL_ID, call_id_for


def decoded(key: str) -> str:
    body = key.removeprefix("b64_")
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()


# ------------------------------------------------------------------ keys


@pytest.mark.parametrize("call_id", ["abc", "order-42", "A_b=c", "fn-17", "0", "h_" + "0" * 40, "order.42",
                                     "alice.x-1"])
def test_ids_that_are_valid_keys_are_used_as_they_are(call_id: str) -> None:
    assert result_key(call_id) == call_id


@pytest.mark.parametrize("call_id", ["order..42", ".a", "a.", "a b", "a/b", "é", "a*", "a>", "$x", "a:b", "#1"])
def test_ids_that_are_not_valid_keys_are_base64url_encoded(call_id: str) -> None:
    key = result_key(call_id)
    assert key.startswith("b64_") and "=" not in key
    assert decoded(key) == call_id


def test_an_id_that_looks_encoded_is_encoded_again_so_it_cannot_collide() -> None:
    encoded = result_key("order 42")
    assert result_key(encoded) != encoded
    assert decoded(result_key(encoded)) == encoded


def test_the_b64_prefix_alone_is_encoded() -> None:
    assert result_key("b64_") == "b64_" + base64.urlsafe_b64encode(b"b64_").decode().rstrip("=")


def test_distinct_ids_get_distinct_keys() -> None:
    ids = ["a.b", "a_b", "b64_YS5i", "YS5i", "a-b", "a b", "h_" + "1" * 40, "x" * 300, "y" * 300]
    assert len({result_key(i) for i in ids}) == len(ids)


@pytest.mark.parametrize("call_id", ["x" * 5000, "y" * (MAX_CALL_ID + 1), "line\nbreak", "nul\x00"])
def test_an_id_the_runtime_replaces_by_a_digest_maps_to_that_digest(call_id: str) -> None:
    digest = call_id_for(call_id)
    assert digest is not None and digest.startswith("h_")
    # Asking by the original id or by the id the runtime used finds the same stored outcome.
    assert result_key(call_id) == result_key(digest) == digest


def test_a_lone_surrogate_id_gets_a_key_without_crashing() -> None:
    key = result_key("\udc80")
    assert key == call_id_for("\udc80")


def test_result_subject_is_the_key_in_the_results_bucket() -> None:
    assert result_subject("abc") == "$KV.fn_results.abc"
    assert result_subject("a.b") == "$KV.fn_results." + result_key("a.b")


# ------------------------------------------------------------------ responses


def test_a_json_success_names_its_content_type() -> None:
    resp = Response.success("c1", b'{"ok": true}', "application/json")
    assert resp.headers == {"Fn-Call-Id": "c1", "Content-Type": "application/json"}
    assert resp.error is None and resp.value() == {"ok": True}


def test_a_msgpack_success_names_its_content_type() -> None:
    resp = Response.success("c1", b"\x81\xa2ok\xc3", "application/msgpack")
    assert resp.headers["Content-Type"] == "application/msgpack"
    assert resp.value() == {"ok": True}


@pytest.mark.parametrize(("error", "code"), [
    (FunctionError("boom", type="ValueError"), 500),
    (InvalidInput("age must be a number"), 400),
    (Rejected("not today"), 422),
])
def test_a_failure_round_trips_to_the_same_typed_error(error: InvocationError, code: int) -> None:
    resp = Response.failure("c1", error)
    assert resp.headers["Nats-Service-Error-Code"] == str(code)
    assert json.loads(resp.body) == {"error": {"type": error.type, "message": error.message, "code": code}}
    with pytest.raises(type(error)) as raised:
        resp.value()
    assert (raised.value.type, raised.value.message, raised.value.call_id) == (error.type, error.message, "c1")


def test_a_failure_header_is_one_line_of_at_most_1024_characters() -> None:
    resp = Response.failure("c1", FunctionError("line one\r\nline two\t" + "z" * 2000))
    header = resp.headers["Nats-Service-Error"]
    assert header.startswith("FunctionError: line one line two z") and len(header) == 1024 and "\n" not in header
    # The body keeps the whole message.
    assert json.loads(resp.body)["error"]["message"].startswith("line one\r\nline two")


def test_a_failure_with_an_empty_message_puts_its_type_in_the_header() -> None:
    assert Response.failure("c1", FunctionError("", type="KeyError")).headers["Nats-Service-Error"] == "KeyError"


def test_a_failure_with_a_body_that_is_not_an_object_uses_the_headers() -> None:
    resp = Response("c1", b"[1, 2]", {"Nats-Service-Error-Code": "400", "Nats-Service-Error": "bad input"})
    err = resp.error
    assert isinstance(err, InvalidInput) and err.message == "bad input"


def test_a_stored_response_keeps_only_the_reply_headers() -> None:
    stored = Response.stored("c1", b"{}", {
        "Fn-Call-Id": "c1", "Nats-Expected-Last-Subject-Sequence": "0", "Nats-Stream": "KV_fn_results",
        "Nats-Subject": "$KV.fn_results.c1", "Nats-Sequence": "7", "Nats-Time-Stamp": "2026-01-01T00:00:00Z"})
    # Outcomes stored before successes named their content type are JSON.
    assert stored.headers == {"Fn-Call-Id": "c1", "Content-Type": "application/json"}
