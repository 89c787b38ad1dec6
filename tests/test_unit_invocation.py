"""Invocation.from_msg: what a delivered message's ack subject and headers say, without a server."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from runtime.invocation import Invocation
from runtime.wire import MAX_CALL_ID, call_id_for, hashed

# $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>
SHORT_ACK = "$JS.ACK.FN.greet.2.17.5.1714566896123456789.0"
# The newer form: domain (or "_") and account hash in front, a random token at the end.
LONG_ACK = "$JS.ACK._.ACCHASH.FN.greet.3.42.9.1714566896123456789.4.RaNd0m"
LONG_ACK_NO_RANDOM = "$JS.ACK.hub.ACCHASH.FN.greet.1.7.1.1714566896123456789.0"


def delivered(reply: str = SHORT_ACK, headers: dict[str, str] | None = None, data: bytes = b"{}") -> Msg:
    return Msg(_client=NATS(), subject="fn.invoke.greet", reply=reply, data=data, headers=headers)


def test_short_ack_subject_gives_stream_sequence_and_delivery_count() -> None:
    inv = Invocation.from_msg(delivered(SHORT_ACK), "greet")
    assert (inv.function, inv.stream, inv.stream_seq, inv.delivered) == ("greet", "FN", 17, 2)


@pytest.mark.parametrize(("reply", "seq", "deliveries"), [(LONG_ACK, 42, 3), (LONG_ACK_NO_RANDOM, 7, 1)])
def test_long_ack_subject_with_domain_and_account_hash_is_read_past_them(reply: str, seq: int,
                                                                         deliveries: int) -> None:
    inv = Invocation.from_msg(delivered(reply), "greet")
    assert (inv.stream, inv.stream_seq, inv.delivered) == ("FN", seq, deliveries)


def test_call_id_header_wins_over_message_id() -> None:
    inv = Invocation.from_msg(delivered(headers={"Fn-Call-Id": "call-1", "Nats-Msg-Id": "msg-1"}), "greet")
    assert inv.call_id == "call-1"


def test_message_id_is_the_call_id_when_there_is_no_call_id_header() -> None:
    inv = Invocation.from_msg(delivered(headers={"Nats-Msg-Id": "msg-1"}), "greet")
    assert inv.call_id == "msg-1"


def test_empty_call_id_header_falls_back_to_message_id() -> None:
    inv = Invocation.from_msg(delivered(headers={"Fn-Call-Id": "", "Nats-Msg-Id": "msg-1"}), "greet")
    assert inv.call_id == "msg-1"


@pytest.mark.parametrize("headers", [None, {}, {"Content-Type": "application/json"}])
def test_message_without_ids_gets_a_call_id_from_stream_and_sequence(headers: dict[str, str] | None) -> None:
    inv = Invocation.from_msg(delivered(SHORT_ACK, headers), "greet")
    assert inv.call_id == "fn-17"


def test_call_id_fallback_uses_the_sequence_of_the_long_ack_form() -> None:
    assert Invocation.from_msg(delivered(LONG_ACK), "greet").call_id == "fn-42"


def test_a_5000_character_call_id_becomes_a_digest() -> None:
    raw = "x" * 5000
    inv = Invocation.from_msg(delivered(headers={"Fn-Call-Id": raw}), "greet")
    assert inv.call_id == hashed(raw) == call_id_for(raw)
    assert inv.call_id.startswith("h_") and len(inv.call_id) == 42


def test_a_call_id_of_the_longest_allowed_length_is_kept() -> None:
    raw = "y" * MAX_CALL_ID
    assert Invocation.from_msg(delivered(headers={"Fn-Call-Id": raw}), "greet").call_id == raw


def test_a_long_message_id_becomes_a_digest_too() -> None:
    raw = "m" * (MAX_CALL_ID + 1)
    assert Invocation.from_msg(delivered(headers={"Nats-Msg-Id": raw}), "greet").call_id == hashed(raw)


def test_a_call_id_with_control_characters_becomes_a_digest() -> None:
    raw = "a\r\nInjected: yes"
    assert Invocation.from_msg(delivered(headers={"Fn-Call-Id": raw}), "greet").call_id == hashed(raw)


@pytest.mark.parametrize("reply", [
    "",                                   # a core message, not a JetStream delivery
    "_INBOX.abc",                         # too few tokens
    "$JS.ACK.FN.greet.two.17.5.1.0",      # delivery count is not a number
    "$JS.ACK.FN.greet.2.seq.5.1.0",       # stream sequence is not a number
    "$JS.ACK.a.b.FN.greet.2",             # long form cut short
])
def test_a_malformed_reply_subject_raises(reply: str) -> None:
    with pytest.raises((ValueError, IndexError)):
        Invocation.from_msg(delivered(reply), "greet")


def test_reply_to_and_content_type_come_from_the_headers() -> None:
    inv = Invocation.from_msg(delivered(headers={"Fn-Reply-To": "_INBOX.x", "Content-Type": "application/msgpack"}),
                              "greet")
    assert inv.reply_to == "_INBOX.x"
    assert inv.content_type == "application/msgpack"


def test_an_empty_reply_to_header_means_no_reply() -> None:
    inv = Invocation.from_msg(delivered(headers={"Fn-Reply-To": ""}), "greet")
    assert inv.reply_to is None and inv.content_type is None


def test_the_invocation_keeps_the_message_and_starts_not_timed_out() -> None:
    msg = delivered()
    inv = Invocation.from_msg(msg, "greet")
    assert inv.msg is msg and inv.headers == {} and not inv.timed_out
