"""Colour for people at a terminal: error and warning prefixes, status words in tables.

One decision per stream (``colour_for``), made from the conventions other tools share:
``NO_COLOR`` (no-color.org) turns colour off, ``FORCE_COLOR`` turns it on where there is
no terminal (tests, ``less -R``), ``TERM=dumb`` and anything that is not a terminal stay plain.
Only text for people is painted: ``--json`` output never goes through here.
"""

from __future__ import annotations

import os
from typing import TextIO

# SGR parameters by role; few and conventional, so any palette reads them well.
ERROR = "1;31"   # bold red: something failed
WARNING = "33"   # yellow: needs attention, nothing failed yet
OK = "32"        # green: working as deployed
MUTED = "2"      # dim: switched off on purpose

RESET = "\033[0m"

# Words the commands print in a state column, by how a user should read them.
STATUS_ROLES = {
    "serving": OK, "enabled": OK, "scheduled": OK, "ok": OK, "deployed": OK,
    "failing": ERROR, "failed": ERROR, "error": ERROR, "max_deliver": ERROR, "timeout": ERROR,
    "refused": ERROR,
    "idle": WARNING, "no runtime": WARNING, "no function": WARNING, "pending": WARNING, "missing": WARNING,
    "invalid_input": WARNING, "rejected": WARNING,
    "disabled": MUTED, "undeployed": MUTED, "unchanged": MUTED,
}


def colour_for(stream: TextIO) -> bool:
    """Whether text written to ``stream`` should be coloured."""
    if os.environ.get("NO_COLOR"):  # the user's own "no", whatever else is set
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    if os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Painter:
    """Paints text for one stream; the decision is taken once, when the painter is made."""

    def __init__(self, stream: TextIO) -> None:
        self.enabled = colour_for(stream)

    def paint(self, text: str, role: str) -> str:
        return f"\033[{role}m{text}{RESET}" if self.enabled and text else text

    def status(self, text: str) -> str:
        """``text`` in its status colour when it is a known status word, unchanged otherwise."""
        role = STATUS_ROLES.get(text.strip().lower())
        return self.paint(text, role) if role else text
