"""Event triggers, end to end on a real nats-server: what a user publishing plain NATS messages sees.

Events are published with nats-py's core ``publish``, as any service would; runs are counted in
files of the scratch directory (tests/handlers/fanout.py), so runtimes in other processes count too.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from runtime import dlq
from runtime.manifest import ManifestSet
from runtime.registry import Registry
from runtime.server import EmbeddedServer
from runtime.status import gather_status
from runtime.streams import DLQ_PREFIX, DLQ_STREAM
from runtime.triggers import TRIGGERS_STREAM, consumer_name
from tests.handlers.fanout import runs

from .conftest import ROOT, RuntimeFactory, RuntimeProcess, eventually

TRUST = {"RUNTIME_TRUST": "tests"}   # the handlers live in the tests package
EVENTS = 1000


def fn(name: str, *subjects: str, handler: str = "record", max_deliver: int = 3, extra: str = "",
       stream: str | None = None) -> str:
    """A function manifest whose triggers are ``subjects`` (on ``stream`` when given)."""
    triggers = "".join(f"  - subject: {s}\n" + (f"    stream: {stream}\n" if stream else "") for s in subjects)
    return (f"name: {name}\nhandler: tests.handlers.fanout:{handler}\nconcurrency: 32\n"
            f"retry: {{max_deliver: {max_deliver}, backoff: [50ms]}}\n{extra}"
            + (f"triggers:\n{triggers}" if triggers else ""))


# Three functions on one event subject, each through a different pattern.
FANOUT = {"audit": fn("audit", "orders.>"), "billing": fn("billing", "orders.created"),
          "email": fn("email", "orders.*")}


async def publish_events(nc: NATS, subject: str, ids: range) -> None:
    for i in ids:
        await nc.publish(subject, json.dumps({"id": i}).encode())
    await nc.flush()


async def settled(js: JetStreamContext, stream: str, consumer: str) -> bool:
    """Every event of the consumer delivered and acknowledged (or terminated)."""
    info = await js.consumer_info(stream, consumer)
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


def ran_once(rows: list[dict[str, Any]], ids: range, function: str) -> None:
    counts = Counter(r["id"] for r in rows)
    missing = sorted(set(ids) - set(counts))
    twice = sorted(i for i, c in counts.items() if c > 1)
    assert not missing and not twice, f"{function}: {len(missing)} missing {missing[:10]}, " \
                                      f"{len(twice)} run twice {twice[:10]}"
    assert set(counts) == set(ids), f"{function} ran other events: {sorted(set(counts) - set(ids))[:10]}"
    assert len({r["call_id"] for r in rows}) == len(ids), f"{function}: call ids repeat"


async def all_ran(scratch: Path, names: list[str], count: int) -> bool:
    return all(len(runs(scratch, n)) >= count for n in names)


def cli(server: EmbeddedServer, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime", *args, "--server", server.url], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, **TRUST, **(env or {})})


async def acli(server: EmbeddedServer, *args: str) -> subprocess.CompletedProcess[str]:
    # In a thread: in-process runtimes and this test's connection keep working meanwhile.
    return await asyncio.to_thread(cli, server, *args)


# ------------------------------------------------------------------ fan-out


async def fan_out_1000(scratch: Path, nc: NATS, js: JetStreamContext) -> None:
    await publish_events(nc, "orders.created", range(EVENTS))
    await eventually(lambda: all_ran(scratch, list(FANOUT), EVENTS), timeout=30, message="3,000 runs")
    for name, trigger in (("audit", "orders-all"), ("billing", "orders-created"), ("email", "orders-any")):
        await eventually(partial(settled, js, TRIGGERS_STREAM, consumer_name(name, trigger)),
                         message=f"{name}'s consumer settled")
        info = await js.consumer_info(TRIGGERS_STREAM, consumer_name(name, trigger))
        assert info.num_redelivered == 0, f"{name}: {info.num_redelivered} events delivered again"
        rows = runs(scratch, name)
        ran_once(rows, range(EVENTS), name)
        assert {(r["subject"], r["trigger"]) for r in rows} == {("orders.created", trigger)}
    # Interest retention: an event is gone once every trigger settled it.
    await eventually(lambda: _messages(js, TRIGGERS_STREAM, 0), message="the event stream to empty")


async def _messages(js: JetStreamContext, stream: str, count: int) -> bool:
    return (await js.stream_info(stream)).state.messages == count


async def test_1000_events_run_each_of_three_functions_exactly_once(runtime: RuntimeFactory, nc: NATS,
                                                                     js: JetStreamContext, scratch: Path) -> None:
    await runtime({"trust": ("tests",)}, **FANOUT)
    await fan_out_1000(scratch, nc, js)
    assert (await js.stream_info(TRIGGERS_STREAM)).config.subjects == ["orders.>"]


async def test_1000_events_fan_out_across_two_runtime_processes(runtime_process: Callable[..., RuntimeProcess],
                                                                manifest_dir: Callable[..., Path], nc: NATS,
                                                                js: JetStreamContext, scratch: Path) -> None:
    manifests = manifest_dir(**FANOUT)
    procs = [runtime_process(manifests, env={**TRUST, "RUNTIME_TEST_DIR": str(scratch)}) for _ in range(2)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    await fan_out_1000(scratch, nc, js)
    pids = {r["pid"] for name in FANOUT for r in runs(scratch, name)}
    assert pids == {p.pid for p in procs}, "both runtimes ran events"


# ------------------------------------------------------------------ dead letters


async def test_a_function_that_always_fails_dead_letters_every_event_and_replays_alone(
        runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext,
        scratch: Path) -> None:
    await runtime({"trust": ("tests",)}, audit=FANOUT["audit"], billing=FANOUT["billing"],
                  email=fn("email", "orders.*", handler="broken_until_fixed", max_deliver=2))
    await publish_events(nc, "orders.created", range(EVENTS))
    await eventually(lambda: all_ran(scratch, ["audit", "billing"], EVENTS), timeout=30,
                     message="the working functions to run every event")
    ran_once(runs(scratch, "audit"), range(EVENTS), "audit")
    ran_once(runs(scratch, "billing"), range(EVENTS), "billing")

    async def letters(count: int) -> bool:
        info = await js.stream_info(DLQ_STREAM, subjects_filter=f"{DLQ_PREFIX}email")
        return sum((info.state.subjects or {}).values()) == count
    await eventually(lambda: letters(EVENTS), timeout=30, message=f"{EVENTS} dead letters of email")
    listing = await dlq.list_dead_letters(nc, js, "email")
    assert len(listing.letters) == EVENTS
    assert {x.reason for x in listing} == {"max_deliver"}
    assert {x.deliveries for x in listing} == {2}
    assert {(x.original_subject, x.headers["Fn-Trigger"]) for x in listing} == {("orders.created", "orders-any")}
    assert len({x.original_seq for x in listing}) == EVENTS
    failed = runs(scratch, "email")
    assert len(failed) == 2 * EVENTS and not any(r["ok"] for r in failed)
    events_stored = (await js.stream_info(TRIGGERS_STREAM)).state.last_seq

    (scratch / "fixed").touch()
    replayed = await acli(nats_server, "dlq", "replay", "--function", "email")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.splitlines()[-1] == f"{EVENTS} dead letter(s) replayed"
    await eventually(lambda: len([r for r in runs(scratch, "email") if r["ok"]]) >= EVENTS, timeout=30,
                     message="every replay to run")
    fixed = [r for r in runs(scratch, "email") if r["ok"]]
    ran_once(fixed, range(EVENTS), "email")
    # The replays are the same calls, still seeing the event's subject and trigger.
    assert {r["call_id"] for r in fixed} == {r["call_id"] for r in failed}
    assert {(r["subject"], r["trigger"]) for r in fixed} == {("orders.created", "orders-any")}
    # Only email ran again: no event was published anew, the other functions ran nothing more.
    assert (await js.stream_info(TRIGGERS_STREAM)).state.last_seq == events_stored
    assert len(runs(scratch, "audit")) == EVENTS and len(runs(scratch, "billing")) == EVENTS
    assert await letters(0)


# ------------------------------------------------------------------ a user's own stream


async def add_payments(js: JetStreamContext, subjects: list[str]) -> StreamConfig:
    info = await js.add_stream(StreamConfig(name="PAYMENTS", subjects=subjects, retention=RetentionPolicy.LIMITS,
                                            storage=StorageType.FILE))
    return info.config


async def test_a_function_bound_to_a_users_stream_runs_matching_events_and_deletes_nothing(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext, scratch: Path) -> None:
    config = await add_payments(js, ["payments.>"])
    published: list[tuple[str, bytes]] = []

    async def pay(subject: str, ids: range) -> None:
        for i in ids:
            body = json.dumps({"id": i}).encode()
            await js.publish(subject, body)
            published.append((subject, body))

    await pay("payments.settled.eu", range(900, 905))   # before the trigger existed: never run
    await runtime({"trust": ("tests",)},
                  settle=fn("settle", "payments.settled.*", stream="PAYMENTS"),
                  refund=fn("refund", "payments.refunded.*", stream="PAYMENTS", handler="broken_until_fixed",
                            max_deliver=2))
    await pay("payments.settled.eu", range(10))
    await pay("payments.settled.us", range(10, 20))
    await pay("payments.settled.eu.late", range(20, 25))   # one token too many for payments.settled.*
    await pay("payments.refunded.eu", range(30, 35))
    await pay("payments.created", range(40, 45))
    await eventually(lambda: len(runs(scratch, "settle")) >= 20 and len(runs(scratch, "refund")) >= 10,
                     message="settle and refund to run")
    for consumer in (consumer_name("settle", "payments-settled-any"), consumer_name("refund", "payments-refunded-any")):
        await eventually(partial(settled, js, "PAYMENTS", consumer))
    settle = runs(scratch, "settle")
    ran_once(settle, range(20), "settle")
    assert {r["subject"] for r in settle} == {"payments.settled.eu", "payments.settled.us"}
    assert {r["id"] for r in runs(scratch, "refund")} == set(range(30, 35))

    async def untouched() -> None:
        info = await js.stream_info("PAYMENTS")
        assert (info.state.messages, info.state.first_seq, info.state.last_seq, info.state.num_deleted or 0) == \
               (len(published), 1, len(published), 0)
        assert info.config.as_dict() == config.as_dict()
        for seq, (subject, body) in enumerate(published, start=1):
            stored = await js.get_msg("PAYMENTS", seq)
            assert (stored.subject, stored.data) == (subject, body), f"message {seq} changed"

    await untouched()
    # Its failures went to dead letters; replaying them leaves the stream as it is too.
    await eventually(lambda: _count_letters(nc, js, "refund", 5))
    (scratch / "fixed").touch()
    assert len(await dlq.replay_all(nc, js, "refund")) == 5
    await eventually(lambda: len([r for r in runs(scratch, "refund") if r["ok"]]) == 5)
    await untouched()
    with pytest.raises(NotFoundError):
        await js.stream_info(TRIGGERS_STREAM)   # nothing of the runtime's captures payments


async def _count_letters(nc: NATS, js: JetStreamContext, function: str, count: int) -> bool:
    return len((await dlq.list_dead_letters(nc, js, function)).letters) == count


async def test_a_subject_inside_a_users_stream_binds_to_it_without_naming_it(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext, scratch: Path) -> None:
    await add_payments(js, ["payments.>"])
    await runtime({"trust": ("tests",)}, settle=fn("settle", "payments.settled.*"))
    info = await js.consumer_info("PAYMENTS", consumer_name("settle", "payments-settled-any"))
    assert info.config.filter_subject == "payments.settled.*"
    metadata = info.config.metadata or {}
    assert (metadata["fn-function"], metadata["fn-trigger"]) == ("settle", "payments-settled-any")
    await nc.publish("payments.settled.eu", b'{"id": 1}')
    await eventually(lambda: runs(scratch, "settle"), message="settle to run")
    assert runs(scratch, "settle")[0]["subject"] == "payments.settled.eu"
    assert (await js.stream_info("PAYMENTS")).state.messages == 1
    with pytest.raises(NotFoundError):
        await js.stream_info(TRIGGERS_STREAM)


async def test_a_subject_partly_in_a_users_stream_is_one_clear_deploy_error(
        nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> None:
    config = await add_payments(js, ["payments.settled.>"])
    path = tmp_path / "ledger.yaml"
    path.write_text(fn("ledger", "payments.>"))
    result = await acli(nats_server, "deploy", str(path))
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "PAYMENTS" in lines[0] and "stream: PAYMENTS" in lines[0] and "payments.settled.>" in lines[0], lines[0]
    assert await (await Registry.open(js)).get("ledger") is None, "nothing was deployed"
    assert (await js.stream_info("PAYMENTS")).config.as_dict() == config.as_dict()
    with pytest.raises(NotFoundError):
        await js.stream_info(TRIGGERS_STREAM)


async def test_a_trigger_whose_stream_is_gone_is_reported_and_the_others_still_run(
        runtime: RuntimeFactory, manifest_dir: Callable[..., Path], nc: NATS, js: JetStreamContext,
        scratch: Path) -> None:
    await add_payments(js, ["payments.>"])
    manifests = ManifestSet.load([manifest_dir(ledger=fn("ledger", "payments.settled.*", stream="PAYMENTS")
                                               + "  - subject: ledger.entries\n")])
    await (await Registry.open(js)).deploy(manifests)
    await js.delete_stream("PAYMENTS")   # the user removes it while no runtime runs
    rt = await runtime({"trust": ("tests",)})
    await eventually(lambda: "ledger" in rt.state.trigger_failures, message="the runtime to apply ledger")
    failures = rt.state.trigger_failures["ledger"]
    assert list(failures) == ["payments-settled-any"] and "no stream PAYMENTS" in failures["payments-settled-any"]
    await nc.publish("ledger.entries", b'{"id": 7}')
    await eventually(lambda: runs(scratch, "ledger"), message="the other trigger to run")
    assert runs(scratch, "ledger")[0]["trigger"] == "ledger-entries"


async def test_a_trigger_on_a_users_work_queue_stream_is_a_clear_deploy_error(
        nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> None:
    await js.add_stream(StreamConfig(name="JOBS", subjects=["jobs.>"], retention=RetentionPolicy.WORK_QUEUE))
    path = tmp_path / "worker.yaml"
    path.write_text(fn("worker", "jobs.>", stream="JOBS"))
    result = await acli(nats_server, "deploy", str(path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(lines) == 1 and "JOBS" in lines[0] and "work queue" in lines[0], result.stderr


# ------------------------------------------------------------------ pipelines


async def test_a_pipeline_runs_the_next_function_once_per_event_despite_retries(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext, scratch: Path) -> None:
    count = 100
    await runtime({"trust": ("tests",)},
                  enrich=fn("enrich", "orders.created", handler="fails_twice", max_deliver=4,
                            extra="output: orders.enriched\n"),
                  notify=fn("notify", "orders.enriched"))
    outputs: list[Any] = []

    async def on_output(msg: Any) -> None:
        outputs.append(msg)
    await nc.subscribe("orders.enriched", cb=on_output)
    await publish_events(nc, "orders.created", range(count))
    await eventually(lambda: len(runs(scratch, "notify")) >= count, timeout=20, message="notify to run")
    for name, trigger in (("enrich", "orders-created"), ("notify", "orders-enriched")):
        await eventually(partial(settled, js, TRIGGERS_STREAM, consumer_name(name, trigger)))
    enrich = runs(scratch, "enrich")
    assert len(enrich) == 3 * count and Counter(r["attempt"] for r in enrich) == {1: count, 2: count, 3: count}
    notify = runs(scratch, "notify")
    ran_once(notify, range(count), "notify")
    emitted_by = {r["id"]: r["call_id"] for r in enrich if r["ok"]}
    for run in notify:
        assert run["caused_by"] == emitted_by[run["id"]], run
        assert run["subject"] == "orders.enriched" and run["trigger"] == "orders-enriched"
    # One output per event, each with an id that makes a second emission of it a duplicate.
    assert len(outputs) == count
    first = outputs[0]
    assert first.headers["Nats-Msg-Id"] == f"out:enrich:{first.headers['Fn-Call-Id']}"
    stored = (await js.stream_info(TRIGGERS_STREAM)).state.last_seq
    assert stored == 2 * count
    again = await js.publish("orders.enriched", first.data, headers=dict(first.headers))
    assert again.duplicate and (await js.stream_info(TRIGGERS_STREAM)).state.last_seq == stored


# ------------------------------------------------------------------ deploy


def logged(proc: RuntimeProcess, text: str) -> bool:
    return text in proc.output()


async def serving(nc: NATS, name: str, count: int) -> bool:
    return sum(1 for s in await gather_status(nc, 0.2) if name in s["serving"]) == count


async def test_a_trigger_manifest_starts_within_2s_and_keeps_events_while_undeployed(
        nats_server: EmbeddedServer, runtime_process: Callable[..., RuntimeProcess], nc: NATS,
        js: JetStreamContext, tmp_path: Path, scratch: Path) -> None:
    procs = [runtime_process(None, env={**TRUST, "RUNTIME_TEST_DIR": str(scratch)}) for _ in range(2)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    function = tmp_path / "late.yaml"
    function.write_text(fn("late"))
    assert (await acli(nats_server, "deploy", str(function))).returncode == 0
    await eventually(lambda: serving(nc, "late", 2), message="both runtimes serving late")
    trigger = tmp_path / "late-orders.yaml"
    trigger.write_text("kind: Trigger\nname: late-orders\nfunction: late\nsubject: orders.placed\n")

    # Deployed in-process, so that its return is the moment the registry has it (a deploy command
    # still exiting would hide the runtimes' delay).
    [deployed] = await (await Registry.open(js)).deploy(ManifestSet.load([trigger], known_functions=["late"]))
    returned = time.time()
    assert (deployed.kind, deployed.status) == ("Trigger", "created")
    await publish_events(nc, "orders.placed", range(1))
    await eventually(lambda: runs(scratch, "late"), timeout=5, message="the first event to run")
    took = runs(scratch, "late")[0]["t"] - returned
    assert took < 2.0, f"the trigger ran its first event {took:.2f}s after the deploy returned"

    consumer = consumer_name("late", "late-orders")
    undeployed = await acli(nats_server, "undeploy", "late-orders", "--yes")
    assert undeployed.returncode == 0, undeployed.stderr
    for proc in procs:
        await eventually(partial(logged, proc, "trigger late-orders stopped"),
                         message="both runtimes to stop the trigger")
    await publish_events(nc, "orders.placed", range(1, 6))

    async def waiting(count: int) -> bool:
        info = await js.consumer_info(TRIGGERS_STREAM, consumer)
        return bool(info.num_pending == count and info.num_ack_pending == 0)
    await eventually(lambda: waiting(5), message="the events to wait for the trigger")
    assert len(runs(scratch, "late")) == 1

    redeployed = await acli(nats_server, "deploy", str(trigger))
    assert redeployed.returncode == 0, redeployed.stderr
    assert redeployed.stdout.startswith("trigger late-orders: created"), redeployed.stdout
    await eventually(lambda: len(runs(scratch, "late")) >= 6, timeout=5, message="the kept events to run")
    await eventually(lambda: waiting(0))
    ran_once(runs(scratch, "late"), range(6), "late")


async def test_an_undeployed_function_keeps_its_events_until_it_is_deployed_again(
        runtime: RuntimeFactory, manifest_dir: Callable[..., Path], nc: NATS, js: JetStreamContext,
        scratch: Path) -> None:
    rt = await runtime({"trust": ("tests",)})
    registry = await Registry.open(js)
    manifests = ManifestSet.load([manifest_dir(audit=fn("audit", "orders.>"))])
    await registry.deploy(manifests)
    await eventually(lambda: "audit" in rt.state.workers, message="the runtime to serve audit")
    await publish_events(nc, "orders.created", range(1))
    await eventually(lambda: runs(scratch, "audit"), message="the first event to run")
    await registry.undeploy("audit")
    await eventually(lambda: "audit" not in rt.state.workers, message="the runtime to stop audit")
    await publish_events(nc, "orders.created", range(1, 4))
    consumer = consumer_name("audit", "orders-all")

    async def waiting(count: int) -> bool:
        info = await js.consumer_info(TRIGGERS_STREAM, consumer)
        return bool(info.num_pending == count and info.num_ack_pending == 0)
    await eventually(lambda: waiting(3), message="the events to wait for audit")
    assert len(runs(scratch, "audit")) == 1
    await registry.deploy(manifests)
    await eventually(lambda: len(runs(scratch, "audit")) >= 4, message="the kept events to run")
    await eventually(lambda: waiting(0))
    ran_once(runs(scratch, "audit"), range(4), "audit")
