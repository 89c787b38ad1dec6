"""Which handler modules a runtime (or ``runtime deploy``) may import: the trusted module prefixes.

Anyone who can write the ``fn_manifests`` bucket chooses the handlers every runtime imports, and
importing runs module code. So a runtime imports only modules under prefixes its operator chose:
``functions``, the packages of the manifests it was started with (``--manifests``: the operator
picked those files), and what ``--trust`` / ``RUNTIME_TRUST`` add. Everything here is pure: the
runtime, ``runtime deploy`` and the tests make the same decision from the same functions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .errors import ConfigError

DEFAULT_PREFIXES = ("functions",)   # the project's own functions package
ENV_VAR = "RUNTIME_TRUST"           # comma-separated prefixes


def is_dotted_name(text: str) -> bool:
    """``a``, ``a.b.c``: a module path made of Python identifiers."""
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def check_prefix(prefix: str) -> str:
    """``prefix`` itself if it is a dotted Python name; ValueError naming it otherwise."""
    if not is_dotted_name(prefix):
        raise ValueError(f"{prefix!r} is not a module prefix (a dotted Python name such as "
                         "functions or myapp.handlers)")
    return prefix


def parse_prefixes(values: Iterable[str]) -> tuple[str, ...]:
    """Prefixes from flags or comma-separated lists, checked, in order, without repeats.

    Raises ConfigError naming the first entry that is not a dotted Python name.
    """
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            prefix = item.strip()
            if not prefix:
                continue   # "a,,b" or a trailing comma
            try:
                check_prefix(prefix)
            except ValueError as exc:
                raise ConfigError(f"--trust / {ENV_VAR}: {exc}") from None
            if prefix not in out:
                out.append(prefix)
    return tuple(out)


def env_prefixes() -> tuple[str, ...]:
    """The prefixes ``RUNTIME_TRUST`` adds (none when unset or empty)."""
    value = os.environ.get(ENV_VAR, "")
    return parse_prefixes([value]) if value.strip() else ()


def handler_module(handler: str) -> str:
    """The module part of ``package.module:attribute``."""
    return handler.partition(":")[0]


def is_trusted(module: str, prefixes: Iterable[str]) -> bool:
    """True when ``module`` equals a prefix or lies under one (``functions`` covers ``functions.x``,
    not ``functionsx``). A name that is not a dotted Python name is never trusted."""
    if not is_dotted_name(module):
        return False
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def packages_of(handlers: Iterable[str]) -> tuple[str, ...]:
    """The top-level packages of ``handlers`` (``myapp.handlers:x`` -> ``myapp``), in order."""
    out: list[str] = []
    for handler in handlers:
        package = handler_module(handler).split(".")[0]
        if is_dotted_name(package) and package not in out:
            out.append(package)
    return tuple(out)


def combine(*groups: Iterable[str]) -> tuple[str, ...]:
    """Prefix groups joined in order, without repeats."""
    out: list[str] = []
    for group in groups:
        out.extend(p for p in group if p not in out)
    return tuple(out)


def serve_prefixes(trust: Iterable[str], started_with: Iterable[str]) -> tuple[str, ...]:
    """A runtime's trusted prefixes: ``functions``, the packages of the handlers it was started
    with (``started_with``), and ``trust`` (from ``--trust`` / ``RUNTIME_TRUST``)."""
    return combine(DEFAULT_PREFIXES, packages_of(started_with), trust)


def deploy_prefixes(trust: Iterable[str]) -> tuple[str, ...]:
    """``runtime deploy``'s trusted prefixes: ``functions`` and ``trust``, never the packages of the
    manifests being deployed (that would trust whatever is deployed)."""
    return combine(DEFAULT_PREFIXES, trust)


def refusal(function: str, handler: str, prefixes: Iterable[str]) -> str | None:
    """Why ``function``'s ``handler`` may not be imported under ``prefixes``; None when it may."""
    prefixes = tuple(prefixes)
    module = handler_module(handler)
    if is_trusted(module, prefixes):
        return None
    package = module.split(".")[0]
    package = package if is_dotted_name(package) else "<package>"
    trusted = ", ".join(prefixes) or "none"
    return (f"function {function!r}: handler {handler!r} is outside the trusted module prefixes "
            f"({trusted}); nothing was imported. To allow it, add --trust {package} "
            f"(or {ENV_VAR}={package})")


def defined_outside(function: str, handler: str, func: object, prefixes: Iterable[str]) -> str | None:
    """Why the loaded handler ``func`` may not run: None when it is defined in a trusted module.

    The attribute part of a handler can reach code from anywhere a trusted module imported
    (``functions.hello:os.system``, or ``system`` after ``from os import system``), so the callable
    itself must come from a trusted module, not only the module named before the colon.
    """
    prefixes = tuple(prefixes)
    module = getattr(func, "__module__", None)
    if isinstance(module, str) and is_trusted(module, prefixes):
        return None
    where = module if isinstance(module, str) else "an unknown module"
    return (f"function {function!r}: handler {handler!r} is defined in {where}, outside the trusted "
            f"module prefixes ({', '.join(prefixes) or 'none'}); a handler must be defined in a trusted module")
