"""Trusted handler prefixes: writing the registry does not let anyone make a runtime import any module."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from runtime.deployment import find_module_file, module_digest
from runtime.errors import ConfigError
from runtime.registry import Registry
from runtime.server import EmbeddedServer
from runtime.settings import Settings
from runtime.streams import provision_base
from runtime.trust import (
    deploy_prefixes,
    env_prefixes,
    is_trusted,
    packages_of,
    parse_prefixes,
    refusal,
    serve_prefixes,
)

from .conftest import ROOT, RuntimeFactory, RuntimeProcess, eventually

GREET = "name: greet\nhandler: tests.handlers.core:greet\n"


def make_package(root: Path, package: str, marker: Path) -> Path:
    """A package whose import (of the package or its ``mod``) appends to ``marker``."""
    code = f"from pathlib import Path\nwith open({str(marker)!r}, 'a') as f:\n    f.write(__name__ + '\\n')\n"
    directory = root / package
    directory.mkdir(parents=True)
    (directory / "__init__.py").write_text(code)
    (directory / "mod.py").write_text(code + "\ndef main(event):\n    return {'imported': True}\n")
    return root


def record(name: str, handler: str, **fields: Any) -> bytes:
    """A registry record as anyone with write access to the bucket could store it."""
    return json.dumps({"kind": "Function",
                       "manifest": {"kind": "Function", "name": name, "handler": handler, **fields}}).encode()


async def cli(server: EmbeddedServer, *args: str, cwd: Path = ROOT,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Only what the test says is trusted: nothing from the environment the suite runs in.
    full_env = {k: v for k, v in os.environ.items() if k != "RUNTIME_TRUST"} | (env or {})
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "runtime", *args, "--server", server.url], cwd=cwd,
        capture_output=True, text=True, timeout=60, env=full_env)


def refusals(proc: RuntimeProcess, name: str) -> list[str]:
    return [line for line in proc.output().splitlines() if f"refusing to serve function {name!r}" in line]


def refused_here(proc: RuntimeProcess, *names: str, times: int = 1) -> bool:
    return all(len(refusals(proc, name)) == times for name in names)


# ------------------------------------------------------------------ the pure policy


def test_a_prefix_trusts_itself_and_the_modules_under_it_only() -> None:
    assert is_trusted("functions", ["functions"])
    assert is_trusted("functions.hello", ["functions"])
    assert is_trusted("myapp.handlers.x", ["functions", "myapp.handlers"])
    assert not is_trusted("functionsx", ["functions"])
    assert not is_trusted("myapp.handlersx", ["myapp.handlers"])
    assert not is_trusted("myapp", ["myapp.handlers"])
    assert not is_trusted("os", ["functions"])
    assert not is_trusted("functions.", ["functions"])     # not a module name at all
    assert not is_trusted("functions..x", ["functions"])
    assert not is_trusted("anything", [])


def test_prefixes_are_dotted_python_names() -> None:
    assert parse_prefixes(["a, b.c", "a", "d,"]) == ("a", "b.c", "d")
    for bad in ("my-app", "1app", "a..b", "a.", "os:system", "a b"):
        with pytest.raises(ConfigError, match="is not a module prefix"):
            parse_prefixes([bad])
    with pytest.raises(ValueError, match="'my-app' is not a module prefix"):
        Settings(trust=("my-app",))
    assert Settings(trust=("myapp.handlers",)).trust == ("myapp.handlers",)


def test_runtime_trust_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_TRUST", "myapp, other.pkg")
    assert Settings.from_env().trust == ("myapp", "other.pkg")
    assert env_prefixes() == ("myapp", "other.pkg")
    monkeypatch.setenv("RUNTIME_TRUST", "my-app")
    with pytest.raises(ConfigError, match="'my-app' is not a module prefix"):
        Settings.from_env()


def test_serve_trusts_its_manifests_packages_and_deploy_does_not() -> None:
    handlers = ["myapp.handlers:x", "functions.hello:main", "myapp.other:y", "tools:z"]
    assert packages_of(handlers) == ("myapp", "functions", "tools")
    assert serve_prefixes(("extra",), handlers) == ("functions", "myapp", "tools", "extra")
    assert serve_prefixes((), ()) == ("functions",)
    assert deploy_prefixes(()) == ("functions",)
    assert deploy_prefixes(("myapp",)) == ("functions", "myapp")


def test_the_refusal_names_the_function_the_handler_the_prefixes_and_the_way_to_allow_it() -> None:
    assert refusal("hello", "functions.hello:main", ("functions",)) is None
    text = refusal("evil", "evilpkg.mod:main", ("functions", "myapp"))
    assert text is not None
    assert "'evil'" in text and "'evilpkg.mod:main'" in text and "(functions, myapp)" in text
    assert "--trust evilpkg" in text and "\n" not in text


def test_the_code_digest_imports_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    monkeypatch.syspath_prepend(str(make_package(tmp_path / "project", "digestpkg", marker)))
    assert find_module_file("digestpkg.mod") == str(tmp_path / "project" / "digestpkg" / "mod.py")
    assert module_digest("digestpkg.mod:main") is not None
    assert module_digest("digestpkg.missing:main") is None
    assert not marker.exists()
    assert "digestpkg" not in sys.modules


# ------------------------------------------------------------------ runtimes


async def test_a_manifest_written_into_the_registry_is_refused_by_every_runtime_and_nothing_is_imported(
        nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path,
        runtime_process: Callable[..., RuntimeProcess]) -> None:
    marker = tmp_path / "imported"
    env = {"PYTHONPATH": str(make_package(tmp_path / "project", "evilpkg", marker))}
    procs = [runtime_process(None, env=env) for _ in range(2)]
    await asyncio.gather(*(p.wait_ready() for p in procs))

    kv = await js.key_value("fn_manifests")   # straight into the bucket, bypassing `runtime deploy`
    await kv.put("evil", record("evil", "evilpkg.mod:main"))
    await kv.put("shell", record("shell", "os:system"))
    for proc in procs:
        await eventually(partial(refused_here, proc, "evil", "shell"), message="both refusals logged")
        line = refusals(proc, "evil")[0]
        assert "ERROR" in line and "'evilpkg.mod:main'" in line and "(functions)" in line
        assert "--trust evilpkg" in line
        assert "--trust os" in refusals(proc, "shell")[0]

    listed = await cli(nats_server, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    for name in ("evil", "shell"):
        assert rows[name]["status"] == "refused"
        assert len(rows[name]["refused"]) == 2 and rows[name]["runtimes"] == 0 and rows[name]["failing"] == {}
    assert "--trust evilpkg" in next(iter(rows["evil"]["refused"].values()))
    table = await cli(nats_server, "ls", env={"NO_COLOR": "1"})
    assert table.returncode == 0, table.stderr
    assert any(line.startswith("evil ") and " refused " in line for line in table.stdout.splitlines())
    assert sum(1 for line in table.stdout.splitlines()
               if line.startswith("  evil refused on ") and "--trust evilpkg" in line) == 2

    # Read again: a changed record, and a runtime started after the record was stored.
    await kv.put("evil", record("evil", "evilpkg.mod:main", concurrency=2))
    for proc in procs:
        await eventually(partial(refused_here, proc, "evil", times=2), message="the update refused")
    procs[0].stop()
    late = runtime_process(None, env=env)
    await late.wait_ready()
    assert refusals(late, "evil") and refusals(late, "shell")
    assert not marker.exists()


async def test_a_runtime_restarted_with_trust_serves_the_package(
        nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, tmp_path: Path,
        runtime_process: Callable[..., RuntimeProcess]) -> None:
    marker = tmp_path / "imported"
    env = {"PYTHONPATH": str(make_package(tmp_path / "project", "evilpkg", marker))}
    first = runtime_process(None, env=env)
    await first.wait_ready()
    await (await js.key_value("fn_manifests")).put("evil", record("evil", "evilpkg.mod:main"))
    await eventually(lambda: refusals(first, "evil"), message="the refusal")
    first.stop()
    assert not marker.exists()

    trusting = runtime_process(None, extra=["--trust", "evilpkg"], env=env)
    await trusting.wait_ready()

    async def answer() -> Any:   # ready may come a moment before the deployed manifest is applied
        data = json.loads((await nc.request("fn.call.evil", b"{}", timeout=10)).data)
        return None if data.get("error", {}).get("type") == "UnknownFunction" else data
    assert await eventually(answer, message="evil to be served") == {"imported": True}
    assert not refusals(trusting, "evil")
    assert "evilpkg" in marker.read_text().split()
    rows = {row["name"]: row for row in json.loads((await cli(nats_server, "ls", "--json")).stdout)}
    assert rows["evil"]["status"] == "serving" and rows["evil"]["refused"] == {}


async def test_serve_trusts_the_packages_of_its_own_manifests(
        nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, tmp_path: Path,
        manifest_dir: Callable[..., Path], runtime_process: Callable[..., RuntimeProcess]) -> None:
    project = tmp_path / "project"
    (project / "myapp").mkdir(parents=True)
    (project / "myapp" / "__init__.py").write_text("")
    (project / "myapp" / "handlers.py").write_text("def x(event):\n    return 'x'\n\ndef y(event):\n    return 'y'\n")
    make_package(project, "otherpkg", tmp_path / "imported")
    manifests = manifest_dir(x="name: x\nhandler: myapp.handlers:x\n")
    proc = runtime_process(manifests, env={"PYTHONPATH": str(project)})
    await proc.wait_ready()
    assert (await nc.request("fn.call.x", b"{}", timeout=10)).data == b'"x"'

    kv = await js.key_value("fn_manifests")
    await kv.put("y", record("y", "myapp.handlers:y"))          # the same package: trusted
    await kv.put("other", record("other", "otherpkg.mod:main"))  # another one: refused
    await eventually(lambda: refusals(proc, "other"), message="the refusal")
    assert "(functions, myapp)" in refusals(proc, "other")[0]
    assert (await nc.request("fn.call.y", b"{}", timeout=10)).data == b'"y"'
    assert not (tmp_path / "imported").exists()


async def test_an_in_process_runtime_trusts_functions_its_manifests_and_settings_trust(
        runtime: RuntimeFactory, js: JetStreamContext) -> None:
    rt = await runtime(greet=GREET)
    assert rt.state.trusted == ("functions", "tests")
    kv = await js.key_value("fn_manifests")
    # A served function whose record now names a module outside the prefixes stops being served.
    await kv.put("greet", record("greet", "json:dumps"))
    await eventually(lambda: "greet" in rt.refused, message="greet refused")
    assert "greet" not in rt.workers and "greet" in rt.manifests and "greet" not in rt.failing

    trusting = await runtime({"trust": ("json",)})
    assert trusting.state.trusted == ("functions", "json")
    await eventually(lambda: "greet" in trusting.workers, message="greet served where json is trusted")
    assert "greet" not in trusting.refused


# ------------------------------------------------------------------ runtime deploy


async def test_deploy_refuses_a_handler_outside_the_trusted_prefixes(
        nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> None:
    await provision_base(js)
    marker = tmp_path / "imported"
    project = make_package(tmp_path / "project", "deploypkg", marker)
    manifest = project / "f.yaml"
    manifest.write_text("name: f\nhandler: deploypkg.mod:main\n")

    refused = await cli(nats_server, "deploy", str(manifest), cwd=project)
    assert refused.returncode == 1
    assert refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith(f"runtime: error: {manifest}: function 'f': handler 'deploypkg.mod:main'")
    assert "--trust deploypkg" in lines[0] and "Traceback" not in refused.stderr
    registry = await Registry.open(js)
    with pytest.raises(KeyNotFoundError):
        await registry.kv.get("f")
    assert not marker.exists()

    # The packages being deployed are no reason to trust them, even with functions trusted too.
    assert (await cli(nats_server, "deploy", str(manifest), "--trust", "functions", cwd=project)).returncode == 1

    deployed = await cli(nats_server, "deploy", str(manifest), "--trust", "deploypkg", cwd=project)
    assert deployed.returncode == 0, deployed.stderr
    assert "function f: created" in deployed.stdout
    by_env = await cli(nats_server, "deploy", str(manifest), cwd=project, env={"RUNTIME_TRUST": "other,deploypkg"})
    assert by_env.returncode == 0, by_env.stderr
    assert "function f: unchanged" in by_env.stdout

    bad = await cli(nats_server, "deploy", str(manifest), "--trust", "deploy-pkg", cwd=project)
    assert bad.returncode == 1 and "'deploy-pkg' is not a module prefix" in bad.stderr


async def test_a_handler_reached_through_a_trusted_module_must_be_defined_in_one(
        runtime: RuntimeFactory, js: JetStreamContext) -> None:
    """``tests.handlers.core:os.system`` names a trusted module, but the callable is ``os.system``."""
    rt = await runtime(greet=GREET)
    kv = await js.key_value("fn_manifests")
    await kv.put("greet", record("greet", "tests.handlers.core:os.system"))
    await eventually(lambda: "greet" in rt.refused, message="greet refused")
    assert "greet" not in rt.workers
    assert f"is defined in {os.system.__module__}, outside the trusted module prefixes" in rt.refused["greet"]
    # A handler the trusted module defines is served again.
    await kv.put("greet", record("greet", "tests.handlers.core:greet"))
    await eventually(lambda: "greet" in rt.workers, message="greet served again")
    assert "greet" not in rt.refused
