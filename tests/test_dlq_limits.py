"""Dead letters at the server's limits: oversized letters, huge listings, messages no advisory covered.

Every test here runs against a nats-server started with ``max_payload: 8MB``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, SequenceInfo
from nats.js.errors import NotFoundError

from runtime import headers as H
from runtime.deadletter import (
    SHORT_ERROR_LENGTH,
    DeadLetterTooLarge,
    dead_letter_headers,
    decode_headers,
    encode_headers,
    fit_dead_letter,
    original_headers,
    write_dead_letter,
)
from runtime.dlq import DeadLetterScan, Listing, get_dead_letter, list_dead_letters, purge
from runtime.mover import ACK_WAIT, MOVER_CONSUMER, DeadLetterMover
from runtime.server import EmbeddedServer
from runtime.streams import (
    ADVISORY_SUBJECTS,
    DLQ_BODIES_BUCKET,
    DLQ_STREAM,
    EVENTS_STREAM,
    INVOKE_STREAM,
    dlq_stream_config,
    ensure_stream,
    events_stream_config,
    invoke_stream_config,
    provision_base,
)
from runtime.sweep import exhausted_up_to
from runtime.wire import header_size

from .conftest import ROOT, RuntimeFactory, collect, configured_server, eventually

MAX_PAYLOAD = 8 * 1024 * 1024
REALISTIC = {"Fn-Call-Id": "order-7f3a9c", "Fn-Reply-To": "_INBOX.k2v8Q7sTz1Xc0a9Lm3", "X-Trace": "trace-0042",
             "Content-Type": "application/json"}


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    """This module's server takes messages up to 8 MB, headers included."""
    async with configured_server(tmp_path, "max_payload: 8MB\n") as server:
        yield server


def letter_headers(seq: int, original: dict[str, str] | None = None, error: str = "InvalidInput: Invalid JSON",
                   reason: str = "invalid_input") -> dict[str, str]:
    return dead_letter_headers(dict(REALISTIC if original is None else original), function="greet",
                               subject="fn.invoke.greet", seq=seq, deliveries=1, reason=reason, error=error,
                               call_id=(original or REALISTIC).get("Fn-Call-Id"))


def wire_size(body: bytes, headers: dict[str, str]) -> int:
    return header_size(headers) + len(body)


# ------------------------------------------------------------------ sizing (pure)


def test_header_size_is_the_bytes_nats_py_sends() -> None:
    # nats-py strips names and values and turns line breaks in values into spaces.
    hdrs = {"A": "1", " Fn-Error ": " bad\r\nline ", "Nats-Msg-Id": "dlq:7"}
    assert encode_headers(hdrs) == b"NATS/1.0\r\nA: 1\r\nFn-Error: bad  line\r\nNats-Msg-Id: dlq:7\r\n\r\n"
    assert header_size(hdrs) == len(encode_headers(hdrs)) and header_size({}) == 0
    assert decode_headers(encode_headers(hdrs)) == {"A": "1", "Fn-Error": "bad  line", "Nats-Msg-Id": "dlq:7"}


def test_a_letter_that_fits_is_stored_as_it_is() -> None:
    hdrs = letter_headers(5)
    fit = fit_dead_letter(b'{"n": 1}', hdrs, MAX_PAYLOAD)
    assert (fit.body, fit.headers, fit.ref, fit.dropped) == (b'{"n": 1}', hdrs, None, ())


def test_a_body_176_bytes_under_max_payload_is_referenced() -> None:
    body = b"{" * (MAX_PAYLOAD - 176)
    hdrs = letter_headers(12)
    assert wire_size(body, hdrs) > MAX_PAYLOAD, "the dead-letter headers push it over"
    fit = fit_dead_letter(body, hdrs, MAX_PAYLOAD)
    assert fit.body == b"" and fit.ref == "dlq:12" and fit.dropped == ()
    assert fit.headers[H.BODY_REF] == "dlq:12" and fit.headers[H.BODY_SIZE] == str(len(body))
    assert {k: v for k, v in fit.headers.items() if k not in (H.BODY_REF, H.BODY_SIZE)} == hdrs
    assert original_headers(fit.headers) == original_headers(hdrs), "a replay sends what the original had"


def test_headers_too_large_are_dropped_largest_first_and_named() -> None:
    original = {**REALISTIC, "X-Huge": "h" * 3000, "X-Big": "b" * 2000, "X-Small": "s"}
    hdrs = letter_headers(3, original, error="ValueError: " + "e" * 2000, reason="max_deliver")
    limit = header_size(hdrs) - 2500
    fit = fit_dead_letter(b"body", hdrs, limit)
    assert wire_size(fit.body, fit.headers) <= limit
    assert fit.dropped == ("X-Huge",), "cutting the error and dropping the largest header is enough"
    assert fit.headers[H.DROPPED_HEADERS] == "X-Huge"
    assert fit.headers[H.ERROR] == hdrs[H.ERROR][:SHORT_ERROR_LENGTH - 1] + "…"
    assert fit.headers["X-Big"] == original["X-Big"] and fit.headers[H.CALL_ID] == REALISTIC["Fn-Call-Id"]
    # Tighter and tighter: the largest go first, the call id last; what names the letter stays.
    originals = {*original} - {H.CALL_ID}
    call_id_dropped = False
    for limit in range(header_size(hdrs), 0, -1):
        try:
            fit = fit_dead_letter(b"body", hdrs, limit)
        except DeadLetterTooLarge:
            break
        assert wire_size(fit.body, fit.headers) <= limit
        assert {H.MSG_ID, H.FUNCTION, H.REASON, H.ORIGINAL_SEQ, H.BODY_REF} <= fit.headers.keys()
        if fit.dropped:
            assert fit.headers[H.DROPPED_HEADERS] == ", ".join(fit.dropped)
        others = [k for k in fit.dropped if k != H.CALL_ID]
        assert others == sorted(others, key=lambda k: -len(k) - len(hdrs[k])), "largest first"
        if H.CALL_ID in fit.dropped:
            call_id_dropped = True
            assert fit.dropped[-1] == H.CALL_ID and set(others) == originals, "the call id goes last"
    assert call_id_dropped
    with pytest.raises(DeadLetterTooLarge):
        fit_dead_letter(b"body", hdrs, 200)


def test_thousands_of_headers_and_unsendable_names() -> None:
    original = {f"X-H{i}": "v" * 50 for i in range(5000)} | {"Bad Name": "x", "Fn-Call-Id": "c1"}
    hdrs = letter_headers(9, original)
    fit = fit_dead_letter(b"{}", hdrs, 64 * 1024)
    assert wire_size(fit.body, fit.headers) <= 64 * 1024 and fit.ref == "dlq:9"
    assert fit.dropped[0] == "Bad Name", "nats-py refuses to send it, so it is never carried"
    assert len(fit.headers[H.DROPPED_HEADERS]) < 600
    assert fit.headers[H.DROPPED_HEADERS].endswith(f"… ({len(fit.dropped)} in all)")
    assert "Bad Name" not in fit_dead_letter(b"{}", letter_headers(9, {"Bad Name": "x"}), MAX_PAYLOAD).headers


# ------------------------------------------------------------------ oversized letters on a real server


async def cli(server: EmbeddedServer, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "runtime", "dlq", *args,
                                                    "--server", server.url],
                                   cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


async def stream_count(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def object_exists(js: JetStreamContext, name: str) -> bool:
    store = await js.object_store(DLQ_BODIES_BUCKET)
    try:
        await store.get_info(name)
    except NotFoundError:
        return False
    return True


async def test_an_oversized_dead_letter_is_stored_by_reference_and_the_connection_survives(
        nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext) -> None:
    await provision_base(js)
    assert nc.max_payload == MAX_PAYLOAD
    body = bytes(range(256)) * ((MAX_PAYLOAD - 176) // 256) + b"\xff" * ((MAX_PAYLOAD - 176) % 256)
    hdrs = letter_headers(41)
    seq = await write_dead_letter(js, "greet", body, hdrs, max_payload=nc.max_payload)
    await nc.flush()
    assert nc.is_connected
    assert await write_dead_letter(js, "greet", body, hdrs, max_payload=nc.max_payload) == seq, "idempotent"
    stored = await js.get_msg(DLQ_STREAM, seq)
    assert stored.data in (None, b"") and (stored.headers or {})[H.BODY_REF] == "dlq:41"
    assert (stored.headers or {})[H.BODY_SIZE] == str(len(body))

    shown = json.loads(ok(await cli(nats_server, "show", str(seq), "--json")))
    assert base64.b64decode(shown["body_base64"]) == body, "show gives back the exact original bytes"
    assert shown["headers"]["X-Trace"] == "trace-0042" and shown["size"] == len(body)
    assert shown["error"] == "InvalidInput: Invalid JSON" and shown["reason"] == "invalid_input"

    replays, _ = await collect(nc, "fn.invoke.greet")
    ok(await cli(nats_server, "replay", str(seq)))
    [replayed] = await eventually(lambda: replays, message="the replayed invocation")
    assert replayed.data == body, "the replay sends the full original"
    assert {k: v for k, v in replayed.headers.items() if k != "Nats-Msg-Id"} == REALISTIC
    assert await stream_count(js, DLQ_STREAM) == 0
    assert not await object_exists(js, "dlq:41"), "the object goes with its letter"


async def test_purge_takes_the_objects_of_the_purged_letters(nats_server: EmbeddedServer, nc: NATS,
                                                             js: JetStreamContext) -> None:
    await provision_base(js)
    big = b"x" * (MAX_PAYLOAD - 100)
    seqs = [await write_dead_letter(js, "greet", big, letter_headers(s), max_payload=nc.max_payload)
            for s in (1, 2, 3)]
    await write_dead_letter(js, "greet", b"{}", letter_headers(4), max_payload=nc.max_payload)
    assert all([await object_exists(js, f"dlq:{s}") for s in (1, 2, 3)])
    assert await purge(nc, js, seq=seqs[0]) == 1
    assert not await object_exists(js, "dlq:1") and await object_exists(js, "dlq:2")
    assert await purge(nc, js, function="greet") == 3
    assert not await object_exists(js, "dlq:2") and not await object_exists(js, "dlq:3")


async def test_an_invalid_body_176_bytes_under_max_payload_keeps_the_runtime_serving(
        runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext) -> None:
    await runtime(greet="name: greet\nhandler: tests.handlers.core:greet\n")
    body = b"{" + b"x" * (MAX_PAYLOAD - 177)  # not JSON
    await js.publish("fn.invoke.greet", body, headers={"Fn-Call-Id": "poison-1"})
    await eventually(lambda: _count_is(js, DLQ_STREAM, 1), message="the dead letter")
    [listed] = (await list_dead_letters(nc, js)).letters
    assert (listed.reason, listed.body_ref, listed.size) == ("invalid_input", "dlq:1", len(body))
    assert (await get_dead_letter(js, listed.seq)).body == body
    # The same runtime keeps serving.
    replies, _ = await collect(nc, "test.replies.after")
    await js.publish("fn.invoke.greet", b'{"name": "Ada"}',
                     headers={"Fn-Call-Id": "after-1", "Fn-Reply-To": "test.replies.after"})
    [reply] = await eventually(lambda: replies, timeout=5, message="the next invocation's answer")
    assert json.loads(reply.data) == {"greeting": "Hello, Ada!"}


async def _count_is(js: JetStreamContext, stream: str, count: int) -> bool:
    return await stream_count(js, stream) == count


# ------------------------------------------------------------------ listing


async def test_ls_lists_700_dead_letters_with_7mb_bodies(nats_server: EmbeddedServer, nc: NATS,
                                                         js: JetStreamContext) -> None:
    await provision_base(js)
    seven = b"7" * (7 * 1024 * 1024)
    heavy = set(range(5, 700, 35))  # 20 of them: 140 MB of bodies
    for chunk in range(0, 700, 100):
        await asyncio.gather(*(
            write_dead_letter(js, "greet", seven if i in heavy else b'{"i": %d}' % i, letter_headers(i + 1),
                              max_payload=nc.max_payload) for i in range(chunk, chunk + 100)))
    assert await stream_count(js, DLQ_STREAM) == 700
    started = time.monotonic()
    result = await cli(nats_server, "ls", "--json", timeout=60)
    elapsed = time.monotonic() - started
    listed: list[dict[str, Any]] = json.loads(ok(result))
    assert len(listed) == 700 and not result.stderr
    assert [d["original_seq"] for d in listed] == list(range(1, 701))
    assert {d["original_seq"] for d in listed if d["size"] == len(seven)} == {i + 1 for i in heavy}
    assert elapsed < 15, f"listing took {elapsed:.1f}s"


async def test_a_listing_says_how_many_were_removed_while_it_ran(nc: NATS, js: JetStreamContext) -> None:
    await provision_base(js)
    for i in range(1, 301):
        await write_dead_letter(js, "greet", b"{}", letter_headers(i), max_payload=nc.max_payload)
    scan = DeadLetterScan(nc, js, batch=100)
    letters = []
    async for batch in scan.batches():
        if not letters:
            for seq in range(150, 160):  # replayed by someone else meanwhile
                await js.delete_msg(DLQ_STREAM, seq)
        letters += batch
    listing = Listing(letters, scan.expected)
    assert len(letters) == 290 and scan.expected == 300
    assert listing.shortfall == ("listed 290 of the 300 dead letters stored when the listing began: "
                                 "10 were removed meanwhile (replayed, purged or expired)")
    assert Listing(letters, 290).shortfall is None


# ------------------------------------------------------------------ nothing stranded


def consumer_info(*, ack_floor: int, delivered: int, ack_pending: int, max_deliver: int = 3) -> ConsumerInfo:
    return ConsumerInfo(name="f", stream_name=INVOKE_STREAM, created=datetime.now(UTC),
                        config=ConsumerConfig(durable_name="f", filter_subject="fn.invoke.f", max_deliver=max_deliver),
                        delivered=SequenceInfo(consumer_seq=delivered, stream_seq=delivered),
                        ack_floor=SequenceInfo(consumer_seq=ack_floor, stream_seq=ack_floor),
                        num_ack_pending=ack_pending)


def test_which_messages_ran_out_of_deliveries() -> None:
    assert exhausted_up_to(consumer_info(ack_floor=4, delivered=9, ack_pending=2)) == 4, "pending ones may be above"
    assert exhausted_up_to(consumer_info(ack_floor=0, delivered=9, ack_pending=0)) == 9, "nothing pending"
    assert exhausted_up_to(consumer_info(ack_floor=0, delivered=9, ack_pending=0, max_deliver=-1)) == 0
    info = consumer_info(ack_floor=0, delivered=9, ack_pending=0)
    info.config.filter_subject = None
    assert exhausted_up_to(info) == 0, "not a function consumer"


async def strand(nc: NATS, js: JetStreamContext, name: str, body: bytes = b'{"job": 1}') -> int:
    """A message of ``name`` that ran out of deliveries; returns its sequence in FN."""
    await js.add_consumer(INVOKE_STREAM, ConsumerConfig(durable_name=name, filter_subject=f"fn.invoke.{name}",
                                                        ack_policy=AckPolicy.EXPLICIT, ack_wait=0.3, max_deliver=1))
    ack = await js.publish(f"fn.invoke.{name}", body,
                           headers={"Fn-Call-Id": f"{name}-1", "Fn-Reply-To": f"test.replies.{name}"})
    sub = await js.pull_subscribe_bind(durable=name, stream=INVOKE_STREAM)
    assert len(await sub.fetch(1, timeout=5)) == 1  # and never acked

    async def exhausted() -> bool:
        return not (await js.consumer_info(INVOKE_STREAM, name)).num_ack_pending

    await eventually(exhausted, message="its only delivery to run out")
    await sub.unsubscribe()
    return int(ack.seq)


async def test_startup_sweep_moves_a_message_whose_advisory_was_never_stored(nc: NATS,
                                                                             js: JetStreamContext) -> None:
    # No FN_EVENTS yet: the MAX_DELIVERIES advisory is published with nowhere to keep it.
    await ensure_stream(js, invoke_stream_config())
    await ensure_stream(js, dlq_stream_config())
    seq = await strand(nc, js, "lost", b"x" * (MAX_PAYLOAD - 176))
    await provision_base(js)
    assert await stream_count(js, EVENTS_STREAM) == 0 and await stream_count(js, INVOKE_STREAM) == 1
    replies, _ = await collect(nc, "test.replies.lost")
    async with DeadLetterMover(nc, js, sweep_interval=0.2) as mover:
        await eventually(lambda: _count_is(js, INVOKE_STREAM, 0), message="FN empty")
        [letter] = (await list_dead_letters(nc, js)).letters
        assert (letter.reason, letter.original_seq, letter.call_id) == ("max_deliver", seq, "lost-1")
        assert letter.body_ref == f"dlq:{seq}", "too large to carry its body: referenced"
        assert (await get_dead_letter(js, letter.seq)).body == b"x" * (MAX_PAYLOAD - 176)
        [reply] = await eventually(lambda: replies, message="the caller's failure reply")
        assert reply.headers["Fn-Call-Id"] == "lost-1" and reply.headers["Nats-Service-Error-Code"] == "500"
        assert mover.moved == 1 and nc.is_connected


async def test_periodic_sweep_moves_what_ran_out_later_and_never_what_is_in_flight(
        nc: NATS, js: JetStreamContext) -> None:
    await provision_base(js)
    # In flight: delivered, neither acked nor out of time.
    await js.add_consumer(INVOKE_STREAM, ConsumerConfig(durable_name="busy", filter_subject="fn.invoke.busy",
                                                        ack_policy=AckPolicy.EXPLICIT, ack_wait=60, max_deliver=1))
    await js.publish("fn.invoke.busy", b"{}")
    busy = await js.pull_subscribe_bind(durable="busy", stream=INVOKE_STREAM)
    [working] = await busy.fetch(1, timeout=5)
    async with DeadLetterMover(nc, js, sweep_interval=0.2) as mover:
        await eventually(lambda: mover.sweeps >= 3, message="three sweeps")
        # FN_EVENTS stops keeping MAX_DELIVERIES advisories, as when the store is full.
        config = events_stream_config()
        config.subjects = [s for s in ADVISORY_SUBJECTS if "MAX_DELIVERIES" not in s]
        await js.update_stream(config)
        seq = await strand(nc, js, "later")
        await eventually(lambda: _count_is(js, DLQ_STREAM, 1), message="the swept dead letter")
        [letter] = (await list_dead_letters(nc, js)).letters
        assert (letter.function, letter.original_seq, letter.reason) == ("later", seq, "max_deliver")
        assert await stream_count(js, EVENTS_STREAM) == 0, "no advisory was involved"
        assert await stream_count(js, INVOKE_STREAM) == 1, "the message in flight stays"
        await working.ack()
        await eventually(lambda: _count_is(js, INVOKE_STREAM, 0), message="FN empty")
        assert await stream_count(js, DLQ_STREAM) == 1


async def test_a_mover_consumer_an_older_runtime_made_is_updated_in_place(nc: NATS, js: JetStreamContext) -> None:
    """Runtimes before kept advisories held 30 s; starting a mover now shortens that, without an error."""
    await provision_base(js)
    async with DeadLetterMover(nc, js, ack_wait=30.0):
        pass
    assert (await js.consumer_info(EVENTS_STREAM, MOVER_CONSUMER)).config.ack_wait == 30.0
    async with DeadLetterMover(nc, js):
        assert (await js.consumer_info(EVENTS_STREAM, MOVER_CONSUMER)).config.ack_wait == ACK_WAIT
        seq = await strand(nc, js, "upgraded")
        await eventually(lambda: _count_is(js, DLQ_STREAM, 1), message="the dead letter")
        [letter] = (await list_dead_letters(nc, js)).letters
        assert (letter.function, letter.original_seq) == ("upgraded", seq)
