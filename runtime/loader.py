"""Import handlers named ``package.module:attribute`` and check they fit the function contract."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .codec import InputDecoder
from .context import Context
from .errors import LoadError


@dataclass(frozen=True, slots=True)
class Handler:
    """A loaded handler: the callable plus what the executor needs to call it."""

    spec: str
    func: Callable[..., Any]
    is_async: bool
    takes_ctx: bool
    decoder: InputDecoder
    module_file: str | None
    module_mtime: float | None


def ensure_on_path(root: str | Path) -> None:
    """Put the project root first on ``sys.path`` so ``functions.x`` imports."""
    root = str(Path(root).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)


def _module_mtime(module: ModuleType) -> tuple[str | None, float | None]:
    path = getattr(module, "__file__", None)
    if not path:
        return None, None
    try:
        return path, os.stat(path).st_mtime
    except OSError:
        return path, None


def _import(module_name: str, reload: bool) -> ModuleType:
    try:
        module = importlib.import_module(module_name)
        if reload:
            importlib.invalidate_caches()
            module = importlib.reload(module)
        return module
    except ModuleNotFoundError as exc:
        raise LoadError(f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:  # an import error inside the user's module
        raise LoadError(f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from None


def load_handler(spec: str, reload: bool = False) -> Handler:
    """Import ``spec`` and inspect its signature: ``(event[, ctx])``, sync or async."""
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise LoadError(f"handler {spec!r} is not of the form 'package.module:attribute'")
    module = _import(module_name, reload)
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise LoadError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise LoadError(f"{spec!r} is not callable")
    file, mtime = _module_mtime(module)
    return inspect_handler(spec, target, file, mtime)


def _positional(sig: inspect.Signature) -> list[inspect.Parameter]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in sig.parameters.values() if p.kind in kinds]


def inspect_handler(spec: str, func: Callable[..., Any], file: str | None = None,
                    mtime: float | None = None) -> Handler:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise LoadError(f"cannot read the signature of {spec!r}: {exc}") from None
    params = _positional(sig)
    required = [p for p in sig.parameters.values()
                if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if not params or len(params) > 2 or len(required) > len(params):
        raise LoadError(f"{spec!r} must take (event) or (event, ctx), not {sig}")
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise LoadError(f"cannot resolve the annotations of {spec!r}: {exc}") from None
    annotation = hints.get(params[0].name, Any)
    try:
        decoder = InputDecoder(annotation)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoadError(f"{spec!r}: input annotation {annotation!r} is not a type pydantic can "
                        f"validate ({first_line})") from None
    if len(params) == 2:
        ctx_hint = hints.get(params[1].name, Context)
        if ctx_hint is not Context and ctx_hint is not Any:
            raise LoadError(f"{spec!r}: the second parameter must be annotated Context, not {ctx_hint!r}")
    call = getattr(func, "__call__", None)  # noqa: B004 - callable objects with async __call__
    is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(call)
    return Handler(spec=spec, func=func, is_async=is_async, takes_ctx=len(params) == 2,
                   decoder=decoder, module_file=file, module_mtime=mtime)


def module_changed(handler: Handler) -> bool:
    """True when the handler's module file changed on disk since it was loaded."""
    if not handler.module_file or handler.module_mtime is None:
        return False
    try:
        return os.stat(handler.module_file).st_mtime != handler.module_mtime
    except OSError:
        return False
