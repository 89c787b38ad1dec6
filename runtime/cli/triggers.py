"""``runtime triggers``: every deployed trigger, the stream and consumer it takes events from, and its backlog."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ..exitcodes import RET_OK
from ..loop import run
from ..manifest import FunctionManifest, TriggerManifest, with_triggers
from ..registry import Registry, as_manifest_set
from ..triggers import (
    TRIGGERS_STREAM,
    all_streams,
    backlog,
    consumer_name,
    find_binding,
    parse_consumer,
    trigger_consumers,
)
from . import common

BOUND = "bound"
MISSING = "missing"         # no consumer yet: no deploy or runtime has bound it (or the server removed it)
UNDEPLOYED = "undeployed"   # a consumer kept for a trigger no longer deployed: its events wait for a redeploy


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "triggers", help="list deployed event triggers with their stream, consumer and backlog",
        description="List every (function, trigger) pair deployed: the subject, the stream its events are "
                    "taken from, its durable consumer, the events waiting for the function (not yet delivered, "
                    "or delivered and not yet acknowledged), and where the function's output goes.")
    p.add_argument("function", nargs="?", metavar="FUNCTION", help="only the triggers of this function")
    common.add_server_option(p)
    common.add_json_option(p)
    p.set_defaults(func=cmd_triggers)


@dataclass(frozen=True)
class TriggerRow:
    """One trigger of one deployed function, as found on the server."""

    function: str
    trigger: str
    subject: str
    stream: str
    consumer: str
    status: str                  # BOUND; MISSING when its consumer does not exist; UNDEPLOYED
    backlog: int | None          # pending + ack_pending; None without a consumer
    pending: int | None
    ack_pending: int | None
    output: str | None
    standalone: bool             # from a ``kind: Trigger`` manifest

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def trigger_rows(js: JetStreamContext, functions: Iterable[FunctionManifest],
                       standalone: Iterable[TriggerManifest]) -> list[TriggerRow]:
    """The rows of every trigger of ``functions`` (their own, then the standalone ones that target them)."""
    extra = list(standalone)
    named = {t.name for t in extra}
    rows: list[TriggerRow] = []
    streams = None
    for function in sorted(functions, key=lambda f: f.name):
        own = {t.trigger_name for t in function.triggers}
        for spec in with_triggers(function, extra).triggers:
            if streams is None and spec.stream is None:
                streams = await all_streams(js)   # read once, for the triggers not on FN_TRIGGERS
            stream, info = await find_binding(js, function.name, spec, streams)
            rows.append(TriggerRow(
                function=function.name, trigger=spec.trigger_name, subject=spec.subject, stream=stream,
                consumer=consumer_name(function.name, spec.trigger_name), status=BOUND if info else MISSING,
                backlog=backlog(info) if info else None, pending=info.num_pending if info else None,
                ack_pending=info.num_ack_pending if info else None, output=function.output,
                standalone=spec.trigger_name in named and spec.trigger_name not in own))
    return rows


async def deployed_triggers(js: JetStreamContext) -> list[TriggerRow]:
    """Every deployed trigger, then the consumers ``FN_TRIGGERS`` keeps for triggers no longer deployed."""
    manifests = as_manifest_set(await (await Registry.open(js)).all())
    rows = await trigger_rows(js, manifests.functions.values(), manifests.triggers.values())
    return rows + await kept_rows(js, {r.consumer for r in rows if r.stream == TRIGGERS_STREAM})


async def kept_rows(js: JetStreamContext, deployed: set[str]) -> list[TriggerRow]:
    """The trigger consumers of ``FN_TRIGGERS`` other than ``deployed``: undeployed, their events kept."""
    try:
        infos = await trigger_consumers(js, TRIGGERS_STREAM)
    except NotFoundError:   # no trigger was ever bound
        return []
    rows = []
    for info in sorted(infos, key=lambda i: i.name or ""):
        names = parse_consumer(info.name or "")
        if names is None or info.name in deployed:
            continue
        rows.append(TriggerRow(
            function=names[0], trigger=names[1], subject=info.config.filter_subject or "", stream=TRIGGERS_STREAM,
            consumer=info.name or "", status=UNDEPLOYED, backlog=backlog(info), pending=info.num_pending,
            ack_pending=info.num_ack_pending, output=None, standalone=False))
    return rows


def backlog_cell(row: TriggerRow) -> str:
    return "-" if row.backlog is None else str(row.backlog)


def cmd_triggers(args: argparse.Namespace) -> int:
    async def main() -> list[TriggerRow]:
        async with common.connection(args) as (_, js):
            return await deployed_triggers(js)

    rows = [r for r in run(main()) if args.function in (None, r.function)]
    if args.json:
        common.print_json([r.to_json() for r in rows])
        return RET_OK
    if not rows:
        print(f"no triggers for {args.function}" if args.function else "no triggers deployed")
        return RET_OK
    common.print_table(["function", "trigger", "subject", "stream", "consumer", "status", "backlog", "output"],
                       [[r.function, r.trigger, r.subject, r.stream,
                         r.consumer, r.status, backlog_cell(r), r.output or "-"] for r in rows])
    return RET_OK
