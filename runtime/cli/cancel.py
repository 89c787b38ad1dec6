"""``runtime cancel``: remove a delayed call before it is due."""

from __future__ import annotations

import argparse
from typing import Any

from ..delay import Pending, cancel
from ..errors import NotPending
from ..exitcodes import RET_NOT_PENDING, RET_OK
from ..loop import run
from . import common


def register(sub: Any) -> None:
    p = sub.add_parser("cancel", help="cancel a delayed call before it runs")
    p.add_argument("call_id", metavar="CALL_ID", help="the call id 'runtime invoke --delay/--at --async' printed")
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_cancel)


def cmd_cancel(args: argparse.Namespace) -> int:
    async def main() -> Pending:
        async with common.connection(args) as (nc, js):
            return await cancel(nc, js, args.call_id)

    try:
        pending = run(main())
    except NotPending as exc:
        if args.json:
            common.print_json({"call_id": args.call_id, "status": "not_pending", "message": str(exc)})
        else:
            common.error(str(exc))
        return RET_NOT_PENDING
    if args.json:
        common.print_json({"call_id": pending.call_id, "function": pending.function, "status": "cancelled",
                           "due": pending.due})
    else:
        print(f"cancelled {pending.call_id} ({pending.function}, was due at {pending.due})")
    return RET_OK
