"""Priority levels: 1 (least urgent) to 10 (most urgent), carried in the invocation's subject.

``fn.invoke.<name>.<level>`` queues at that level; a plain ``fn.invoke.<name>`` queues at the
function's default level (its manifest's ``priority``, 5 unless set).
"""

from __future__ import annotations

from .protocol import INVOKE_PREFIX, QUEUED_PREFIX

LOWEST = 1
HIGHEST = 10
DEFAULT = 5
LEVELS = tuple(range(HIGHEST, LOWEST - 1, -1))   # most urgent first: the order a free slot looks in


def check_level(level: int) -> int:
    """``level`` if it is a priority level; ValueError naming the range otherwise."""
    if isinstance(level, bool) or not isinstance(level, int) or not LOWEST <= level <= HIGHEST:
        raise ValueError(f"priority must be a whole number from {LOWEST} (least urgent) to {HIGHEST} "
                         f"(most urgent), not {level!r}")
    return level


def invoke_subject(function: str, level: int | None = None) -> str:
    """Where to publish an invocation of ``function``: at ``level``, or at its default level if None."""
    if level is None:
        return f"{INVOKE_PREFIX}{function}"
    return f"{INVOKE_PREFIX}{function}.{check_level(level)}"


def level_subjects(function: str, level: int, default: int) -> list[str]:
    """The subjects whose invocations queue at ``level``: the plain subject belongs to the default level."""
    subjects = [f"{INVOKE_PREFIX}{function}.{level}"]
    if level == default:
        subjects.insert(0, f"{INVOKE_PREFIX}{function}")
    return subjects


def split_subject(subject: str) -> tuple[str, int | None]:
    """``(function, level)`` of an invocation subject; level None for the plain subject.

    ValueError for anything that is not ``fn.invoke.<name>`` or ``fn.invoke.<name>.<level>``.
    """
    if not subject.startswith(INVOKE_PREFIX):
        raise ValueError(f"{subject!r} is not an invocation subject")
    parts = subject[len(INVOKE_PREFIX):].split(".")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 2 and parts[0] and parts[1].isdigit():
        return parts[0], check_level(int(parts[1]))
    raise ValueError(f"{subject!r} is not fn.invoke.<function> or fn.invoke.<function>.<{LOWEST}-{HIGHEST}>")


def consumer_name(function: str, level: int, default: int) -> str:
    """The durable consumer of ``function`` for ``level``: the function's own name for its default level.

    Function names are lower case, so ``<name>_L<level>`` never names another function's consumer.
    """
    return function if level == default else f"{function}_L{level}"


def consumer_names(function: str) -> list[str]:
    """Every name a consumer of ``function`` can have, whatever its default level."""
    return [function] + [f"{function}_L{level}" for level in LEVELS]


def split_consumer(consumer: str) -> tuple[str, int | None]:
    """``(function, level)`` of a consumer of ``FN`` (the inverse of ``consumer_name``); level None
    for the consumer named after the function, which takes its default level."""
    name, sep, level = consumer.rpartition("_L")
    return (name, int(level)) if sep and name and level.isdigit() else (consumer, None)


def function_of_consumer(consumer: str) -> str:
    """The function a consumer of ``FN`` feeds."""
    return split_consumer(consumer)[0]


def doorbell_subjects(function: str, level: int, default: int) -> list[str]:
    """Where FN republishes the headers of each invocation stored at ``level``."""
    return [QUEUED_PREFIX + s[len(INVOKE_PREFIX):] for s in level_subjects(function, level, default)]
