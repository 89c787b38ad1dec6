"""``runtime dlq ls | show | replay | purge``: see why work failed, run it again, or drop it."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

from .. import dlq
from ..exitcodes import RET_ERROR, RET_OK
from ..loop import run
from ..streams import DLQ_PREFIX, DLQ_STREAM
from . import common

ERROR_WIDTH = 60

Command = Callable[[argparse.Namespace], int]


def _plain_errors(cmd: Command) -> Command:
    """A sequence that names no dead letter (and the like) is one plain line, like any other user error."""
    @functools.wraps(cmd)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except (dlq.DeadLetterNotFound, dlq.BodyMissing, dlq.ReplayTooLarge, dlq.ListingStalled) as exc:
            common.error(str(exc))
            return RET_ERROR
    return wrapper


def _function(value: str) -> str:
    try:
        return dlq.check_function(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seq(value: str) -> int:
    try:
        seq = int(value)
    except ValueError:
        seq = 0
    if seq < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a dead-letter sequence number (see 'runtime dlq ls')")
    return seq


def _add_target(p: argparse.ArgumentParser, verb: str) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("seq", nargs="?", type=_seq, help=f"{verb} the dead letter with this sequence number")
    target.add_argument("--function", "-f", type=_function, metavar="NAME", help=f"{verb} all of NAME's")
    target.add_argument("--all", action="store_true", help=f"{verb} every dead letter")


def register(sub: Any) -> None:
    parent = sub.add_parser("dlq", help="inspect, replay and purge dead letters")
    dsub = parent.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    p = dsub.add_parser("ls", help="list dead letters, oldest first")
    p.add_argument("--function", "-f", type=_function, metavar="NAME", help="only NAME's dead letters")
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_ls)

    p = dsub.add_parser("show", help="show one dead letter: headers and body")
    p.add_argument("seq", type=_seq, help="the dead letter's sequence number (see 'runtime dlq ls')")
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_show)

    p = dsub.add_parser("replay", help="invoke the function again with the original message, then drop it")
    _add_target(p, "replay")
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_replay)

    p = dsub.add_parser("purge", help="delete dead letters for good",
                        description="Delete dead letters for good. --function and --all ask first on a terminal "
                                    "(--yes for scripts); one SEQ is deleted at once.")
    _add_target(p, "purge")
    common.add_yes_option(p)
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_purge)


def _short(text: str, width: int = ERROR_WIDTH) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    return f"{n / 1024:.1f}KB" if n < 1024 * 1024 else f"{n / (1024 * 1024):.1f}MB"


@_plain_errors
def cmd_ls(args: argparse.Namespace) -> int:
    async def main() -> dlq.Listing:
        async with common.connection(args) as (nc, js):
            return await dlq.list_dead_letters(nc, js, args.function)

    listing = run(main())
    letters = listing.letters
    if args.json:
        common.print_json([letter.summary() for letter in letters])
    elif not letters:
        print("no dead letters" + (f" for {args.function}" if args.function else ""))
    else:
        common.print_table(["seq", "function", "reason", "error", "failed at", "deliveries", "size"],
                           [[d.seq, d.function, d.reason, _short(d.error), d.failed_at, d.deliveries, _size(d.size)]
                            for d in letters])
    if listing.shortfall:
        common.warning(listing.shortfall)
    return RET_OK


@_plain_errors
def cmd_show(args: argparse.Namespace) -> int:
    async def main() -> dlq.DeadLetter:
        async with common.connection(args) as (_, js):
            return await dlq.get_dead_letter(js, args.seq)

    letter = run(main())
    if args.json:
        common.print_json(letter.to_json())
        return RET_OK
    print(f"dead letter {letter.seq} of {letter.function}")
    for name, value in letter.headers.items():
        print(f"{name}: {value}")
    print()
    body = letter.to_json()
    if "body" in body:
        print(body["body"])
    else:
        print(f"({letter.size} bytes, not UTF-8; base64 below)")
        print(body["body_base64"])
    return RET_OK


@_plain_errors
def cmd_replay(args: argparse.Namespace) -> int:
    async def main() -> list[tuple[dlq.DeadLetter, int]]:
        async with common.connection(args) as (nc, js):
            if args.seq is not None:
                return [await dlq.replay_seq(nc, js, args.seq)]
            return await dlq.replay_all(nc, js, args.function)

    replayed = run(main())
    if args.json:
        common.print_json([{"seq": letter.seq, "function": letter.function, "call_id": letter.call_id,
                            "invocation_seq": new_seq} for letter, new_seq in replayed])
        return RET_OK
    for letter, new_seq in replayed:
        print(f"replayed dead letter {letter.seq} of {letter.function} (call {letter.call_id}) "
              f"as message {new_seq}")
    print(f"{len(replayed)} dead letter(s) replayed")
    return RET_OK


async def _stored(args: argparse.Namespace) -> int:
    """How many dead letters a purge by --function or --all would delete, from the stream's counts."""
    async with common.connection(args) as (_, js):
        if args.all:
            return int((await js.stream_info(DLQ_STREAM)).state.messages)
        info = await js.stream_info(DLQ_STREAM, subjects_filter=f"{DLQ_PREFIX}{args.function}")
        return sum((info.state.subjects or {}).values())


@_plain_errors
def cmd_purge(args: argparse.Namespace) -> int:
    if args.seq is None and (stored := run(_stored(args))):
        # Declined is not among the errors _plain_errors turns into RET_ERROR: main() exits RET_DECLINED.
        letters = f"{stored} dead letter{'s' * (stored != 1)}"
        common.confirm(args, f"purge all {letters}?" if args.all else f"purge {letters} of {args.function}?")

    async def main() -> int:
        async with common.connection(args) as (nc, js):
            return await dlq.purge(nc, js, seq=args.seq, function=None if args.all else args.function)

    count = run(main())
    if args.json:
        common.print_json({"purged": count})
    else:
        print(f"{count} dead letter(s) purged")
    return RET_OK
