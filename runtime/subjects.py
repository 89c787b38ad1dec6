"""Subject patterns: which subjects a pattern with ``*`` and ``>`` wildcards matches.

Triggers bind functions to subject patterns; a stream may not capture a subject another stream
captures, and one stream's patterns may not overlap each other. These answer, without asking the
server, whether two patterns share a subject and whether one covers the other.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .wire import syntax_problem

MAX_PATTERN = 256
RESERVED = ("$", "_INBOX.", "fn.")   # system and API subjects, inboxes, the runtime's own subjects


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a subject pattern a trigger may use, or None."""
    problem = syntax_problem(pattern, MAX_PATTERN)
    if problem is not None:
        return problem
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if token == ">" and i != len(tokens) - 1:
            return "'>' may only be the last token"
        if len(token) > 1 and ("*" in token or ">" in token):
            return f"{token!r} mixes a wildcard with other characters"
    if all(t in ("*", ">") for t in tokens):
        return "it matches every subject; name at least one token"
    if pattern.startswith(RESERVED) or pattern == "fn":
        return "subjects starting with $, _INBOX. or fn. belong to NATS and the runtime"
    return None


def _matches(a: list[str], b: list[str]) -> bool:
    """Whether some subject matches both token lists."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x == ">" or y == ">":
            # '>' needs at least one more token, which the other side has or can match.
            return len(a) > i and len(b) > i
        if x != y and x != "*" and y != "*":
            return False
    return len(a) == len(b)


def overlaps(a: str, b: str) -> bool:
    """Whether at least one subject matches both patterns."""
    return _matches(a.split("."), b.split("."))


def covers(wide: str, narrow: str) -> bool:
    """Whether every subject ``narrow`` matches is matched by ``wide``."""
    w, n = wide.split("."), narrow.split(".")
    for i, x in enumerate(w):
        if x == ">":
            return len(n) > i
        if i >= len(n):
            return False
        y = n[i]
        if y == ">":
            return False
        if x != "*" and (y == "*" or x != y):
            return False
    return len(w) == len(n)


def minimal_cover(patterns: Iterable[str]) -> list[str]:
    """The patterns without those another one covers, sorted: what one stream may capture.

    Patterns that overlap without one covering the other (``a.*.c`` and ``a.b.*``) are both
    kept; the server refuses that pair in one stream, and ``conflicts`` names it first.
    """
    unique = sorted(set(patterns))
    return [p for p in unique if not any(q != p and covers(q, p) for q in unique)]


def conflicts(patterns: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of patterns that overlap while neither covers the other."""
    kept = minimal_cover(patterns)
    return [(a, b) for i, a in enumerate(kept) for b in kept[i + 1:] if overlaps(a, b)]


def name_for(pattern: str) -> str:
    """A trigger name made from its subject: ``orders.>`` → ``orders-all``, ``a.*.b`` → ``a-any-b``."""
    words = {"*": "any", ">": "all"}
    name = "-".join(words.get(t, t) for t in pattern.split(".")).lower()
    name = re.sub(r"[^a-z0-9_-]+", "-", name).strip("-_") or "trigger"
    return name[:64].rstrip("-_")
