"""What the server accepts, checked before the runtime publishes anything.

nats-server closes a connection that sends a message over ``max_payload`` (headers count, not
only the body) or a protocol line over ``max_control_line``, and nats-py then gives up on it.
One such message built from untrusted input (a call id, a reply subject, a result) would
disable a runtime, so every message the runtime builds from such input is measured here first.
Reply subjects come from the network too: answering one publishes with the runtime's rights.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping

MAX_CONTROL_LINE = 4096   # nats-server's default max_control_line
MAX_SUBJECT = 1024        # a reply subject longer than this is refused (inboxes are ~30 characters)
MAX_CALL_ID = 256         # longer call ids are replaced by a digest (see call_id_for)
HASHED_PREFIX = "h_"
# Room a publish's protocol line needs besides its subjects: "HPUB  <hdr> <total>\r\n".
_CONTROL_OVERHEAD = 48
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f]")
STATUS_LINE = b"NATS/1.0\r\n"   # opens every header block; an empty line closes it
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # what nats-py agrees to send as a header name
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


class WireLimits:
    """The limits of one connection's server."""

    __slots__ = ("max_payload",)

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload

    def fits(self, subject: str, body: bytes, headers: Mapping[str, str] | None = None, reply: str = "") -> bool:
        """Whether the server takes this message without closing the connection."""
        return (message_size(body, headers) <= self.max_payload
                and len(subject) + len(reply) + _CONTROL_OVERHEAD <= MAX_CONTROL_LINE)

    def room_for_body(self, headers: Mapping[str, str] | None = None) -> int:
        """The largest body that fits beside ``headers``."""
        return self.max_payload - header_size(headers)


def header_line(name: str, value: str) -> bytes:
    """One header as nats-py sends it: name and value stripped, line breaks in the value as spaces."""
    return b"%s: %s\r\n" % (name.strip().encode(), value.strip().translate(_NEWLINES).encode())


def sendable_header_name(name: str) -> bool:
    """Whether nats-py sends a header of this name (it refuses the whole message otherwise)."""
    return bool(_HEADER_NAME.fullmatch(name.strip()))


def header_size(headers: Mapping[str, str] | None) -> int:
    """Bytes ``headers`` add to a message, exactly as nats-py sends them; they count against ``max_payload``.

    nats-py skips a header whose name is empty once stripped.
    """
    if not headers:
        return 0
    return len(STATUS_LINE) + 2 + sum(len(header_line(k, v)) for k, v in headers.items() if k.strip())


def message_size(body: bytes, headers: Mapping[str, str] | None = None) -> int:
    return len(body) + header_size(headers)


def syntax_problem(subject: str, limit: int = MAX_SUBJECT) -> str | None:
    """Why ``subject`` (wildcards allowed) is not a well-formed subject of at most ``limit`` characters."""
    if not subject:
        return "it is empty"
    if len(subject) > limit:
        return f"it is longer than {limit} characters"
    if _BAD_CHARS.search(subject):
        return "it contains whitespace or control characters"
    if "" in subject.split("."):
        return "it has an empty token"
    return None


def subject_problem(subject: str) -> str | None:
    """Why ``subject`` cannot be published to, or None if it can."""
    problem = syntax_problem(subject)
    if problem is None:
        tokens = subject.split(".")
        if "*" in tokens or ">" in tokens:
            return "it contains a wildcard"
    return problem


class ReplyPolicy:
    """Which reply subjects the runtime answers on behalf of a caller.

    Never a system or API subject (anything starting with ``$``: ``$JS.API.STREAM.PURGE.FN`` as
    a reply subject would make the runtime purge its own stream); when ``prefixes`` are given,
    only subjects under one of them (``_INBOX.``, say).
    """

    def __init__(self, prefixes: Iterable[str] = ()) -> None:
        self.prefixes = tuple(prefixes)

    def problem(self, subject: str) -> str | None:
        """Why the runtime refuses to answer on ``subject``, or None if it may."""
        syntax = subject_problem(subject)
        if syntax:
            return syntax
        if subject.startswith("$"):
            return "it is a system or API subject (starts with '$')"
        if self.prefixes and not subject.startswith(self.prefixes):
            return f"it is outside the allowed reply prefixes ({', '.join(self.prefixes)})"
        return None


def call_id_for(raw: str | None) -> str | None:
    """The call id the runtime uses for ``raw`` (from a header): itself when usable, else a digest.

    Ids too long to put in a subject or a header line, or holding control characters, become
    ``h_<sha256>``; ``results.result_key`` maps the original to the same key, so a caller that
    asks by the original id still finds the outcome.
    """
    if not raw:
        return None
    if len(raw) <= MAX_CALL_ID and raw.isprintable():
        return raw
    return hashed(raw)


def hashed(raw: str) -> str:
    return HASHED_PREFIX + hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def clip(text: str, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters (error text goes into headers)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"
