"""``runtime invoke`` and ``runtime result`` as a user runs them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from runtime.server import EmbeddedServer, free_port

from .conftest import ROOT, RuntimeFactory
from .test_client import fn


async def cli(server: EmbeddedServer | str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    url = server if isinstance(server, str) else server.url
    # In a thread: the runtime under test shares this event loop.
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "runtime", *args, "--server", url],
                                   cwd=ROOT, capture_output=True, text=True, timeout=30, input=stdin)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("runtime: error: ")
    return lines[0]


async def test_invoke_prints_the_result(runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(greet=fn("greet", "core:greet"))
    human = await cli(nats_server, "invoke", "greet", '{"name": "Ada"}')
    assert human.returncode == 0, human.stderr
    assert json.loads(human.stdout) == {"greeting": "Hello, Ada!"}
    scripted = await cli(nats_server, "invoke", "greet", "-", "--json", "--call-id", "cli-1", stdin='{"name": "Bo"}')
    assert scripted.returncode == 0, scripted.stderr
    assert json.loads(scripted.stdout) == {"call_id": "cli-1", "status": "ok", "result": {"greeting": "Hello, Bo!"}}


async def test_failed_invocation_is_a_nonzero_exit(runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(fails=fn("fails", "core:always_fail", retry={"max_deliver": 1}))
    human, scripted = await asyncio.gather(cli(nats_server, "invoke", "fails", '{"n": 1}'),
                                           cli(nats_server, "invoke", "fails", '{"n": 2}', "--json"))
    assert human.returncode == 3
    assert one_line(human) == "runtime: error: ValueError: boom 1 (code 500)"
    assert scripted.returncode == 3
    out = json.loads(scripted.stdout)
    assert out["status"] == "failed" and out["error"] == {"type": "ValueError", "message": "boom 2",
                                                          "code": 500}
    unknown = await cli(nats_server, "invoke", "nothing", "{}")
    assert unknown.returncode == 3 and "(code 404)" in one_line(unknown)


async def test_async_then_result_by_id(runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(sleepy=fn("sleepy", "core:sleepy"))
    submitted = await cli(nats_server, "invoke", "sleepy", '{"seconds": 0.5}', "--async")
    assert submitted.returncode == 0, submitted.stderr
    call_id = submitted.stdout.strip()
    assert call_id and "\n" not in call_id
    waited = await cli(nats_server, "result", call_id, "--wait", "10s")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout) == {"slept": 0.5}
    scripted = await cli(nats_server, "result", call_id, "--json")
    assert json.loads(scripted.stdout) == {"call_id": call_id, "status": "ok", "result": {"slept": 0.5}}


async def test_result_not_stored(runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(greet=fn("greet", "core:greet"))
    human, scripted = await asyncio.gather(cli(nats_server, "result", "no-such-call"),
                                           cli(nats_server, "result", "no-such-call", "--json"))
    assert human.returncode == scripted.returncode == 4
    assert "no outcome stored for call id 'no-such-call'" in one_line(human)
    assert json.loads(scripted.stdout)["status"] == "missing"


async def test_bad_input_is_one_line(nats_server: EmbeddedServer) -> None:
    bad_json, bad_timeout, no_server = await asyncio.gather(
        cli(nats_server, "invoke", "greet", "{name: Ada}"),
        cli(nats_server, "invoke", "greet", "{}", "--timeout", "soon"),
        cli(f"nats://127.0.0.1:{free_port()}", "invoke", "greet", "{}"))
    assert bad_json.returncode == 2 and "not valid JSON" in one_line(bad_json)
    assert bad_timeout.returncode == 2 and "not a duration" in bad_timeout.stderr
    assert no_server.returncode == 1 and "cannot connect" in one_line(no_server)


async def test_a_reused_call_id_is_reported_as_a_duplicate(runtime: RuntimeFactory,
                                                            nats_server: EmbeddedServer) -> None:
    await runtime(echo=fn("echo", "core:echo"))
    first = await cli(nats_server, "invoke", "echo", '{"amount": 100}', "--call-id", "dup-1")
    assert first.returncode == 0 and first.stderr == "", first.stderr
    second = await cli(nats_server, "invoke", "echo", '{"amount": 999999}', "--call-id", "dup-1")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {"amount": 100}, "the first call's outcome, not a second run"
    assert "'dup-1' was already used" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    submitted = await cli(nats_server, "invoke", "echo", '{"amount": 5}', "--call-id", "dup-1", "--async", "--json")
    assert json.loads(submitted.stdout)["duplicate"] is True
    assert "was not stored" in submitted.stderr
