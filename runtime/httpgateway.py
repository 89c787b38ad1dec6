"""Calling functions over HTTP, OpenFaaS style, on the runtime's own HTTP listener.

``POST /function/<name>`` runs a call and answers with its outcome, ``POST /async-function/<name>``
stores it and answers 202 at once (POSTing the outcome to ``X-Callback-Url`` when it is stored),
``GET /calls/<id>`` reads a stored outcome. Every call goes through the durable path
(:class:`~runtime.client.Client` on the runtime's own connection), so an HTTP call is stored,
retried and deduplicated like any other; the body is passed on as it came, with its
``Content-Type``, and errors keep the status codes of the wire contract.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from nats.nuid import NUID

from . import codec
from . import headers as H
from .client import Client
from .durations import parse_duration
from .errors import (
    FnRuntimeError,
    InvalidInput,
    InvocationError,
    InvocationTimeout,
    PayloadTooLarge,
    Unavailable,
)
from .http import HttpServer, Route, json_response
from .loop import spawn
from .metrics import Monitoring
from .results import Replayed, Response, fetch_state
from .settings import Settings
from .state import RuntimeState
from .wire import call_id_for

log = logging.getLogger("runtime.httpgateway")

CALL_ID = "X-Call-Id"
IDEMPOTENCY_KEY = "Idempotency-Key"
TIMEOUT = "X-Timeout"
CALLBACK_URL = "X-Callback-Url"
FUNCTION_NAME = "X-Function-Name"
FUNCTION_STATUS = "X-Function-Status"

DEFAULT_TIMEOUT = 30.0        # seconds a synchronous call waits for its outcome (504 after)
MAX_TIMEOUT = 3600.0          # the longest X-Timeout taken
CALLBACK_WAIT = 3600.0        # seconds an async call's callback waits for the outcome, without X-Timeout
CALLBACK_ATTEMPTS = 4         # POSTs of one outcome to its callback URL
CALLBACK_BACKOFF = 0.5        # seconds before the second attempt, doubled each time
CALLBACK_POST_TIMEOUT = 10.0  # seconds one POST to a callback URL may take
MAX_CALLBACKS = 10_000        # callbacks waiting at once (503 beyond: each holds a subscription)
RECENT = 100_000              # call ids remembered as submitted here (GET /calls/<id> says 202, not 404)


def error_response(error: InvocationError, call_id: str | None = None) -> web.Response:
    """The error's wire status and body ``{"error": {"type", "message", "code"}}``."""
    response = json_response(error.code, error.to_wire())
    if call_id or error.call_id:
        response.headers[CALL_ID] = call_id or error.call_id or ""
    return response


def outcome_response(response: Response) -> web.Response:
    """A stored outcome as HTTP: its body and content type, or its error status and body."""
    error = response.error
    if error is not None:
        return error_response(error, response.call_id)
    return web.Response(body=response.body, headers={
        "Content-Type": response.headers.get(H.CONTENT_TYPE, codec.JSON), CALL_ID: response.call_id})


def safe_url(url: str) -> str:
    """``url`` for a log line: no credentials, query or fragment (they may hold secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def callback_problem(url: str) -> str | None:
    """Why ``url`` cannot be a callback URL (None: it can)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "X-Callback-Url is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "X-Callback-Url must be an http:// or https:// URL"
    return None


def requested_timeout(request: web.Request, default: float) -> float:
    """``X-Timeout`` (seconds, or a duration such as 500ms or 2m), else ``default``."""
    given = request.headers.get(TIMEOUT)
    if not given:
        return default
    try:
        seconds = float(given) if given.strip().replace(".", "", 1).isdigit() else parse_duration(given)
    except ValueError as exc:
        raise InvalidInput(f"{TIMEOUT}: {exc}") from None
    if not 0 < seconds <= MAX_TIMEOUT:
        raise InvalidInput(f"{TIMEOUT} must be more than 0 and at most {MAX_TIMEOUT:g} seconds")
    return seconds


class HttpGateway:
    """The gateway's routes, and what they share: one :class:`Client` on the runtime's connection
    (started with the runtime's other components) and the callbacks waiting for outcomes."""

    def __init__(self, state: RuntimeState) -> None:
        self.state = state
        self.client: Client | None = None
        self.session: aiohttp.ClientSession | None = None
        self.callbacks: set[asyncio.Task[None]] = set()
        self.max_body = 0
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._id_base = "http-" + NUID().next().decode() + "-"
        self._ids = itertools.count(1)

    @classmethod
    def install(cls, monitoring: Monitoring | None, settings: Settings) -> HttpGateway | None:
        """Add the gateway to the runtime's HTTP listener, if it has one; sets its token and body limit."""
        if monitoring is None or monitoring.server is None:
            return None
        gateway = cls(monitoring.state)
        server: HttpServer = monitoring.server
        server.token = settings.http_token.get_secret_value() if settings.http_token else None
        server.max_body = gateway.max_body = settings.http_max_body
        for route in gateway.routes():
            server.add(route)
        return gateway

    def routes(self) -> list[Route]:
        return [Route("POST", "/function/{name}", self.call),
                Route("POST", "/async-function/{name}", self.submit),
                Route("GET", "/calls/{call_id:.+}", self.read)]

    # ------------------------------------------------------------------ lifecycle (a runtime component)

    async def start(self) -> None:
        nc, _ = self.state.connection
        client = Client(nc)
        await client.start()
        self.client = client
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALLBACK_POST_TIMEOUT))

    async def stop(self) -> None:
        # A callback not sent yet is given up: its outcome stays readable at /calls/<id>.
        tasks = list(self.callbacks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session, self.session = self.session, None
        if session is not None:
            await session.close()
        client, self.client = self.client, None
        if client is not None:
            await client.stop()

    # ------------------------------------------------------------------ routes

    async def call(self, request: web.Request) -> web.StreamResponse:
        """``POST /function/<name>``: run it, answer with its outcome (504 with the call id if it is late)."""
        name = request.match_info["name"]
        call_id: str | None = None
        try:
            client = self._client()
            body = await self._body(request)
            timeout = requested_timeout(request, DEFAULT_TIMEOUT)
            call_id = self._call_id(request)
            self._remember(call_id)
            try:
                response = await client.invoke_response(name, body, timeout=timeout, call_id=call_id,
                                                        headers=self._content_type(request))
            except InvocationTimeout:
                raise
            except InvocationError:
                self._recent.pop(call_id, None)   # nothing was stored
                raise
        except InvocationError as exc:
            return error_response(exc, call_id)
        return outcome_response(response)

    async def submit(self, request: web.Request) -> web.StreamResponse:
        """``POST /async-function/<name>``: store the call, answer 202 with its id; with
        ``X-Callback-Url``, POST the outcome there once it is stored."""
        name = request.match_info["name"]
        callback = request.headers.get(CALLBACK_URL)
        try:
            client = self._client()
            body = await self._body(request)
            wait = requested_timeout(request, CALLBACK_WAIT)
            if callback is not None:
                problem = callback_problem(callback)
                if problem is not None:
                    raise InvalidInput(problem)
                if len(self.callbacks) >= MAX_CALLBACKS:
                    raise Unavailable(f"{MAX_CALLBACKS} callbacks are waiting already; try again later, "
                                      "or call without X-Callback-Url and read /calls/<id>")
            call = await client.submit(name, body, call_id=self._call_id(request),
                                       headers=self._content_type(request))
        except InvocationError as exc:
            return error_response(exc)
        self._remember(call.id)
        if callback is not None:
            spawn(self.callbacks, self._call_back(name, call.id, callback, wait), name=f"callback-{call.id}")
        response = json_response(202, {"call_id": call.id, "duplicate": call.duplicate})
        response.headers[CALL_ID] = call.id
        return response

    async def read(self, request: web.Request) -> web.StreamResponse:
        """``GET /calls/<id>``: the stored outcome; 202 while pending; 404 if the call is unknown."""
        call_id = request.match_info["call_id"]
        try:
            client = self._client()
            stored = await fetch_state(client.js, call_id)
        except InvocationError as exc:
            return error_response(exc, call_id)
        if isinstance(stored, Response):
            return outcome_response(stored)
        if isinstance(stored, Replayed) or self._submitted_here(call_id):
            pending = json_response(202, {"call_id": call_id, "status": "pending"})
            pending.headers[CALL_ID] = call_id
            return pending
        return json_response(404, {"error": {
            "type": "NoResult", "code": 404,
            "message": f"no outcome stored for call id {call_id!r}, and no call of that id is known to be "
                       "pending here (the outcome may have expired, or the call was submitted elsewhere)"}})

    # ------------------------------------------------------------------ internals

    def _client(self) -> Client:
        if self.client is None:
            raise Unavailable("the runtime is not connected to NATS yet")
        return self.client

    async def _body(self, request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"the request body is larger than {self.max_body:,} bytes "
                                  "(--http-max-body)") from None

    @staticmethod
    def _content_type(request: web.Request) -> dict[str, str]:
        # Passed on only when the caller named one: the function then decodes what it was sent.
        given = request.headers.get("Content-Type")
        return {H.CONTENT_TYPE: given} if given else {}

    def _call_id(self, request: web.Request) -> str:
        given = request.headers.get(IDEMPOTENCY_KEY) or request.headers.get(CALL_ID)
        return call_id_for(given) or self._id_base + str(next(self._ids))

    def _remember(self, call_id: str) -> None:
        self._recent[call_id] = None
        self._recent.move_to_end(call_id)
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    def _submitted_here(self, call_id: str) -> bool:
        return call_id in self._recent or call_id_for(call_id) in self._recent

    async def _call_back(self, function: str, call_id: str, url: str, wait: float) -> None:
        """Wait for ``call_id``'s outcome and POST it to ``url``, retried with exponential backoff."""
        try:
            response = await self._client().outcome(call_id, wait=wait)
        except (FnRuntimeError, OSError) as exc:
            log.warning("cannot wait for the outcome of call %s for its callback: %s", call_id, exc)
            return
        if response is None:
            answer = error_response(InvocationTimeout(
                f"no outcome of {function} stored within {wait:g}s; read it later at /calls/{call_id}"), call_id)
        else:
            answer = outcome_response(response)
        body = answer.body if isinstance(answer.body, bytes) else b""
        headers = {"Content-Type": answer.headers.get("Content-Type", codec.JSON), CALL_ID: call_id,
                   FUNCTION_NAME: function, FUNCTION_STATUS: str(answer.status)}
        problem = ""
        for attempt in range(CALLBACK_ATTEMPTS):
            if attempt:
                await asyncio.sleep(CALLBACK_BACKOFF * 2 ** (attempt - 1))
            session = self.session
            if session is None:
                return
            try:
                async with session.post(url, data=body, headers=headers, allow_redirects=False) as reply:
                    if 200 <= reply.status < 300:
                        return
                    problem = f"answered HTTP {reply.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                # The exception text may repeat the full URL: keep only its type for a URL with secrets.
                if url != safe_url(url):
                    problem = type(exc).__name__
        log.warning("callback of call %s (%s) to %s failed after %d attempts (%s); the outcome stays readable "
                    "at /calls/%s", call_id, function, safe_url(url), CALLBACK_ATTEMPTS, problem, call_id)


__all__ = ["HttpGateway", "error_response", "outcome_response"]
