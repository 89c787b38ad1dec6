"""``runtime invoke`` and ``runtime result``: call a function, or read a call's outcome by id."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from datetime import datetime
from typing import Any

from nats.nuid import NUID

from ..client import Call, Client, Progress, check_id_prefix
from ..delay import parse_moment, rfc3339
from ..durations import parse_duration
from ..errors import InvocationError, InvocationTimeout, NoResult, PermissionDenied, QueueFull
from ..exitcodes import RET_FAILED, RET_NO_RESULT, RET_OK, RET_QUEUE_FULL, RET_USAGE
from ..expiry import parse_ttl, ttl_header
from ..loop import run
from ..priority import check_level
from . import common


def duration_arg(value: str) -> float:
    """An argparse type: a duration (``90s``, ``5m``, a bare number of seconds)."""
    try:
        return parse_duration(float(value))  # a bare number is seconds
    except ValueError:
        pass
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ttl(value: str) -> float:
    try:
        seconds = parse_ttl(value)
        ttl_header(seconds)   # as Client would send it: at least a millisecond
        return seconds
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TTL: use e.g. 30s, 5m or a number of seconds, "
                                         f"at least 1ms") from None


def moment_arg(value: str) -> datetime:
    """An argparse type: a time (RFC 3339; no offset: local time)."""
    try:
        return parse_moment(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _level(value: str) -> int:
    try:
        return check_level(int(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a priority level from 1 to 10") from None


def register(sub: Any) -> None:
    p = sub.add_parser("invoke", help="call a function and print its result")
    p.add_argument("name", help="the function's name")
    p.add_argument("payload", nargs="?", default=None,
                   help="the input as JSON text, or - to read it from stdin (default: null)")
    p.add_argument("--async", dest="submit", action="store_true",
                   help="store the call and print its call id without waiting")
    p.add_argument("--timeout", "-t", type=duration_arg, default=30.0, metavar="DURATION",
                   help="how long to wait for the outcome, e.g. 500ms, 30s, 2m (default 30s)")
    p.add_argument("--call-id", metavar="ID", help="the call id (default: a new unique id)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="print the function's progress updates on stderr as they come, then the result")
    p.add_argument("--id-prefix", metavar="PREFIX", default=None,
                   help="start a new call id with PREFIX, e.g. alice. (a caller's own results; $RUNTIME_ID_PREFIX)")
    p.add_argument("--priority", "-p", type=_level, metavar="LEVEL",
                   help="queue at this level, 1 (least urgent) to 10 (most urgent); default: the function's own")
    later = p.add_mutually_exclusive_group()
    later.add_argument("--delay", type=duration_arg, metavar="DURATION",
                       help="queue it this long from now, e.g. 90s, 5m, 2h (with --async; see 'runtime cancel')")
    later.add_argument("--at", type=moment_arg, metavar="TIME",
                       help="queue it at this time, e.g. 2026-12-01T08:00:00Z (with --async; no offset: local time)")
    p.add_argument("--ttl", type=_ttl, metavar="DURATION",
                   help="never run it if it is still queued this long after it was stored, e.g. 30s, 5m "
                        "(default: the function's ttl, if any)")
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_invoke)

    p = sub.add_parser("result", help="print the stored outcome of a call")
    p.add_argument("call_id", metavar="CALL_ID", help="the call id 'runtime invoke' printed or was given")
    p.add_argument("--wait", "-w", type=duration_arg, default=0.0, metavar="DURATION",
                   help="wait this long for the outcome if it is not stored yet (default: do not wait)")
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_result)


def _print_progress(update: Progress) -> None:
    data = update.data if isinstance(update.data, str) else json.dumps(update.data, default=repr)
    print(f"progress [attempt {update.attempt}] {data}", file=sys.stderr, flush=True)


def _payload(text: str | None) -> Any:
    if text is None:
        return None
    if text == "-":
        text = sys.stdin.read()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the payload is not valid JSON ({exc}); quote it, e.g. '{{\"name\": \"Ada\"}}'") from None


def cmd_invoke(args: argparse.Namespace) -> int:
    try:
        payload = _payload(args.payload)
    except ValueError as exc:
        common.error(str(exc))
        return RET_USAGE
    if (args.delay is not None or args.at is not None) and not args.submit:
        common.error("--delay and --at need --async: the call runs later; read its outcome then with "
                     "'runtime result CALL_ID --wait DURATION'")
        return RET_USAGE
    try:
        prefix = check_id_prefix(args.id_prefix or os.environ.get("RUNTIME_ID_PREFIX", ""))
    except ValueError as exc:
        common.error(str(exc))
        return RET_USAGE
    call_id = args.call_id or prefix + NUID().next().decode()
    common.show_warnings("runtime.client")   # e.g. a call id already used

    async def main() -> Call | Any:
        async with common.connection(args) as (nc, _), Client(nc) as fn:
            if args.submit:
                return await fn.submit(args.name, payload, call_id=call_id, priority=args.priority,
                                       delay=args.delay, at=args.at, ttl=args.ttl)
            return await fn.invoke(args.name, payload, timeout=args.timeout, call_id=call_id,
                                   priority=args.priority, ttl=args.ttl,
                                   on_progress=_print_progress if args.follow else None)

    try:
        outcome = run(main())
    except PermissionDenied:
        raise   # the server refused us, the function did not fail: cli.failure gives exit 11
    except InvocationError as exc:
        return _failed(args, exc)
    if isinstance(outcome, Call):
        if args.json:
            out = {"call_id": outcome.id, "function": outcome.function, "duplicate": outcome.duplicate}
            if outcome.due is not None:
                out["due"] = rfc3339(outcome.due)
            common.print_json(out)
        else:
            print(outcome.id)
        return RET_OK
    return _succeeded(args, call_id, outcome)


def cmd_result(args: argparse.Namespace) -> int:
    async def main() -> Any:
        async with common.connection(args) as (nc, _), Client(nc) as fn:
            return await fn.result(args.call_id, wait=args.wait)

    try:
        value = run(main())
    except PermissionDenied:
        raise
    except InvocationError as exc:
        return _failed(args, exc)
    except NoResult as exc:
        if args.json:
            out: dict[str, Any] = {"call_id": args.call_id, "status": "missing", "message": str(exc)}
            if exc.replayed_at:
                out.update(status="pending", replayed_at=exc.replayed_at, replayed_from=exc.replayed_from)
            common.print_json(out)
        else:
            common.error(str(exc))
        return RET_NO_RESULT
    return _succeeded(args, args.call_id, value)


def _succeeded(args: argparse.Namespace, call_id: str, value: Any) -> int:
    if args.json:
        out: dict[str, Any] = {"status": "ok", "result": value}
        if isinstance(value, bytes):
            out["result"] = base64.b64encode(value).decode()
            out["result_encoding"] = "base64"
        common.print_json({"call_id": call_id, **out})
    elif isinstance(value, bytes):
        sys.stdout.buffer.write(value)
        sys.stdout.flush()
    elif isinstance(value, str):
        print(value)
    elif value is not None:
        print(json.dumps(value, indent=2, ensure_ascii=False))
    return RET_OK


def _failed(args: argparse.Namespace, exc: InvocationError) -> int:
    exc = _for_the_shell(exc)
    code = RET_QUEUE_FULL if isinstance(exc, QueueFull) else RET_FAILED
    if args.json:
        common.print_json({"call_id": exc.call_id, "status": "failed",
                           "error": {"type": exc.type, "message": exc.message, "code": exc.code}})
    else:
        common.error(f"{exc.described} (code {exc.code})")
    return code


def _for_the_shell(exc: InvocationError) -> InvocationError:
    """A caller's timeout names the Python call to read the outcome later; here the command is the way."""
    python = f"result({exc.call_id!r})"
    if not isinstance(exc, InvocationTimeout) or not exc.call_id or python not in exc.message:
        return exc
    return InvocationTimeout(exc.message.replace(python, f"runtime result {exc.call_id}"),
                             type=exc.type, call_id=exc.call_id)
