"""Helpers shared by the subcommands: connection options, output, errors."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from .. import errors
from ..connection import ENVIRONMENT, ConnectOptions, open_connection, permission_watch, redact_url
from ..errors import AuthError, ConfigError, LoadError, ManifestError, PermissionDenied, ServerError
from ..protocol import DEFAULT_URL, STREAM_NOT_FOUND
from ..revisions import RegistryError
from .style import ERROR, WARNING, Painter

# Columns whose cells are state words (``schedules`` writes "disabled" where a next time would be).
STATE_COLUMNS = frozenset({"status", "state", "reason", "next (local)"})


def add_server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", "-s", metavar="URL", default=None,
                        help=f"NATS server URL, or several separated by commas (default: $NATS_URL or {DEFAULT_URL})")
    add_auth_options(parser)


def add_auth_options(parser: argparse.ArgumentParser) -> None:
    """The nats CLI's connection flags; each defaults to its environment variable."""
    group = parser.add_argument_group("connection (each flag defaults to the environment variable named)")
    env = ENVIRONMENT
    group.add_argument("--user", default=None, help=f"user name (${env['user']})")
    group.add_argument("--password", default=None,
                       help=f"password (${env['password']}; prefer the variable: arguments show in ps)")
    group.add_argument("--token", default=None, help=f"authentication token (${env['token']})")
    group.add_argument("--nkey", metavar="FILE", default=None, help=f"NKey seed file (${env['nkey']})")
    group.add_argument("--creds", metavar="FILE", default=None, help=f"JWT credentials file (${env['creds']})")
    group.add_argument("--tlscert", metavar="FILE", default=None,
                       help=f"client certificate for mutual TLS (${env['tls_cert']})")
    group.add_argument("--tlskey", metavar="FILE", default=None,
                       help=f"private key of the client certificate (${env['tls_key']})")
    group.add_argument("--tlsca", metavar="FILE", default=None,
                       help=f"CA certificate that signed the server's (${env['tls_ca']})")
    group.add_argument("--tls-first", action="store_true", default=None,
                       help=f"start TLS before the server's greeting (${env['tls_first']})")
    group.add_argument("--inbox-prefix", metavar="PREFIX", default=None,
                       help=f"subscribe for replies under this prefix instead of _INBOX (${env['inbox_prefix']})")


def server_url(args: argparse.Namespace) -> str:
    return str(args.server or os.environ.get("NATS_URL") or DEFAULT_URL)


def connect_options(args: argparse.Namespace) -> ConnectOptions:
    """The connection options of a command: its flags over the ``NATS_*`` environment."""
    return ConnectOptions.from_env(
        user=getattr(args, "user", None), password=getattr(args, "password", None),
        token=getattr(args, "token", None), nkey=getattr(args, "nkey", None), creds=getattr(args, "creds", None),
        tls_cert=getattr(args, "tlscert", None), tls_key=getattr(args, "tlskey", None),
        tls_ca=getattr(args, "tlsca", None), tls_first=getattr(args, "tls_first", None),
        inbox_prefix=getattr(args, "inbox_prefix", None))


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")


def add_yes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation (for scripts)")


class Declined(Exception):
    """A destructive command was not confirmed; its message says how to go ahead."""


def confirm(args: argparse.Namespace, question: str) -> None:
    """Ask ``question`` (y/N) on a terminal; raise ``Declined`` unless the user agrees.

    ``--yes`` skips the question. Without a terminal there is nobody to ask, so a script
    must say ``--yes``: a destructive command never runs just because its input is a pipe.
    """
    if getattr(args, "yes", False):
        return
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise Declined(f"{question.rstrip('?')}: refused without confirmation; pass --yes to confirm")
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline().strip().lower()
    except (EOFError, KeyboardInterrupt):
        answer = ""
    if answer not in ("y", "yes"):
        raise Declined("nothing done")


def error(message: str) -> None:
    print(f"runtime: {Painter(sys.stderr).paint('error:', ERROR)} {message}", file=sys.stderr)


def warning(message: str) -> None:
    print(f"runtime: {Painter(sys.stderr).paint('warning:', WARNING)} {message}", file=sys.stderr)


def show_warnings(logger: str) -> None:
    """Print ``logger``'s warnings as one line each on stderr (commands other than serve log nothing else)."""
    handler = logging.StreamHandler(sys.stderr)
    prefix = Painter(sys.stderr).paint("warning:", WARNING).replace("%", "%%")
    handler.setFormatter(logging.Formatter(f"runtime: {prefix} %(message)s"))
    target = logging.getLogger(logger)
    target.addHandler(handler)
    target.setLevel(logging.WARNING)
    target.propagate = False


def describe(exc: BaseException, url: str | None = None) -> str:
    """An error as one line for the terminal: the package's own errors already say what failed.

    nats-py's errors (``nats: NotFoundError: code=404 err_code=10059 ...``) are said in the
    user's terms: what is missing on which server, and what to do about it.
    """
    text = str(exc).strip()
    if text and isinstance(exc, ManifestError | LoadError | ServerError | ConfigError | RegistryError | AuthError):
        return text
    if text and ("nats: no servers available" in text
                 or type(exc).__name__ in ("NoServersError", "ConnectionRefusedError")):
        return f"cannot connect to the NATS server ({text})"
    return describe_nats(exc, url) or errors.describe(exc)


def describe_nats(exc: BaseException, url: str | None = None) -> str | None:
    """One line for an error nats-py raised on a JetStream request; None for any other error."""
    server = f"the NATS server at {url}" if url else "the NATS server"
    if isinstance(exc, ServiceUnavailableError):
        return (f"JetStream is not enabled on {server}: start nats-server with -js "
                "(or let 'runtime serve' start one)")
    if isinstance(exc, NotFoundError) and exc.err_code == STREAM_NOT_FOUND:
        return (f"the runtime's streams do not exist on {server}: "
                "run 'runtime serve' against it first")
    if isinstance(exc, NoRespondersError | NoStreamResponseError):
        # A direct get from a stream that does not exist, or JetStream is off: nobody answers.
        return (f"nothing answered on {server}: is JetStream enabled there, and has "
                "'runtime serve' run against it?")
    if isinstance(exc, NatsTimeout):
        return f"{server} did not answer in time; try again"
    if isinstance(exc, APIError):
        what = exc.description or type(exc).__name__
        return f"{server} refused the request: {what} (error {exc.err_code or exc.code})"
    return None


def url_of(args: argparse.Namespace) -> str | None:
    """The server a command talks to, for error messages; None for ``serve`` on its embedded server."""
    if not hasattr(args, "server"):
        return None
    if args.command == "serve":
        return redact_url(str(args.server or os.environ.get("NATS_URL") or "")) or None
    return redact_url(server_url(args))


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=None, default=str))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Rows under upper-case headers in aligned columns; state words in their colour on a terminal."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    line = "  ".join(h.upper().ljust(widths[i]) for i, h in enumerate(headers))
    print(line.rstrip())
    painter = Painter(sys.stdout)
    states = {i for i, h in enumerate(headers) if h.lower() in STATE_COLUMNS}
    for row in cells:
        # Padding is added outside the colour codes, so widths count only what the eye sees.
        print("  ".join((painter.status(c) if i in states else c) + " " * (widths[i] - len(c))
                        for i, c in enumerate(row)).rstrip())


async def _quiet(exc: Exception) -> None:
    """Connection errors become one line from ``connection``; nats-py need not print them too."""


@contextlib.asynccontextmanager
async def connection(args: argparse.Namespace) -> AsyncIterator[tuple[NATS, JetStreamContext]]:
    """A short-lived connection for one command; a refused connection is one clear error.

    A publish or subscription the server refuses for lack of permission ends the command at once
    with ``PermissionDenied`` (the server says so asynchronously; without this the command would
    wait for an answer that never comes).
    """
    url = server_url(args)
    options = connect_options(args)
    try:
        nc = await open_connection(url, options, name="runtime-cli", connect_timeout=3,
                                   max_reconnect_attempts=1, reconnect_time_wait=0, error_cb=_quiet)
    except (AuthError, ConfigError):
        raise
    except Exception as exc:
        raise ConfigError(f"cannot connect to the NATS server at {redact_url(url)}: {exc}") from None
    task = asyncio.current_task()
    denied: list[PermissionDenied] = []

    def on_denied(exc: PermissionDenied) -> None:
        if not denied and task is not None:
            denied.append(exc)
            task.cancel()

    watch = permission_watch(nc)
    assert watch is not None
    stop_watching = watch.listen(on_denied)
    try:
        yield nc, nc.jetstream()
    except asyncio.CancelledError:
        if not denied:
            raise
    finally:
        stop_watching()
        with contextlib.suppress(asyncio.CancelledError):
            await nc.close()
    if denied:
        assert task is not None
        task.uncancel()
        raise denied[0]
