"""The command line as a newcomer meets it: version, help, options in any place, and errors in plain words."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path

import pytest
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError

from runtime.cli import build_parser, subcommands
from runtime.cli.common import describe
from runtime.dlq import DeadLetterNotFound, delete_dead_letter
from runtime.server import EmbeddedServer, find_binary, free_port
from runtime.streams import DLQ_PREFIX, DLQ_STREAM, dlq_stream_config

from .conftest import ROOT, RuntimeFactory, eventually
from .test_cli_invoke import cli, one_line
from .test_client import fn

MINE = {"serve", "schedules", "dlq", "invoke", "result", "deploy", "undeploy", "rollback", "ls"}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})})


async def answers(host: str, port: int) -> bool:
    """Whether a NATS server listens on ``host:port`` (it greets every connection with INFO)."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    try:
        return (await asyncio.wait_for(reader.readline(), 5)).startswith(b"INFO ")
    finally:
        writer.close()


def plain(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line, which must not be nats-py's wording."""
    line = one_line(result)
    assert "err_code" not in line and "error: nats:" not in line and "Error:" not in line, line
    return line


# ------------------------------------------------------------------ dead letters that are gone


async def test_a_dead_letter_deleted_twice_is_no_such_dead_letter(nats_server: EmbeddedServer,
                                                                  js: JetStreamContext) -> None:
    await js.add_stream(dlq_stream_config())
    for _ in range(5):
        await js.publish(f"{DLQ_PREFIX}greet", b"{}")
    first = await cli(nats_server, "dlq", "purge", "5")
    assert first.returncode == 0 and first.stdout == "1 dead letter(s) purged\n", first.stderr
    second = await cli(nats_server, "dlq", "purge", "5")
    assert second.returncode == 1 and plain(second) == "runtime: error: no dead letter with sequence 5"
    # Between a purge's look-up and its delete another purge can win: the server then answers
    # the delete with a different code, which must read the same.
    await js.delete_msg(DLQ_STREAM, 4)
    with pytest.raises(DeadLetterNotFound, match="no dead letter with sequence 4"):
        await delete_dead_letter(js, 4)


# ------------------------------------------------------------------ servers without the runtime


@pytest.fixture
async def plain_nats() -> AsyncIterator[str]:
    """A nats-server without JetStream, stopped by its PID."""
    port = free_port()
    proc = subprocess.Popen([find_binary(), "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"

    try:
        await eventually(lambda: answers("127.0.0.1", port), message="nats-server without JetStream")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_jetstream_off_is_one_plain_line(plain_nats: str) -> None:
    commands = [("dlq", "ls"), ("dlq", "show", "1"), ("dlq", "replay", "--all"), ("dlq", "purge", "1"),
                ("invoke", "greet", "{}"), ("invoke", "greet", "{}", "--async"), ("schedules",)]
    results = await asyncio.gather(*(cli(plain_nats, *c) for c in commands))
    for command, result in zip(commands, results, strict=True):
        assert result.returncode == 1, (command, result.stderr)
        assert plain(result) == (f"runtime: error: JetStream is not enabled on the NATS server at {plain_nats}: "
                                 "start nats-server with -js (or let 'runtime serve' start one)"), command
    stored = await cli(plain_nats, "result", "some-call")
    assert stored.returncode == 1 and "is JetStream enabled there" in plain(stored)


async def test_a_server_the_runtime_never_ran_on_is_one_plain_line(nats_server: EmbeddedServer) -> None:
    commands = [("dlq", "ls"), ("dlq", "show", "1"), ("dlq", "replay", "1"), ("dlq", "purge", "--all")]
    results = await asyncio.gather(*(cli(nats_server, *c) for c in commands))
    for command, result in zip(commands, results, strict=True):
        assert result.returncode == 1, (command, result.stderr)
        assert plain(result) == (f"runtime: error: the runtime's streams do not exist on the NATS server at "
                                 f"{nats_server.url}: run 'runtime serve' against it first"), command
    stored = await cli(nats_server, "result", "some-call")
    assert stored.returncode == 1 and "has 'runtime serve' run against it?" in plain(stored)


# ------------------------------------------------------------------ serve options


def test_an_unknown_log_level_is_a_usage_error() -> None:
    loud = run_cli("serve", "--log-level", "LOUD")
    assert loud.returncode == 2 and "Traceback" not in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == (
        "runtime serve: error: argument --log-level: invalid choice: 'LOUD' "
        "(choose from 'DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')")
    from_env = run_cli("serve", env={"RUNTIME_LOG_LEVEL": "loud"})
    assert from_env.returncode == 1 and plain(from_env) == (
        "runtime: error: RUNTIME_LOG_LEVEL='loud' is not a log level "
        "(choose from DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    # Any case is accepted: this one gets as far as looking for its server's config.
    quiet = run_cli("serve", "--log-level", "warning", "--port", str(free_port()), "--nats-conf", "missing.conf")
    assert quiet.returncode == 1 and plain(quiet) == "runtime: error: nats-server config missing.conf does not exist"
    help_text = run_cli("serve", "--help").stdout
    assert "--log-level {DEBUG,INFO,WARNING,ERROR,CRITICAL}" in help_text


async def test_serve_host_is_the_embedded_servers_listen_address(tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.2", "--port", str(port),
                             "--data-dir", str(tmp_path / "data"), "--nats-conf", str(ROOT / "nats.conf")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    try:
        await eventually(lambda: answers("127.0.0.2", port), timeout=20, message="the server on 127.0.0.2")
        assert not await answers("127.0.0.1", port)
    finally:
        # Often before the runtime is ready: a stop during start-up must still stop the server.
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    assert not await answers("127.0.0.2", port), "the embedded server stops with the runtime"


# ------------------------------------------------------------------ version, --debug, help


def test_version_comes_from_the_installed_package() -> None:
    shown = run_cli("--version")
    assert shown.returncode == 0 and shown.stdout == f"runtime {version('nats-fn-runtime')}\n"


async def test_debug_is_accepted_after_the_subcommand() -> None:
    nowhere = f"nats://127.0.0.1:{free_port()}"
    terse, verbose, early = await asyncio.gather(cli(nowhere, "dlq", "ls"), cli(nowhere, "dlq", "ls", "--debug"),
                                                 asyncio.to_thread(run_cli, "--debug", "dlq", "ls", "-s", nowhere))
    assert terse.returncode == 1 and "Traceback" not in terse.stderr
    assert "Traceback" in verbose.stderr and "cannot connect" in verbose.stderr
    assert "Traceback" in early.stderr
    invoked = await cli(nowhere, "invoke", "hello", "--debug")
    assert invoked.returncode == 1 and "unrecognized arguments" not in invoked.stderr


def test_every_command_and_positional_argument_has_help() -> None:
    parser = build_parser()
    top = next(a for a in parser._actions if a.dest == "command")
    listed = {choice.dest: choice.help for choice in top._get_subactions()}
    for name in MINE:
        assert listed[name], name
    for command in subcommands(parser):
        name = command.prog.split()[1]
        if name not in MINE:
            continue
        for action in command._actions:
            assert action.help, (command.prog, action.dest)
    actions = next(a for a in top.choices["dlq"]._actions if a.dest == "dlq_command")
    assert all(sub.help for sub in actions._get_subactions())


# ------------------------------------------------------------------ the timeout hint


async def test_the_timeout_hint_is_a_command(runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(sleepy=fn("sleepy", "core:sleepy"))
    human, scripted = await asyncio.gather(
        cli(nats_server, "invoke", "sleepy", '{"seconds": 1}', "--timeout", "200ms", "--call-id", "slow-1"),
        cli(nats_server, "invoke", "sleepy", '{"seconds": 1}', "--timeout", "200ms", "--call-id", "slow-2",
            "--json"))
    assert human.returncode == 3
    line = one_line(human)
    assert "read it later with runtime result slow-1 (code 504)" in line and "result(" not in line
    assert scripted.returncode == 3 and "runtime result slow-2" in scripted.stdout
    later = await cli(nats_server, "result", "slow-1", "--wait", "10s")
    assert later.returncode == 0, later.stderr


def test_other_nats_errors_are_said_in_the_users_terms() -> None:
    url = "nats://127.0.0.1:4222"
    assert describe(NatsTimeout(), url) == "the NATS server at nats://127.0.0.1:4222 did not answer in time; try again"
    refused = BadRequestError(code=400, err_code=10999, description="something odd")
    assert describe(refused, url) == ("the NATS server at nats://127.0.0.1:4222 refused the request: "
                                      "something odd (error 10999)")
    assert describe(ValueError("boom")) == "ValueError: boom"
