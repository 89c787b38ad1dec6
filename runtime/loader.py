"""Import handlers named ``package.module:attribute`` and check they fit the function contract.

Importing runs the author's module code, which may call ``sys.exit()`` or ``os._exit()``, raise
``KeyboardInterrupt`` or never return. Two guards keep that from taking a runtime or the CLI down:

* every in-process import catches ``BaseException`` and reports it as a one-line ``LoadError``;
* before module code runs in-process (first import, a reload because the file changed, or a reload
  because a newly added attribute is missing), a short-lived child process imports the module
  first (:mod:`runtime.importcheck`). Only a clean child lets the module into the process.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from .codec import InputDecoder
from .context import Context
from .deployment import source_digest
from .errors import LoadError

# The import check's public names are part of this module's API too (``as`` marks them re-exported).
from .importcheck import CHECK_TIMEOUT as CHECK_TIMEOUT
from .importcheck import cannot_import
from .importcheck import check_import as check_import
from .importcheck import check_import_async as check_import_async
from .importcheck import describe_import_failure as describe_import_failure

_MISSING = object()


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
    code: str = ""   # digest of the module file as loaded ("" without a file): a new version differs


def ensure_on_path(root: str | Path) -> None:
    """Put the project root first on ``sys.path`` so ``functions.x`` imports."""
    root = str(Path(root).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)


def load_handler(spec: str, reload: bool = False, *, root: str | Path | None = None,
                 timeout: float = CHECK_TIMEOUT) -> Handler:
    """Import ``spec`` and inspect its signature: ``(event[, ctx])``, sync or async.

    Module code that would run here is first run in a child process (see the module docstring);
    ``root`` is the project root (default: the working directory).
    """
    module_name, attr_path = _split(spec)
    cwd = _project_root(root)
    reload, check = _plan(module_name, attr_path, reload)
    if check:
        check_import(module_name, attr_path, cwd, timeout)
    return _load(spec, module_name, attr_path, reload)


async def load_handler_async(spec: str, reload: bool = False, *, root: str | Path | None = None,
                             timeout: float = CHECK_TIMEOUT) -> Handler:
    """:func:`load_handler` for the event loop: the check child is awaited, not waited for."""
    module_name, attr_path = _split(spec)
    cwd = _project_root(root)
    reload, check = _plan(module_name, attr_path, reload)
    if check:
        await check_import_async(module_name, attr_path, cwd, timeout)
    return _load(spec, module_name, attr_path, reload)


def _split(spec: str) -> tuple[str, str]:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise LoadError(f"handler {spec!r} is not of the form 'package.module:attribute'")
    return module_name, attr_path


def _project_root(root: str | Path | None) -> Path:
    if root is None:
        return Path.cwd()
    ensure_on_path(root)
    return Path(root).resolve()


def _plan(module_name: str, attr_path: str, reload: bool) -> tuple[bool, bool]:
    """``(reload, check)``: re-execute an imported module? Will module code run in this process?"""
    module = sys.modules.get(module_name)
    if module is None:
        return False, True
    if not reload and _resolve(module, attr_path) is _MISSING:
        reload = True  # a function added to the file after the module was imported
    return reload, reload


def _resolve(module: ModuleType, attr_path: str) -> Any:
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except BaseException:  # a module-level __getattr__ may raise anything
            return _MISSING
    return target


def _load(spec: str, module_name: str, attr_path: str, reload: bool) -> Handler:
    module = _import(module_name, reload)
    target = _resolve(module, attr_path)
    if target is _MISSING:
        raise LoadError(f"module {module_name!r} has no attribute {attr_path!r}")
    if not callable(target):
        raise LoadError(f"{spec!r} is not callable")
    file, mtime = _module_mtime(module)
    return replace(inspect_handler(spec, target, file, mtime), code=_code_of(module_name, file))


def _import(module_name: str, reload: bool) -> ModuleType:
    try:
        module = sys.modules.get(module_name)
        if module is not None and not reload:
            return module
        importlib.invalidate_caches()  # the file may be newer than this process's directory caches
        _CODES.pop(module_name, None)
        if module is not None:
            module = importlib.reload(module)
        else:
            module = importlib.import_module(module_name)
        _code_of(module_name, getattr(module, "__file__", None))   # the source just run, before it changes
        return module
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: a module must not end the process
        raise LoadError(cannot_import(module_name, describe_import_failure(exc))) from None


# ------------------------------------------------------------------ the function contract


def _module_mtime(module: ModuleType) -> tuple[str | None, float | None]:
    path = getattr(module, "__file__", None)
    if not path:
        return None, None
    try:
        return path, os.stat(path).st_mtime
    except OSError:
        return path, None


# Module name -> digest of its source file when this process last imported it (see Handler.code).
_CODES: dict[str, str] = {}


def _code_of(module_name: str, path: str | None) -> str:
    if module_name not in _CODES:
        # Without a source to tell versions apart, the function's cache entries are shared.
        _CODES[module_name] = (source_digest(path) if path else None) or ""
    return _CODES[module_name]


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
