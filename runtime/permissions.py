"""Permission errors: what the server refused us, said the way we wrote it, to whoever waits on it.

The server reports a refused publish or subscription asynchronously, through nats-py's error
callback and in lower case; :class:`PermissionWatch` hands it to the listeners of the connection
it happened on, which match it to their own subjects.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from .errors import PermissionDenied

_PERMISSION = re.compile(r"permissions violation for (publish|subscription) to \"?([^\"']+)\"?", re.I)


def permission_denied(exc: BaseException) -> PermissionDenied | None:
    """nats-py's report of a permissions violation, as ``PermissionDenied``; None for other errors."""
    if not isinstance(exc, NatsError):
        return None
    match = _PERMISSION.search(str(exc))
    if match is None:
        return None
    action = "publish to" if match.group(1).lower() == "publish" else "subscribe to"
    subject = restore_case(match.group(2))
    return PermissionDenied(f"permission denied: {action} {subject}", subject=subject, action=action.split()[0])


def restore_case(subject: str) -> str:
    """The system subject nats-py reported in lower case, with its upper-case tokens restored.

    nats-py lower-cases the server's error text. The runtime's own names are lower case (function
    names, buckets), so only the NATS prefixes (``$JS.API.…``, ``$KV``, ``_INBOX``) and stream names
    need restoring; an inbox token's case is lost for good.
    """
    tokens = subject.split(".")
    head = tokens[0].upper()
    if head in ("$KV", "$O", "_INBOX"):
        return ".".join([head, *tokens[1:]])
    if head == "$SRV":
        return ".".join([head, tokens[1].upper(), *tokens[2:]]) if len(tokens) > 1 else head
    if head != "$JS":
        return subject
    restored = [head]
    for i, token in enumerate(tokens[1:], start=1):
        stream = _stream_name(token)
        if stream is not None:
            rest = tokens[i + 1:]
            return ".".join([*restored, stream, *([restore_case(".".join(rest))] if rest else [])])
        restored.append(token.upper())
    return ".".join(restored)


def _stream_name(token: str) -> str | None:
    from .streams import OWNED_STREAMS, TRIGGERS_STREAM

    upper = token.upper()
    if upper in OWNED_STREAMS or upper == TRIGGERS_STREAM:
        return upper
    for prefix in ("KV_", "OBJ_"):
        if upper.startswith(prefix):
            return prefix + token[len(prefix):]
    return None


DeniedCallback = Callable[[PermissionDenied], None]


class PermissionWatch:
    """The permission errors of one connection, passed on to whoever waits on what was refused.

    The server reports a refused publish or subscription asynchronously (nats-py's error
    callback), not to the call that made it; listeners match it to their own subjects.
    """

    def __init__(self) -> None:
        self._listeners: list[DeniedCallback] = []
        self._claims: dict[str, DeniedCallback] = {}   # lower-case subject prefix -> who copes with it

    def listen(self, callback: DeniedCallback) -> Callable[[], None]:
        """Call ``callback`` with every ``PermissionDenied``; returns what stops it."""
        self._listeners.append(callback)

        def stop() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)
        return stop

    def claim(self, prefix: str, callback: DeniedCallback) -> Callable[[], None]:
        """Refusals of subjects under ``prefix`` go to ``callback`` alone: its owner copes with them
        (an optional subscription), so they end nothing else. Returns what gives the claim up."""
        key = prefix.lower()
        self._claims[key] = callback

        def release() -> None:
            if self._claims.get(key) is callback:
                del self._claims[key]
        return release

    def notify(self, denied: PermissionDenied) -> None:
        subject = denied.subject.lower()
        for prefix, owner in list(self._claims.items()):
            if subject.startswith(prefix):
                owner(denied)
                return
        for callback in list(self._listeners):
            callback(denied)


_WATCHES: weakref.WeakKeyDictionary[NATS, PermissionWatch] = weakref.WeakKeyDictionary()


def watch_permissions(nc: NATS) -> PermissionWatch:
    """A new watch for ``nc``'s permission errors (made by ``open_connection``)."""
    watch = PermissionWatch()
    _WATCHES[nc] = watch
    return watch


def permission_watch(nc: NATS) -> PermissionWatch | None:
    """The watch of a connection made by :func:`open_connection`; None for any other connection."""
    return _WATCHES.get(nc)
