"""Final outcomes as responses: published to the caller's inbox and kept in ``fn_results``."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from . import codec
from . import headers as H
from .errors import InvocationError, describe, error_from_wire
from .protocol import KV_DELETE, KV_OPERATION, is_tombstone, kv_stream, kv_subject
from .streams import RESULTS_BUCKET
from .wire import call_id_for, clip

if TYPE_CHECKING:
    from .manifest import FunctionManifest

# Dots are kept (a key of several tokens): ids under a per-caller prefix such as ``alice.`` are
# stored under ``$KV.fn_results.alice.>``, which NATS permissions can grant to that caller alone.
_KEY_OK = re.compile(r"^[-_=A-Za-z0-9]+(\.[-_=A-Za-z0-9]+)*$")
# Every answer carries these and nothing else: the last two on failure only.
REPLY_HEADERS = frozenset({H.CALL_ID, H.CONTENT_TYPE, H.SERVICE_ERROR, H.SERVICE_ERROR_CODE})


class Call(Protocol):
    """What the store decision reads of a call (an ``Invocation``, or a message read back from ``FN``)."""

    @property
    def headers(self) -> Mapping[str, str] | None: ...


def caller_holds_id(call: Call) -> bool:
    """Whether someone can ask for ``call``'s outcome: it carries its caller's call id
    (``Fn-Call-Id``, ``Nats-Msg-Id``: every ``Client`` call, the gateways, delayed calls, replays,
    cron ticks) or a reply subject (whose caller reads the stored outcome of a duplicate)."""
    headers = call.headers
    if getattr(call, "event", False):
        # An event's call id is made by the runtime per function (``ev-...``): an id the event
        # carries names what caused it (a pipeline's emitting call, a publisher's dedupe id).
        return bool(headers and headers.get(H.REPLY_TO))
    return bool(headers and (headers.get(H.CALL_ID) or headers.get(H.MSG_ID) or headers.get(H.REPLY_TO)))


def watches_outcome(headers: Mapping[str, str] | None) -> bool:
    """Whether a call's caller reads its stored outcome as it is written (``Fn-Watches-Outcome: 1``):
    the write of a stored outcome is then its answer. Any other value means no."""
    return headers is not None and headers.get(H.WATCHES_OUTCOME) == "1"


def should_store(manifest: FunctionManifest | None, call: Call) -> bool:
    """Whether ``call``'s outcome is kept in ``fn_results`` (``manifest``: the function's, if known).

    ``auto`` (the default) keeps the outcome of every call someone can ask for
    (:func:`caller_holds_id`). A bare ``nats pub`` carries no id: its ``fn-<seq>`` is made up by
    the runtime, nobody holds it, and not writing its outcome halves the JetStream writes of a
    fire-and-forget call. ``always`` keeps every outcome, ``never`` none (``True``/``False``, as
    ``model_copy`` may leave them, mean the same).
    """
    mode: object = "auto" if manifest is None else manifest.store_results
    if mode == "auto":
        return caller_holds_id(call)
    return mode is True or mode == "always"


def result_key(call_id: str) -> str:
    """The KV key of a call id; ids that are not valid keys are base64url-encoded.

    An id the runtime would not use as it is (see ``wire.call_id_for``) maps to the digest the
    runtime stores its outcome under.
    """
    usable = call_id_for(call_id) or call_id
    if _KEY_OK.match(usable) and not usable.startswith("b64_"):
        return usable
    return "b64_" + base64.urlsafe_b64encode(usable.encode()).decode().rstrip("=")


def result_subject(call_id: str) -> str:
    """The subject ``call_id``'s outcome is stored on in ``fn_results``."""
    return kv_subject(RESULTS_BUCKET, result_key(call_id))


@dataclass(frozen=True, slots=True)
class Response:
    """A final outcome as it travels: body plus headers (the micro error headers on failure)."""

    call_id: str
    body: bytes
    headers: dict[str, str]

    @classmethod
    def success(cls, call_id: str, body: bytes, content_type: str) -> Response:
        return cls(call_id, body, {H.CALL_ID: call_id, H.CONTENT_TYPE: content_type})

    @classmethod
    def stored(cls, call_id: str, body: bytes, headers: Mapping[str, str] | None) -> Response:
        """A response read back from ``fn_results``, with only the headers of the wire contract.

        The stored message also carries what JetStream adds when it is read (``Nats-Stream``,
        ``Nats-Sequence``...) and the write-once condition; none of it is the caller's business.
        """
        hdrs = {name: value for name, value in (headers or {}).items() if name in REPLY_HEADERS}
        # Outcomes stored before every success named its content type are JSON.
        hdrs.setdefault(H.CONTENT_TYPE, codec.JSON)
        hdrs[H.CALL_ID] = hdrs.get(H.CALL_ID) or call_id
        return cls(call_id, body, hdrs)

    @classmethod
    def failure(cls, call_id: str, error: InvocationError) -> Response:
        # The header stands alone (what `nats req` shows), so it names the type; the body keeps
        # type and message apart. Header values cannot hold line breaks.
        message = clip(describe(error), 1024)
        hdrs = {H.CALL_ID: call_id, H.CONTENT_TYPE: codec.JSON, H.SERVICE_ERROR: message,
                H.SERVICE_ERROR_CODE: str(error.code)}
        return cls(call_id, codec.encode(error.to_wire()), hdrs)

    @property
    def error(self) -> InvocationError | None:
        code = self.headers.get(H.SERVICE_ERROR_CODE)
        if not code:
            return None
        message = self.headers.get(H.SERVICE_ERROR, "")
        type_ = None
        try:
            detail = codec.decode(self.body, codec.JSON).get("error", {})
            message = detail.get("message", message)
            type_ = detail.get("type")
        except AttributeError:
            pass
        return error_from_wire(int(code), type_, message, self.call_id)

    def value(self) -> object:
        """The decoded result; raises the typed error for a failure."""
        err = self.error
        if err is not None:
            raise err
        return codec.decode(self.body, self.headers.get(H.CONTENT_TYPE))


@dataclass(frozen=True, slots=True)
class Replayed:
    """A call whose outcome a replay cleared: pending until the replayed run stores its own.

    Read from the delete marker the replay leaves in ``fn_results``: to the store (and to any
    KV client) the key is simply deleted, so the replay's outcome is written like a first one.
    """

    at: str             # RFC 3339 UTC
    dead_letter: int    # the sequence of the replayed dead letter (0 if the marker does not say)

    @classmethod
    def from_marker(cls, headers: Mapping[str, str] | None) -> Replayed | None:
        """The replay a KV message records, if it is a replay's delete marker."""
        hdrs = headers or {}
        at = hdrs.get(H.REPLAYED_AT)
        if not at or not is_tombstone(hdrs):
            return None
        try:
            dead_letter = int(hdrs.get(H.REPLAYED_FROM) or 0)
        except ValueError:
            dead_letter = 0
        return cls(at, dead_letter)

    def describe(self) -> str:
        source = f" from dead letter {self.dead_letter}" if self.dead_letter else ""
        return f"replayed{source} at {self.at}"


async def clear_for_replay(js: JetStreamContext, call_id: str, dead_letter: int) -> Replayed:
    """Delete ``call_id``'s stored outcome, leaving a marker that says the call was replayed.

    nats-py's ``KeyValue.delete`` takes no headers, so the delete marker is published here as
    the bucket's own would be (``KV-Operation: DEL`` on the key's subject), with two more.
    """
    replayed = Replayed(datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                        dead_letter)
    await js.publish(result_subject(call_id), b"", headers={
        KV_OPERATION: KV_DELETE, H.REPLAYED_AT: replayed.at, H.REPLAYED_FROM: str(dead_letter)})
    return replayed


async def fetch_state(js: JetStreamContext, call_id: str) -> Response | Replayed | None:
    """The stored outcome of ``call_id``; else ``Replayed`` if a replay cleared it; else None."""
    try:
        raw = await js.get_msg(kv_stream(RESULTS_BUCKET), subject=result_subject(call_id), direct=True)
    except NotFoundError:
        return None
    hdrs = dict(raw.headers or {})
    if is_tombstone(hdrs):
        return Replayed.from_marker(hdrs)
    return Response.stored(call_id, raw.data or b"", hdrs)


async def fetch_response(js: JetStreamContext, call_id: str) -> Response | None:
    """The stored outcome of ``call_id``, or None if there is none (yet)."""
    state = await fetch_state(js, call_id)
    return state if isinstance(state, Response) else None
