"""``runtime triggers`` and the triggers in ``runtime ls``, on a real server: what is bound where, and what waits."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from runtime.server import EmbeddedServer

from .conftest import ROOT, RuntimeProcess, eventually

TRUST = {"RUNTIME_TRUST": "tests"}

AUDIT = """\
name: audit
handler: tests.handlers.events:audit
triggers:
  - subject: orders.>
"""
BILLING = """\
name: billing
handler: tests.handlers.events:billing
triggers:
  - subject: orders.created
    name: created
output: billing.done
"""
SETTLED = """\
kind: Trigger
name: settled
function: audit
stream: PAYMENTS
subject: payments.settled.*
"""


async def cli(server: EmbeddedServer, *args: str) -> subprocess.CompletedProcess[str]:
    # In a thread: the test's own connection keeps being served meanwhile.
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "runtime", *args, "--server", server.url], cwd=ROOT,
        capture_output=True, text=True, timeout=30, env={**os.environ, **TRUST, "NO_COLOR": "1"})


async def ok(server: EmbeddedServer, *args: str) -> str:
    result = await cli(server, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def listed(server: EmbeddedServer) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["function"], r["trigger"]): r for r in json.loads(await ok(server, "triggers", "--json"))}


def table(stdout: str) -> list[list[str]]:
    """The rows of a printed table (header left out), cells split on runs of two or more spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.strip().splitlines()[1:]]


async def deployed(server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> None:
    """audit (orders.>, and payments.settled.* of the user's PAYMENTS) and billing (orders.created), no runtime."""
    await js.add_stream(StreamConfig(name="PAYMENTS", subjects=["payments.>"]))
    for name, text in (("audit", AUDIT), ("billing", BILLING), ("settled", SETTLED)):
        (tmp_path / f"{name}.yaml").write_text(textwrap.dedent(text))
    await ok(server, "deploy", str(tmp_path / "audit.yaml"), str(tmp_path / "billing.yaml"))
    await ok(server, "deploy", str(tmp_path / "settled.yaml"))


async def test_triggers_lists_each_binding_with_the_events_waiting_for_it(
        nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, tmp_path: Path,
        runtime_process: Callable[..., RuntimeProcess]) -> None:
    assert (await ok(nats_server, "triggers")).strip() == "no triggers deployed"
    await deployed(nats_server, js, tmp_path)
    for i in range(3):   # nobody runs them yet: they wait, each once per trigger that wants it
        await nc.publish("orders.created", json.dumps({"id": i}).encode())
    await nc.publish("orders.cancelled", b'{"id": 9}')
    for i in range(2):
        await js.publish(f"payments.settled.{i}", b"{}")
    await js.publish("payments.refused.1", b"{}")

    async def waiting() -> dict[tuple[str, str], dict[str, Any]] | None:
        rows = await listed(nats_server)
        return rows if rows[("audit", "orders-all")]["backlog"] == 4 else None
    rows = await eventually(waiting, message="the four order events to wait for audit")
    assert list(rows) == [("audit", "orders-all"), ("audit", "settled"), ("billing", "created")]
    assert rows[("audit", "orders-all")] == {
        "function": "audit", "trigger": "orders-all", "subject": "orders.>", "stream": "FN_TRIGGERS",
        "consumer": "fn_audit_ON_orders-all", "status": "bound", "backlog": 4, "pending": 4, "ack_pending": 0,
        "output": None, "standalone": False}
    settled = rows[("audit", "settled")]
    assert (settled["stream"], settled["consumer"], settled["backlog"], settled["standalone"]) == (
        "PAYMENTS", "fn_audit_ON_settled", 2, True)
    billing = rows[("billing", "created")]
    assert (billing["subject"], billing["backlog"], billing["output"]) == ("orders.created", 3, "billing.done")

    shown = {(row[0], row[1]): row for row in table(await ok(nats_server, "triggers"))}
    assert shown[("audit", "orders-all")] == ["audit", "orders-all", "orders.>", "FN_TRIGGERS",
                                              "fn_audit_ON_orders-all", "bound", "4", "-"]
    assert shown[("billing", "created")][-2:] == ["3", "billing.done"]
    only = table(await ok(nats_server, "triggers", "billing"))
    assert [row[:2] for row in only] == [["billing", "created"]]

    # Served at last: every backlog drains.
    proc = runtime_process(None, env=TRUST)
    await proc.wait_ready()

    async def drained() -> bool:
        return all(r["backlog"] == 0 for r in (await listed(nats_server)).values())
    await eventually(drained, message="every trigger's backlog to drain")


async def test_a_missing_consumer_and_the_kept_consumer_of_an_undeployed_trigger_are_shown(
        nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, tmp_path: Path) -> None:
    await deployed(nats_server, js, tmp_path)
    # As after 7 days without a runtime: the server removed the consumer.
    await js.delete_consumer("FN_TRIGGERS", "fn_audit_ON_orders-all")
    row = (await listed(nats_server))[("audit", "orders-all")]
    assert (row["status"], row["backlog"], row["stream"]) == ("missing", None, "FN_TRIGGERS")
    shown = {(r[0], r[1]): r for r in table(await ok(nats_server, "triggers"))}
    assert shown[("audit", "orders-all")][5:7] == ["missing", "-"]

    # Undeployed, billing's consumer stays and keeps the events published meanwhile.
    await ok(nats_server, "undeploy", "billing", "--yes")
    await nc.publish("orders.created", b'{"id": 1}')

    async def kept() -> dict[str, Any] | None:
        rows = await listed(nats_server)
        return rows[("billing", "created")] if rows[("billing", "created")]["backlog"] == 1 else None
    row = await eventually(kept, message="the event to wait for the undeployed billing")
    assert (row["status"], row["subject"], row["consumer"]) == ("undeployed", "orders.created",
                                                                 "fn_billing_ON_created")
    assert [r[:2] for r in table(await ok(nats_server, "triggers", "billing"))] == [["billing", "created"]]


async def test_ls_shows_each_functions_triggers_and_their_backlog(nats_server: EmbeddedServer, nc: NATS,
                                                                  js: JetStreamContext, tmp_path: Path) -> None:
    await deployed(nats_server, js, tmp_path)
    for i in range(2):
        await nc.publish("orders.created", json.dumps({"id": i}).encode())
    await js.publish("payments.settled.1", b"{}")

    async def listing() -> dict[str, dict[str, Any]] | None:
        rows = {r["name"]: r for r in json.loads(await ok(nats_server, "ls", "--json"))}
        return rows if sum(t["backlog"] for t in rows["audit"]["triggers"]) == 3 else None
    rows = await eventually(listing, message="three events to wait for audit")
    assert rows["audit"]["triggers"] == [
        {"name": "orders-all", "subject": "orders.>", "stream": "FN_TRIGGERS", "backlog": 2, "status": "bound"},
        {"name": "settled", "subject": "payments.settled.*", "stream": "PAYMENTS", "backlog": 1, "status": "bound"}]
    assert rows["billing"]["triggers"] == [
        {"name": "created", "subject": "orders.created", "stream": "FN_TRIGGERS", "backlog": 2, "status": "bound"}]
    assert [t["name"] for t in rows["settled"]["triggers"]] == ["settled"]

    text = await ok(nats_server, "ls")
    header = text.splitlines()[0].split()
    assert header[-2:] == ["EVENTS", "SETTINGS"]
    events = {row[0]: row[-2] for row in table(text) if row[0] in ("audit", "billing", "settled")}
    assert events == {"audit": "3", "billing": "2", "settled": "1"}, text
    assert "  audit on orders.> (trigger orders-all, stream FN_TRIGGERS): backlog 2" in text.splitlines()
    assert "  audit on payments.settled.* (trigger settled, stream PAYMENTS): backlog 1" in text.splitlines()


async def test_a_trigger_bound_to_a_users_stream_by_its_subject_is_found_there(
        nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> None:
    await js.add_stream(StreamConfig(name="REFUNDS", subjects=["refunds.>"]))
    path = tmp_path / "refunder.yaml"
    path.write_text("name: refunder\nhandler: tests.handlers.events:audit\ntriggers:\n  - subject: refunds.issued\n")
    await ok(nats_server, "deploy", str(path))   # no stream named: REFUNDS captures the whole subject
    for _ in range(2):
        await js.publish("refunds.issued", b"{}")
    row = (await listed(nats_server))[("refunder", "refunds-issued")]
    assert (row["stream"], row["status"], row["backlog"]) == ("REFUNDS", "bound", 2)
    assert (await js.stream_info("REFUNDS")).state.messages == 2   # the user's stream keeps its events


async def test_a_deploy_that_closes_a_loop_of_outputs_is_refused_in_one_line(
        nats_server: EmbeddedServer, nc: NATS, manifest_dir: Callable[..., Path]) -> None:
    # billing's output billing.done triggers notify, whose output orders.refund is under audit's
    # orders.>; audit's output would close the loop through billing's orders.created.
    notify = "name: notify\nhandler: tests.handlers.events:audit\ntriggers:\n  - subject: billing.done\n" \
             "output: orders.refund\n"
    await ok(nats_server, "deploy", str(manifest_dir(billing=BILLING, notify=notify)))
    closing = AUDIT.replace("orders.>", "orders.refund") + "output: orders.created\n"
    result = await cli(nats_server, "deploy", str(manifest_dir(audit=closing)))
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "audit -> billing -> notify -> audit would trigger each other without end" in lines[0]
    assert "audit's output orders.created triggers billing" in lines[0]
    listed = json.loads(await ok(nats_server, "ls", "--json"))
    assert "audit" not in json.dumps(listed), "nothing of the refused deploy is stored"
    # Without the closing output, the same function deploys.
    await ok(nats_server, "deploy", str(manifest_dir(audit=AUDIT.replace("orders.>", "orders.refund"))))
