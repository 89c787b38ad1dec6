"""The runtime's HTTP listener: a small route table served by aiohttp inside the runtime's own loop.

aiohttp runs on the loop that serves the functions (no thread, no second loop), so a probe
answers only while that loop does. The listener opens before the connection to NATS and closes
after everything else, so that the probes tell the truth for the whole life of the process:
not ready while connecting, starting or draining.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from .state import RuntimeState

log = logging.getLogger("runtime.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_MAX_BODY = 1024 * 1024   # bytes of a request body (413 beyond)
# Answered without the bearer token: probes and scrapes come from the platform, and say nothing
# a caller could act on; the dashboard's page (``/``) is static, its data comes from routes that ask.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/"})


@dataclass(frozen=True)
class Route:
    """One entry of the route table: ``GET /metrics`` -> handler."""

    method: str
    path: str
    handler: Handler


class HttpServer:
    """Serves ``routes`` on ``host:port`` with ``async start()`` / ``async stop()``."""

    def __init__(self, host: str, port: int, routes: Iterable[Route] = ()) -> None:
        self.host = host
        self.port = port
        self.routes: list[Route] = list(routes)
        # Set before ``start``: every route outside OPEN_PATHS then requires ``Authorization: Bearer``.
        self.token: str | None = None
        self.max_body = DEFAULT_MAX_BODY
        self._runner: web.AppRunner | None = None

    def add(self, route: Route) -> None:
        """Add a route; only before ``start`` (aiohttp freezes its router then)."""
        if self._runner is not None:
            raise RuntimeError("routes are added before the listener starts")
        self.routes.append(route)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen; OSError if the address cannot be bound (taken, not local)."""
        if self.token is None and not is_loopback(self.host):
            log.warning("the HTTP listener on %s is reachable from other hosts and has no token: anyone who "
                        "reaches it may call functions (set --http-token or $RUNTIME_HTTP_TOKEN)", self.url)
        middlewares = [] if self.token is None else [bearer_middleware(self.token)]
        app = web.Application(client_max_size=self.max_body, middlewares=middlewares)
        for route in self.routes:
            app.router.add_route(route.method, route.path, route.handler)
        # No access log: probes and scrapes every few seconds would drown what matters. A scraper's
        # keep-alive connection must not hold up the end of a shutdown.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("health and metrics on %s (/healthz, /readyz, /metrics)", self.url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorized(request: web.Request, token: str) -> bool:
    """True if ``request`` carries ``Authorization: Bearer <token>`` (compared in constant time)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def bearer_middleware(token: str, open_paths: Collection[str] = OPEN_PATHS) -> Middleware:
    """An aiohttp middleware answering 401 to any request outside ``open_paths`` without the token."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths or authorized(request, token):
            return await handler(request)
        response = json_response(401, {"error": {"type": "Unauthorized", "code": 401,
                                                 "message": "missing or wrong bearer token"}})
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    return check


def json_response(status: int, body: dict[str, object]) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def not_ready(state: RuntimeState, expected: Collection[str] = ()) -> str | None:
    """Why this runtime should get no work now (None: it is ready).

    Ready means: connected to NATS, streams provisioned, every component started, every
    function deployed (``expected``, from the registry) either served or known to fail here,
    and not shutting down.
    """
    if state.draining:
        return "draining: shutting down, in-flight work is finishing"
    nc = state.nc
    if nc is None or not nc.is_connected:
        return "not connected to NATS"
    if not state.provisioned:
        return "provisioning streams"
    if not state.serving:
        return "starting: loading the deployed functions"
    accounted = state.workers.keys() | state.failing.keys() | state.refused.keys()
    pending = sorted(name for name in expected if name not in accounted)
    if pending:
        return f"not yet serving: {', '.join(pending)}"
    return None


def probe_routes(state: RuntimeState, expected: Callable[[], Collection[str]]) -> list[Route]:
    """``/healthz`` (liveness: the loop answers) and ``/readyz`` (readiness, 503 with the reason)."""

    async def healthz(request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reason = not_ready(state, expected())
        if reason is None:
            return json_response(200, {"ready": True})
        return json_response(503, {"ready": False, "reason": reason})

    return [Route("GET", "/healthz", healthz), Route("GET", "/readyz", readyz)]
