"""Final outcomes as responses: published to the caller's inbox and kept in ``fn_results``."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from . import codec
from . import headers as H
from .errors import InvocationError, describe, error_from_wire
from .protocol import is_tombstone, kv_stream, kv_subject
from .streams import RESULTS_BUCKET
from .wire import call_id_for, clip

_KEY_OK = re.compile(r"^[-_=A-Za-z0-9]+$")
# Every answer carries these and nothing else: the last two on failure only.
REPLY_HEADERS = frozenset({H.CALL_ID, H.CONTENT_TYPE, H.SERVICE_ERROR, H.SERVICE_ERROR_CODE})


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


async def fetch_response(js: JetStreamContext, call_id: str) -> Response | None:
    """The stored outcome of ``call_id``, or None if there is none (yet)."""
    try:
        raw = await js.get_msg(kv_stream(RESULTS_BUCKET), subject=result_subject(call_id), direct=True)
    except NotFoundError:
        return None
    hdrs = dict(raw.headers or {})
    if is_tombstone(hdrs):
        return None
    return Response.stored(call_id, raw.data or b"", hdrs)
