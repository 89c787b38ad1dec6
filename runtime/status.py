"""Live status of the fleet: every runtime answers ``fn.admin.status`` with what it serves."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .state import RuntimeState
from .worker import FunctionWorker

STATUS_SUBJECT = "fn.admin.status"
DISTRIBUTION = "nats-fn-runtime"


def runtime_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def function_status(worker: FunctionWorker) -> dict[str, Any]:
    stats = worker.executor.stats
    completed_1m, failed_1m = stats.last_minute()
    p50, p99 = stats.percentiles(0.5, 0.99)
    return {"in_flight": worker.in_flight, "completed": worker.completed, "late": worker.executor.late,
            "outcomes": stats.counts(), "completed_1m": completed_1m, "failed_1m": failed_1m,
            "p50": p50, "p99": p99}


class StatusResponder:
    """Answers status requests with a snapshot of the runtime's shared ``state``."""

    def __init__(self, state: RuntimeState) -> None:
        self.state = state
        self.id = runtime_id()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.version = package_version()
        self._sub: Subscription | None = None

    def snapshot(self) -> dict[str, Any]:
        """What this runtime does now. Per served function: ``in_flight``, ``completed`` (invocations
        settled), ``late``, ``outcomes`` (attempts by outcome since start, the labels of
        ``fn_invocations_total``), ``completed_1m`` / ``failed_1m`` (attempts that succeeded / did not
        in the last minute) and ``p50`` / ``p99`` (seconds, attempts of the last minute; None without any)."""
        state = self.state
        outbox = state.outbox
        monitor = state.monitor
        return {
            "runtime": self.id,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "started": datetime.fromtimestamp(state.started, UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "uptime": round(time.time() - state.started, 3),
            "serving": {name: function_status(w) for name, w in state.workers.items()},
            "failing": dict(state.failing),
            # Deployed, but its handler module is outside the trusted prefixes: never imported here.
            "refused": dict(state.refused),
            "trusted": list(state.trusted),
            "loop": None if monitor is None else monitor.counts(),   # event-loop blocking by handlers
            "outbox": None if outbox is None else {
                "refused_replies": outbox.refused_replies, "kept_first": outbox.kept_first,
                "write_failures": outbox.write_failures},
        }

    async def start(self) -> None:
        nc, _ = self.state.connection

        async def on_request(msg: Msg) -> None:
            outbox = self.state.outbox
            # The requester names the reply subject: never answer on a system or API subject.
            if msg.reply and outbox is not None and outbox.reply_subject(msg.reply) is not None:
                await msg.respond(json.dumps(self.snapshot()).encode())

        self._sub = await nc.subscribe(STATUS_SUBJECT, cb=on_request)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


async def gather_status(nc: NATS, wait: float = 0.5) -> list[dict[str, Any]]:
    """Ask every runtime for its status; collects the answers that arrive within ``wait``."""
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []

    async def on_reply(msg: Msg) -> None:
        try:
            replies.append(json.loads(msg.data))
        except ValueError:
            pass

    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(STATUS_SUBJECT, b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait)
    finally:
        await sub.unsubscribe()
    return replies
