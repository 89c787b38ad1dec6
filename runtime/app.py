"""The runtime: connects, provisions, and serves every deployed function until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext

from . import triggers
from .blocking import LoopMonitor
from .connection import ConnectOptions, open_connection, redact_url
from .errors import ConnectionLost, LoadError, PermissionDenied
from .follower import RegistryFollower
from .gateway import Gateway
from .loader import Handler, ensure_on_path, load_handler_async, module_changed
from .manifest import FunctionManifest, ManifestSet, Schedule
from .mover import DeadLetterMover
from .outbox import Outbox
from .registry import Registry
from .results import Call, should_store
from .scheduler import Scheduler
from .server import EmbeddedServer
from .settings import Settings
from .state import RuntimeState
from .status import StatusResponder
from .streams import ensure_consumer, provision_base
from .triggers import Binding
from .trust import defined_outside, refusal, serve_prefixes
from .wire import ReplyPolicy
from .worker import FunctionWorker

if TYPE_CHECKING:
    from .httpgateway import HttpGateway
    from .metrics import Monitoring

log = logging.getLogger("runtime.app")

CONNECTION_CHECK = 0.5   # seconds between checks that the connection is still open
START_ATTEMPTS = 5         # start-ups tried when the server does not answer in time
PROVISION_TIMEOUT = 15.0   # seconds a provisioning request may take to be answered
JS_TIMEOUT = 10.0          # seconds any other JetStream request of the runtime may take
COMPONENT_STOP = 10.0   # seconds a part may take to stop, beyond the grace period its work gets
PERMISSION_LOG_EVERY = 60.0  # seconds between log lines about the same refused permission


class Component(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def connect(url: str, name: str = "runtime", on_closed: Callable[[], None] | None = None,
                  options: ConnectOptions | None = None) -> NATS:
    """The runtime's connection: reconnects forever (the server may be restarting).

    Credentials or a certificate the server refuses end the attempt at once with ``AuthError``.
    ``on_closed`` is called if the connection is closed anyway while nobody asked for it
    (nats-py closes it for good on some server errors); the runtime then exits. A permission the
    server refuses is logged and the runtime goes on serving everything else.
    """
    where = redact_url(url)
    said: dict[str, float] = {}   # refused subject -> when it was last logged

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, PermissionDenied):
            # Refused again on every retry (a pull every few seconds): said once a minute per subject.
            now = asyncio.get_running_loop().time()
            if now - said.get(exc.message, -PERMISSION_LOG_EVERY) >= PERMISSION_LOG_EVERY:
                said[exc.message] = now
                log.error("%s: this runtime's NATS user lacks that permission; what needs it cannot work "
                          "until it is granted, everything else is served", exc.message)
            return
        log.warning("nats: %s", exc)

    async def on_closed_cb() -> None:
        if on_closed is not None:
            on_closed()

    def server() -> str:
        # The one server of a cluster's list this connection is on.
        return redact_url(nc.connected_url.geturl()) if nc.connected_url else where

    async def on_disconnect() -> None:
        if not nc.is_closed and not nc.is_draining:
            log.warning("disconnected from %s; reconnecting", server())

    async def on_reconnect() -> None:
        # Then every feed asks again (open_connection): a restarted server forgot the pull
        # requests it held.
        log.info("reconnected to %s", server())

    nc: NATS = await open_connection(
        url, options, name=name, max_reconnect_attempts=-1, reconnect_time_wait=1,
        error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
        closed_cb=on_closed_cb,
        pending_size=8 * 1024 * 1024,
        # Subjects are built from validated names; checking each publish again is hot-path cost.
        skip_subject_validation=True)
    return nc


class Runtime:
    """Serves functions from one NATS connection. ``async with Runtime(settings, url)``.

    Its parts share ``self.state`` (connection, served functions, counters); the parts that act on
    the runtime do so through explicit callbacks (the follower's ``apply``/``remove``, the
    watchers' ``serving``/``stopped_serving``).
    """

    def __init__(self, settings: Settings, url: str, *, embedded: bool = False) -> None:
        self.settings = settings
        self.url = url
        self.state = RuntimeState()
        self.components: list[Component] = []
        self.follower = RegistryFollower(self.state, apply=self.apply, remove=self.remove,
                                         replicas=settings.replicas, on_schedules=self._set_schedules)
        self.state.monitor = LoopMonitor(self.state.handlers)
        # Completed with the packages of ``settings.manifests`` once they are loaded at start.
        self.state.trusted = serve_prefixes(settings.trust, ())
        self.scheduler: Scheduler | None = None
        # Set when the connection closed for good without a stop: the process must exit.
        self.lost = asyncio.Event()
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._serving = False   # workers pull only once every component has started
        self._lock = asyncio.Lock()
        # /healthz, /readyz, /metrics: on by default only beside the embedded server (settings.http).
        self.monitoring: Monitoring | None = None
        self.http_gateway: HttpGateway | None = None
        listener = settings.http_address(embedded)
        if listener is not None:   # imported only then: aiohttp.web and prometheus_client take ~8 MB
            from .httpgateway import HttpGateway
            from .metrics import monitoring_for
            self.monitoring = monitoring_for(listener, self.state, lambda: self.follower.functions.keys())
            # POST /function/<name>, /async-function/<name>, GET /calls/<id> on that listener.
            self.http_gateway = HttpGateway.install(self.monitoring, settings)
        ensure_on_path(settings.project_root)

    # The state's parts, as the runtime's own attributes (read-only: the state is the one place).

    @property
    def connection(self) -> tuple[NATS, JetStreamContext]:
        return self.state.connection

    @property
    def nc(self) -> NATS | None:
        return self.state.nc

    @property
    def js(self) -> JetStreamContext | None:
        return self.state.js

    @property
    def outbox(self) -> Outbox | None:
        return self.state.outbox

    @property
    def monitor(self) -> LoopMonitor:
        assert self.state.monitor is not None
        return self.state.monitor

    @property
    def workers(self) -> dict[str, FunctionWorker]:
        return self.state.workers

    @property
    def failing(self) -> dict[str, str]:
        """Function name -> why its handler is not served here."""
        return self.state.failing

    @property
    def refused(self) -> dict[str, str]:
        """Function name -> why its handler module was not imported (outside the trusted prefixes)."""
        return self.state.refused

    @property
    def manifests(self) -> dict[str, FunctionManifest]:
        """Every function deployed to this runtime, served, failing or refused."""
        return self.state.deployed

    async def start(self) -> None:
        """Connect, provision and serve; a start that fails half way stops what it started."""
        try:
            if self.monitoring is not None:
                # Before the connection: the probes say "not ready" while it is tried again and again.
                await self.monitoring.open()
            await self._start()
        except BaseException:
            await self.stop()
            raise

    def _on_closed(self) -> None:
        if not self._stopping and not self.lost.is_set():
            log.error("the connection to NATS was closed for good (last error: %s); this runtime stops so "
                      "that its supervisor can restart it", self.nc.last_error if self.nc else None)
            self.lost.set()

    async def _watch_connection(self, nc: NATS) -> None:
        # nats-py may close the connection without calling closed_cb (an error while it closes
        # the transport): the state is what counts.
        while not nc.is_closed:
            await asyncio.sleep(CONNECTION_CHECK)
        self._on_closed()

    async def _start(self) -> None:
        self._stopping = False
        state = self.state
        state.draining = False
        state.nc = nc = await connect(self.url, on_closed=self._on_closed, options=self.settings.connect)
        self._watch = asyncio.create_task(self._watch_connection(nc), name="connection-watch")
        # nats-py's default 5 s is short for a cluster under load creating replicated consumers.
        state.js = js = nc.jetstream(timeout=JS_TIMEOUT)
        state.outbox = Outbox(nc, js, ReplyPolicy(self.settings.reply_prefixes))
        s = self.settings
        # A cluster electing leaders (a node just died, streams being scaled) can take longer than
        # nats-py's default 5 s to answer; provisioning waits longer rather than failing the start.
        await provision_base(nc.jetstream(timeout=PROVISION_TIMEOUT), results_ttl=s.results_ttl,
                             dlq_retention=s.dlq_retention, replicas=s.replicas, max_queued=s.max_queued)
        await triggers.keep_in_shape(nc.jetstream(timeout=PROVISION_TIMEOUT), s.replicas)
        state.provisioned = True
        if s.manifests:
            # Development mode: deploy the given manifests, then follow the registry like any runtime.
            registry = await Registry.open(js, s.replicas)
            given = ManifestSet.load(s.manifests)
            # The operator chose these files: their handlers' packages are trusted.
            state.trusted = serve_prefixes(s.trust, (m.handler for m in given.functions.values()))
            for result in await registry.deploy(given):
                log.info("%s %s: %s", result.kind.lower(), result.name, result.status)
        for component in self._components():
            # Listed first: a component whose own start fails half way is stopped with the others.
            self.components.append(component)
            await component.start()
        # Handlers run only now: a handler that blocks the event loop cannot break the start-up.
        self._serving = True
        for worker in list(self.state.workers.values()):
            await worker.start()
        state.serving = True

    def _components(self) -> list[Component]:
        """The parts of a runtime, each with start/stop, in start order."""
        # The loop monitor comes first so that it also watches the start-up of every function.
        components: list[Component] = [self.monitor, self.follower, StatusResponder(self.state)]
        if self.settings.scheduler:
            self.scheduler = Scheduler(self.connection[1], stats=self.state.cron)
            components.append(self.scheduler)
        if self.settings.dead_letters:
            components.append(DeadLetterMover(*self.connection, store_results=self._stores_results,
                                              attempts=self._attempts, user_streams=self._trigger_streams,
                                              outbox=self.outbox))
        if self.settings.gateway:
            components.append(Gateway(self.state))
        if self.http_gateway is not None:
            components.append(self.http_gateway)
        if self.monitoring is not None:
            components.append(self.monitoring)   # reads queue depths and dead letters
        return components

    def _set_schedules(self, schedules: list[Schedule]) -> None:
        # The follower tells every change; the scheduler, if this runtime runs one, fires them.
        if self.scheduler is not None:
            self.scheduler.set_schedules(schedules)

    def _stores_results(self, name: str, call: Call) -> bool:
        return should_store(self.state.deployed.get(name), call)

    def _trigger_streams(self) -> set[str]:
        """The streams of the user's own that the triggers served here read from."""
        return {binding.stream for worker in self.state.workers.values() for binding in worker.bindings
                if not binding.owned}

    def _attempts(self, name: str) -> int | None:
        manifest = self.state.deployed.get(name)
        return None if manifest is None else manifest.retry.max_deliver

    async def apply(self, manifest: FunctionManifest) -> None:
        """Serve ``manifest``'s function, or apply its new settings if already served."""
        state = self.state
        nc, js = state.connection
        async with self._lock:
            current = state.workers.get(manifest.name)
            # Checked before anything imports the module (the import check child runs its code too).
            refused = refusal(manifest.name, manifest.handler, state.trusted)
            if refused is not None:
                log.error("refusing to serve %s", refused)
                await self._not_served(manifest, current, refused=refused)
                return
            try:
                handler = await self._handler_for(manifest, current)
            except LoadError as exc:
                log.error("cannot serve %s: %s", manifest.name, exc)
                await self._not_served(manifest, current, failing=str(exc))
                return
            refused = defined_outside(manifest.name, manifest.handler, handler.func, state.trusted)
            if refused is not None:
                log.error("refusing to serve %s", refused)
                await self._not_served(manifest, current, refused=refused)
                return
            state.failing.pop(manifest.name, None)
            state.refused.pop(manifest.name, None)
            # The deploy created the consumer; ensuring it here also restores one deleted by hand.
            await ensure_consumer(js, manifest)
            bindings = await self._bind_triggers(manifest)
            state.deployed[manifest.name] = manifest
            if current is None:
                assert state.outbox is not None
                worker = FunctionWorker(nc, js, manifest, handler, state.outbox, state.stats_for(manifest.name))
                await worker.set_triggers(bindings)
                if self._serving:
                    await worker.start()
                state.workers[manifest.name] = worker
            else:
                current.update(manifest, handler)
                await current.set_triggers(bindings)
                log.info("updated %s", manifest.name)
            await self._tell_watchers(manifest.name, manifest)

    async def _bind_triggers(self, manifest: FunctionManifest) -> list[Binding]:
        """The consumers of the function's triggers, created or updated; one that cannot be bound is
        logged and recorded, and the function is served with the others."""
        failed: dict[str, str] = {}
        bindings = await triggers.bind(self.state.connection[1], manifest, self.settings.replicas, failed)
        for reason in failed.values():
            log.error("not serving %s", reason)
        self.state.trigger_failures[manifest.name] = failed
        return bindings

    async def _not_served(self, manifest: FunctionManifest, current: FunctionWorker | None, *,
                          failing: str | None = None, refused: str | None = None) -> None:
        """Record why ``manifest``'s function is not served here; stop serving its earlier revision."""
        state = self.state
        state.deployed[manifest.name] = manifest
        for reasons, reason in ((state.failing, failing), (state.refused, refused)):
            if reason is None:
                reasons.pop(manifest.name, None)
            else:
                reasons[manifest.name] = reason
        if current is not None:
            del state.workers[manifest.name]
            await self._tell_watchers(manifest.name, None)
            await current.stop(self.settings.grace)

    async def _tell_watchers(self, name: str, manifest: FunctionManifest | None) -> None:
        for watcher in list(self.state.watchers):
            try:
                if manifest is None:
                    await watcher.stopped_serving(name)
                else:
                    await watcher.serving(manifest)
            except Exception:
                log.exception("could not tell %s about %s", type(watcher).__name__, name)

    async def _handler_for(self, manifest: FunctionManifest, current: FunctionWorker | None) -> Handler:
        root = self.settings.project_root
        if current is not None and current.manifest.handler == manifest.handler:
            old = current.executor.handler
            if not module_changed(old):
                return old
            log.info("module of %s changed on disk; reloading it", manifest.handler)
            return await load_handler_async(manifest.handler, reload=True, root=root)
        return await load_handler_async(manifest.handler, root=root)

    async def remove(self, name: str) -> None:
        """Stop serving ``name`` once its in-flight invocations finish."""
        state = self.state
        async with self._lock:
            worker = state.workers.pop(name, None)
            state.deployed.pop(name, None)
            state.failing.pop(name, None)
            state.refused.pop(name, None)
            if worker is not None:
                await self._tell_watchers(name, None)
        if worker is not None:
            await worker.stop(self.settings.grace)
            log.info("stopped serving %s", name)

    @staticmethod
    async def _stop_component(component: Component, within: float) -> None:
        """Stop one part; a part that does not stop in time is logged and left, so that shutdown
        stays bounded whatever it waits for."""
        try:
            await asyncio.wait_for(component.stop(), within)
        except TimeoutError:
            log.warning("%s did not stop within %gs; shutting down without it", type(component).__name__, within)
        except Exception:
            log.debug("stopping %s failed", type(component).__name__, exc_info=True)

    async def stop(self) -> None:
        """Stop fetching, let in-flight work finish within the grace period, then drain."""
        self._stopping = True
        self._serving = False
        # First of all: the readiness probe fails at once, so load balancers stop sending work.
        self.state.draining = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        # Without a connection nothing can be acknowledged: in-flight work is redelivered anyway.
        grace = 0.0 if self.lost.is_set() else self.settings.grace
        for component in reversed(self.components):
            await self._stop_component(component, grace + COMPONENT_STOP)
        self.components.clear()
        state = self.state
        workers = list(state.workers.values())
        state.workers.clear()
        await asyncio.gather(*(w.stop(grace) for w in workers))
        if state.outbox is not None:
            await state.outbox.stop(min(grace, 5.0))
        nc = state.nc
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.flush(timeout=5)
            with contextlib.suppress(Exception):
                await nc.drain()
        state.nc = state.js = None
        state.provisioned = state.serving = False
        if self.monitoring is not None:
            await self.monitoring.close()   # the very end: probes answered "draining" until now

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


async def start_patiently(settings: Settings, url: str, embedded: bool, stop: asyncio.Event) -> Runtime | None:
    """A started runtime; a start-up the server did not answer in time (a busy cluster electing
    leaders) is tried again a few times rather than ending the process. None if stopped meanwhile."""
    for attempt in range(1, START_ATTEMPTS + 1):
        runtime = Runtime(settings, url, embedded=embedded)
        try:
            await runtime.start()
            return runtime
        except (NatsTimeout, TimeoutError):
            if attempt == START_ATTEMPTS or stop.is_set():
                raise
            delay = min(2.0 * attempt, 10.0)
            log.warning("the NATS server did not answer in time during start-up; starting again in %gs", delay)
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return None
        except TimeoutError:
            pass
    return None


async def serve(settings: Settings, stop: asyncio.Event, *, handle_signals: bool = True,
                embedded: bool = False) -> None:
    """Run a runtime (and the embedded server when no URL is set) until ``stop`` is set.

    ``embedded``: the URL is an embedded server started by the caller (``--secure``), so the
    HTTP endpoints are on by default as beside the one started here."""
    from .signals import capture_signals

    # Signals are handled from the very start: a SIGTERM while the embedded server starts must
    # still stop that server (it runs in a session of its own and would outlive this process).
    with capture_signals(stop, handle_signals):
        server: EmbeddedServer | None = None
        url = settings.server
        try:
            if url is None:
                server = EmbeddedServer(settings.data_dir, port=settings.port, host=settings.host,
                                        config=settings.default_conf())
                await server.start()
                url = server.url
            if stop.is_set():
                return
            runtime = await start_patiently(settings, url, embedded or server is not None, stop)
            if runtime is None:
                return
            try:
                log.info("runtime ready on %s", redact_url(url))
                stopped = asyncio.create_task(stop.wait())
                lost = asyncio.create_task(runtime.lost.wait())
                await asyncio.wait([stopped, lost], return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                lost.cancel()
                log.info("shutting down")
            finally:
                await runtime.stop()
            if runtime.lost.is_set():
                raise ConnectionLost("the connection to NATS was closed for good; exiting so that a supervisor "
                                     "restarts the runtime")
        finally:
            if server is not None:
                await server.stop()
