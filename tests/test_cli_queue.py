"""``runtime queue ls | purge`` and the confirmation of destructive commands, against a real server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pty
import select
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime import queue
from runtime.exitcodes import RET_DECLINED
from runtime.manifest import ManifestSet
from runtime.registry import Registry
from runtime.server import EmbeddedServer
from runtime.streams import DLQ_PREFIX, DLQ_STREAM, INVOKE_STREAM, dlq_stream_config, provision_base

from .conftest import ROOT

PING = "name: ping\nhandler: tests.handlers.deploy:ping\n"
LONG_BODY = json.dumps({"text": "x" * 300})


async def cli(server: EmbeddedServer, *args: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "runtime", *args, "--server", server.url],
                                   cwd=ROOT, capture_output=True, text=True, timeout=30,
                                   env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def declined(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == RET_DECLINED, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and result.stdout == "", result.stderr
    return lines[0]


async def waiting(js: JetStreamContext, subjects_filter: str) -> int:
    info = await js.stream_info(INVOKE_STREAM, subjects_filter=subjects_filter)
    return sum((info.state.subjects or {}).values())


async def queued_work(js: JetStreamContext, manifest_dir: Callable[..., Path]) -> dict[str, int]:
    """``ping`` deployed with 5 invocations (one in flight, one on a priority level); ``ghost`` undeployed with 2.

    Returns the sequence numbers that matter.
    """
    await provision_base(js)
    registry = await Registry.open(js)
    await registry.deploy(ManifestSet.load([manifest_dir(ping=PING)]))
    seqs: dict[str, int] = {}
    for n in range(4):
        ack = await js.publish("fn.invoke.ping", json.dumps({"n": n}).encode(), headers={"Fn-Call-Id": f"ping-{n}"})
        seqs.setdefault("ping_first", ack.seq)
        seqs["ping_last"] = ack.seq
    seqs["ghost_first"] = (await js.publish("fn.invoke.ghost", LONG_BODY.encode(),
                                            headers={"Fn-Call-Id": "ghost-1", "X-Origin": "test"})).seq
    seqs["ghost_level"] = (await js.publish("fn.invoke.ghost.3", b"\xff\x00binary")).seq
    seqs["ping_level"] = (await js.publish("fn.invoke.ping.7", b'{"n": 7}')).seq
    # One of ping's is delivered and not acknowledged: in flight, as if a runtime were running it.
    sub = await js.pull_subscribe_bind("ping", stream=INVOKE_STREAM)
    [msg] = await sub.fetch(1, timeout=5)
    assert msg.metadata.sequence.stream == seqs["ping_first"]
    return seqs


# ------------------------------------------------------------------ queue ls


async def test_queue_ls_counts_queued_and_in_flight_work_of_every_function(
        nats_server: EmbeddedServer, js: JetStreamContext, manifest_dir: Callable[..., Path]) -> None:
    seqs = await queued_work(js, manifest_dir)

    table = ok(await cli(nats_server, "queue", "ls")).splitlines()
    assert table[0].split() == ["FUNCTION", "DEPLOYED", "QUEUED", "IN", "FLIGHT", "OLDEST", "PAUSED"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert rows["ghost"][:3] == ["no", "2", "0"], "an undeployed function's work is shown"
    assert rows["ping"][:3] == ["yes", "4", "1"]
    assert rows["ghost"][3].endswith("s") and len(rows) == 2
    assert rows["ghost"][4] == rows["ping"][4] == "-"

    listed = {r["function"]: r for r in json.loads(ok(await cli(nats_server, "queue", "ls", "--json")))}
    ghost, ping = listed["ghost"], listed["ping"]
    assert ghost["subjects"] == {"fn.invoke.ghost": 1, "fn.invoke.ghost.3": 1}
    assert ping["subjects"] == {"fn.invoke.ping": 4, "fn.invoke.ping.7": 1}
    assert ghost["oldest_seq"] == seqs["ghost_first"]
    # The oldest queued of ping is the one after the delivered one.
    assert ping["oldest_seq"] == seqs["ping_first"] + 1
    stored = await js.get_msg(INVOKE_STREAM, ping["oldest_seq"])
    assert stored.time is not None
    assert datetime.fromisoformat(ping["oldest_published_at"]) == stored.time
    age = (datetime.now(UTC) - stored.time).total_seconds()
    assert 0 <= ping["oldest_age"] <= age + 0.5

    one = json.loads(ok(await cli(nats_server, "queue", "ls", "ghost", "--json")))
    assert [r["function"] for r in one] == ["ghost"] and one[0]["queued"] == 2
    nothing = json.loads(ok(await cli(nats_server, "queue", "ls", "never-deployed", "--json")))
    assert nothing == [{"function": "never-deployed", "deployed": False, "queued": 0, "in_flight": 0,
                        "subjects": {}, "oldest_seq": None, "oldest_published_at": None, "oldest_age": None,
                        "paused": False, "paused_until": None}]


async def test_queue_ls_peek_shows_the_next_queued_invocations(
        nats_server: EmbeddedServer, js: JetStreamContext, manifest_dir: Callable[..., Path]) -> None:
    seqs = await queued_work(js, manifest_dir)

    shown = ok(await cli(nats_server, "queue", "ls", "ghost", "--peek", "5", env={"COLUMNS": "60"}))
    blocks = shown.split("\n\n")
    assert len(blocks) == 3, shown
    first = blocks[1].splitlines()
    assert first[0].startswith(f"seq {seqs['ghost_first']}  fn.invoke.ghost  queued ")
    assert first[0].endswith(f"{len(LONG_BODY)} bytes")
    assert first[1:3] == ["  Fn-Call-Id: ghost-1", "  X-Origin: test"]
    assert first[3].startswith('  {"text": "xxx') and first[3].endswith("…") and len(first[3]) == 60
    second = blocks[2].splitlines()
    assert second[0].startswith(f"seq {seqs['ghost_level']}  fn.invoke.ghost.3  ")
    assert second[1] == "  (not UTF-8; --json shows it as base64)"

    # The in-flight one is not queued: ping's peek starts after it, and takes priority levels in order.
    peeked = json.loads(ok(await cli(nats_server, "queue", "ls", "ping", "--peek", "4", "--json")))[0]["peek"]
    assert [(m["seq"], m["subject"]) for m in peeked] == [
        (seqs["ping_first"] + 1, "fn.invoke.ping"), (seqs["ping_first"] + 2, "fn.invoke.ping"),
        (seqs["ping_last"], "fn.invoke.ping"), (seqs["ping_level"], "fn.invoke.ping.7")]
    assert peeked[0]["headers"] == {"Fn-Call-Id": "ping-1"} and peeked[0]["body"] == '{"n": 1}'

    ghost = json.loads(ok(await cli(nats_server, "queue", "ls", "ghost", "--peek", "2", "--json")))[0]["peek"]
    assert ghost[0]["body"] == LONG_BODY, "--json has the whole body"
    assert base64.b64decode(ghost[1]["body_base64"]) == b"\xff\x00binary"

    usage = await cli(nats_server, "queue", "ls", "--peek", "2")
    assert usage.returncode == 2 and "--peek needs a FUNCTION" in usage.stderr


# ------------------------------------------------------------------ queue purge


async def test_queue_purge_with_yes_removes_both_subject_forms_only(
        nats_server: EmbeddedServer, js: JetStreamContext, manifest_dir: Callable[..., Path]) -> None:
    await queued_work(js, manifest_dir)
    assert ok(await cli(nats_server, "queue", "purge", "ping", "--yes")) == "5 invocation(s) of ping purged\n"
    assert await waiting(js, "fn.invoke.ping.>") == await waiting(js, "fn.invoke.ping") == 0
    assert await waiting(js, "fn.invoke.ghost.>") == await waiting(js, "fn.invoke.ghost") == 1

    assert json.loads(ok(await cli(nats_server, "queue", "purge", "ghost", "--yes", "--json"))) == {
        "function": "ghost", "purged": 2}
    # Nothing left: nothing to confirm, even without --yes.
    assert ok(await cli(nats_server, "queue", "purge", "ghost")) == "no queued invocations of ghost\n"
    listed = json.loads(ok(await cli(nats_server, "queue", "ls", "--json")))
    assert [(r["function"], r["queued"], r["in_flight"]) for r in listed] == [("ping", 0, 0)]


async def test_a_purge_keeps_what_was_published_after_the_count(nc: NATS, js: JetStreamContext) -> None:
    await provision_base(js)
    for _ in range(2):
        await js.publish("fn.invoke.late", b"{}")
    counted = await queue.queue_state(js, "late")   # what the question names
    await js.publish("fn.invoke.late.2", b"{}")
    assert (counted.queued, counted.in_flight) == (2, 0)
    assert await queue.purge(nc, "late", up_to=counted.up_to) == 2
    assert await waiting(js, "fn.invoke.late.*") == 1 and await waiting(js, "fn.invoke.late") == 0


async def test_destructive_commands_refuse_without_a_terminal(
        nats_server: EmbeddedServer, js: JetStreamContext, manifest_dir: Callable[..., Path]) -> None:
    await queued_work(js, manifest_dir)
    await js.update_stream(dlq_stream_config())
    for function in ("greet", "greet", "other"):
        await js.publish(f"{DLQ_PREFIX}{function}", b"{}")

    queue_purge, dlq_all, dlq_function, undeploy = await asyncio.gather(
        cli(nats_server, "queue", "purge", "ping"), cli(nats_server, "dlq", "purge", "--all"),
        cli(nats_server, "dlq", "purge", "--function", "greet"), cli(nats_server, "undeploy", "ping"))
    assert declined(queue_purge) == ("runtime: error: purge 5 invocations of ping (4 queued, 1 in flight): "
                                     "refused without confirmation; pass --yes to confirm")
    assert declined(dlq_all).startswith("runtime: error: purge all 3 dead letters: refused")
    assert declined(dlq_function).startswith("runtime: error: purge 2 dead letters of greet: refused")
    assert declined(undeploy).startswith(
        "runtime: error: undeploy function ping (5 waiting invocations kept in FN): refused")
    assert await waiting(js, "fn.invoke.>") == 7
    assert (await js.stream_info(DLQ_STREAM)).state.messages == 3
    assert (await (await Registry.open(js)).get("ping")) is not None

    # One dead letter by its sequence is not asked about; --yes goes ahead.
    assert ok(await cli(nats_server, "dlq", "purge", "3")) == "1 dead letter(s) purged\n"
    assert ok(await cli(nats_server, "dlq", "purge", "--all", "--yes")) == "2 dead letter(s) purged\n"
    assert ok(await cli(nats_server, "undeploy", "ping", "--yes")).startswith("function ping: undeployed")


# ------------------------------------------------------------------ on a terminal


def on_terminal(server: EmbeddedServer, args: list[str], answer: bytes) -> tuple[int, str, str]:
    """Run a command with a pseudo-terminal as stdin and stderr; answer its question. (code, terminal, stdout)."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "runtime", *args, "--server", server.url], cwd=ROOT,
                            stdin=terminal, stderr=terminal, stdout=subprocess.PIPE,
                            env={**os.environ, "NO_COLOR": "1"})   # the words, not the colours, are under test
    os.close(terminal)
    seen = b""
    try:
        while b"[y/N] " not in seen:
            ready, _, _ = select.select([controller], [], [], 20)
            assert ready, f"no question on the terminal: {seen!r}"
            seen += os.read(controller, 1024)
        os.write(controller, answer + b"\n")
        stdout, _ = proc.communicate(timeout=20)
        while select.select([controller], [], [], 0.5)[0]:
            try:
                chunk = os.read(controller, 1024)
            except OSError:  # the other end closed: everything was read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    return proc.returncode, seen.decode().replace("\r\n", "\n"), stdout.decode()


async def test_a_terminal_is_asked_and_the_answer_is_kept(
        nats_server: EmbeddedServer, js: JetStreamContext, manifest_dir: Callable[..., Path]) -> None:
    await queued_work(js, manifest_dir)

    code, terminal, stdout = await asyncio.to_thread(on_terminal, nats_server, ["queue", "purge", "ghost"], b"n")
    assert code == RET_DECLINED and stdout == ""
    assert terminal.startswith("purge 2 queued invocations of ghost? [y/N] n\n")
    assert terminal.strip().endswith("runtime: error: nothing done")
    assert await waiting(js, "fn.invoke.ghost") == await waiting(js, "fn.invoke.ghost.*") == 1

    code, terminal, stdout = await asyncio.to_thread(on_terminal, nats_server, ["queue", "purge", "ghost"], b"y")
    assert code == 0 and stdout == "2 invocation(s) of ghost purged\n", terminal
    assert await waiting(js, "fn.invoke.ghost.>") == await waiting(js, "fn.invoke.ghost") == 0

    code, terminal, stdout = await asyncio.to_thread(on_terminal, nats_server, ["undeploy", "ping"], b"yes")
    assert terminal.startswith("undeploy function ping (5 waiting invocations kept in FN)? [y/N] yes\n")
    assert code == 0 and stdout.startswith("function ping: undeployed"), terminal
    assert await (await Registry.open(js)).get("ping") is None
    assert await waiting(js, "fn.invoke.ping") == 4, "undeploy keeps queued work"
