"""The pull window: how many messages a feed asks for, and what status messages change; no server."""

from __future__ import annotations

import logging

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from runtime.consumer import PullFeed, StatusEffect, read_status, wanted

# ------------------------------------------------------------------ free slots and batching


@pytest.mark.parametrize("slots", [1, 4, 100])
def test_an_idle_feed_asks_for_every_slot(slots: int) -> None:
    assert wanted(slots, held=0, outstanding=0) == slots


def test_a_feed_with_nothing_outstanding_asks_even_for_one_free_slot() -> None:
    assert wanted(8, held=7, outstanding=0) == 1


@pytest.mark.parametrize(("held", "outstanding"), [(4, 0), (0, 4), (2, 2), (3, 1)])
def test_a_full_feed_asks_for_nothing(held: int, outstanding: int) -> None:
    assert wanted(4, held=held, outstanding=outstanding) == 0


@pytest.mark.parametrize(("held", "outstanding"), [(6, 0), (3, 3), (0, 9)])
def test_a_feed_shrunk_below_what_it_holds_asks_for_nothing(held: int, outstanding: int) -> None:
    # After a resize down, held + outstanding can exceed the slots for a while.
    assert wanted(2, held=held, outstanding=outstanding) == 0


def test_with_requests_outstanding_a_feed_waits_for_a_quarter_of_its_slots() -> None:
    # 8 slots: 2 is the batch threshold while a request is still open.
    assert wanted(8, held=5, outstanding=2) == 0   # 1 free
    assert wanted(8, held=4, outstanding=2) == 2   # 2 free: ask
    assert wanted(8, held=1, outstanding=2) == 5


def test_the_batch_threshold_scales_with_the_slots() -> None:
    assert wanted(100, held=76, outstanding=1) == 0    # 23 free < 25
    assert wanted(100, held=74, outstanding=1) == 25   # 25 free


@pytest.mark.parametrize("slots", [2, 3])
def test_small_feeds_ask_for_a_single_free_slot_even_with_requests_outstanding(slots: int) -> None:
    assert wanted(slots, held=slots - 2, outstanding=1) == 1


# ------------------------------------------------------------------ status messages


def test_an_idle_heartbeat_changes_nothing_and_asks_for_nothing() -> None:
    assert read_status({"Status": "100", "Description": "Idle Heartbeat"}, 5) == StatusEffect(5, pull=False)


@pytest.mark.parametrize(("status", "description"), [
    ("404", "No Messages"),
    ("408", "Request Timeout"),
    ("409", "Exceeded MaxWaiting"),
])
def test_an_ended_request_forgets_the_messages_it_did_not_deliver(status: str, description: str) -> None:
    headers = {"Status": status, "Description": description, "Nats-Pending-Messages": "3",
               "Nats-Pending-Bytes": "0"}
    assert read_status(headers, 5) == StatusEffect(2, pull=True)


@pytest.mark.parametrize("status", ["404", "408", "409"])
def test_an_ended_request_without_a_pending_count_forgets_everything_outstanding(status: str) -> None:
    assert read_status({"Status": status}, 7) == StatusEffect(0, pull=True)


def test_outstanding_never_goes_below_zero() -> None:
    headers = {"Status": "408", "Description": "Request Timeout", "Nats-Pending-Messages": "10"}
    assert read_status(headers, 4) == StatusEffect(0, pull=True)


def test_a_deleted_consumer_stops_the_asking() -> None:
    headers = {"Status": "409", "Description": "Consumer Deleted", "Nats-Pending-Messages": "2"}
    assert read_status(headers, 6) == StatusEffect(4, pull=False, consumer_deleted=True)


def test_a_consumer_deleted_description_on_another_status_is_not_a_deletion() -> None:
    effect = read_status({"Status": "408", "Description": "Consumer Deleted"}, 3)
    assert effect.pull and not effect.consumer_deleted


def test_a_request_ends_then_the_window_reopens() -> None:
    # 8 slots, 6 held, 2 asked for; a request expires having delivered none of its 2.
    outstanding = read_status({"Status": "408", "Nats-Pending-Messages": "2"}, 2).outstanding
    assert outstanding == 0
    assert wanted(8, held=6, outstanding=outstanding) == 2


# ------------------------------------------------------------------ the feed applies them


def feed(slots: int = 4) -> tuple[PullFeed, list[Msg]]:
    sunk: list[Msg] = []
    return PullFeed(NATS(), "FN", "greet", slots, sunk.append), sunk


def inbox_msg(reply: str = "", headers: dict[str, str] | None = None) -> Msg:
    return Msg(_client=NATS(), subject="_INBOX.feed", reply=reply, headers=headers)


async def test_a_delivered_message_is_held_and_no_longer_outstanding() -> None:
    pull, sunk = feed()
    pull.outstanding = 4
    msg = inbox_msg(reply="$JS.ACK.FN.greet.1.1.1.1714566896123456789.3")
    pull._on_msg(msg, pull._round)
    assert sunk == [msg]
    assert (pull.held, pull.outstanding, pull.delivered) == (1, 3, 1)
    pull.release()
    assert pull.held == 0


async def test_the_feed_takes_the_outstanding_count_from_a_status_message() -> None:
    pull, sunk = feed()
    pull.outstanding = 4
    pull._on_msg(inbox_msg(headers={"Status": "408", "Nats-Pending-Messages": "1"}), pull._round)
    assert pull.outstanding == 3 and sunk == [] and pull.held == 0


async def test_the_feed_logs_a_deleted_consumer(caplog: pytest.LogCaptureFixture) -> None:
    pull, _ = feed()
    with caplog.at_level(logging.WARNING, logger="runtime.consumer"):
        pull._on_msg(inbox_msg(headers={"Status": "409", "Description": "Consumer Deleted"}), pull._round)
    assert "consumer greet was deleted" in caplog.text


async def test_what_a_request_of_an_earlier_round_brings_is_taken_only_while_there_is_room() -> None:
    pull, sunk = feed(slots=2)
    pull._round = 2           # renewed: requests of round 1 were given up
    pull.outstanding = 1      # asked for one in round 2
    early = inbox_msg(reply="$JS.ACK.FN.greet.1.1.1.1714566896123456789.3")
    pull._on_msg(early, 1)    # room for it: held, and round 2's request still counts as out
    assert sunk == [early] and (pull.held, pull.outstanding) == (1, 1)
    pull._on_msg(inbox_msg(reply="$JS.ACK.FN.greet.1.1.2.1714566896123456789.3"), 1)
    assert sunk == [early] and pull.held == 1   # none left: handed back
    pull._on_msg(inbox_msg(headers={"Status": "408", "Nats-Pending-Messages": "1"}), 1)
    assert pull.outstanding == 1   # the end of a request given up changes nothing


async def test_only_the_requests_of_the_current_round_count_as_alive() -> None:
    pull, _ = feed(slots=2)
    pull._round = 2
    pull._last_seen = 0.0
    pull._on_msg(inbox_msg(headers={"Status": "100", "Description": "Idle Heartbeat"}), 1)
    assert pull._last_seen == 0.0   # an old request's heartbeat says nothing of the one out now
    pull._on_msg(inbox_msg(headers={"Status": "100", "Description": "Idle Heartbeat"}), 2)
    assert pull._last_seen > 0.0
