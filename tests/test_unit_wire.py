"""What the server accepts and which reply subjects the runtime answers on, without a server."""

from __future__ import annotations

import pytest
from nats.protocol.command import hpub_cmd

from runtime.wire import (
    HASHED_PREFIX,
    MAX_CALL_ID,
    MAX_CONTROL_LINE,
    MAX_SUBJECT,
    ReplyPolicy,
    WireLimits,
    call_id_for,
    clip,
    hashed,
    header_size,
    subject_problem,
)

# ------------------------------------------------------------------ sizes


def wire_headers(headers: dict[str, str]) -> bytes:
    """The header block as NATS puts it on the wire."""
    return b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"


@pytest.mark.parametrize("headers", [
    {"Fn-Call-Id": "abc"},
    {"Fn-Call-Id": "abc", "Content-Type": "application/msgpack", "Nats-Msg-Id": "m-1"},
    {"Fn-Error": "naïve café ✓"},
])
def test_header_size_is_the_size_of_the_header_block_on_the_wire(headers: dict[str, str]) -> None:
    assert header_size(headers) == len(wire_headers(headers))


@pytest.mark.parametrize("headers", [None, {}])
def test_no_headers_take_no_room(headers: dict[str, str] | None) -> None:
    assert header_size(headers) == 0


def test_a_body_of_exactly_max_payload_fits_and_one_byte_more_does_not() -> None:
    limits = WireLimits(max_payload=1024)
    assert limits.fits("fn.invoke.greet", b"x" * 1024)
    assert not limits.fits("fn.invoke.greet", b"x" * 1025)


def test_headers_count_against_max_payload() -> None:
    limits = WireLimits(max_payload=1024)
    headers = {"Fn-Call-Id": "c" * 200}
    room = limits.room_for_body(headers)
    assert room == 1024 - len(wire_headers(headers))
    assert limits.fits("s", b"x" * room, headers)
    assert not limits.fits("s", b"x" * (room + 1), headers)


def test_room_for_body_without_headers_is_max_payload() -> None:
    assert WireLimits(max_payload=4096).room_for_body() == 4096


def longest_fitting_subjects(reply_share: int) -> tuple[str, str]:
    limits = WireLimits(max_payload=1 << 20)
    total = MAX_CONTROL_LINE
    while not limits.fits("s" * (total - reply_share), b"", reply="r" * reply_share):
        total -= 1
    return "s" * (total - reply_share), "r" * reply_share


@pytest.mark.parametrize("reply_share", [0, 30, 2000])
def test_a_protocol_line_that_fits_is_within_the_servers_control_line_limit(reply_share: int) -> None:
    subject, reply = longest_fitting_subjects(reply_share)
    limits = WireLimits(max_payload=1 << 20)
    headers = {"Fn-Call-Id": "c" * MAX_CALL_ID}
    body = b"x" * limits.room_for_body(headers)
    assert limits.fits(subject, body, headers, reply)
    # The line nats-py sends for the largest such message, with the widest size fields.
    line = hpub_cmd(subject, reply, wire_headers(headers), body).split(b"\r\n", 1)[0] + b"\r\n"
    assert len(line) <= MAX_CONTROL_LINE
    assert not limits.fits(subject + "s", b"", reply=reply)


def test_subject_and_reply_share_the_control_line() -> None:
    limits = WireLimits(max_payload=1 << 20)
    assert limits.fits("s" * 2000, b"", reply="r" * 2000)
    assert not limits.fits("s" * 2100, b"", reply="r" * 2000)


# ------------------------------------------------------------------ subjects


@pytest.mark.parametrize("subject", ["_INBOX.abc", "reply", "a.b.c", "fn.results.x-1", "a.b*", "a>b", "ü.ñ"])
def test_plain_subjects_have_no_problem(subject: str) -> None:
    assert subject_problem(subject) is None


@pytest.mark.parametrize(("subject", "problem"), [
    ("", "it is empty"),
    ("a b", "whitespace"),
    ("a\tb", "whitespace"),
    ("a\r\nPUB x 1", "whitespace"),
    ("a\x00b", "control characters"),
    ("a\x7fb", "control characters"),
    ("a..b", "empty token"),
    (".a", "empty token"),
    ("a.", "empty token"),
    (".", "empty token"),
    ("a.*", "wildcard"),
    ("*", "wildcard"),
    ("a.>", "wildcard"),
    ("a.*.b", "wildcard"),
    ("x" * (MAX_SUBJECT + 1), f"longer than {MAX_SUBJECT}"),
])
def test_subjects_the_server_would_refuse_or_misread_are_named(subject: str, problem: str) -> None:
    found = subject_problem(subject)
    assert found is not None and problem in found


def test_a_subject_of_the_longest_allowed_length_is_fine() -> None:
    assert subject_problem("x" * MAX_SUBJECT) is None


# ------------------------------------------------------------------ reply policy


@pytest.mark.parametrize("subject", ["$JS.API.STREAM.PURGE.FN", "$KV.fn_results.x", "$SYS.REQ.SERVER.PING", "$x"])
def test_subjects_in_dollar_space_are_never_answered(subject: str) -> None:
    problem = ReplyPolicy().problem(subject)
    assert problem is not None and "starts with '$'" in problem


@pytest.mark.parametrize("subject", ["_INBOX.abc.1", "my.replies.7", "x"])
def test_without_prefixes_any_plain_subject_is_answered(subject: str) -> None:
    assert ReplyPolicy().problem(subject) is None


def test_with_prefixes_only_subjects_under_them_are_answered() -> None:
    policy = ReplyPolicy(["_INBOX.", "replies."])
    assert policy.problem("_INBOX.abc") is None
    assert policy.problem("replies.7") is None
    for subject in ("other.abc", "_INBOXES.abc", "replies", "x._INBOX.abc"):
        problem = policy.problem(subject)
        assert problem is not None and "_INBOX., replies." in problem


def test_a_prefix_does_not_let_a_dollar_subject_through() -> None:
    problem = ReplyPolicy(["$JS."]).problem("$JS.API.STREAM.PURGE.FN")
    assert problem is not None and "'$'" in problem


@pytest.mark.parametrize(("subject", "problem"), [
    ("_INBOX.*", "wildcard"), ("_INBOX..x", "empty token"), ("_INBOX. x", "whitespace"), ("", "empty"),
])
def test_malformed_reply_subjects_are_refused_before_the_prefix_check(subject: str, problem: str) -> None:
    found = ReplyPolicy(["_INBOX."]).problem(subject)
    assert found is not None and problem in found


# ------------------------------------------------------------------ call ids


@pytest.mark.parametrize("raw", [None, ""])
def test_no_call_id_gives_none(raw: str | None) -> None:
    assert call_id_for(raw) is None


@pytest.mark.parametrize("raw", ["abc", "order.42", "café ✓", "a b", "x" * MAX_CALL_ID])
def test_usable_call_ids_are_kept(raw: str) -> None:
    assert call_id_for(raw) == raw


@pytest.mark.parametrize("raw", ["x" * (MAX_CALL_ID + 1), "x" * 5000, "a\nb", "a\rb", "\x00", "tab\t", "\udc80"])
def test_unusable_call_ids_become_a_stable_digest(raw: str) -> None:
    digest = call_id_for(raw)
    assert digest == hashed(raw) == call_id_for(raw)
    assert digest is not None and digest.startswith(HASHED_PREFIX) and len(digest) == 42
    assert call_id_for(digest) == digest  # a digest is a usable id itself


def test_different_long_ids_get_different_digests() -> None:
    assert call_id_for("x" * 5000) != call_id_for("x" * 4999 + "y")


def test_clip_flattens_and_shortens_with_an_ellipsis() -> None:
    assert clip("a\n b\t c", 10) == "a b c"
    assert clip("abcdefghij", 10) == "abcdefghij"
    assert clip("abcdefghijk", 10) == "abcdefghi…"
