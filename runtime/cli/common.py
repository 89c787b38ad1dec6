"""Helpers shared by the subcommands: connection options, output, errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_URL = "nats://127.0.0.1:4222"


def add_server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", "-s", metavar="URL", default=None,
                        help=f"NATS server URL (default: $NATS_URL or {DEFAULT_URL})")


def server_url(args: argparse.Namespace) -> str:
    return str(args.server or os.environ.get("NATS_URL") or DEFAULT_URL)


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")


def error(message: str) -> None:
    print(f"runtime: error: {message}", file=sys.stderr)


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    if not text:
        return name
    if name in ("ManifestError", "LoadError", "ServerError", "ConfigError"):
        return text
    if "nats: no servers available" in text or name in ("NoServersError", "ConnectionRefusedError"):
        return f"cannot connect to the NATS server ({text})"
    return f"{name}: {text}" if name not in text else text


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=None, default=str))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    line = "  ".join(h.upper().ljust(widths[i]) for i, h in enumerate(headers))
    print(line.rstrip())
    for row in cells:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
