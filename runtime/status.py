"""Live status of the fleet: every runtime answers ``fn.admin.status`` with what it serves."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .state import RuntimeState

STATUS_SUBJECT = "fn.admin.status"


def runtime_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class StatusResponder:
    """Answers status requests with a snapshot of the runtime's shared ``state``."""

    def __init__(self, state: RuntimeState) -> None:
        self.state = state
        self.id = runtime_id()
        self._sub: Subscription | None = None

    def snapshot(self) -> dict[str, Any]:
        state = self.state
        outbox = state.outbox
        monitor = state.monitor
        return {
            "runtime": self.id,
            "serving": {name: {"in_flight": w.in_flight, "completed": w.completed, "late": w.executor.late}
                        for name, w in state.workers.items()},
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
