"""Structured logs: ``runtime serve --log-format json`` writes one JSON object per line, and every line
about an invocation names its function, call id, attempt and stream sequence."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from runtime import headers as H
from runtime.logs import InvocationLogger, JsonFormatter, TextFormatter, configure
from runtime.results import fetch_response

from .conftest import ROOT, RuntimeProcess, eventually

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

FLAKY = """\
name: flaky
handler: tests.handlers.logged:flaky
retry: {max_deliver: 3, backoff: [10ms]}
"""
BROKEN = """\
name: broken
handler: tests.handlers.logged:broken
retry: {max_deliver: 2, backoff: [10ms]}
"""


def json_lines(proc: RuntimeProcess) -> list[dict[str, Any]]:
    """Every line the process wrote, each parsed as JSON (a line that is not fails the test)."""
    lines = []
    for number, line in enumerate(proc.output().splitlines(), 1):
        try:
            parsed = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}\n{proc.output()}") from None
        assert isinstance(parsed, dict), line
        assert {"time", "level", "logger", "message"} <= parsed.keys(), line
        assert TIME.match(parsed["time"]), parsed["time"]
        lines.append(parsed)
    return lines


def about(lines: list[dict[str, Any]], call_id: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("call_id") == call_id]


async def test_json_logs_carry_the_invocation_fields(runtime_process: Callable[..., RuntimeProcess],
                                                     manifest_dir: Callable[..., Path], js: JetStreamContext) -> None:
    proc = runtime_process(manifest_dir(flaky=FLAKY, broken=BROKEN), extra=["--log-format", "json"])
    await proc.wait_ready()
    flaky = await js.publish("fn.invoke.flaky", b'{"order": 1}', headers={H.CALL_ID: "order-flaky"})
    broken = await js.publish("fn.invoke.broken", b'{"order": 2}', headers={H.CALL_ID: "order-broken"})
    await eventually(lambda: fetch_response(js, "order-flaky"), message="the flaky call to succeed")
    await eventually(lambda: fetch_response(js, "order-broken"), message="the broken call to fail for good")
    await eventually(lambda: "failed for good" in proc.output(), message="the dead letter to be logged")
    proc.stop()   # its shutdown lines too must be JSON
    lines = json_lines(proc)
    assert any(line["message"].startswith("runtime ready") for line in lines)

    flaky_lines = about(lines, "order-flaky")
    assert {(line["logger"], line["attempt"]) for line in flaky_lines} >= {
        ("runtime.fn.flaky", 1), ("runtime.fn.flaky", 2)}, "the handler's own lines and the retry"
    assert any(line["level"] == "WARNING" and "retrying" in line["message"] and line["attempt"] == 1
               for line in flaky_lines)
    assert {(line["function"], line["stream_seq"]) for line in flaky_lines} == {("flaky", flaky.seq)}

    broken_lines = about(lines, "order-broken")
    [final] = [line for line in broken_lines if "failed for good" in line["message"]]
    assert (final["function"], final["attempt"], final["stream_seq"]) == ("broken", 2, broken.seq)
    assert {line["attempt"] for line in broken_lines} == {1, 2}
    assert {(line["function"], line["stream_seq"]) for line in broken_lines} == {("broken", broken.seq)}

    # Lines that name a call in their text carry it as a field too.
    for line in lines:
        for call_id in ("order-flaky", "order-broken"):
            if call_id in line["message"]:
                assert line.get("call_id") == call_id, line
    # A Python warning is a log line like any other, not text the warnings module prints.
    assert any(line["logger"] == "py.warnings" and "the first attempt is about to fail" in line["message"]
               for line in lines)


async def test_the_format_can_come_from_the_environment(runtime_process: Callable[..., RuntimeProcess],
                                                        manifest_dir: Callable[..., Path]) -> None:
    proc = runtime_process(manifest_dir(flaky=FLAKY), env={"RUNTIME_LOG_FORMAT": "JSON"})
    await proc.wait_ready()
    proc.stop()
    lines = json_lines(proc)
    assert any(line["message"].startswith("serving flaky") for line in lines)


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime", "serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env={**os.environ, **(env or {})})


def test_an_unknown_log_format_is_a_one_line_error() -> None:
    given = run_serve("--log-format", "xml")
    assert given.returncode == 2 and "Traceback" not in given.stderr
    assert given.stderr.strip().splitlines()[-1] == (
        "runtime serve: error: argument --log-format: invalid choice: 'xml' (choose from 'text', 'json')")
    from_env = run_serve(env={"RUNTIME_LOG_FORMAT": "xml"})
    assert from_env.returncode == 1 and from_env.stderr.strip() == (
        "runtime: error: RUNTIME_LOG_FORMAT='xml' is not a log format (choose from text, json)")


# ------------------------------------------------------------------ the formatters


def record(message: str = "attempt %d failed", *args: Any, exc: bool = False, **extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("runtime.fn.hello")
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    made = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, args or (2,), exc_info,
                             extra=extra)
    made.created = 1714564800.0425   # 2024-05-01T12:00:00.042Z
    made.msecs = 42.0
    return made


INVOCATION: dict[str, Any] = {"function": "hello", "call_id": "c-1", "attempt": 2, "stream_seq": 17}


def test_the_json_formatter_writes_one_object_per_line() -> None:
    line = JsonFormatter().format(record(exc=True, **INVOCATION, order=object(), time="not mine"))
    assert "\n" not in line
    parsed = json.loads(line)
    assert list(parsed)[:8] == ["time", "level", "logger", "message", "function", "call_id", "attempt",
                                "stream_seq"]
    assert parsed["time"] == "2024-05-01T12:00:00.042Z", "RFC 3339, UTC, milliseconds"
    assert (parsed["level"], parsed["logger"], parsed["message"]) == ("WARNING", "runtime.fn.hello",
                                                                      "attempt 2 failed")
    assert {k: parsed[k] for k in INVOCATION} == INVOCATION
    assert parsed["order"].startswith("<object object"), "any other field is written as text"
    assert parsed["exc"].startswith("Traceback") and parsed["exc"].endswith("ValueError: boom")
    plain = json.loads(JsonFormatter().format(record()))
    assert set(plain) == {"time", "level", "logger", "message"}


def test_the_text_formatter_appends_the_invocation_fields() -> None:
    formatter = TextFormatter()
    line = formatter.format(record(**INVOCATION))
    assert line.endswith(" WARNING runtime.fn.hello: attempt 2 failed [function=hello call_id=c-1 attempt=2 seq=17]")
    assert formatter.format(record()).endswith(" WARNING runtime.fn.hello: attempt 2 failed")
    first, *rest = formatter.format(record(exc=True, call_id="c-1")).splitlines()
    assert first.endswith("attempt 2 failed [call_id=c-1]") and rest[-1] == "ValueError: boom"


class Seen(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record)


class Inv:
    function, call_id, delivered, stream_seq = "hello", "c-1", 2, 17


def test_a_handler_logger_adds_its_invocation() -> None:
    target = logging.getLogger("tests.logs.handler")
    handler = Seen()
    target.addHandler(handler)
    try:
        InvocationLogger(target, Inv()).warning("hi %s", "there", extra={"order": 5, "call_id": "forged"})
    finally:
        target.removeHandler(handler)
    [made] = handler.seen
    assert made.getMessage() == "hi there" and made.__dict__["order"] == 5
    assert {k: made.__dict__[k] for k in INVOCATION} == INVOCATION


def test_configure_writes_the_chosen_format(capsys: Any) -> None:
    root, nats_logger = logging.getLogger(), logging.getLogger("nats")
    saved = root.handlers[:], root.level, nats_logger.level
    try:
        configure("INFO", "json")
        logging.getLogger("runtime.test").info("hello", extra={"call_id": "c-9"})
        err = capsys.readouterr().err
    finally:
        root.handlers[:], level, nats_level = saved
        root.setLevel(level)
        nats_logger.setLevel(nats_level)
        logging.captureWarnings(False)
    [line] = err.splitlines()
    assert json.loads(line)["call_id"] == "c-9"
