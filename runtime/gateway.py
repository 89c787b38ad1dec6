"""The ``runtime`` NATS micro service: ``fn.call.<name>`` for any NATS client, one endpoint per function.

An endpoint does not run the function: it stores the request as a durable invocation whose
``Fn-Reply-To`` is the requester's reply subject, and whichever runtime runs it answers the
requester directly. The endpoint itself answers only when the call cannot go ahead: 404 for
an unknown function, 413 for an input too large, 429 when the function's queue is full
(``max_queued``), 503 when the invocation could not be stored.

An endpoint's STATS count the requests it received and, as errors, every failure answered for
them: the endpoint's own 413/503 (and a 404 for a name it serves), a duplicate request answered
with a stored failure, and the final failure of a call it stored, counted by the runtime that
ran the call (the invocation's ``Fn-Endpoint`` header says it came through an endpoint). Each
runtime reports its own counts; summed over the fleet they cover every call once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, ServiceConfig
from nats.nuid import NUID

from . import headers as H
from .client import Client, read_ack
from .errors import (
    InvalidInput,
    InvocationError,
    PayloadTooLarge,
    QueueFull,
    Unavailable,
    UnknownFunction,
    describe,
)
from .inbox import ReplyInbox
from .logs import call_fields
from .loop import finish_within, spawn
from .manifest import FunctionManifest
from .micro import MicroService, reply_subject
from .outbox import Outbox
from .priority import check_level, invoke_subject
from .queuelimit import Throttle, held_back
from .results import Response
from .state import RuntimeState
from .status import runtime_id
from .streams import INVOKE_PREFIX
from .wire import call_id_for, clip

log = logging.getLogger("runtime.gateway")

SERVICE_NAME = "runtime"
CALL_PREFIX = "fn.call."
QUEUE = "q"  # the micro default: one runtime of the fleet takes each request
# The server picks one member among all matching subscriptions sharing a queue name, whatever
# their subjects: the catch-all needs a group of its own, or it would take requests from endpoints.
UNKNOWN_QUEUE = "fn-unknown"
ACK_TIMEOUT = 5.0
# Headers the gateway sets itself; a requester's own values are not passed on.
_OWN = {H.REPLY_TO.lower(), H.CALL_ID.lower(), H.MSG_ID.lower(), H.ENDPOINT.lower()}


def _version() -> str:
    try:
        return version("nats-fn-runtime")
    except PackageNotFoundError:
        return "0.0.0"


def worst_case(manifest: FunctionManifest) -> float:
    """Seconds a call may take from its first attempt to its final outcome."""
    retry = manifest.retry
    backoff = sum(retry.delay_before(n) for n in range(2, retry.max_deliver + 1))
    return manifest.timeout * retry.max_deliver + backoff


def requested_level(value: str | None) -> int | None:
    """The level a ``Fn-Priority`` request header asks for (None: the function's default); ValueError if invalid."""
    if value is None or not value.strip():
        return None
    try:
        level = int(value.strip())
    except ValueError:
        raise ValueError(f"{clip(value, 32)!r} is not a priority level from 1 (least urgent) "
                         "to 10 (most urgent)") from None
    return check_level(level)


@dataclass(frozen=True, slots=True)
class _Storing:
    """A request whose invocation awaits JetStream's acknowledgement."""

    function: str
    reply: str
    call_id: str


class Gateway:
    """Keeps one micro endpoint per function this runtime serves.

    It reads the runtime's shared ``state`` and, once started, is told through ``state.watchers``
    when the runtime starts or stops serving a function.
    """

    def __init__(self, state: RuntimeState) -> None:
        self.state = state
        self.service: MicroService | None = None
        self.client: Client | None = None
        self.endpoints: set[str] = set()
        self._unknown: Subscription | None = None
        self._acks: ReplyInbox | None = None
        self._lock = asyncio.Lock()
        self._waits: set[asyncio.Task[None]] = set()
        self._replying: set[asyncio.Task[None]] = set()   # error replies to acknowledgements
        self._nuid = NUID()
        self._refusals = Throttle()   # a full queue refuses every call until it drains: log some

    async def start(self) -> None:
        nc, _ = self.state.connection
        self.client = Client(nc)
        await self.client.start()
        self._acks = ReplyInbox(nc, tick=0.1, name="gateway-acks")
        await self._acks.start()
        self.service = MicroService(nc, ServiceConfig(
            name=SERVICE_NAME, version=_version(), description="Python functions served from NATS JetStream",
            metadata={"runtime": runtime_id()}, queue_group=QUEUE),
            may_answer=lambda reply: self._outbox.reply_subject(reply) is not None)
        await self.service.start()
        self._outbox.on_endpoint_failure = self.count_error
        # Every request also reaches this catch-all group; it answers only for names no endpoint has.
        self._unknown = await nc.subscribe(CALL_PREFIX + ">", queue=UNKNOWN_QUEUE, cb=self._on_unknown)
        self.state.watchers.append(self)
        for manifest in self.state.served():
            await self.serving(manifest)
        await nc.flush()

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.state.watchers.remove(self)
        if self.state.outbox is not None and self.state.outbox.on_endpoint_failure == self.count_error:
            self.state.outbox.on_endpoint_failure = None
        if self._unknown is not None:
            with contextlib.suppress(Exception):
                await self._unknown.unsubscribe()
        if self.service is not None:
            with contextlib.suppress(Exception):
                # Endpoints drain first: requests already received still become invocations.
                for name in list(self.endpoints):
                    await self.service.remove_endpoint(name)
                await self.service.stop()
        if self._acks is not None:
            with contextlib.suppress(Exception):
                # Acknowledgements already received are still handled.
                await self._acks.stop(drain=True)
        await finish_within(self._replying, 1.0)   # short: each publishes one error reply
        await finish_within(self._waits, 0.0)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.stop()
        self.endpoints.clear()

    # ------------------------------------------------------------------ following the runtime

    async def serving(self, manifest: FunctionManifest) -> None:
        """The runtime serves ``manifest``'s function: add its endpoint if it has none."""
        name = manifest.name
        async with self._lock:
            if name in self.endpoints or self.service is None:
                return
            await self.service.add_endpoint(EndpointConfig(
                name=name, subject=CALL_PREFIX + name, handler=self._handler(name),
                metadata={"function": name, "invoke": INVOKE_PREFIX + name,
                          "description": manifest.description}))
            self.endpoints.add(name)
            # Once the runtime serves a function, requests to its endpoint must find it.
            await self.state.connection[0].flush()
            log.debug("endpoint %s%s added", CALL_PREFIX, name)

    async def stopped_serving(self, name: str) -> None:
        async with self._lock:
            if name not in self.endpoints or self.service is None:
                return
            self.endpoints.discard(name)
            await self.service.remove_endpoint(name)
            log.debug("endpoint %s%s removed", CALL_PREFIX, name)

    # ------------------------------------------------------------------ requests

    def _handler(self, name: str) -> Callable[[Request], Awaitable[None]]:
        async def handle(request: Request) -> None:
            # The reply subject is the requester's inbox: the function's runtime answers there.
            try:
                await self._forward(name, request.data, request.headers, reply_subject(request))
            except Exception:
                # Never raise to nats.micro: it would answer the error on the request's reply
                # subject without the checks every answer of the runtime goes through.
                log.exception("could not forward a call of %s", name, extra=call_fields(name))

        return handle

    async def _forward(self, name: str, data: bytes, headers: Mapping[str, str] | None, requester: str) -> None:
        """Store the request as an invocation; its acknowledgement is handled when it comes."""
        nc, _ = self.state.connection
        outbox = self._outbox
        acks = self._ack_inbox
        given = headers or {}
        call_id = call_id_for(given.get(H.MSG_ID)) or self._nuid.next().decode()
        # The reply subject is the requester's: a system subject there is never answered.
        reply = outbox.reply_subject(requester, call_id) or ""
        hdrs = {k: v for k, v in given.items() if k.lower() not in _OWN}
        hdrs[H.MSG_ID] = call_id
        hdrs[H.ENDPOINT] = CALL_PREFIX + name
        if reply:
            hdrs[H.REPLY_TO] = reply
        try:
            subject = invoke_subject(name, requested_level(given.get(H.PRIORITY)))
        except ValueError as exc:
            await self._reply_error(name, reply, call_id, InvalidInput(f"{H.PRIORITY}: {exc}", call_id=call_id))
            return
        # Not awaiting the acknowledgement here keeps requests flowing while earlier ones are stored.
        deadline = asyncio.get_running_loop().time() + ACK_TIMEOUT
        ack_subject = acks.on_reply(deadline, functools.partial(self._on_ack, _Storing(name, reply, call_id)))
        if not outbox.limits.fits(subject, data, hdrs, reply=ack_subject):
            acks.forget(ack_subject)
            room = outbox.limits.room_for_body(hdrs)
            error = PayloadTooLarge(f"the input of {name} is {len(data)} bytes; at most {room} fit in an "
                                    f"invocation (the server's max_payload is {outbox.limits.max_payload})",
                                    call_id=call_id)
            log.warning("refused a call of %s: %s", name, error.message, extra=call_fields(name, call_id))
            self.count_error(name, error)
            # Kept by call id as well, so the refused call can be looked up like any other.
            response = Response.failure(call_id, error)
            await outbox.answer(reply, response)
            with contextlib.suppress(Exception):   # best effort: the requester has its answer already
                await outbox.store(response, patient=False)
            return
        try:
            await nc.publish(subject, data, reply=ack_subject, headers=hdrs)
        except Exception as exc:
            acks.forget(ack_subject)
            await self._reply_error(name, reply, call_id, Unavailable(
                f"the invocation of {name} could not be stored: {exc or type(exc).__name__}"))

    @property
    def _outbox(self) -> Outbox:
        if self.state.outbox is None:
            raise RuntimeError("the runtime is not started")
        return self.state.outbox

    @property
    def _ack_inbox(self) -> ReplyInbox:
        if self._acks is None:
            raise RuntimeError("the gateway is not started")
        return self._acks

    def _on_ack(self, storing: _Storing, ack: Msg | None) -> None:
        # Called as the acknowledgement is read (see ReplyInbox): what must wait goes to a task.
        if ack is None:
            self._later(self._reply_error(storing.function, storing.reply, storing.call_id, Unavailable(
                f"JetStream did not acknowledge the invocation of {storing.function} within "
                f"{ACK_TIMEOUT:g}s (call id {storing.call_id!r} may or may not be stored)")), storing)
            return
        try:
            duplicate = read_ack(ack, storing.function, storing.call_id)
        except QueueFull as exc:
            held = self._refusals.due(storing.function)
            if held is not None:
                log.warning("refused a call of %s: %s%s", storing.function, exc.message, held_back(held),
                            extra=call_fields(storing.function, storing.call_id))
            self._later(self._reply_error(storing.function, storing.reply, storing.call_id, exc), storing)
            return
        except Unavailable as exc:
            log.warning("could not store a call of %s: %s", storing.function, exc.message,
                        extra=call_fields(storing.function, storing.call_id))
            self._later(self._reply_error(storing.function, storing.reply, storing.call_id, exc), storing)
            return
        if duplicate and storing.reply:
            # The stored invocation answers its first requester; this one gets the stored outcome.
            self._later(self._answer_duplicate(storing), storing, waits=True)

    def _later(self, work: Coroutine[Any, Any, None], storing: _Storing, *, waits: bool = False) -> None:
        """Run ``work`` in a task: an error reply (finished at shutdown), or a wait for an outcome
        (``waits``: cancelled at shutdown)."""
        spawn(self._waits if waits else self._replying, work, name=f"gateway-{storing.call_id[:64]}")

    async def _answer_duplicate(self, storing: _Storing) -> None:
        assert self.client is not None
        manifest = self.state.deployed.get(storing.function)
        wait = max(60.0, worst_case(manifest)) if manifest is not None else 60.0
        response = await self.client.outcome(storing.call_id, wait=wait)
        if response is not None and storing.reply:
            await self._outbox.answer(storing.reply, response)
            error = response.error
            if error is not None:
                self.count_error(storing.function, error)

    async def _on_unknown(self, msg: Msg) -> None:
        name = msg.subject[len(CALL_PREFIX):]
        if name in self.state.deployed or not msg.reply:
            return  # deployed: its endpoint answers (on whichever runtime serves it)
        call_id = call_id_for((msg.headers or {}).get(H.MSG_ID)) or self._nuid.next().decode()
        await self._reply_error(name, msg.reply, call_id,
                                UnknownFunction(f"no function named {name[:80]!r} is deployed"))

    async def _reply_error(self, function: str, reply: str, call_id: str, error: InvocationError) -> None:
        # Counted whether or not it can be answered: the call failed at the endpoint either way.
        self.count_error(function, error)
        if reply:
            await self._outbox.answer(reply, Response.failure(call_id, error))

    def count_error(self, function: str, error: InvocationError) -> None:
        """Count a failure answered for ``function``'s endpoint in its STATS (if this runtime has one).

        ``last_error`` reads ``<code>:<type>: <message>``, after the ``code:description`` of the
        micro errors other NATS clients report.
        """
        if self.service is not None and function in self.endpoints:
            self.service.record_error(function, f"{error.code}:{describe(error, 256)}")
