"""Calling functions from Python: ``invoke`` waits for the answer, ``submit`` returns a call id at once,
``result`` reads a stored outcome by call id from any process.

Every call goes through the durable ``FN`` stream (so it survives a runtime restart). The
stream's acknowledgement and the function's answer both come back to this client's own
``ReplyInbox``: one wildcard subscription serves all calls, and one watchdog enforces every
call's deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import BadHeaderError, MaxPayloadError, NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.nuid import NUID

from . import codec
from . import headers as H
from .connection import ConnectOptions, open_connection, permission_watch
from .consumer import follow_reconnects, unfollow_reconnects
from .delay import Pending, delayed_subject, due_time, schedule_headers
from .delay import cancel as cancel_delayed
from .errors import (
    FnRuntimeError,
    InvalidInput,
    InvocationTimeout,
    NoResult,
    PayloadTooLarge,
    PermissionDenied,
    QueueFull,
    Unavailable,
    UnknownFunction,
)
from .expiry import ttl_header
from .fastpub import Publisher
from .inbox import ReplyInbox, Waiter
from .loop import spawn
from .manifest import NAME_PATTERN
from .priority import invoke_subject
from .protocol import DEFAULT_URL, is_tombstone
from .queuelimit import refused_for_full_queue
from .results import Replayed, Response, fetch_response, fetch_state, result_subject
from .streams import INVOKE_PREFIX, INVOKE_STREAM, MANIFESTS_BUCKET

log = logging.getLogger("runtime.client")

KNOWN_TTL = 10.0  # a function found deployed is trusted this long before it is looked up again
READ_AGAIN_AT_ONCE = 64   # outcomes read at once after a reconnect
_NAME = re.compile(NAME_PATTERN)
_ID_PREFIX = re.compile(r"^([A-Za-z0-9_\-]+\.)+$|^[A-Za-z0-9_\-]+$")
T = TypeVar("T")

Encoding = Literal["json", "msgpack"]


@dataclass(frozen=True, slots=True)
class Call:
    """A stored invocation. ``id`` reads its outcome later with :meth:`Client.result`."""

    id: str
    function: str
    duplicate: bool = False  # this call id was already stored: the function runs once for both
    due: datetime | None = None  # a delayed call: when it is queued to run (UTC, whole seconds)


@dataclass(frozen=True, slots=True)
class Progress:
    """An update a function sent while it ran (``ctx.progress``): ``seq`` counts from 1 within
    ``attempt``, so a retried attempt's updates start again at 1 with the next attempt number."""

    call_id: str
    attempt: int
    seq: int
    data: Any


@dataclass(frozen=True, slots=True)
class Final:
    """The last item :meth:`Client.stream` yields: the call's result."""

    call_id: str
    value: Any


def _progress_reader(call_id: str, callback: Callable[[Progress], object]) -> Callable[[Msg], None]:
    """Turns progress messages into :class:`Progress` for ``callback`` (a coroutine result is scheduled)."""
    def on_msg(msg: Msg) -> None:
        hdrs = msg.headers or {}
        try:
            attempt, seq = int(hdrs.get(H.ATTEMPT, "1")), int(hdrs.get(H.PROGRESS, "0"))
        except ValueError:
            return   # not an update the runtime sent
        outcome = callback(Progress(hdrs.get(H.CALL_ID, call_id), attempt, seq,
                                    codec.decode(msg.data, hdrs.get(H.CONTENT_TYPE))))
        if inspect.isawaitable(outcome):
            task = asyncio.ensure_future(outcome)
            _CALLBACKS.add(task)   # kept until done: the loop holds tasks only weakly
            task.add_done_callback(_CALLBACKS.discard)
    return on_msg


_CALLBACKS: set[asyncio.Future[Any]] = set()


class Client:
    """Invoke functions served by runtimes: ``async with Client(url) as fn: await fn.invoke(...)``.

    ``server`` is a NATS URL, or an existing nats-py connection (left open on exit).
    Payloads may be pydantic models, dicts and other JSON-able values (encoded as JSON, or
    msgpack with ``encoding="msgpack"``) or bytes (sent as they are).
    """

    def __init__(self, server: str | NATS = DEFAULT_URL, *, encoding: Encoding = "json",
                 ack_timeout: float = 5.0, user: str | None = None, password: str | None = None,
                 token: str | None = None, nkey: str | Path | None = None, creds: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 tls_ca: str | Path | None = None, tls_first: bool = False, inbox_prefix: str | None = None,
                 id_prefix: str = "", options: ConnectOptions | None = None) -> None:
        """``user``/``password``, ``token``, ``nkey`` (a seed file), ``creds`` (a JWT credentials file)
        and the ``tls_*`` files authenticate to the server (or pass ``options``); ``inbox_prefix``
        puts this client's reply subjects under a prefix its user may subscribe to. Call ids start
        with ``id_prefix`` (such as ``"alice."``), so a caller can be allowed to read only the
        outcomes of its own calls."""
        if encoding not in codec.CONTENT_TYPES:
            raise ValueError(f"encoding must be one of {sorted(codec.CONTENT_TYPES)}, not {encoding!r}")
        check_id_prefix(id_prefix)
        self._server = server
        self.options = options or ConnectOptions.model_validate({
            "user": user, "password": password, "token": token, "nkey": nkey, "creds": creds,
            "tls_cert": tls_cert, "tls_key": tls_key, "tls_ca": tls_ca, "tls_first": tls_first,
            "inbox_prefix": inbox_prefix})
        self.encoding: Encoding = encoding
        self.ack_timeout = ack_timeout
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._pub: Publisher | None = None
        self._inbox: ReplyInbox | None = None
        self._known: dict[str, float] = {}
        # Call ids: unique per client, then a counter (cheaper than a random id per call).
        unique = id_prefix + NUID().next().decode()
        self._id_base = unique + "-"
        self._ids = itertools.count(1)
        # invoke's own ids: ``<unique>.<reply token>``, whose outcomes this client subscribes to
        # (see start), so a stored outcome is its answer without a second message.
        self._watch_base = unique + "."
        self._watched: dict[str, asyncio.Future[Msg | None]] = {}   # call id -> its waiter
        self._watching = False
        self._watch_refused = False   # this client may not subscribe to its outcomes
        # What each waiting request published to, so a permission the server refused fails it at once.
        self._guarded: dict[asyncio.Future[Any], tuple[str, ...]] = {}
        self._inbox_refused: PermissionDenied | None = None   # this client may not receive replies
        self._stop_watching: Callable[[], None] | None = None
        self._stop_claim: Callable[[], None] | None = None
        # call id -> the waiter of each call waiting for its outcome, read again after a reconnect
        self._waiting: dict[str, Waiter] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._inbox is not None:
            return
        if isinstance(self._server, str):
            # Only validated names and inboxes become subjects here.
            self._nc = await open_connection(self._server, self.options, name="runtime-client",
                                             skip_subject_validation=True)
        else:
            self._nc = self._server   # told of reconnects if open_connection made it (see renew)
        follow_reconnects(self._nc, self)
        self._js = self._nc.jetstream()
        self._pub = Publisher(self._nc)
        watch = permission_watch(self._nc)
        if watch is not None:
            self._stop_watching = watch.listen(self._on_denied)
        inbox = ReplyInbox(self._nc, name="client-deadlines")
        await inbox.start()
        if watch is not None and self._may_watch():
            # Outcomes are answers where the runtime stores them: no second message per call. Only
            # on a connection that hears a refused subscription, which then changes nothing else.
            watched = result_subject(self._watch_base[:-1])
            self._stop_claim = watch.claim(watched + ".", self._on_watch_denied)
            await inbox.also_on(watched)
            # The server reports a refused subscription after the fact, often after this round
            # trip; if later, the calls waiting then fail with it (see _on_denied).
            await self._nc.flush()
            if self._inbox_refused is not None:
                await inbox.stop()
                raise self._inbox_refused
            self._watching = not self._watch_refused
        self._inbox = inbox

    async def stop(self) -> None:
        if self._nc is not None:
            unfollow_reconnects(self._nc, self)
        for task in list(self._tasks):
            task.cancel()
        if self._stop_watching is not None:
            self._stop_watching()
            self._stop_watching = None
        if self._stop_claim is not None:
            self._stop_claim()
            self._stop_claim = None
        inbox, self._inbox = self._inbox, None
        if inbox is not None:
            await inbox.stop()
        nc = self._nc
        if nc is None or nc.is_closed:
            return
        if isinstance(self._server, str):
            await nc.drain()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def nc(self) -> NATS:
        if self._nc is None or self._inbox is None:
            raise FnRuntimeError("the client is not started: use 'async with Client(...)' or 'await start()'")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        self.nc  # noqa: B018 - raises when not started
        assert self._js is not None
        return self._js

    @property
    def _replies(self) -> ReplyInbox:
        self.nc  # noqa: B018 - raises when not started
        assert self._inbox is not None
        if self._inbox_refused is not None:
            raise self._inbox_refused
        return self._inbox

    # ------------------------------------------------------------------ calls

    async def invoke(self, function: str, payload: Any = None, *, timeout: float = 30.0,
                     call_id: str | None = None, headers: Mapping[str, str] | None = None,
                     priority: int | None = None, ttl: float | None = None,
                     on_progress: Callable[[Progress], object] | None = None) -> Any:
        """Run ``function`` with ``payload`` and return its decoded result.

        Raises the typed error of a failed call (``FunctionError`` after the last attempt,
        ``InvalidInput``, ``UnknownFunction``, ``Rejected``, ``InvocationTimeout``, ``Unavailable``);
        each carries ``type``, ``message``, ``code`` and ``call_id``. Reusing a ``call_id`` within
        the duplicate window runs the function once and returns that outcome. ``priority`` (1 to
        10, most urgent last) queues it at that level; by default at the function's own level.
        ``ttl`` (seconds, instead of the manifest's) bounds how long it may wait in the queue: a call
        still queued then is not run and fails with ``Expired``. ``QueueFull`` means the function's
        queue is at its limit and the call was not stored. ``on_progress`` is called with each
        :class:`Progress` update the function sends (``ctx.progress``) while it runs.
        """
        response = await self.invoke_response(function, payload, timeout=timeout, call_id=call_id, headers=headers,
                                              priority=priority, ttl=ttl, on_progress=on_progress)
        return response.value()

    async def invoke_response(self, function: str, payload: Any = None, *, timeout: float = 30.0,
                              call_id: str | None = None, headers: Mapping[str, str] | None = None,
                              priority: int | None = None, ttl: float | None = None,
                              on_progress: Callable[[Progress], object] | None = None) -> Response:
        """Like :meth:`invoke`, but the outcome as it travels (body and headers, undecoded): a call
        that ran and failed is returned (``Response.error``), not raised; what kept it from running
        (unknown function, full queue, no outcome in time) is raised as by :meth:`invoke`."""
        nc = self.nc
        loop = asyncio.get_running_loop()
        subject = invoke_subject(function, priority)
        deadline = loop.time() + timeout
        inbox = self._replies
        watched = call_id is None and self._watching
        reply_subject, reply = inbox.expect(deadline, also=watched)
        progress_subject = None
        try:
            if watched:   # its outcome comes on the result subject of the reply's token (see start)
                call_id = self._watch_base + inbox.token(reply_subject)
            call_id, body, hdrs = await self._prepare(function, payload, call_id, headers)
            if ttl is not None:
                hdrs[H.TTL] = ttl_header(ttl)
            hdrs[H.REPLY_TO] = reply_subject
            if watched:
                hdrs[H.WATCHES_OUTCOME] = "1"
                self._watched[call_id] = reply
            self._waiting[call_id] = reply
            if on_progress is not None:
                progress_subject = inbox.listen(deadline, _progress_reader(call_id, on_progress))
                hdrs[H.PROGRESS_TO] = progress_subject
            duplicate = await self._store(nc, subject, function, body, hdrs, call_id, deadline)
            if duplicate:
                log.warning("call id %r was already used within the duplicate window: %s ran once, for the "
                            "first call; this is that call's outcome, whatever this call's payload",
                            call_id, function)
                # The first caller's inbox gets the reply; this one reads the stored outcome.
                response = await self.outcome(call_id, wait=deadline - loop.time())
            else:
                msg = await reply
                if msg is None and watched and self._watch_refused and loop.time() < deadline:
                    # Refused after the call went out: its outcome is only stored, read it there.
                    response = await self._read_when_stored(call_id, deadline)
                elif msg is None:
                    response = None
                elif msg.subject[0] == "$":   # the write of the outcome, less its write-once condition
                    hdrs = dict(msg.headers or {})
                    hdrs.pop(H.EXPECTED_LAST_SUBJECT_SEQ, None)
                    response = Response(call_id, msg.data, hdrs)
                else:
                    response = Response(call_id, msg.data, msg.headers or {})
        finally:
            inbox.forget(reply_subject)
            self._unwait(call_id, reply)
            if progress_subject is not None:
                inbox.forget(progress_subject)
        if response is None:
            raise InvocationTimeout(f"no outcome from {function} within {timeout:g}s; it may still run: "
                                    f"read it later with result({call_id!r})", call_id=call_id)
        return response

    async def stream(self, function: str, payload: Any = None, *, timeout: float = 30.0,
                     call_id: str | None = None, **options: Any) -> AsyncIterator[Progress | Final]:
        """Run ``function`` like :meth:`invoke`, yielding its :class:`Progress` updates as they come,
        then one :class:`Final` with the result. A failed call raises its typed error at the end.

        ``async for event in fn.stream("report", {...}): ...``
        """
        call_id = call_id or self._new_id()
        updates: asyncio.Queue[Progress] = asyncio.Queue()
        call = asyncio.ensure_future(self.invoke(function, payload, timeout=timeout, call_id=call_id,
                                                 on_progress=updates.put_nowait, **options))
        try:
            while not call.done():
                update = asyncio.ensure_future(updates.get())
                await asyncio.wait((update, call), return_when=asyncio.FIRST_COMPLETED)
                if update.done():
                    yield update.result()
                else:
                    update.cancel()
            while not updates.empty():
                yield updates.get_nowait()
            yield Final(call_id, call.result())
        finally:
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)

    async def submit(self, function: str, payload: Any = None, *, call_id: str | None = None,
                     headers: Mapping[str, str] | None = None, priority: int | None = None,
                     delay: float | None = None, at: datetime | None = None,
                     ttl: float | None = None) -> Call:
        """Store an invocation of ``function`` and return at once; the outcome is kept by call id.

        ``delay`` (seconds) or ``at`` (a datetime; naive is local time) makes it a delayed call: the
        server queues it then, to the second and never early, whether or not a runtime is running
        meanwhile; :meth:`cancel` removes it before that.
        """
        nc = self.nc
        loop = asyncio.get_running_loop()
        subject = invoke_subject(function, priority)
        due = None if delay is None and at is None else due_time(delay=delay, at=at)
        call_id, body, hdrs = await self._prepare(function, payload, call_id, headers)
        if due is not None:
            hdrs.update(schedule_headers(function, call_id, due, priority))
            subject = delayed_subject(function, call_id)
        if ttl is not None:
            hdrs[H.TTL] = ttl_header(ttl)
        duplicate = await self._store(nc, subject, function, body, hdrs, call_id, loop.time() + self.ack_timeout)
        if duplicate:
            log.warning("call id %r was already used within the duplicate window: this call was not stored; "
                        "%s runs once, for the first call", call_id, function)
        return Call(call_id, function, duplicate, due)

    async def cancel(self, call_id: str) -> Pending:
        """Cancel ``call_id``'s delayed call before it is due: it never runs, and its outcome reads
        ``Cancelled`` (``result`` raises it; a caller waiting on its reply subject gets it).

        Raises ``NotPending`` if no delayed call of that id is waiting: unknown, or queued already.
        """
        return await cancel_delayed(self.nc, self.js, call_id)

    async def _prepare(self, function: str, payload: Any, call_id: str | None,
                       headers: Mapping[str, str] | None) -> tuple[str, bytes, dict[str, str]]:
        """The call id, body and headers of a new call; unknown functions fail here, before sending."""
        call_id = call_id or self._new_id()
        body, hdrs = self._encode(payload, headers)
        if self._known.get(function, 0.0) <= asyncio.get_running_loop().time():
            await self._check_known(function, call_id)
        return call_id, body, hdrs

    async def result(self, call_id: str, *, wait: float = 0.0) -> Any:
        """The decoded result of ``call_id``, waiting up to ``wait`` seconds for it.

        Raises the call's typed error if it failed, ``NoResult`` if no outcome is stored (yet); when
        a replay cleared the outcome and the replayed run has none yet, ``NoResult.replayed_at`` and
        ``NoResult.replayed_from`` say when, and from which dead letter.
        """
        waited = await self.outcome(call_id, wait=wait) if wait > 0 else None
        # Read (again, after a wait): a replay may be the reason there is no outcome.
        state: Response | Replayed | None = waited
        if state is None:
            state = await self._guard(fetch_state(self.js, call_id), result_subject(call_id))
        if isinstance(state, Response):
            return state.value()
        within = f" within {wait:g}s" if wait > 0 else " (yet)"
        if isinstance(state, Replayed):
            raise NoResult(f"call {call_id!r} is pending: {state.describe()}; no outcome stored{within}",
                           replayed_at=state.at, replayed_from=state.dead_letter or None)
        raise NoResult(f"no outcome stored for call id {call_id!r}{within}")

    async def outcome(self, call_id: str, *, wait: float = 0.0) -> Response | None:
        """The stored outcome of ``call_id`` as it travels on the wire, or None."""
        if wait <= 0:
            return await self._guard(fetch_response(self.js, call_id), result_subject(call_id))
        arrived: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_msg(msg: Msg) -> None:
            arrived.put_nowait(msg)

        # Subscribe before reading, so an outcome stored in between is not missed.
        sub = await self.nc.subscribe(result_subject(call_id), cb=on_msg)
        try:
            async with asyncio.timeout(wait):
                stored = await self._guard(fetch_response(self.js, call_id), result_subject(call_id))
                while stored is None:
                    msg = await arrived.get()
                    if not is_tombstone(msg.headers):
                        stored = Response.stored(call_id, msg.data, msg.headers)
                return stored
        except TimeoutError:
            return None
        finally:
            if not self.nc.is_closed:
                await sub.unsubscribe()

    def _unwait(self, call_id: str | None, waiter: Waiter) -> None:
        for waiting in (self._waiting, self._watched):
            if call_id is not None and waiting.get(call_id) is waiter:
                del waiting[call_id]

    def renew(self) -> None:
        """Back on the server after the link broke: an outcome stored meanwhile reached this client
        neither as its write nor as a reply. Read the outcome of every call still waiting."""
        waiting = [(call_id, waiter) for call_id, waiter in self._waiting.items() if not waiter.done()]
        if waiting and self._nc is not None and not self._nc.is_closed:
            spawn(self._tasks, self._read_again(waiting))

    async def _read_again(self, waiting: list[tuple[str, Waiter]]) -> None:
        nc = self.nc
        at_once = asyncio.Semaphore(READ_AGAIN_AT_ONCE)

        async def read(call_id: str, waiter: Waiter) -> None:
            async with at_once:
                if waiter.done():
                    return
                try:
                    stored = await fetch_response(self.js, call_id)
                except Exception as exc:   # still waits for the write or the reply, up to its timeout
                    log.debug("could not read the outcome of %s after a reconnect: %s", call_id, exc)
                    return
                if stored is not None and not waiter.done():
                    # As the write of the outcome would have come (see invoke_response).
                    waiter.set_result(Msg(nc, subject=result_subject(call_id), data=stored.body,
                                          headers=stored.headers))
        await asyncio.gather(*(read(call_id, waiter) for call_id, waiter in waiting))

    # ------------------------------------------------------------------ internals

    async def _read_when_stored(self, call_id: str, deadline: float) -> Response | None:
        """The outcome of ``call_id`` once stored, read again and again until ``deadline`` (for a
        client that may not subscribe to it); None if it is not stored by then."""
        loop = asyncio.get_running_loop()
        pause = 0.05
        while True:
            stored = await self._guard(fetch_response(self.js, call_id), result_subject(call_id))
            if stored is not None or loop.time() + pause >= deadline:
                return stored
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _may_watch(self) -> bool:
        """Whether this client's user is likely allowed to subscribe to its outcomes: any user on
        the default inbox prefix, and a user with reply and id prefixes of its own, which its role
        grants (``runtime roles``). A refusal is coped with all the same (see _on_watch_denied)."""
        assert self._nc is not None
        default_inbox = self._nc.new_inbox().count(".") == 1
        return default_inbox or "." in self._watch_base[:-1]   # an id prefix ends with a dot

    def _new_id(self) -> str:
        return self._id_base + str(next(self._ids))

    def _on_denied(self, denied: PermissionDenied) -> None:
        """Fail at once whatever waits on a publish or subscription the server refused."""
        inbox_denied = denied.action == "subscribe" and self._nc is not None and denied.subject.lower().startswith(
            self._nc.new_inbox().rsplit(".", 1)[0].lower() + ".")
        if inbox_denied:
            denied = PermissionDenied(f"{denied.message} (this client's replies come there: give it an inbox "
                                      "prefix its user may subscribe to, inbox_prefix= or --inbox-prefix)",
                                      subject=denied.subject, action=denied.action)
            self._inbox_refused = denied
        for waiter, subjects in list(self._guarded.items()):
            if waiter.done():
                continue
            # nats-py reports the subject in lower case: say it as this client wrote it.
            ours = next((s for s in subjects if denied.subject.lower().endswith(s.lower())), None)
            if inbox_denied or ours is not None:
                if ours is not None and denied.subject.lower() == ours.lower():
                    denied = PermissionDenied(f"permission denied: {denied.action} to {ours}", subject=ours,
                                              action=denied.action)
                waiter.set_exception(denied)
                waiter.exception()   # retrieved: the caller may have been cancelled meanwhile

    def _on_watch_denied(self, denied: PermissionDenied) -> None:
        """This client's user may not read its outcomes as they are stored: answers come to the
        inbox from now on, and the calls already out read theirs from the store (see invoke_response)."""
        self._watch_refused = True
        self._watching = False
        for waiter in self._watched.values():
            if not waiter.done():
                waiter.set_result(None)

    async def _guard(self, request: Awaitable[T], *subjects: str) -> T:
        """Await ``request``, failing with ``PermissionDenied`` as soon as the server refuses a
        publish to a subject ending in one of ``subjects`` (nats-py would wait for its timeout)."""
        denied: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(request)
        self._guarded[denied] = subjects
        try:
            await asyncio.wait((task, denied), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._guarded.pop(denied, None)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise denied.exception() or PermissionDenied("permission denied")
        denied.cancel()
        return task.result()

    def _encode(self, payload: Any, headers: Mapping[str, str] | None) -> tuple[bytes, dict[str, str]]:
        hdrs = dict(headers) if headers else {}
        if isinstance(payload, bytes | bytearray | memoryview):
            return bytes(payload), hdrs
        try:
            body = codec.encode(payload, self.encoding)
        except Exception as exc:
            raise InvalidInput(f"cannot encode the payload: {exc}", type=type(exc).__name__) from None
        if self.encoding == "msgpack":
            hdrs[H.CONTENT_TYPE] = codec.MSGPACK
        return body, hdrs

    async def _store(self, nc: NATS, subject: str, function: str, body: bytes, hdrs: dict[str, str],
                     call_id: str, deadline: float) -> bool:
        """Publish the invocation through JetStream; True if its call id was already stored."""
        hdrs[H.MSG_ID] = call_id
        # The acknowledgement is bounded on its own: a missing one means the invocation may not
        # be stored, which is not the same as a slow function.
        ack_deadline = min(deadline, asyncio.get_running_loop().time() + self.ack_timeout)
        inbox = self._replies
        ack_subject, ack = inbox.expect(ack_deadline)
        self._guarded[ack] = (subject,)
        try:
            # It comes to this client's inbox like the reply: no request machinery per call.
            # Straight into the connection's buffer (names and inboxes are checked; a header
            # a caller passed that needs cleaning up, or a reconnect, goes through nc.publish).
            assert self._pub is not None   # set with the connection, in start()
            await self._pub.publish(subject, body, reply=ack_subject, headers=hdrs, at_once=True)
            msg = await ack
        except MaxPayloadError:
            raise PayloadTooLarge(f"the invocation of {function} does not fit in one message: "
                                  f"{len(body):,} bytes of payload, and the server takes at most "
                                  f"{nc.max_payload:,} bytes with headers (its max_payload)", call_id=call_id) from None
        except BadHeaderError as exc:
            raise InvalidInput(f"invalid header for {function}: {str(exc).removeprefix('nats: ')}",
                               call_id=call_id) from None
        except PermissionDenied as exc:
            raise PermissionDenied(exc.message, subject=exc.subject, action=exc.action, call_id=call_id) from None
        finally:
            inbox.forget(ack_subject)
            self._guarded.pop(ack, None)
        if msg is None:
            if ack_deadline < deadline:
                raise Unavailable(f"JetStream did not acknowledge the invocation of {function} within "
                                  f"{self.ack_timeout:g}s (call id {call_id!r} may or may not be stored)",
                                  call_id=call_id)
            raise InvocationTimeout(f"the invocation of {function} was not acknowledged in time "
                                    f"(call id {call_id!r} may or may not be stored)", call_id=call_id)
        return read_ack(msg, function, call_id)

    async def _check_known(self, function: str, call_id: str) -> None:
        if not _NAME.match(function):
            raise UnknownFunction(f"{function!r} is not a function name", call_id=call_id)
        if not await self._deployed(function):
            raise UnknownFunction(f"no function named {function!r} is deployed", call_id=call_id)
        self._known[function] = asyncio.get_running_loop().time() + KNOWN_TTL

    async def _deployed(self, function: str) -> bool:
        js = self.js
        key = f"$KV.{MANIFESTS_BUCKET}.{function}"
        try:
            entry = await self._guard(js.get_msg(f"KV_{MANIFESTS_BUCKET}", subject=key, direct=True), key)
            return not is_tombstone(entry.headers)
        except PermissionDenied:
            # A caller need not be allowed to read the registry: the invocation's own publish is
            # then what the server allows or refuses (by that subject, which says more).
            return True
        except (NotFoundError, NoRespondersError):
            pass
        # Deployed without the registry: its durable consumer is what makes it run.
        try:
            await self._guard(js.consumer_info(INVOKE_STREAM, function), f".{INVOKE_STREAM}.{function}")
        except NotFoundError:
            return False
        except NoRespondersError:
            raise Unavailable("JetStream is not available on this server") from None
        return True


def check_id_prefix(prefix: str) -> str:
    """``prefix`` if call ids may start with it (tokens of letters, digits, ``_`` and ``-``, such as
    ``alice.``); raises ``ValueError`` otherwise."""
    if prefix and not _ID_PREFIX.match(prefix):
        raise ValueError(f"the call id prefix {prefix!r} must be letters, digits, '_' or '-', "
                         "in parts that end with '.' (such as 'alice.')")
    return prefix


def read_ack(ack: Msg, function: str, call_id: str) -> bool:
    """Read a JetStream publish acknowledgement: True for a duplicate, raises if not stored
    (``QueueFull`` when the function's queue is at its limit, ``Unavailable`` otherwise)."""
    data = ack.data
    if not data:
        status = (ack.headers or {}).get("Status", "")
        raise Unavailable(f"the invocation of {function} could not be stored: no stream takes "
                          f"{INVOKE_PREFIX}{function} (status {status or 'unknown'}; has a runtime "
                          f"provisioned this server?)", call_id=call_id)
    if b'"error"' not in data and b'"duplicate"' not in data:
        return False  # the common case, without parsing
    parsed = json.loads(data)
    error = parsed.get("error")
    if error and refused_for_full_queue(error):
        raise QueueFull(f"the queue of {function} is full: the server holds as many of its invocations "
                        f"as its limit allows (max_queued); nothing was stored, try again later", call_id=call_id)
    if error and "header size exceeds" in str(error.get("description", "")):
        raise InvalidInput(f"the invocation of {function} was refused: {error['description']}", call_id=call_id)
    if error:
        raise Unavailable(f"the invocation of {function} could not be stored: "
                          f"{error.get('description', error)}", call_id=call_id)
    return bool(parsed.get("duplicate"))
