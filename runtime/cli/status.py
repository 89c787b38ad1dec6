"""``runtime status``: the fleet at a glance, once or refreshed like ``top``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from .. import fleet
from ..durations import parse_duration
from ..exitcodes import RET_OK
from ..loop import run
from . import common
from .queue import age

DEFAULT_WAIT = 0.5   # seconds for the runtimes to answer; one that does not is left out
CLEAR = "\033[H\033[2J"   # cursor home, clear the screen: a redraw in place

DESCRIPTION = """\
Per function: queued work, in flight, completed and failed over the last minute, p50/p99 duration
and stored dead letters; per runtime: id, host, pid, version, uptime and what it serves. Runtimes
are asked on fn.admin.status and those that answer within --wait are shown, so a stopped runtime
disappears from the next look; a deployed function that no runtime serves still appears."""


def _duration(value: str, *, positive: bool) -> float:
    try:
        seconds = parse_duration(float(value))  # a bare number is seconds
    except ValueError:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    if positive and seconds <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be more than zero")
    return seconds


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="the fleet at a glance: functions and runtimes", description=DESCRIPTION)
    p.add_argument("--watch", type=lambda v: _duration(v, positive=True), metavar="INTERVAL",
                   help="refresh every INTERVAL (e.g. 2s) until Ctrl-C; in place on a terminal, "
                        "successive snapshots otherwise")
    p.add_argument("--wait", type=lambda v: _duration(v, positive=True), default=DEFAULT_WAIT,
                   metavar="DURATION",
                   help=f"how long runtimes have to answer (default {DEFAULT_WAIT:g}s); "
                        "one that answers later is not shown")
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_status)


def seconds(value: float | None) -> str:
    """A duration at a glance: ``850us``, ``12ms``, ``1.25s``."""
    if value is None:
        return "-"
    if value < 0.001:
        return f"{value * 1e6:.0f}us"
    if value < 1:
        return f"{value * 1000:.0f}ms" if value >= 0.01 else f"{value * 1000:.1f}ms"
    return f"{value:.2f}s"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def render(view: fleet.Fleet, wait: float) -> None:
    """The two tables, functions then runtimes."""
    if view.functions:
        common.print_table(
            ["function", "status", "runtimes", "queued", "in flight", "ack pending", "completed/1m", "failed/1m",
             "p50", "p99", "dead letters"],
            [[f.name, f.status, len(f.runtimes), f.queued, _count(f.in_flight), f.ack_pending,
              _count(f.completed_1m), _count(f.failed_1m), seconds(f.p50), seconds(f.p99),
              _count(f.dead_letters)] for f in view.functions])
    else:
        print("no functions deployed, served or queued for")
    print()
    if view.runtimes:
        common.print_table(
            ["runtime", "host", "pid", "version", "uptime", "in flight", "serving", "failing"],
            [[r.id, r.host or "-", _count(r.pid), r.version or "-", age(r.uptime), _count(r.in_flight),
              ",".join(sorted(r.serving)) or "-",
              ",".join(sorted(r.failing) + [f"{n} (refused)" for n in sorted(r.refused)]) or "-"]
             for r in view.runtimes])
    else:
        print(f"no runtime answered within {wait:g}s")


def show(view: fleet.Fleet, args: argparse.Namespace) -> None:
    if args.json:
        common.print_json(view.to_json())
    else:
        render(view, args.wait)


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch is None:
        async def once() -> fleet.Fleet:
            async with common.connection(args) as (nc, js):
                return await fleet.fleet_status(nc, js, args.wait)

        show(run(once()), args)
        return RET_OK
    run(watch(args, args.watch))
    return RET_OK   # not reached: watching ends with Ctrl-C (exit 130, said by the command line)


async def watch(args: argparse.Namespace, interval: float) -> None:
    """Show the fleet every ``interval`` seconds over one connection, until interrupted."""
    # Redrawn in place for a person at a terminal; a pipe or a file gets every snapshot,
    # one after another (JSON: one object per line).
    in_place = sys.stdout.isatty() and not args.json
    loop = asyncio.get_running_loop()
    async with common.connection(args) as (nc, js):
        first = True
        while True:
            began = loop.time()
            view = await fleet.fleet_status(nc, js, args.wait)
            if in_place:
                print(CLEAR, end="")
                print(f"runtime status, every {interval:g}s, at {view.at.astimezone():%H:%M:%S} (Ctrl-C to quit)")
                print()
            elif not first and not args.json:
                print()
            show(view, args)
            sys.stdout.flush()
            first = False
            await asyncio.sleep(max(0.0, interval - (loop.time() - began)))
