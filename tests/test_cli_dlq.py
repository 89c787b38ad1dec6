"""``runtime dlq ls | show | replay | purge`` end to end, as subprocesses against a real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime.dlq import list_dead_letters
from runtime.results import fetch_response
from runtime.server import EmbeddedServer
from runtime.streams import DLQ_BODIES_BUCKET, DLQ_STREAM, EVENTS_STREAM

from .conftest import ROOT, RuntimeFactory, RuntimeProcess, eventually

FIXABLE = """\
name: fixable
handler: tests.handlers.deadletters:fixable
retry: {max_deliver: 1}
"""
GREET = "name: greet\nhandler: tests.handlers.core:greet\n"
NOPE = "name: nope\nhandler: tests.handlers.core:reject\n"


async def dlq(server: EmbeddedServer, *args: str) -> subprocess.CompletedProcess[str]:
    # In a thread: the in-process runtime keeps serving while the command runs.
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "runtime", "dlq", *args,
                                                    "--server", server.url],
                                   cwd=ROOT, capture_output=True, text=True, timeout=30)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or code == 2, result.stderr  # argparse prints its usage line too
    return lines[-1]


async def _settled(js: JetStreamContext, count: int) -> bool:
    dead = (await js.stream_info(DLQ_STREAM)).state.messages
    return dead == count and (await js.stream_info(EVENTS_STREAM)).state.messages == 0


async def test_dlq_commands_end_to_end(runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS,
                                       js: JetStreamContext, scratch: Path) -> None:
    await runtime(fixable=FIXABLE, greet=GREET, nope=NOPE)
    sent: list[tuple[str, bytes, str]] = [
        ("fixable", b'{"item": "tea", "quantity": 1}', "order-1"),
        ("fixable", b'{"item": "jam", "quantity": 2}', "order-2"),
        ("greet", b"{oops", "bad-1"),
        ("greet", b'{"age": 3}', "bad-2"),
        ("nope", b"{}", "nope-1"),
    ]
    for function, body, call_id in sent:
        await js.publish(f"fn.invoke.{function}", body, headers={"Fn-Call-Id": call_id, "X-Origin": "cli-test"})
    await eventually(lambda: _settled(js, 5), message="five dead letters")
    seq = {d.call_id: d.seq for d in (await list_dead_letters(nc, js)).letters}

    table = ok(await dlq(nats_server, "ls")).splitlines()
    assert table[0].split() == ["SEQ", "FUNCTION", "REASON", "ERROR", "FAILED", "AT", "DELIVERIES", "SIZE"]
    assert len(table) == 6
    assert [int(row.split()[0]) for row in table[1:]] == sorted(seq.values()), "oldest first"
    first = next(row.split() for row in table[1:] if row.split()[0] == str(seq["order-1"]))
    assert first[:4] == [str(seq["order-1"]), "fixable", "max_deliver", "LookupError:"]
    assert first[-2:] == ["1", f"{len(sent[0][1])}B"]

    listed: list[dict[str, Any]] = json.loads(ok(await dlq(nats_server, "ls", "--function", "greet", "--json")))
    assert [(d["call_id"], d["reason"], d["deliveries"]) for d in listed] == [
        ("bad-1", "invalid_input", 1), ("bad-2", "invalid_input", 1)]
    assert "name: Field required" in listed[1]["error"]

    shown = ok(await dlq(nats_server, "show", str(seq["order-2"])))
    assert "Fn-Reason: max_deliver" in shown and "Fn-Error: LookupError: no stock of jam" in shown
    assert "X-Origin: cli-test" in shown and shown.rstrip().endswith('{"item": "jam", "quantity": 2}')
    as_json = json.loads(ok(await dlq(nats_server, "show", str(seq["bad-1"]), "--json")))
    assert as_json["body"] == "{oops" and as_json["headers"]["Fn-Function"] == "greet"

    # The fix ships; one replay by sequence, the rest of the function's by name.
    (scratch / "fixed").touch()
    assert "1 dead letter(s) replayed" in ok(await dlq(nats_server, "replay", str(seq["order-1"])))
    replayed = json.loads(ok(await dlq(nats_server, "replay", "--function", "fixable", "--json")))
    assert [r["call_id"] for r in replayed] == ["order-2"]
    for call_id, item in (("order-1", "tea"), ("order-2", "jam")):
        result = await eventually(lambda c=call_id: _succeeded(js, c), message=f"{call_id} to succeed")
        assert result.value()["shipped"] == item

    assert ok(await dlq(nats_server, "purge", str(seq["bad-1"]))).strip() == "1 dead letter(s) purged"
    assert ok(await dlq(nats_server, "purge", "--function", "greet", "--yes")).strip() == "1 dead letter(s) purged"
    remaining = json.loads(ok(await dlq(nats_server, "ls", "--json")))
    assert [d["call_id"] for d in remaining] == ["nope-1"]
    assert json.loads(ok(await dlq(nats_server, "purge", "--all", "--json", "--yes"))) == {"purged": 1}
    assert ok(await dlq(nats_server, "ls")).strip() == "no dead letters"


async def _succeeded(js: JetStreamContext, call_id: str) -> Any:
    response = await fetch_response(js, call_id)
    return response if response is not None and response.error is None else None


async def test_dlq_command_errors_are_one_line(nats_server: EmbeddedServer, js: JetStreamContext) -> None:
    from runtime.streams import provision_base

    await provision_base(js)
    missing = one_line_error(await dlq(nats_server, "show", "999"), 1)
    assert missing == "runtime: error: no dead letter with sequence 999"
    assert "no dead letter with sequence 998" in one_line_error(await dlq(nats_server, "purge", "998"), 1)
    usage = one_line_error(await dlq(nats_server, "replay"), 2)
    assert "one of the arguments seq --function/-f --all is required" in usage
    bad_name = one_line_error(await dlq(nats_server, "purge", "--function", "a.>"), 2)
    assert "is not a function name" in bad_name


async def test_dlq_retention_is_configurable(runtime_process: Callable[..., RuntimeProcess],
                                             js: JetStreamContext) -> None:
    proc = runtime_process(extra=["--dlq-retention", "2d"])
    await proc.wait_ready()
    info = await js.stream_info(DLQ_STREAM)
    assert info.config.max_age == 2 * 86400
    bodies = await js.stream_info(f"OBJ_{DLQ_BODIES_BUCKET}")
    assert bodies.config.max_age == 2 * 86400, "bodies of oversized letters do not outlive their letters"
