"""Import a handler module in a short-lived child process before this process imports it.

A ``python -c`` child imports the module and resolves the attribute with the same working directory
and ``sys.path``, within ``CHECK_TIMEOUT`` seconds. Only a clean child lets the module into the
process; anything else becomes a one-line ``LoadError``.

The child costs an interpreter start plus the module's own imports: a median of about 30 ms for a
module importing nothing and 210 ms for ``functions/hello.py`` (which imports pydantic, nats-py and
this package), against 1 ms to import it in a warm process. That is paid once per module version,
never per invocation; an imported, unchanged module costs nothing.
We chose the child over an in-process guard alone because nothing in-process can survive
``os._exit()`` or an endless loop at import. Inside the runtime the child is an asyncio subprocess,
so the event loop keeps serving while it runs. Its report travels through a temporary file, so the
module's own output (and any process it forks) cannot hold a pipe open or fill it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import LoadError

CHECK_TIMEOUT = 20.0   # seconds a module may take to import in the check child
_MAX_REASON = 300      # characters of an exception message a LoadError keeps

# The check child: import, resolve, write one JSON report, leave at once. ``os._exit`` skips atexit
# hooks and waits for no thread the module started; stdio is /dev/null, so nothing else comes back.
_CHECK = """
import importlib, json, os, sys
module_name, attr_path, report_path = sys.argv[1:4]
sys.path[:] = json.loads(sys.argv[4])
try:
    target = importlib.import_module(module_name)
    report = {"ok": True}
    for part in attr_path.split("."):
        if not hasattr(target, part):
            report = {"missing": True}
            break
        target = getattr(target, part)
except BaseException as exc:
    try:
        text = ("" if exc.code is None else repr(exc.code)) if isinstance(exc, SystemExit) else str(exc)
    except BaseException:
        text = ""
    report = {"type": type(exc).__name__, "text": text, "not_found": isinstance(exc, ModuleNotFoundError)}
with open(report_path, "w") as f:
    json.dump(report, f)
os._exit(0)
"""


def check_import(module_name: str, attr_path: str, root: Path, timeout: float = CHECK_TIMEOUT) -> None:
    """Import ``module_name`` and resolve ``attr_path`` in a child process; ``LoadError`` if that fails."""
    with _check_command(module_name, attr_path, root) as (cmd, report):
        try:
            proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise LoadError(cannot_import(module_name, f"the import check could not start: {exc}")) from None
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LoadError(cannot_import(module_name, f"timed out after {timeout:g}s at import")) from None
        finally:
            if proc.returncode is None:  # timed out or interrupted
                _kill_group(proc.pid)
                proc.wait()
        _verdict(module_name, attr_path, returncode, report)


async def check_import_async(module_name: str, attr_path: str, root: Path,
                             timeout: float = CHECK_TIMEOUT) -> None:
    """:func:`check_import` with an asyncio subprocess, so the event loop keeps running."""
    with _check_command(module_name, attr_path, root) as (cmd, report):
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise LoadError(cannot_import(module_name, f"the import check could not start: {exc}")) from None
        try:
            returncode = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            raise LoadError(cannot_import(module_name, f"timed out after {timeout:g}s at import")) from None
        finally:
            if proc.returncode is None:  # timed out or cancelled
                _kill_group(proc.pid)
                await proc.wait()
        _verdict(module_name, attr_path, returncode, report)


@contextlib.contextmanager
def _check_command(module_name: str, attr_path: str, root: Path) -> Iterator[tuple[list[str], Path]]:
    """The child's command line and the file it reports to (removed afterwards)."""
    try:
        fd, name = tempfile.mkstemp(prefix="runtime-import-check-", suffix=".json")
    except OSError as exc:
        raise LoadError(cannot_import(module_name, f"the import check could not start: {exc}")) from None
    os.close(fd)
    # The child sees this process's sys.path, absolute, with the project root first.
    paths = list(dict.fromkeys([str(root), *(os.path.abspath(str(p) or os.curdir) for p in sys.path)]))
    try:
        yield [sys.executable, "-c", _CHECK, module_name, attr_path, name, json.dumps(paths)], Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _kill_group(pid: int) -> None:
    """The child leads its own session: end it and anything its module started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _verdict(module_name: str, attr_path: str, returncode: int, report_path: Path) -> None:
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        report = None  # the module ended the child before it could report
    if returncode == 0 and isinstance(report, dict):
        if report.get("ok"):
            return
        if report.get("missing"):
            raise LoadError(f"module {module_name!r} has no attribute {attr_path!r}")
        if "type" in report:
            reason = _reason(str(report["type"]), str(report.get("text", "")), bool(report.get("not_found")))
            raise LoadError(cannot_import(module_name, reason))
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        raise LoadError(cannot_import(module_name, f"the import was killed by {name}"))
    raise LoadError(cannot_import(module_name,
                                  f"the module exited with code {returncode} at import (os._exit?)"))


# ------------------------------------------------------------------ one line per failure


def describe_import_failure(exc: BaseException) -> str:
    """One line saying why importing a module raised ``exc``."""
    try:
        text = ("" if exc.code is None else repr(exc.code)) if isinstance(exc, SystemExit) else str(exc)
    except BaseException:
        text = ""
    return _reason(type(exc).__name__, text, isinstance(exc, ModuleNotFoundError))


def _reason(type_name: str, text: str, not_found: bool) -> str:
    lines = text.strip().splitlines()
    line = lines[0].strip() if lines else ""
    if len(line) > _MAX_REASON:
        line = line[:_MAX_REASON] + "…"
    if type_name == "SystemExit":
        return f"the module called sys.exit({line}) at import"
    if type_name == "KeyboardInterrupt":
        return "the module raised KeyboardInterrupt at import"
    if not_found and line:
        return line
    return f"{type_name}: {line}" if line else type_name


def cannot_import(module_name: str, reason: str) -> str:
    """The ``LoadError`` message for a module that failed to import, in the child or in-process."""
    return f"cannot import module {module_name!r}: {reason}"
