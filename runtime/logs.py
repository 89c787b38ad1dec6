"""The one place that configures logging: level, format (text or JSON lines) and invocation fields.

A line about an invocation carries ``function``, ``call_id``, ``attempt`` and ``stream_seq`` as
record attributes (``extra=``): the JSON format writes them as keys, the text format appends them
in brackets. They are built only on the paths that log (:func:`fields`, :class:`InvocationLogger`),
never for an invocation that logs nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, Protocol

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")

# The structured fields of a line about an invocation, in the order they are shown.
FIELDS = ("function", "call_id", "attempt", "stream_seq")
_TEXT_NAMES = {"stream_seq": "seq"}   # shorter in brackets, where every character counts

# What every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class About(Protocol):
    """What a log line needs of an invocation (``runtime.invocation.Invocation`` has it)."""

    @property
    def function(self) -> str: ...
    @property
    def call_id(self) -> str: ...
    @property
    def delivered(self) -> int: ...
    @property
    def stream_seq(self) -> int: ...


def fields(inv: About) -> dict[str, Any]:
    """The ``extra=`` of a log line about ``inv``; call it only where a line is logged."""
    return {"function": inv.function, "call_id": inv.call_id, "attempt": inv.delivered,
            "stream_seq": inv.stream_seq}


def call_fields(function: str | None = None, call_id: str | None = None, attempt: int | None = None,
                stream_seq: int | None = None) -> dict[str, Any]:
    """The ``extra=`` of a line about a call known only in part (not stored yet, or read back)."""
    given = {"function": function, "call_id": call_id, "attempt": attempt, "stream_seq": stream_seq}
    return {key: value for key, value in given.items() if value is not None}


class InvocationLogger(logging.LoggerAdapter[logging.Logger]):
    """``ctx.logger``: a handler's lines carry its invocation's fields, worked out only when one is logged."""

    def __init__(self, logger: logging.Logger, inv: About) -> None:
        super().__init__(logger)
        self.inv = inv

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        # The handler's own extra= is kept; the invocation's fields win over it.
        kwargs["extra"] = {**(kwargs.get("extra") or {}), **fields(self.inv)}
        return msg, kwargs


def rfc3339(created: float) -> str:
    """A record's time as RFC 3339 in UTC with milliseconds: ``2024-05-01T12:00:00.123Z``."""
    seconds = int(created)
    millis = min(999, int((created - seconds) * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record got through ``extra=``: the invocation's first, then any others."""
    found = {key: record.__dict__[key] for key in FIELDS if key in record.__dict__}
    for key, value in record.__dict__.items():
        if key not in _STANDARD and key not in found and not key.startswith("_"):
            found[key] = value
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's fields, ``exc`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": rfc3339(record.created), "level": record.levelname,
                                "logger": record.name, "message": record.getMessage()}
        for key, value in extras(record).items():
            line.setdefault(key, value)   # a field never hides one of the four above
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: a field of any type still makes a line, never an error.
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The human format; a line about an invocation ends with ``[function=… call_id=… attempt=… seq=…]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        shown = [f"{_TEXT_NAMES.get(key, key)}={record.__dict__[key]}" for key in FIELDS if key in record.__dict__]
        return f"{text} [{' '.join(shown)}]" if shown else text


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {fmt!r} (choose from {', '.join(FORMATS)})")


def configure(level: str | int = "INFO", fmt: str = "text") -> None:
    """Send every log line, Python's warnings included, to stderr in ``fmt`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("nats").setLevel(max(logging.getLevelName(level) if isinstance(level, str) else level,
                                           logging.WARNING))
    # A warning printed by the warnings module would be a line of another format.
    logging.captureWarnings(True)
