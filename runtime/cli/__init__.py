# PYTHON_ARGCOMPLETE_OK: the marker argcomplete's global completion looks for in a console script's package
"""``runtime`` command line: thin subcommands over the library, one-line errors, named exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..errors import AuthError, ConnectionLost, FnRuntimeError, InvocationError, PermissionDenied
from ..exitcodes import (
    RET_AUTH,
    RET_CONNECTION_LOST,
    RET_DECLINED,
    RET_ERROR,
    RET_FAILED,
    RET_INTERRUPTED,
    RET_PERMISSION,
)
from . import cancel, common, deploy, dlq, invoke, queue, schedules, secure, serve, status, triggers

COMMANDS = [serve, deploy, schedules, triggers, dlq, queue, invoke, cancel, secure, status]
DISTRIBUTION = "nats-fn-runtime"
DEBUG_HELP = "show tracebacks and debug logs"


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class CommandParser(argparse.ArgumentParser):
    """An argument parser that remembers its subcommands' parsers (argparse keeps them to itself)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.subcommand_actions: list[argparse.Action] = []

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)  # its parsers are of this class too
        self.subcommand_actions.append(action)
        return action


def build_parser() -> CommandParser:
    parser = CommandParser(prog="runtime", description="Run Python functions from NATS JetStream.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    for command in subcommands(parser):
        # Accepted where users type it, at the end too; SUPPRESS keeps an earlier --debug.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def subcommands(parser: CommandParser) -> Iterator[CommandParser]:
    """Every parser that runs a command (``dlq ls``, not ``dlq``), depth first."""
    for action in parser.subcommand_actions:
        assert isinstance(action.choices, dict)
        for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            nested = list(subcommands(child))
            yield from nested or [child]


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's completion request and exit, when this run is one (argcomplete's protocol).

    argcomplete is imported only then, so an ordinary command does not pay for it.
    """
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete

        argcomplete.autocomplete(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    complete(parser)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        return RET_INTERRUPTED
    except Exception as exc:
        if args.debug and not isinstance(exc, common.Declined | ConnectionLost):
            raise
        message, code = failure(exc, args)
        common.error(message)
        return code


def failure(exc: Exception, args: argparse.Namespace) -> tuple[str, int]:
    """The one line and the exit code a command's error ends it with."""
    if isinstance(exc, common.Declined):
        return str(exc), RET_DECLINED
    if isinstance(exc, PermissionDenied):
        return exc.message, RET_PERMISSION
    if isinstance(exc, AuthError):
        return str(exc), RET_AUTH
    if isinstance(exc, InvocationError):
        return f"{exc.described} (code {exc.code})", RET_FAILED
    if isinstance(exc, ConnectionLost):
        return str(exc), RET_CONNECTION_LOST
    if not isinstance(exc, FnRuntimeError | OSError | TimeoutError):
        logging.getLogger("runtime.cli").debug("unexpected error", exc_info=True)
    return common.describe(exc, common.url_of(args)), RET_ERROR


def entry() -> None:
    sys.exit(main())
