"""Event triggers on a real nats-server: fan-out, dead letters and their replay, pipelines."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime import dlq
from runtime.triggers import TRIGGERS_STREAM
from tests.conftest import eventually, the_dead_letter
from tests.handlers import events

pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True)
def fresh() -> None:
    events.seen.clear()
    events.fixed["value"] = False


def fn(name: str, handler: str, extra: str = "") -> str:
    return f"name: {name}\nhandler: tests.handlers.events:{handler}\nconcurrency: 8\n" \
           f"retry: {{max_deliver: 3, backoff: [0.05]}}\n{extra}"


def count(name: str) -> int:
    return len(events.seen.get(name, []))


async def test_one_event_runs_every_subscribed_function_once(runtime: Any, nc: NATS, js: JetStreamContext) -> None:
    await runtime({"trust": ("tests",)},
                  audit=fn("audit", "audit", "triggers:\n  - subject: orders.>\n"),
                  billing=fn("billing", "billing", "triggers:\n  - subject: orders.created\n    name: created\n"))
    for i in range(20):
        await nc.publish("orders.created", json.dumps({"id": i}).encode())
    await nc.publish("orders.cancelled", b'{"id": 99}')
    await eventually(lambda: count("audit") == 21 and count("billing") == 20)
    first = events.seen["billing"][0]
    assert first["subject"] == "orders.created" and first["trigger"] == "created"
    assert {s["trigger"] for s in events.seen["audit"]} == {"orders-all"}
    assert len({s["call_id"] for s in events.seen["audit"] + events.seen["billing"]}) == 41
    # Every function settled every event: nothing is left in the event stream.
    await eventually(lambda: _stream_empty(js))


async def _stream_empty(js: JetStreamContext) -> bool:
    return (await js.stream_info(TRIGGERS_STREAM)).state.messages == 0


async def test_a_failing_function_dead_letters_and_replays_alone(runtime: Any, nc: NATS, js: JetStreamContext) -> None:
    await runtime({"trust": ("tests",)},
                  audit=fn("audit", "audit", "triggers:\n  - subject: orders.>\n"),
                  broken=fn("broken", "broken", "triggers:\n  - subject: orders.>\n"))
    for i in range(5):
        await nc.publish("orders.created", json.dumps({"id": i}).encode())
    letters: list[Any] = []

    async def five_letters() -> bool:
        listing = await dlq.list_dead_letters(nc, js, "broken")
        letters[:] = [await dlq.get_dead_letter(js, x.seq) for x in listing.letters]
        return len(letters) == 5
    await eventually(five_letters)
    assert count("audit") == 5 and count("broken") == 15
    assert {x.reason for x in letters} == {"max_deliver"}
    assert letters[0].headers["Fn-Original-Subject"] == "orders.created"
    assert letters[0].headers["Fn-Trigger"] == "orders-all"
    events.fixed["value"] = True
    for letter in letters:
        await dlq.replay(nc, js, letter)
    await eventually(lambda: count("broken") == 20)
    replayed = events.seen["broken"][-1]
    assert replayed["subject"] == "orders.created" and replayed["trigger"] == "orders-all"
    assert count("audit") == 5   # the replay ran that function only


async def test_output_triggers_the_next_function_once_despite_retries(runtime: Any, nc: NATS) -> None:
    await runtime({"trust": ("tests",)},
                  shaky=fn("shaky", "shaky", "triggers:\n  - subject: orders.>\noutput: audit.logged\n"),
                  after=fn("after", "after", "triggers:\n  - subject: audit.logged\n"))
    for i in range(10):
        await nc.publish("orders.created", json.dumps({"id": i}).encode())
    await eventually(lambda: count("after") == 10 and count("shaky") == 30)
    shaky_ids = {s["call_id"] for s in events.seen["shaky"]}
    assert {s["caused_by"] for s in events.seen["after"]} == shaky_ids
    assert sorted(s["event"]["from"]["id"] for s in events.seen["after"]) == list(range(10))


@pytest.mark.parametrize("stream", [TRIGGERS_STREAM, "PAYMENTS"])
async def test_an_event_whose_runtime_died_on_every_delivery_is_dead_lettered(nc: NATS, js: JetStreamContext,
                                                                               stream: str) -> None:
    """No runtime settled it (each died holding it, even on the extra delivery that a live runtime
    dead-letters without running it): the advisory drives the mover, for the runtime's event stream
    and for a stream of the user's own alike. The dead letter counts the attempts, not the extra
    delivery; the event stays in its stream for the functions that still want it."""
    from runtime.manifest import FunctionManifest
    from runtime.mover import DeadLetterMover
    from runtime.streams import provision_base
    from runtime.triggers import bind

    await provision_base(js)
    trigger: dict[str, Any] = {"subject": "orders.>"}
    if stream != TRIGGERS_STREAM:
        await js.add_stream(name=stream, subjects=["orders.>"])
        trigger["stream"] = stream
    manifest = FunctionManifest.model_validate({
        "name": "lost", "handler": "tests.handlers.events:audit", "ack_wait": 0.3,
        "retry": {"max_deliver": 2}, "triggers": [trigger]})
    [binding] = await bind(js, manifest)
    assert binding.stream == stream
    sub = await js.pull_subscribe_bind(binding.consumer, stream)
    await nc.publish("orders.created", b'{"id": 7}', headers={"Fn-Note": "kept"})
    async with DeadLetterMover(nc, js, attempts={"lost": 2}.get):
        for _ in range(3):   # two attempts and the extra delivery, never settled: a runtime died each time
            [msg] = await sub.fetch(1, timeout=5)
        # JetStream gives up on it (and says so) when it would deliver it a fourth time.
        with contextlib.suppress(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=1)
        stored = await the_dead_letter(nc, js, "lost")
    assert stored.reason == "max_deliver"
    assert stored.headers["Fn-Deliveries"] == "2"
    assert stored.headers["Fn-Error"].startswith("worker lost")
    assert stored.headers["Fn-Trigger"] == "orders-all" and stored.headers["Fn-Note"] == "kept"
    assert stored.headers["Fn-Original-Subject"] == "orders.created"
    assert stored.body == b'{"id": 7}'
    assert msg.data == b'{"id": 7}'
    assert (await js.stream_info(stream)).state.messages == 1


async def test_fn_events_keeps_the_advisories_of_a_users_stream_unless_another_stream_captures_them(
        js: JetStreamContext, caplog: pytest.LogCaptureFixture) -> None:
    """A trigger on a stream of the user's own adds that stream's advisories to FN_EVENTS, and a
    runtime start keeps them. Where a stream of the user's already captures them, the trigger is
    bound all the same, with a warning."""
    from runtime.manifest import FunctionManifest
    from runtime.streams import EVENTS_STREAM, provision_base, trigger_advisories
    from runtime.triggers import bind

    await provision_base(js)
    await js.add_stream(name="PAYMENTS", subjects=["payments.>"])
    await js.add_stream(name="LEDGER", subjects=["ledger.>"])
    await js.add_stream(name="LEDGER_FAILURES", subjects=[trigger_advisories("LEDGER")])   # the user's own
    manifest = FunctionManifest.model_validate({
        "name": "books", "handler": "tests.handlers.events:audit",
        "triggers": [{"subject": "payments.>", "stream": "PAYMENTS"}, {"subject": "ledger.>", "stream": "LEDGER"}]})

    async def subjects() -> list[str]:
        return list((await js.stream_info(EVENTS_STREAM)).config.subjects or [])
    await bind(js, manifest, advisories=False)   # as a deploy binds them: the runtimes add the advisories
    assert trigger_advisories("PAYMENTS") not in await subjects()
    bindings = await bind(js, manifest)          # as a runtime serving the function does
    assert [b.stream for b in bindings] == ["PAYMENTS", "LEDGER"]
    assert trigger_advisories("PAYMENTS") in await subjects()
    assert trigger_advisories("LEDGER") not in await subjects()
    assert any("LEDGER" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    await provision_base(js)   # what every runtime start does
    assert trigger_advisories("PAYMENTS") in await subjects()
    assert (await js.stream_info("LEDGER_FAILURES")).config.subjects == [trigger_advisories("LEDGER")]


async def test_the_mover_adds_back_the_advisories_of_a_users_stream_that_fn_events_lost(
        nc: NATS, js: JetStreamContext, caplog: pytest.LogCaptureFixture) -> None:
    """Two runtimes adding subjects to FN_EVENTS at once can overwrite each other's: here another
    writer updates it from a read made before PAYMENTS was added. The mover's next round adds
    PAYMENTS back; LEDGER, whose advisories a stream of the user's captures, is warned about once,
    not at every round."""
    from runtime.mover import DeadLetterMover
    from runtime.streams import EVENTS_STREAM, capture_advisories, provision_base, trigger_advisories

    await provision_base(js)
    await js.add_stream(name="PAYMENTS", subjects=["payments.>"])
    await js.add_stream(name="LEDGER", subjects=["ledger.>"])
    await js.add_stream(name="LEDGER_FAILURES", subjects=[trigger_advisories("LEDGER")])   # the user's own

    async def subjects() -> list[str]:
        return list((await js.stream_info(EVENTS_STREAM)).config.subjects or [])
    stale = (await js.stream_info(EVENTS_STREAM)).config   # read by another runtime, then ...
    assert await capture_advisories(js, "PAYMENTS")
    await js.update_stream(stale)                             # ... written after PAYMENTS was added
    assert trigger_advisories("PAYMENTS") not in await subjects()
    caplog.clear()
    async with DeadLetterMover(nc, js, sweep_interval=0.05, user_streams=lambda: ("PAYMENTS", "LEDGER")) as mover:
        await eventually(lambda: mover.sweeps >= 6, message="six rounds of the mover")
        assert trigger_advisories("PAYMENTS") in await subjects()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([w for w in warned if "PAYMENTS" in w and "added them back" in w]) == 1, warned
    assert len([w for w in warned if "LEDGER" in w]) == 1, warned
    assert trigger_advisories("LEDGER") not in await subjects()
    assert (await js.stream_info("LEDGER_FAILURES")).config.subjects == [trigger_advisories("LEDGER")]


async def test_a_runtimes_mover_keeps_the_advisories_of_the_streams_its_triggers_read(
        runtime: Any, js: JetStreamContext) -> None:
    """The mover of a runtime serving a trigger on a stream of the user's own knows that stream."""
    from runtime.mover import DeadLetterMover
    from runtime.streams import EVENTS_STREAM, trigger_advisories

    await js.add_stream(name="PAYMENTS", subjects=["payments.>"])
    rt = await runtime({"trust": ("tests",)},
                       audit=fn("audit", "audit", "triggers:\n  - subject: payments.>\n    stream: PAYMENTS\n"),
                       billing=fn("billing", "billing", "triggers:\n  - subject: orders.>\n"))
    [mover] = [c for c in rt.components if isinstance(c, DeadLetterMover)]
    await eventually(lambda: mover.sweeps >= 1, message="the mover's first round")   # the next is 30 s later
    events_config = (await js.stream_info(EVENTS_STREAM)).config
    assert trigger_advisories("PAYMENTS") in (events_config.subjects or [])
    events_config.subjects = [s for s in events_config.subjects or [] if s != trigger_advisories("PAYMENTS")]
    await js.update_stream(events_config)
    assert await mover.keep_advisories() == ["PAYMENTS"]   # FN_TRIGGERS' own are not the user's
    assert trigger_advisories("PAYMENTS") in ((await js.stream_info(EVENTS_STREAM)).config.subjects or [])
    assert await mover.keep_advisories() == []


async def test_a_runtime_user_that_may_not_change_fn_events_still_binds_a_trigger_on_its_stream(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An operator's own permissions may leave FN_EVENTS out: the trigger is bound all the same,
    and the runtime warns that a double fault on that stream would not be dead-lettered."""
    from runtime.manifest import FunctionManifest
    from runtime.server import EmbeddedServer, free_port
    from runtime.streams import EVENTS_STREAM, provision_base, trigger_advisories
    from runtime.triggers import bind

    conf = tmp_path / "nats.conf"
    conf.write_text('authorization { users: [\n'
                    '  { user: admin, password: admin-pw }\n'
                    '  { user: runner, password: runner-pw, permissions: {\n'
                    '      publish: { allow: [">"], deny: ["$JS.API.STREAM.INFO.FN_EVENTS", '
                    '"$JS.API.STREAM.UPDATE.FN_EVENTS"] },\n'
                    '      subscribe: { allow: [">"] } } }\n'
                    '] }\n')
    async with EmbeddedServer(tmp_path / "nats", port=free_port(), config=conf).discarded() as server:
        admin = await nats.connect(server.url, user="admin", password="admin-pw")
        runner = await nats.connect(server.url, user="runner", password="runner-pw", error_cb=_ignore)
        try:
            js = admin.jetstream()
            await provision_base(js)
            await js.add_stream(name="PAYMENTS", subjects=["payments.>"])
            manifest = FunctionManifest.model_validate({
                "name": "books", "handler": "tests.handlers.events:audit",
                "triggers": [{"subject": "payments.>", "stream": "PAYMENTS"}]})
            [binding] = await bind(runner.jetstream(timeout=1), manifest)
            assert binding.stream == "PAYMENTS"
            assert (await js.consumer_info("PAYMENTS", binding.consumer)).config.filter_subject == "payments.>"
            assert trigger_advisories("PAYMENTS") not in ((await js.stream_info(EVENTS_STREAM)).config.subjects or [])
            warned = [r.getMessage() for r in caplog.records
                      if r.levelname == "WARNING" and "PAYMENTS" in r.getMessage()]
            assert warned and EVENTS_STREAM in warned[0], warned
        finally:
            await runner.close()
            await admin.close()


async def _ignore(_exc: Exception) -> None:
    """The permission errors the server reports for the refused requests (expected here)."""


async def test_a_trigger_taken_out_of_its_manifest_loses_its_consumer(js: JetStreamContext) -> None:
    from nats.js.errors import NotFoundError

    from runtime.manifest import ManifestSet, parse_manifest
    from runtime.registry import Registry
    from runtime.streams import provision_base

    await provision_base(js)
    registry = await Registry.open(js)

    def manifest_set(triggers: str) -> ManifestSet:
        manifest = parse_manifest({"name": "audit", "handler": "tests.handlers.events:audit",
                                   "triggers": [{"subject": s} for s in triggers.split()]}, "audit.yaml")
        return ManifestSet(functions={"audit": manifest}, schedules={}, sources={"Function:audit": "audit.yaml"})

    await registry.deploy(manifest_set("orders.> refunds.*"))
    await js.consumer_info(TRIGGERS_STREAM, "fn_audit_ON_refunds-any")
    await registry.deploy(manifest_set("orders.>"))
    await js.consumer_info(TRIGGERS_STREAM, "fn_audit_ON_orders-all")
    with pytest.raises(NotFoundError):
        await js.consumer_info(TRIGGERS_STREAM, "fn_audit_ON_refunds-any")

    # A rollback is a deploy of an older revision: the trigger it brings back is bound again, and
    # one the restored revision does not have loses its consumer the same way.
    await registry.rollback("audit")
    await js.consumer_info(TRIGGERS_STREAM, "fn_audit_ON_refunds-any")
    await registry.deploy(manifest_set("refunds.*"))
    await registry.rollback("audit", to=1)
    await js.consumer_info(TRIGGERS_STREAM, "fn_audit_ON_orders-all")
    await registry.rollback("audit", to=2)
    with pytest.raises(NotFoundError):
        await js.consumer_info(TRIGGERS_STREAM, "fn_audit_ON_refunds-any")
    await js.consumer_info(TRIGGERS_STREAM, "fn_audit_ON_orders-all")


def _functions(**triggers: str) -> Any:
    """A manifest set of functions (name -> their trigger subjects, space separated)."""
    from runtime.manifest import ManifestSet, parse_manifest

    functions = {name: parse_manifest({"name": name, "handler": "tests.handlers.events:audit",
                                       "triggers": [{"subject": s} for s in subjects.split()]}, f"{name}.yaml")
                 for name, subjects in triggers.items()}
    return ManifestSet(functions=functions, schedules={}, sources={f"Function:{n}": f"{n}.yaml" for n in functions})


async def _captured(js: JetStreamContext) -> list[str]:
    return sorted((await js.stream_info(TRIGGERS_STREAM)).config.subjects or [])


async def test_a_subject_no_trigger_reads_any_more_is_free_for_a_stream_of_ones_own(js: JetStreamContext) -> None:
    from nats.js.api import StreamConfig
    from nats.js.errors import APIError, NoStreamResponseError

    from runtime.registry import Registry
    from runtime.streams import provision_base

    await provision_base(js)
    registry = await Registry.open(js)
    await registry.deploy(_functions(audit="orders.> refunds.*", billing="orders.created"))
    assert await _captured(js) == ["orders.>", "refunds.*"]
    with pytest.raises(APIError):   # as long as a trigger reads them, no other stream may capture them
        await js.add_stream(StreamConfig(name="REFUNDS", subjects=["refunds.>"]))

    # Undeploying keeps the consumers, and so the subjects: events published meanwhile wait.
    await registry.undeploy("billing")
    assert await _captured(js) == ["orders.>", "refunds.*"]
    await registry.deploy(_functions(billing="orders.created"))

    # audit loses its triggers for good: only what billing reads stays captured.
    await registry.deploy(_functions(audit=""))
    assert await _captured(js) == ["orders.created"]
    await js.add_stream(StreamConfig(name="REFUNDS", subjects=["refunds.>"]))
    ack = await js.publish("orders.created", b'{"id": 1}')
    assert ack.stream == TRIGGERS_STREAM

    async def pending() -> bool:   # the consumer counts a stored message a moment after its PubAck
        return (await js.consumer_info(TRIGGERS_STREAM, "fn_billing_ON_orders-created")).num_pending == 1
    await eventually(pending, timeout=5, message="billing's consumer to count the event")
    with pytest.raises(NoStreamResponseError):   # nobody reads it: not stored as if someone would
        await js.publish("orders.updated", b'{"id": 2}')

    # No trigger left: the stream keeps only its own name, and orders.> can be a stream of one's own.
    await registry.deploy(_functions(billing=""))
    assert await _captured(js) == [TRIGGERS_STREAM]
    await js.add_stream(StreamConfig(name="ORDERS", subjects=["orders.>"]))

    # A new trigger elsewhere is captured as before.
    await registry.deploy(_functions(audit="payments.*"))
    assert await _captured(js) == ["payments.*"]


async def test_a_runtime_start_releases_subjects_whose_consumers_the_server_removed(js: JetStreamContext) -> None:
    from nats.js.api import ConsumerConfig

    from runtime.triggers import ensure_captured, keep_in_shape

    await ensure_captured(js, ["idle.>", "busy.*"])
    # busy.* is still read (by any consumer, not only a trigger's); idle.>'s consumer is gone.
    await js.add_consumer(TRIGGERS_STREAM, ConsumerConfig(durable_name="watcher", filter_subject="busy.*"))
    await keep_in_shape(js, 1)
    assert await _captured(js) == ["busy.*"]
    # A consumer reading everything keeps everything captured.
    await ensure_captured(js, ["idle.>"])
    await js.add_consumer(TRIGGERS_STREAM, ConsumerConfig(durable_name="all"))
    await keep_in_shape(js, 1)
    assert await _captured(js) == ["busy.*", "idle.>"]


async def test_an_events_outcome_is_not_stored_unless_the_function_stores_every_one(
        runtime: Any, nc: NATS, js: JetStreamContext) -> None:
    """Nobody holds an event's ``ev-...`` call id, even when the event carries an id of its own."""
    from runtime.results import fetch_response

    await runtime({"trust": ("tests",)},
                  audit=fn("audit", "audit", "triggers:\n  - subject: orders.>\n"),
                  billing=fn("billing", "billing", "store_results: always\ntriggers:\n  - subject: orders.>\n"))
    await js.publish("orders.created", b'{"id": 1}', headers={"Nats-Msg-Id": "order-1", "Fn-Call-Id": "upstream-1"})
    await eventually(lambda: count("audit") == 1 and count("billing") == 1)
    billed = events.seen["billing"][0]["call_id"]
    await eventually(lambda: fetch_response(js, billed))
    assert await fetch_response(js, events.seen["audit"][0]["call_id"]) is None
    assert await fetch_response(js, "upstream-1") is None and await fetch_response(js, "order-1") is None
