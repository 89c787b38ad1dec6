"""Result caching (manifest ``cache: {ttl: 1h}``): a call whose input equals that of an earlier
successful call, within the TTL, is answered with that call's result without running the function.

Entries live in the KV bucket ``fn_cache`` under ``<function>.<sha256 hex of the handler's code
digest, content type and body>``: a deploy of a new version of the handler's module starts
afresh. Each is written with a message TTL (``Nats-TTL``), so the server removes it when it
expires: one bucket serves functions with different TTLs, and nothing needs sweeping. A read
also checks the entry's age (the server's timestamp of the write) against the function's
current TTL, because the server removes expired messages on its own schedule, a little late,
and a deploy may have shortened the TTL since.

The cache only ever saves work: a read or a write that fails is logged and the function runs
(or its result goes uncached), and a call with ``Fn-Cache: bypass`` is not answered from it
(its result, a fresh one, replaces the stored one).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from . import codec
from . import headers as H
from .invocation import Invocation
from .logs import fields
from .manifest import FunctionManifest
from .outbox import Throttle
from .protocol import is_tombstone, kv_stream, kv_subject
from .results import Response
from .streams import CACHE_BUCKET

log = logging.getLogger("runtime.cache")

HIT = "hit"        # Fn-Cache on an answer from the cache
BYPASS = "bypass"  # Fn-Cache on a call: run it whatever the cache holds
_throttle = Throttle()


def cache_key(function: str, content_type: str | None, body: bytes, code: str = "") -> str:
    """The key of an input: the function, then the SHA-256 of the handler's code digest (see
    ``loader.Handler.code``: a new version of the module starts afresh), the content type and bytes."""
    digest = hashlib.sha256(f"{code}\n{content_type or codec.JSON}\n".encode())
    digest.update(body)
    return f"{function}.{digest.hexdigest()}"


def bypassed(inv: Invocation) -> bool:
    """The caller asked for a run whatever the cache holds (``Fn-Cache: bypass``)."""
    return inv.headers.get(H.CACHE, "").strip().lower() == BYPASS


async def answer(js: JetStreamContext, manifest: FunctionManifest, inv: Invocation, code: str = "") -> Response | None:
    """The answer to ``inv`` from the cache (``Fn-Cache: hit``); None if it holds no live entry for
    its input and the handler's ``code``, or the caller bypasses it."""
    assert manifest.cache is not None
    if bypassed(inv):
        return None
    subject = kv_subject(CACHE_BUCKET, cache_key(manifest.name, inv.content_type, inv.msg.data, code))
    try:
        stored = await js.get_msg(kv_stream(CACHE_BUCKET), subject=subject, direct=True)
    except NotFoundError:
        return None
    except Exception as exc:
        if _throttle.allow("read"):
            log.warning("could not read the cache of %s (%s); running the function", manifest.name,
                        exc or type(exc).__name__, extra=fields(inv))
        return None
    hdrs = stored.headers or {}
    if is_tombstone(hdrs) or _age(hdrs) > manifest.cache.ttl:
        return None
    return Response(inv.call_id, stored.data or b"", {
        H.CALL_ID: inv.call_id, H.CONTENT_TYPE: hdrs.get(H.CONTENT_TYPE, codec.JSON), H.CACHE: HIT})


async def keep(js: JetStreamContext, manifest: FunctionManifest, inv: Invocation, result: bytes,
               code: str = "") -> None:
    """Store a successful result of ``inv`` (run by the handler's ``code``) for the function's cache TTL."""
    assert manifest.cache is not None
    subject = kv_subject(CACHE_BUCKET, cache_key(manifest.name, inv.content_type, inv.msg.data, code))
    headers = {H.CONTENT_TYPE: codec.CONTENT_TYPES[manifest.encoding],
               H.MSG_TTL: f"{math.ceil(manifest.cache.ttl)}s"}
    try:
        await js.publish(subject, result, headers=headers)
    except Exception as exc:
        if _throttle.allow("write"):
            log.warning("could not cache a result of %s (%s)", manifest.name, exc or type(exc).__name__,
                        extra=fields(inv))


def _age(headers: dict[str, str]) -> float:
    """Seconds since the server stored the entry (0 if it does not say)."""
    stamp = headers.get(H.TIME_STAMP)
    if not stamp:
        return 0.0
    try:
        return time.time() - datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
