"""Testing functions: one attempt in-process with :func:`call`, or the real thing with :func:`serve`.

``call`` runs one invocation the way a runtime does (the same decoder, ``ctx``, timeout and
outcome policy) without a server: what the handler publishes through ``ctx`` is recorded, not
sent, and the result is the policy's decision (ack, retry after N seconds, or dead letter)
rather than a retry that would have to be waited for. ``serve`` starts a nats-server and a
runtime in this process for a test that needs the whole path.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from nats.aio.msg import Msg
from nats.js.api import PubAck
from pydantic import ValidationError

from . import codec
from . import headers as H
from .app import Runtime
from .client import Client
from .errors import ConfigError, InvalidInput, InvocationError, ManifestError, format_problems, validation_problems
from .executor import attempt as run_attempt
from .invocation import Invocation
from .loader import Handler, inspect_handler, load_handler_async
from .manifest import HANDLER_PATTERN, MAX_NAME, FunctionManifest, load_manifest
from .policy import Ack, AttemptEnd, DeadLetter, Decision, RetryAfter, decide
from .server import EmbeddedServer, free_port
from .settings import Settings
from .streams import INVOKE_PREFIX, INVOKE_STREAM
from .wire import ReplyPolicy, WireLimits

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext

__all__ = ["DeadLetter", "Message", "Outcome", "RecordingConnection", "ServedClient", "acall", "call", "serve"]

DEFAULT_MAX_PAYLOAD = 1024 * 1024   # nats-server's default max_payload
SERVE_GRACE = 2.0                   # serve(): in-flight work gets this long when the test ends
PROGRESS_SUBJECT = "_INBOX.testing.progress"   # call(): where ctx.progress updates are recorded

Target = str | Path | FunctionManifest | Callable[..., Any]


# ------------------------------------------------------------------ what a handler sent


@dataclass(frozen=True, slots=True)
class Message:
    """A message a handler published through ``ctx`` (recorded by :func:`call`, never sent)."""

    subject: str
    data: bytes
    headers: dict[str, str] | None = None

    @property
    def value(self) -> Any:
        """The body decoded the way a subscriber would (JSON, msgpack by Content-Type, else bytes)."""
        return codec.decode(self.data, (self.headers or {}).get(H.CONTENT_TYPE))


class RecordingJetStream:
    """Stands in for ``ctx.js``: publishes are recorded and acknowledged, with the duplicate window's answer."""

    def __init__(self) -> None:
        self.published: list[Message] = []
        self._seqs: dict[str, int] = {}

    async def publish(self, subject: str, payload: bytes = b"", timeout: float | None = None,
                      stream: str | None = None, headers: dict[str, str] | None = None) -> PubAck:
        msg_id = (headers or {}).get(H.MSG_ID)
        if msg_id and msg_id in self._seqs:
            return PubAck(stream=_stream_of(subject), seq=self._seqs[msg_id], duplicate=True)
        self.published.append(Message(subject, bytes(payload), dict(headers) if headers else None))
        seq = len(self.published)
        if msg_id:
            self._seqs[msg_id] = seq
        return PubAck(stream=_stream_of(subject), seq=seq)


def _stream_of(subject: str) -> str:
    return INVOKE_STREAM if subject.startswith(INVOKE_PREFIX) else ""


class RecordingConnection:
    """Stands in for ``ctx.nc``: ``publish`` is recorded, not sent; ``flush`` returns at once.

    Only what :class:`~runtime.context.Context` and handlers use to send is here; anything else
    (``request``, ``subscribe``) needs a server: test such a function with :func:`serve`.
    """

    is_connected = True
    is_closed = False

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.published: list[Message] = []
        self.js = RecordingJetStream()

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        self.published.append(Message(subject, bytes(payload), dict(headers) if headers else None))

    async def flush(self, timeout: float = 10.0) -> None:
        return None

    def jetstream(self, **options: Any) -> RecordingJetStream:
        return self.js

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"ctx.nc.{name} is not available in runtime.testing.call, which only records "
                             f"what a handler publishes; test this function with runtime.testing.serve")


# ------------------------------------------------------------------ one attempt, in-process


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended, as the runtime would carry it out.

    Exactly one of ``result`` (acked), ``retry_in`` (seconds until the next attempt) and
    ``dead_letter`` (``reason`` and ``error``) describes it; ``decision`` is the policy's own
    answer. ``published`` and ``invoked`` hold what the handler sent through ``ctx.nc`` and
    ``ctx.js`` (``ctx.publish`` and ``ctx.invoke``), in order.
    """

    decision: Decision
    call_id: str
    attempt: int
    body: bytes = b""
    content_type: str = codec.JSON
    published: tuple[Message, ...] = ()
    invoked: tuple[Message, ...] = ()
    progress: tuple[Any, ...] = ()   # what the handler sent with ctx.progress, decoded, in order

    @property
    def acked(self) -> bool:
        return isinstance(self.decision, Ack)

    @property
    def result(self) -> Any:
        """The result as a caller receives it (decoded from the wire), or None unless acked."""
        return codec.decode(self.body, self.content_type) if self.acked else None

    @property
    def retry_in(self) -> float | None:
        return self.decision.delay if isinstance(self.decision, RetryAfter) else None

    @property
    def dead_letter(self) -> DeadLetter | None:
        return self.decision if isinstance(self.decision, DeadLetter) else None

    @property
    def error(self) -> InvocationError | None:
        """The attempt's error (retried or final), None when acked."""
        return None if isinstance(self.decision, Ack) else self.decision.error


def call(target: Target, payload: Any = None, *, attempt: int = 1, headers: Mapping[str, str] | None = None,
         call_id: str | None = None, root: str | Path | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD,
         **manifest_fields: Any) -> Outcome:
    """Run one attempt of a function in-process and return how it ended; see :func:`acall`.

    Usable from plain and async tests alike: inside a running event loop the attempt runs on
    its own loop in a helper thread (use ``await acall(...)`` to stay on the caller's loop).
    """
    coro = acall(target, payload, attempt=attempt, headers=headers, call_id=call_id, root=root,
                 max_payload=max_payload, **manifest_fields)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime-testing-call") as helper:
        return helper.submit(asyncio.run, coro).result()


async def acall(target: Target, payload: Any = None, *, attempt: int = 1, headers: Mapping[str, str] | None = None,
                call_id: str | None = None, root: str | Path | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD,
                **manifest_fields: Any) -> Outcome:
    """Run attempt number ``attempt`` of a function in-process and return how it ended.

    ``target`` is a manifest file (``"manifests/hello.yaml"``), a :class:`FunctionManifest`,
    a handler spec (``"functions.hello:main"``) or the handler itself; ``manifest_fields``
    replace fields of its manifest (``timeout="200ms"``, ``retry={"max_deliver": 1}``).
    ``payload`` is encoded like :class:`~runtime.Client` does (``bytes`` go as they are, msgpack
    when ``headers`` say ``Content-Type: application/msgpack``). ``root`` is the project root
    handlers are imported from (default: the working directory); ``max_payload`` the server's.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    root_dir = Path(root) if root is not None else Path.cwd()
    manifest, handler = await _function(target, root_dir, manifest_fields)
    conn = RecordingConnection(max_payload)
    inv = _invocation(manifest, payload, headers, call_id, attempt, conn)
    outcome, body = await _attempt(inv, manifest, handler, conn)
    decision = decide(outcome, attempt, manifest)
    if not isinstance(decision, Ack):
        decision.error.call_id = inv.call_id
    published = [m for m in conn.published if m.subject != PROGRESS_SUBJECT]
    progress = tuple(m.value for m in conn.published if m.subject == PROGRESS_SUBJECT)
    return Outcome(decision, inv.call_id, attempt, body, codec.CONTENT_TYPES[manifest.encoding],
                   tuple(published), tuple(conn.js.published), progress)


async def _attempt(inv: Invocation, manifest: FunctionManifest, handler: Handler,
                   conn: RecordingConnection) -> tuple[AttemptEnd, bytes]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    timers: list[asyncio.TimerHandle] = []

    def watch(deadline: float) -> None:
        # What the runtime's watchdog does at the deadline: mark the attempt timed out, cancel it.
        timers.append(loop.call_later(deadline - time.monotonic(), _expire, task, inv))

    # A thread of its own, left behind if the attempt times out: a thread cannot be stopped,
    # and a runtime does not wait for it either.
    threads = None if handler.is_async else ThreadPoolExecutor(1, thread_name_prefix=f"fn-{manifest.name}")
    # The recording stand-ins have the methods Context calls; the types are nats-py's.
    nc, js = cast("NATS", conn), cast("JetStreamContext", conn.js)
    try:
        return await run_attempt(inv, manifest, handler, watch, nc, js, WireLimits(conn.max_payload), threads,
                                 ReplyPolicy())
    finally:
        for timer in timers:
            timer.cancel()
        if threads is not None:
            threads.shutdown(wait=False)


def _expire(task: asyncio.Task[Any], inv: Invocation) -> None:
    if not task.done():
        inv.timed_out = True
        task.cancel()


def _invocation(manifest: FunctionManifest, payload: Any, headers: Mapping[str, str] | None,
                call_id: str | None, attempt: int, conn: RecordingConnection) -> Invocation:
    """The invocation a runtime would be delivered, read from its ack subject like a real one."""
    hdrs = dict(headers or {})
    if call_id is not None:
        hdrs[H.MSG_ID] = call_id
    hdrs.setdefault(H.PROGRESS_TO, PROGRESS_SUBJECT)   # ctx.progress is recorded as a follower would see it
    if isinstance(payload, bytes | bytearray | memoryview):
        body = bytes(payload)
    else:
        try:
            body = codec.encode(payload, "msgpack" if codec.is_msgpack(hdrs.get(H.CONTENT_TYPE)) else "json")
        except Exception as exc:   # as Client refuses it: the invocation is never sent
            raise InvalidInput(f"cannot encode the payload: {exc}", type=type(exc).__name__) from None
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>
    reply = f"$JS.ACK.{INVOKE_STREAM}.{manifest.name}.{attempt}.1.{attempt}.{time.time_ns()}.0"
    msg = Msg(cast("NATS", conn), manifest.subject, reply, body, hdrs or None)
    return Invocation.from_msg(msg, manifest.name)


async def _function(target: Target, root: Path, fields: Mapping[str, Any]) -> tuple[FunctionManifest, Handler]:
    handler: Handler | None = None
    if isinstance(target, FunctionManifest):
        manifest = target
    elif isinstance(target, str) and HANDLER_PATTERN.match(target) and not (root / target).exists():
        manifest = FunctionManifest(name=_name(target.rpartition(":")[2]), handler=target)
    elif isinstance(target, str | Path):
        path = Path(target) if Path(target).is_absolute() else root / target
        loaded = load_manifest(path)
        if not isinstance(loaded, FunctionManifest):
            raise ManifestError(str(path), [("kind", "call() runs a function: this is a Schedule manifest")])
        manifest = loaded
    elif callable(target):
        spec = _spec_of(target)
        manifest = FunctionManifest(name=_name(spec.rpartition(":")[2]), handler=spec)
        handler = inspect_handler(spec, target)
    else:
        raise TypeError(f"cannot call {target!r}: give a manifest file, a FunctionManifest or a handler")
    if fields:
        data = {**manifest.model_dump(), **fields}
        try:
            manifest = FunctionManifest.model_validate(data)
        except ValidationError as exc:
            raise ManifestError(f"manifest of {manifest.name}", validation_problems(exc)) from None
    if handler is None:
        handler = await load_handler_async(manifest.handler, root=root)
    return manifest, handler


def _spec_of(func: Callable[..., Any]) -> str:
    """The ``module:attribute`` a manifest would name ``func`` by (a lambda or a local function has none)."""
    module = getattr(func, "__module__", None) or "handler"
    spec = f"{module}:{getattr(func, '__qualname__', '')}"
    if HANDLER_PATTERN.match(spec):
        return spec
    return f"{module}:{re.sub(r'[^A-Za-z0-9_]', '_', getattr(func, '__name__', type(func).__name__))}"


def _name(text: str) -> str:
    name = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:MAX_NAME]
    return name or "function"


# ------------------------------------------------------------------ the whole path, for real


class ServedClient(Client):
    """The client :func:`serve` yields: ``url`` is the server's, ``runtime`` the runtime serving."""

    def __init__(self, url: str, runtime: Runtime) -> None:
        super().__init__(url)
        self.url = url
        self.runtime = runtime


@contextlib.asynccontextmanager
async def serve(manifests: str | Path | Iterable[str | Path] = "manifests",
                **settings: Any) -> AsyncIterator[ServedClient]:
    """Serve ``manifests`` (files or directories) for the length of a test.

    Starts a nats-server with JetStream on a free loopback port and a temporary store, and a
    runtime in this process with ``settings`` (:class:`~runtime.Settings` fields); yields a
    connected :class:`~runtime.Client`, then stops all of it and removes the store.
    """
    paths = (manifests,) if isinstance(manifests, str | Path) else tuple(manifests)
    with tempfile.TemporaryDirectory(prefix="runtime-serve-") as tmp:
        values: dict[str, Any] = {"data_dir": Path(tmp) / "runtime", "grace": SERVE_GRACE, **settings,
                                  "manifests": tuple(Path(p) for p in paths)}
        try:
            config = Settings.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(f"invalid settings: {format_problems(validation_problems(exc))}") from None
        async with EmbeddedServer(Path(tmp) / "nats", port=free_port()).discarded() as server:
            runtime = Runtime(config, server.url)
            async with runtime:
                client = ServedClient(server.url, runtime)
                async with client:
                    yield client
