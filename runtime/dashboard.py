"""The web dashboard: one static page, and the JSON it renders every few seconds.

``GET /`` is ``dashboard.html`` (no build step, nothing fetched from elsewhere: it works offline).
``GET /api/overview`` is what ``runtime status``, ``runtime ls``, ``runtime schedules`` and
``runtime dlq ls`` show, in one answer, read over the runtime's own connection.
``POST /api/dlq/<seq>/replay`` and ``/purge`` do what ``runtime dlq replay`` / ``purge`` do for
one dead letter. With a token on the listener (``--http-token``), its middleware asks every
route but the page itself for ``Authorization: Bearer <token>``; the page sends what the user
typed in when first refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError

from . import dlq
from .crontab import format_tick, next_tick
from .deployment import Deployment
from .fleet import fleet_status
from .http import Route, json_response
from .manifest import FunctionManifest
from .registry import Registry, as_manifest_set
from .scheduler import read_records
from .state import RuntimeState
from .streams import CRON_BUCKET, DLQ_STREAM

__all__ = ["RECENT_DEAD_LETTERS", "STATUS_WAIT", "Dashboard", "DeadLetterCache", "dashboard_routes", "overview"]

log = logging.getLogger("runtime.dashboard")

STATUS_WAIT = 0.25        # seconds the runtimes have to answer: the page waits that long per refresh
RECENT_DEAD_LETTERS = 50  # the newest ones shown; `runtime dlq ls` lists them all

@dataclass
class DeadLetterCache:
    """The last listing of ``FN_DLQ``, listed again only when the stream changed.

    Listing reads every letter's headers; the page asks every few seconds, and most of the
    time nothing was dead-lettered, replayed or purged in between.
    """

    key: tuple[int, int, int] | None = None
    listing: dlq.Listing | None = None

    async def read(self, nc: NATS, js: JetStreamContext) -> dlq.Listing:
        try:
            state = (await js.stream_info(DLQ_STREAM)).state
        except NotFoundError:
            return dlq.Listing([], 0)
        key = (state.first_seq, state.last_seq, state.messages)
        if self.listing is None or key != self.key:
            self.listing = await dlq.list_dead_letters(nc, js)
            self.key = key
        return self.listing

    def forget(self) -> None:
        self.key = self.listing = None


async def _schedules(js: JetStreamContext, registry: Mapping[str, Deployment], at: datetime) -> list[dict[str, Any]]:
    """Each deployed schedule with its next fire (from its cron) and last fire (from ``fn_cron``)."""
    try:
        records = await read_records(await js.key_value(CRON_BUCKET))
    except BucketNotFoundError:
        records = {}
    out = []
    for s in sorted(as_manifest_set(dict(registry)).all_schedules(), key=lambda s: s.name):
        upcoming = next_tick(s.cron, s.timezone, at) if s.enabled else None
        record = records.get(s.name)
        out.append({"name": s.name, "function": s.function, "cron": s.cron, "timezone": s.timezone,
                    "enabled": s.enabled, "next": format_tick(upcoming) if upcoming else None,
                    "last": format_tick(record.last) if record and record.last else None})
    return out


async def overview(nc: NATS, js: JetStreamContext, cache: DeadLetterCache | None = None,
                   wait: float = STATUS_WAIT) -> dict[str, Any]:
    """Functions, runtimes, schedules and recent dead letters, as the page renders them."""
    registry = await Registry.open(js)
    fleet, deployments, listing = await asyncio.gather(
        fleet_status(nc, js, wait), registry.all(), (cache or DeadLetterCache()).read(nc, js))
    manifests = {d.manifest.name: d for d in deployments.values() if isinstance(d.manifest, FunctionManifest)}
    functions = []
    for view in fleet.functions:
        row = view.to_json()
        deployment = manifests.get(view.name)
        manifest = deployment.manifest if deployment else None
        row.update(revision=deployment.revision if deployment else None,
                   concurrency=manifest.concurrency if isinstance(manifest, FunctionManifest) else None,
                   description=manifest.description if isinstance(manifest, FunctionManifest) else None,
                   # Attempts that ended in the last minute, whichever way.
                   rate_1m=None if view.completed_1m is None and view.failed_1m is None
                   else (view.completed_1m or 0) + (view.failed_1m or 0))
        functions.append(row)
    letters = listing.letters[-RECENT_DEAD_LETTERS:][::-1]   # newest first
    return {"at": fleet.at.isoformat(), "functions": functions,
            "runtimes": [r.to_json() for r in fleet.runtimes],
            "schedules": await _schedules(js, deployments, datetime.now(UTC)),
            "dead_letters": {"total": len(listing), "recent": [letter.summary() for letter in letters]}}


class Dashboard:
    """The page and its API, over ``state``'s connection (503 until the runtime is connected)."""

    def __init__(self, state: RuntimeState, wait: float = STATUS_WAIT) -> None:
        self.state = state
        self.wait = wait
        self.letters = DeadLetterCache()
        self._page = resources.files(__package__).joinpath("dashboard.html").read_text(encoding="utf-8")

    def routes(self) -> list[Route]:
        return [Route("GET", "/", self.page), Route("GET", "/api/overview", self.overview),
                Route("POST", "/api/dlq/{seq}/replay", self.replay),
                Route("POST", "/api/dlq/{seq}/purge", self.purge)]

    def _connection(self) -> tuple[NATS, JetStreamContext] | None:
        nc, js = self.state.nc, self.state.js
        if nc is None or js is None or not nc.is_connected:
            return None
        return nc, js

    async def page(self, request: web.Request) -> web.Response:
        # The page is the same for everyone; its data comes from the API, never inside the HTML.
        return web.Response(text=self._page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    async def overview(self, request: web.Request) -> web.Response:
        connection = self._connection()
        if connection is None:
            return json_response(503, {"error": "not connected to NATS"})
        try:
            body = await overview(*connection, self.letters, self.wait)
        except Exception as exc:   # a reconnect, a slow server: the page says so and asks again
            log.warning("cannot build the dashboard overview: %s", exc)
            return json_response(503, {"error": f"cannot read the state from NATS: {exc}"})
        return web.Response(text=json.dumps(body), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def replay(self, request: web.Request) -> web.Response:
        return await self._act(request, "replay")

    async def purge(self, request: web.Request) -> web.Response:
        return await self._act(request, "purge")

    async def _act(self, request: web.Request, action: str) -> web.Response:
        seq = _seq(request.match_info["seq"])
        if seq is None:
            return json_response(400, {"error": f"{request.match_info['seq']!r} is not a dead-letter sequence number"})
        connection = self._connection()
        if connection is None:
            return json_response(503, {"error": "not connected to NATS"})
        nc, js = connection
        try:
            if action == "replay":
                letter, new_seq = await dlq.replay_seq(nc, js, seq)
                body: dict[str, object] = {"replayed": seq, "function": letter.function, "call_id": letter.call_id,
                                           "invocation_seq": new_seq}
            else:
                body = {"purged": await dlq.purge(nc, js, seq=seq)}
        except dlq.DeadLetterNotFound as exc:
            return json_response(404, {"error": str(exc)})
        except (dlq.BodyMissing, dlq.ReplayTooLarge) as exc:
            return json_response(409, {"error": str(exc)})
        finally:
            self.letters.forget()
        log.info("dashboard: %s of dead letter %d", action, seq)
        return json_response(200, body)


def _seq(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def dashboard_routes(state: RuntimeState) -> list[Route]:
    """``/``, ``/api/overview`` and the dead-letter actions of the dashboard."""
    return Dashboard(state).routes()
