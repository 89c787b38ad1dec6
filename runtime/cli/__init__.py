"""``runtime`` command line: thin subcommands over the library, one-line errors, named exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import ConnectionLost, FnRuntimeError, InvocationError
from ..exitcodes import RET_CONNECTION_LOST, RET_ERROR, RET_FAILED, RET_INTERRUPTED
from . import common, deploy, dlq, invoke, schedules, serve

COMMANDS = [serve, deploy, schedules, dlq, invoke]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runtime", description="Run Python functions from NATS JetStream.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        return RET_INTERRUPTED
    except InvocationError as exc:
        if args.debug:
            raise
        common.error(f"{exc.described} (code {exc.code})")
        return RET_FAILED
    except ConnectionLost as exc:
        common.error(str(exc))
        return RET_CONNECTION_LOST
    except (FnRuntimeError, OSError, TimeoutError) as exc:
        if args.debug:
            raise
        common.error(common.describe(exc))
        return RET_ERROR
    except Exception as exc:
        if args.debug:
            raise
        logging.getLogger("runtime.cli").debug("unexpected error", exc_info=True)
        common.error(common.describe(exc))
        return RET_ERROR


def entry() -> None:
    sys.exit(main())
