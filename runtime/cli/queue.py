"""``runtime queue ls | purge | pause | resume``: the invocations waiting in ``FN``, deployed functions
or not, and whether runtimes may start them."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any

from .. import queue
from ..exitcodes import RET_NOT_FOUND, RET_OK, RET_USAGE
from ..loop import run
from ..revisions import NotDeployed
from . import common
from .invoke import duration_arg, moment_arg

PAUSE_HELP = """\
Pauses FUNCTION's consumers in FN on the server: no runtime starts its calls until you resume it
(or until --for/--until, when the server resumes them by itself). Calls keep queueing; those
running finish; retries wait. The pause outlives runtimes and deploys, and a priority level used
for the first time meanwhile is paused too."""

PURGE_HELP = """\
Deletes FUNCTION's invocations from FN (fn.invoke.FUNCTION and fn.invoke.FUNCTION.*), deployed or
not. Invocations in flight are deleted too: a running attempt finishes, but it is not retried.
Invocations published after the count you are asked to confirm are kept. On a terminal it asks
first; --yes for scripts."""


def _name(value: str) -> str:
    try:
        return queue.check_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number")
    return count


def register(sub: Any) -> None:
    parent = sub.add_parser("queue", help="see and purge the invocations waiting in FN")
    qsub = parent.add_subparsers(dest="queue_command", required=True, metavar="ACTION")

    p = qsub.add_parser("ls", help="per function: queued, in flight, age of the oldest queued, deployed or not")
    p.add_argument("function", nargs="?", type=_name, metavar="FUNCTION", help="only this function")
    p.add_argument("--peek", type=_count, metavar="N",
                   help="also show FUNCTION's next N queued invocations: headers and body")
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_ls)

    p = qsub.add_parser("purge", help="delete a function's waiting invocations", description=PURGE_HELP)
    p.add_argument("function", type=_name, metavar="FUNCTION", help="the function whose invocations to delete")
    common.add_yes_option(p)
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_purge)

    p = qsub.add_parser("pause", help="stop runtimes starting a function's calls; they keep queueing",
                        description=PAUSE_HELP)
    p.add_argument("function", type=_name, metavar="FUNCTION", help="the function to pause")
    until = p.add_mutually_exclusive_group()
    until.add_argument("--for", dest="duration", type=duration_arg, metavar="DURATION",
                       help="resume by itself this long from now, e.g. 90s, 10m, 2h")
    until.add_argument("--until", type=moment_arg, metavar="TIME",
                       help="resume by itself at this time, e.g. 2026-12-01T08:00:00Z (no offset: local time)")
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_pause)

    p = qsub.add_parser("resume", help="let runtimes start a paused function's calls again, at once")
    p.add_argument("function", type=_name, metavar="FUNCTION", help="the function to resume")
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_resume)


def age(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h10m``, ``3d04h``: an age at a glance."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def paused(until: datetime | None) -> str:
    if until is None:
        return "-"
    return "until resumed" if until >= queue.UNTIL_RESUMED else f"until {until.strftime('%Y-%m-%dT%H:%M:%SZ')}"


def clip(text: str, width: int) -> str:
    """One terminal line: line breaks shown as ``\\n``, cut to ``width`` with an ellipsis."""
    line = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    return line if len(line) <= width else line[:max(1, width - 1)] + "…"


def cmd_ls(args: argparse.Namespace) -> int:
    if args.peek and not args.function:
        common.error("--peek needs a FUNCTION (runtime queue ls FUNCTION --peek N)")
        return RET_USAGE

    async def main() -> tuple[list[queue.QueueState], list[queue.QueuedMessage]]:
        async with common.connection(args) as (_, js):
            if not args.function:
                return await queue.queue_states(js), []
            state = await queue.queue_state(js, args.function)
            return [state], await queue.peek(js, state, args.peek) if args.peek else []

    states, peeked = run(main())
    now = queue.now()
    if args.json:
        rows = [s.to_json(now) for s in states]
        if args.peek:
            rows[0]["peek"] = [m.to_json(now) for m in peeked]
        common.print_json(rows)
        return RET_OK
    if not states:
        print("no queued invocations and no deployed functions")
        return RET_OK
    common.print_table(["function", "deployed", "queued", "in flight", "oldest", "paused"],
                       [[s.function, "yes" if s.deployed else "no", s.queued, s.in_flight,
                         age(s.oldest.age(now)) if s.oldest else "-", paused(s.paused_until)] for s in states])
    if args.peek:
        _print_peek(peeked, now)
    return RET_OK


def _print_peek(messages: list[queue.QueuedMessage], now: datetime) -> None:
    width = shutil.get_terminal_size((100, 24)).columns - 2
    for m in messages:
        print()
        print(f"seq {m.seq}  {m.subject}  queued {age(m.age(now))} ago  {len(m.body)} bytes")
        for name, value in m.headers.items():
            print("  " + clip(f"{name}: {value}", width))
        try:
            print("  " + clip(m.body.decode(), width))
        except UnicodeDecodeError:
            print("  (not UTF-8; --json shows it as base64)")


def cmd_purge(args: argparse.Namespace) -> int:
    async def count() -> queue.QueueState:
        async with common.connection(args) as (_, js):
            return await queue.queue_state(js, args.function)

    state = run(count())
    purged = 0
    if state.total:
        noun = "invocation" + "s" * (state.total != 1)
        detail = (f"{state.total} {noun} of {args.function} ({state.queued} queued, {state.in_flight} in flight)"
                  if state.in_flight else f"{state.total} queued {noun} of {args.function}")
        # Asked with no connection open; what is published meanwhile is after up_to and stays.
        common.confirm(args, f"purge {detail}?")

        async def remove() -> int:
            async with common.connection(args) as (nc, _):
                return await queue.purge(nc, args.function, up_to=state.up_to)

        purged = run(remove())
    if args.json:
        common.print_json({"function": args.function, "purged": purged})
    elif not state.total:
        print(f"no queued invocations of {args.function}")
    else:
        print(f"{purged} invocation(s) of {args.function} purged")
    return RET_OK


def cmd_pause(args: argparse.Namespace) -> int:
    until = args.until
    if args.duration is not None:
        until = queue.now() + timedelta(seconds=args.duration)

    async def main() -> queue.Paused:
        async with common.connection(args) as (_, js):
            return await queue.pause(js, args.function, until)

    return _report(args, main, "paused")


def cmd_resume(args: argparse.Namespace) -> int:
    async def main() -> queue.Paused:
        async with common.connection(args) as (nc, js):
            return await queue.resume(nc, js, args.function)

    return _report(args, main, "resumed")


def _report(args: argparse.Namespace, action: Callable[[], Coroutine[Any, Any, queue.Paused]], done: str) -> int:
    try:
        result = run(action())
    except NotDeployed as exc:
        common.error(str(exc))
        return RET_NOT_FOUND
    if args.json:
        common.print_json(result.to_json())
    elif result.until is None:
        print(f"{done} {result.function}: runtimes start its calls again")
    else:
        print(f"{done} {result.function} {paused(result.until)}: its calls queue, none starts")
    return RET_OK
