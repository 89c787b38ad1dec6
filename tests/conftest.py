"""Fixtures: a real nats-server per test, in-process runtimes, and runtime subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime.app import Runtime
from runtime.fastpub import pings_in_order
from runtime.manifest import ManifestSet
from runtime.server import EmbeddedServer, free_port
from runtime.settings import Settings

from .authservers import (  # noqa: F401 (fixtures: secured servers and certificates)
    certificates,
    mtls_server,
    nkey_server,
    operator_server,
    password_server,
    tls_server,
    token_server,
)
from .cluster import cluster  # noqa: F401 (fixture: a three-node JetStream cluster)

ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def configured_server(tmp_path: Path, conf: str) -> AsyncIterator[EmbeddedServer]:
    """A fresh nats-server like ``nats_server``, started with the configuration text ``conf``."""
    path = tmp_path / "nats.conf"
    path.write_text(conf)
    async with EmbeddedServer(tmp_path / "nats", port=free_port(), config=path).discarded() as server:
        yield server


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    """A fresh nats-server with JetStream on a free loopback port and a temporary store."""
    async with EmbeddedServer(tmp_path / "nats", port=free_port()).discarded() as server:
        yield server


@pytest.fixture
async def nc(nats_server: EmbeddedServer) -> AsyncIterator[NATS]:
    """A plain nats-py connection: what any client outside the project would use. Its ``flush()``
    waits for what was sent before it, as the runtime's connections do (``pings_in_order``), so
    that a test subscribing on it, then flushing, has the subscription in place."""
    conn = await nats.connect(nats_server.url)
    pings_in_order(conn)
    yield conn
    await conn.close()


@pytest.fixture
def js(nc: NATS) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write manifests (YAML text per name) into a fresh directory; returns the directory."""
    counter = iter(range(1000))

    def write(**manifests: str) -> Path:
        directory = tmp_path / f"manifests{next(counter)}"
        directory.mkdir()
        for name, text in manifests.items():
            (directory / f"{name}.yaml").write_text(textwrap.dedent(text))
        return directory

    return write


RuntimeFactory = Callable[..., Any]


@pytest.fixture
async def runtime(nats_server: EmbeddedServer, manifest_dir: Callable[..., Path],
                  tmp_path: Path) -> AsyncIterator[RuntimeFactory]:
    """Start in-process runtimes: ``await runtime(hello=YAML, ..., **settings)``."""
    started: list[Runtime] = []

    async def start(settings: dict[str, Any] | None = None, **manifests: str) -> Runtime:
        directory = manifest_dir(**manifests)
        ManifestSet.load([directory])  # fail fast with the manifest error
        values = {"project_root": ROOT, "data_dir": tmp_path / "rt", "grace": 5.0, "manifests": (directory,)}
        values.update(settings or {})
        rt = Runtime(Settings(**values), nats_server.url)
        await rt.start()
        started.append(rt)
        return rt

    yield start
    for rt in reversed(started):
        with contextlib.suppress(Exception):
            await rt.stop()


class RuntimeProcess:
    """``runtime serve`` in a child process; stopped by its PID only."""

    def __init__(self, url: str | None, manifests: Path | None, log: Path, extra: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "runtime", "serve", "--log-level", "INFO"]
        if url:
            cmd += ["--server", url]
        if manifests is not None:
            cmd += ["--manifests", str(manifests)]
        cmd += extra or []
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("NATS_URL", None)
        self.log = log
        self._logf = open(log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self._logf, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_ready(self, timeout: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if "runtime ready" in self.output():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"runtime exited with {self.proc.returncode}:\n{self.output()}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"runtime not ready after {timeout}s:\n{self.output()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        code = await asyncio.to_thread(self.proc.wait, timeout)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()


@pytest.fixture
def runtime_process(nats_server: EmbeddedServer, tmp_path: Path) -> Iterator[Callable[..., RuntimeProcess]]:
    """Start ``runtime serve --server <test server>`` subprocesses."""
    procs: list[RuntimeProcess] = []

    def start(manifests: Path | None = None, extra: list[str] | None = None,
              env: dict[str, str] | None = None, url: str | None = "") -> RuntimeProcess:
        log = tmp_path / f"runtime-{len(procs)}.log"
        proc = RuntimeProcess(nats_server.url if url == "" else url, manifests, log, extra, env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory shared with handlers (they find it in the RUNTIME_TEST_DIR environment variable)."""
    with tempfile.TemporaryDirectory(prefix="rt-test-") as d:
        old = os.environ.get("RUNTIME_TEST_DIR")
        os.environ["RUNTIME_TEST_DIR"] = d
        yield Path(d)
        if old is None:
            os.environ.pop("RUNTIME_TEST_DIR", None)
        else:
            os.environ["RUNTIME_TEST_DIR"] = old


async def collect(nc: NATS, subject: str) -> tuple[list[Any], Any]:
    """Subscribe to ``subject``; returns the list that fills with messages and the subscription."""
    received: list[Any] = []

    async def on_msg(msg: Any) -> None:
        received.append(msg)

    sub = await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return received, sub


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
                     message: str = "condition") -> Any:
    """Await until ``predicate()`` is truthy (sync or async), or fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


async def the_dead_letter(nc: NATS, js: JetStreamContext, function: str, timeout: float = 10.0) -> Any:
    """The dead letter of ``function``, read whole, once it has exactly one."""
    from runtime import dlq

    letters: list[Any] = []

    async def one() -> bool:
        letters[:] = (await dlq.list_dead_letters(nc, js, function)).letters
        return len(letters) == 1
    await eventually(one, timeout=timeout, message=f"one dead letter of {function}")
    return await dlq.get_dead_letter(js, letters[0].seq)
