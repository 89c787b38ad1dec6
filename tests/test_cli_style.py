"""The command line at a terminal: colour where a person reads it (``NO_COLOR`` honoured), and tab completion."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runtime.cli import common
from runtime.server import EmbeddedServer

from .conftest import ROOT, RuntimeFactory

ENTRY = Path(sys.executable).with_name("runtime")  # the installed console script, as a shell runs it
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RED_ERROR = "\x1b[1;31merror:\x1b[0m"
DIM_DISABLED = "\x1b[2mdisabled\x1b[0m"
COLOUR_VARS = ("NO_COLOR", "FORCE_COLOR", "TERM")

PING = "name: ping\nhandler: tests.handlers.deploy:ping\n"
NIGHTLY = "kind: Schedule\nname: nightly\nfunction: ping\ncron: '0 3 * * *'\n"
PAUSED = "kind: Schedule\nname: paused-for-now\nfunction: ping\ncron: '@hourly'\nenabled: false\n"


def environ(**extra: str) -> dict[str, str]:
    """This environment without the colour settings of whoever runs the tests, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in COLOUR_VARS}
    return {"TERM": "xterm-256color", **env, **extra}


def on_terminal(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run ``runtime`` with stdin, stdout and stderr on a pseudo-terminal; its exit code and what the screen got."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([str(ENTRY), *args], stdin=terminal, stdout=terminal, stderr=terminal,
                                cwd=ROOT, env=env)
    finally:
        os.close(terminal)
    screen = bytearray()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], deadline - time.monotonic())
            if not ready:
                break
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the command exited and closed its side
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(controller)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    return proc.returncode, screen.decode().replace("\r\n", "\n")


def piped(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENTRY), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


@pytest.fixture
def schedules(manifest_dir: Callable[..., Path]) -> Path:
    return manifest_dir(ping=PING, nightly=NIGHTLY, paused=PAUSED)


# ------------------------------------------------------------------ colour


@pytest.mark.parametrize(("settings", "coloured"), [
    ({}, True),
    ({"NO_COLOR": "1"}, False),
    ({"NO_COLOR": ""}, True),  # no-color.org: an empty NO_COLOR is as if unset
    ({"TERM": "dumb"}, False),
])
def test_errors_and_statuses_are_coloured_on_a_terminal_unless_told_not_to(
        schedules: Path, settings: dict[str, str], coloured: bool) -> None:
    code, screen = on_terminal("schedules", "--manifests", "/no/such/manifests", env=environ(**settings))
    assert code == 1
    assert screen.strip() == (f"runtime: {RED_ERROR if coloured else 'error:'} "
                              "/no/such/manifests: no such file or directory")

    code, screen = on_terminal("schedules", "--manifests", str(schedules), env=environ(**settings))
    assert code == 0, screen
    assert (DIM_DISABLED in screen) is coloured
    assert ("\x1b[" in screen) is coloured


@pytest.mark.parametrize(("settings", "coloured"), [
    ({}, False),
    ({"FORCE_COLOR": "1"}, True),
    ({"FORCE_COLOR": "1", "NO_COLOR": "1"}, False),  # the user's "no" wins
])
def test_output_that_is_not_a_terminal_is_plain_unless_colour_is_forced(
        schedules: Path, settings: dict[str, str], coloured: bool) -> None:
    failed = piped("schedules", "--manifests", "/no/such/manifests", env=environ(**settings))
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"runtime: {RED_ERROR if coloured else 'error:'} /no/such/manifests")

    listed = piped("schedules", "--manifests", str(schedules), env=environ(**settings))
    assert listed.returncode == 0, listed.stderr
    assert (DIM_DISABLED in listed.stdout) is coloured
    assert ("\x1b[" in listed.stdout) is coloured


def test_json_is_never_coloured(schedules: Path) -> None:
    code, screen = on_terminal("schedules", "--manifests", str(schedules), "--json", env=environ(FORCE_COLOR="1"))
    assert code == 0, screen
    assert "\x1b" not in screen
    assert [s["enabled"] for s in json.loads(screen)] == [True, False]


def test_colour_keeps_the_columns_of_a_table_aligned(schedules: Path) -> None:
    coloured = piped("schedules", "--manifests", str(schedules), env=environ(FORCE_COLOR="1")).stdout
    plain = piped("schedules", "--manifests", str(schedules), env=environ()).stdout
    assert DIM_DISABLED in coloured
    assert ANSI.sub("", coloured) == plain
    header, _, paused = plain.splitlines()
    assert paused.index("disabled") == header.index("NEXT (LOCAL)")
    assert paused[header.index("NEXT (UTC)") - 1:].startswith(" - ")


def test_status_words_in_any_column_named_status_get_their_colour(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    rows = [["a", "serving", "failing"], ["bb", "failing", "-"], ["ccc", "no runtime", "x"], ["d", "disabled", "y"]]
    common.print_table(["name", "status", "note"], rows)
    out = capsys.readouterr().out
    assert out.splitlines()[1:] == [
        "a     \x1b[32mserving\x1b[0m     failing",  # only the status column is painted
        "bb    \x1b[1;31mfailing\x1b[0m     -",
        "ccc   \x1b[33mno runtime\x1b[0m  x",
        "d     \x1b[2mdisabled\x1b[0m    y",
    ]
    monkeypatch.setenv("NO_COLOR", "1")
    common.print_table(["name", "status", "note"], rows)
    assert capsys.readouterr().out == ANSI.sub("", out)


def test_warnings_get_a_yellow_prefix(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    name = "runtime.test_cli_style"
    common.show_warnings(name)
    logger = logging.getLogger(name)
    try:
        logger.warning("call id %s was used before (100%% sure)", "abc")
    finally:
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
    assert capsys.readouterr().err == "runtime: \x1b[33mwarning:\x1b[0m call id abc was used before (100% sure)\n"


async def test_ls_paints_the_status_column(runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(ping=PING, paused=PAUSED)

    def ls(*args: str, **settings: str) -> str:
        result = piped("ls", "--server", nats_server.url, *args, env=environ(**settings))
        assert result.returncode == 0, result.stderr
        return result.stdout

    # In a thread: the runtime under test shares this event loop.
    coloured = await asyncio.to_thread(ls, FORCE_COLOR="1")
    plain = await asyncio.to_thread(ls)
    assert "\x1b[32mserving\x1b[0m" in coloured
    assert DIM_DISABLED in coloured
    assert ANSI.sub("", coloured) == plain
    listing = json.loads(await asyncio.to_thread(ls, "--json", FORCE_COLOR="1"))
    assert {r["name"]: r["status"] for r in listing} == {"ping": "serving", "paused-for-now": "disabled"}


# ------------------------------------------------------------------ completion


def complete(line: str, tmp_path: Path) -> list[str]:
    """What the shell offers for ``line`` with the cursor at its end, asked as bash's hook asks argcomplete."""
    out = tmp_path / "completions"
    env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
           "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
    result = subprocess.run([str(ENTRY)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    return [word.strip() for word in out.read_text().split("\013")]


def test_completion_of_commands_and_subcommands(tmp_path: Path) -> None:
    assert complete("runtime dl", tmp_path) == ["dlq"]
    assert {w for w in complete("runtime dlq ", tmp_path) if not w.startswith("-")} == {"ls", "show", "replay", "purge"}
    assert complete("runtime serve --log-l", tmp_path) == ["--log-level"]
    assert {"DEBUG", "INFO", "WARNING", "ERROR"} <= set(complete("runtime serve --log-level ", tmp_path))


def test_the_console_script_carries_the_marker_global_completion_looks_for() -> None:
    # activate-global-python-argcomplete completes only scripts whose module says PYTHON_ARGCOMPLETE_OK.
    result = subprocess.run([sys.executable, "-W", "ignore", "-m", "argcomplete._check_console_script", str(ENTRY)],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
