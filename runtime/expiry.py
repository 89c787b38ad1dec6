"""Expiry: an invocation still queued when its TTL has run out is never run.

The TTL is the call's own ``Fn-TTL`` header when it has one, else its manifest's ``ttl`` (none
by default). It counts from when the message was stored in ``FN``: JetStream's timestamp,
delivered with the message (a delayed call is stored when it fires, so its TTL counts from
then). Like RabbitMQ's message TTL, it is checked when the invocation reaches the head of the
queue, that is when a runtime takes it to run it; an expired invocation is then dead-lettered
with reason ``expired`` instead of run, and its caller is answered. Nothing expires unseen,
and nothing is removed from the queue before a runtime looks at it.

Only a first delivery can expire: the TTL bounds the wait before a call starts. Once it has
started, its retries run as for any call (a long backoff does not turn a failure into an
expiry); a call handed back by a runtime that stopped before running it is not checked again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from . import headers as H
from .durations import format_duration, parse_duration
from .errors import InvalidInput
from .invocation import Invocation
from .manifest import FunctionManifest
from .policy import Overdue, Undecodable
from .wire import clip

_SHOWN = 64   # characters of a bad header value quoted in the error


def parse_ttl(text: str) -> float:
    """Seconds of a TTL given as a duration (``30s``, ``250ms``, ``5m``) or a number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = parse_duration(text)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{text!r} is not greater than zero")
    return seconds


def ttl_of(headers: Mapping[str, str], manifest: FunctionManifest) -> float | None:
    """The call's TTL in seconds (None: it never expires); InvalidInput for a bad ``Fn-TTL``."""
    given = headers.get(H.TTL)
    if given is None:
        return manifest.ttl
    try:
        return parse_ttl(given)
    except ValueError:
        raise InvalidInput(f"the {H.TTL} header {clip(given, _SHOWN)!r} is not a TTL: give a duration such as "
                           f"30s, 5m or 250ms, or a number of seconds greater than zero") from None


def check(inv: Invocation, manifest: FunctionManifest, now: float | None = None) -> Overdue | Undecodable | None:
    """Why ``inv`` must not run (past its TTL, or a TTL that cannot be read), or None if it may.

    ``now`` is the wall clock in seconds (default: this host's); it is compared with the
    server's timestamp, so hosts whose clocks disagree expire calls early or late by that much.
    """
    if inv.delivered > 1 or (manifest.ttl is None and H.TTL not in inv.headers):
        return None
    try:
        ttl = ttl_of(inv.headers, manifest)
    except InvalidInput as exc:
        return Undecodable(exc)
    if ttl is None:
        return None
    waited = (time.time() if now is None else now) - inv.msg.metadata.timestamp.timestamp()
    return Overdue(ttl, waited) if waited > ttl else None


def ttl_header(ttl: float) -> str:
    """The ``Fn-TTL`` value for ``ttl`` seconds; ValueError unless it is at least a millisecond."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl < 0.001:
        raise ValueError(f"ttl must be a number of seconds, at least 0.001, not {ttl!r}")
    return format_duration(ttl)
