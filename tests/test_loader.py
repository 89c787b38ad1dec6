"""Importing handler modules: a module that exits, is interrupted or hangs at import is a load error."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime import Client
from runtime.app import Runtime
from runtime.errors import LoadError
from runtime.loader import load_handler, load_handler_async
from runtime.manifest import FunctionManifest
from runtime.server import EmbeddedServer, free_port

from .conftest import ROOT, RuntimeFactory, RuntimeProcess, eventually

_ids = itertools.count()

# Each bad module misbehaves only where RT_TEST_EXPLODE is set, so a deploy from a host where it
# imports cleanly can put it in the registry, as a deploy from another machine would.
BAD_MODULES = {
    "bad_exit": ("import sys\nsys.exit(3)", "the module called sys.exit(3) at import"),
    "bad_osexit": ("import os\nos._exit(7)", "the module exited with code 7 at import (os._exit?)"),
    "bad_interrupt": ("raise KeyboardInterrupt", "the module raised KeyboardInterrupt at import"),
}


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """Write a uniquely named module on ``sys.path``: ``name = module(source)``."""
    directory = tmp_path / "modules"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))
    names: list[str] = []

    def write(source: str, name: str | None = None) -> str:
        name = name or f"rt_loader_mod_{os.getpid()}_{next(_ids)}"
        (directory / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


@pytest.mark.parametrize(("source", "reason"), [
    *BAD_MODULES.values(),
    ("import sys\nsys.exit()", "the module called sys.exit() at import"),
    ("import sys\nsys.exit('bye')", "the module called sys.exit('bye') at import"),
    ("raise ValueError('first line\\nsecond line')", "ValueError: first line"),
    ("import os\nos.kill(os.getpid(), 9)", "the import was killed by SIGKILL"),
])
def test_a_module_that_fails_at_import_is_one_clear_load_error(
        module: Callable[..., str], source: str, reason: str) -> None:
    name = module(source)
    with pytest.raises(LoadError) as caught:
        load_handler(f"{name}:main")
    assert str(caught.value) == f"cannot import module {name!r}: {reason}"
    assert name not in sys.modules


def test_a_module_that_never_finishes_importing_times_out(module: Callable[..., str]) -> None:
    name = module("while True:\n    pass\n")
    with pytest.raises(LoadError) as caught:
        load_handler(f"{name}:main", timeout=0.5)
    assert str(caught.value) == f"cannot import module {name!r}: timed out after 0.5s at import"


async def test_the_async_check_does_not_block_the_event_loop(module: Callable[..., str]) -> None:
    name = module("import time\ntime.sleep(0.3)\ndef main(event):\n    return event\n")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        handler = await load_handler_async(f"{name}:main")
    finally:
        ticker.cancel()
    assert handler.func({"a": 1}) == {"a": 1}
    assert ticks > 10, "the loop kept running while the child imported the module"


def test_an_exit_that_only_happens_in_this_process_is_caught_too(module: Callable[..., str]) -> None:
    # The check child has no pytest loaded, so this module passes the check and exits here.
    name = module("import sys\nif 'pytest' in sys.modules:\n    raise SystemExit(4)\ndef main(event): ...\n")
    with pytest.raises(LoadError) as caught:
        load_handler(f"{name}:main")
    assert str(caught.value) == f"cannot import module {name!r}: the module called sys.exit(4) at import"


def test_the_check_message_carries_no_traceback_or_environment(module: Callable[..., str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RT_TEST_SECRET", "s3cr3t-value")
    name = module("import os\ndef helper():\n    raise RuntimeError('deep ' + 'x' * 1000)\nhelper()\n")
    with pytest.raises(LoadError) as caught:
        load_handler(f"{name}:main")
    message = str(caught.value)
    assert message.startswith(f"cannot import module {name!r}: RuntimeError: deep xxx")
    assert len(message) < 400 and "\n" not in message
    assert "Traceback" not in message and "s3cr3t" not in message


def test_a_function_added_to_an_imported_module_is_loaded(module: Callable[..., str], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    counting = f"with open({str(runs)!r}, 'a') as f:\n    f.write('x')\n"
    name = module(counting + "def first(event):\n    return 'first'\n")
    assert load_handler(f"{name}:first").func(None) == "first"
    assert runs.read_text() == "xx", "once in the check child, once here"
    assert load_handler(f"{name}:first").func(None) == "first"
    assert runs.read_text() == "xx", "an imported, unchanged module runs no code again"
    module(counting + "def first(event):\n    return 'first'\ndef second(event):\n    return 'second'\n", name)
    assert load_handler(f"{name}:second").func(None) == "second"
    assert runs.read_text() == "xxxx", "checked in a child, then reloaded here"
    with pytest.raises(LoadError, match=f"module '{name}' has no attribute 'third'"):
        load_handler(f"{name}:third")


async def test_a_runtime_serves_a_function_added_to_a_module_it_already_imported(
        runtime: RuntimeFactory, module: Callable[..., str]) -> None:
    name = module("def first(event):\n    return 'first'\n")
    rt: Runtime = await runtime(first=f"name: first\nhandler: {name}:first\n")
    assert "first" in rt.workers
    module("def first(event):\n    return 'first'\ndef second(event):\n    return 'second'\n", name)
    await rt.apply(FunctionManifest.model_validate({"name": "second", "handler": f"{name}:second"}))
    assert rt.failing == {}
    assert "second" in rt.workers
    async with Client(rt.url) as fn:
        assert await fn.invoke("second", {}, timeout=5) == "second"
        assert await fn.invoke("first", {}, timeout=5) == "first"


# ------------------------------------------------------------------ the CLI and a real runtime


def _modules_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "fleet_modules"
    directory.mkdir()
    for name, (source, _) in BAD_MODULES.items():
        gated = "import os\nif os.environ.get('RT_TEST_EXPLODE'):\n" + textwrap.indent(source, "    ")
        (directory / f"{name}.py").write_text(gated + "\n\nasync def main(event):\n    return event\n")
    (directory / "healthy_mod.py").write_text("async def main(event):\n    return {'echo': event}\n")
    return directory


def _manifests(tmp_path: Path, *names: str) -> Path:
    directory = tmp_path / f"manifests_{next(_ids)}"
    directory.mkdir()
    for name in names:
        module = "healthy_mod" if name == "healthy" else name
        (directory / f"{name}.yaml").write_text(f"name: {name}\nhandler: {module}:main\n")
    return directory


async def _cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime", *args, cwd=ROOT, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_modules_that_exit_at_import_neither_stop_a_runtime_nor_the_deploy(
        nats_server: EmbeddedServer, tmp_path: Path, runtime_process: Callable[..., RuntimeProcess]) -> None:
    modules = _modules_dir(tmp_path)
    path = {"PYTHONPATH": str(modules), "RUNTIME_TRUST": ",".join([*BAD_MODULES, "healthy_mod"])}
    explode = {**path, "RT_TEST_EXPLODE": "1"}
    proc = runtime_process(None, env=explode)
    await proc.wait_ready()
    # Deployed from a host where the modules import cleanly; the runtime's host is where they exit.
    code, out, err = await _cli("deploy", str(_manifests(tmp_path, "healthy", *BAD_MODULES)),
                                "--server", nats_server.url, env=path)
    assert code == 0 and "function bad_exit: created" in out, err

    async def listing() -> dict[str, Any]:
        code, out, err = await _cli("ls", "--json", "--server", nats_server.url, env=path)
        assert code == 0, err
        return {row["name"]: row for row in json.loads(out)}

    async def settled() -> dict[str, Any] | None:
        rows = await listing()
        statuses = {name: row["status"] for name, row in rows.items()}
        expected = {"healthy": "serving", **{name: "failing" for name in BAD_MODULES}}
        return rows if statuses == expected else None

    rows = await eventually(settled, timeout=8, interval=0.1, message="healthy serving, the others failing")
    for name, (_, reason) in BAD_MODULES.items():
        [error] = rows[name]["failing"].values()
        assert error == f"cannot import module {name!r}: {reason}"
        assert f"cannot serve {name}: cannot import module" in proc.output()
    async with Client(nats_server.url) as fn:
        assert await fn.invoke("healthy", {"n": 1}, timeout=5) == {"echo": {"n": 1}}
    assert proc.proc.poll() is None, proc.output()

    # Deployed from a host where they exit: one error line, the CLI's error code, nothing deployed.
    dirs = {name: _manifests(tmp_path, name) for name in BAD_MODULES}
    results = await asyncio.gather(*(
        _cli("deploy", str(dirs[name]), "--server", nats_server.url, env=explode) for name in BAD_MODULES))
    for name, (code, out, err) in zip(BAD_MODULES, results, strict=True):
        reason = BAD_MODULES[name][1]
        source = dirs[name] / f"{name}.yaml"   # the error names the manifest whose handler failed
        assert (code, out, err) == (1, "", f"runtime: error: {source}: handler: cannot import module {name!r}: "
                                           f"{reason}\n")
    assert proc.proc.poll() is None, proc.output()


async def test_serve_with_a_module_that_exits_at_import_fails_with_one_line(tmp_path: Path) -> None:
    modules = _modules_dir(tmp_path)
    code, out, err = await _cli(
        "serve", "--manifests", str(_manifests(tmp_path, "bad_exit")), "--port", str(free_port()),
        "--data-dir", str(tmp_path / "data"), env={"PYTHONPATH": str(modules), "RT_TEST_EXPLODE": "1"})
    assert (code, out, err) == (1, "", "runtime: error: cannot import module 'bad_exit': "
                                       "the module called sys.exit(3) at import\n")
    assert not (tmp_path / "data").exists(), "nothing was started"
