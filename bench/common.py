"""Shared pieces of the benchmarks: a private server, prefill, runtime subprocesses, polling."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from runtime.server import EmbeddedServer, free_port

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = json.dumps({"fn": "noop", "id": 0, "args": [1, 2, 3], "pad": "x" * 11}).encode()
assert len(PAYLOAD) == 64


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def private_server() -> EmbeddedServer:
    return EmbeddedServer(tempfile.mkdtemp(prefix="bench-nats-"), port=free_port())


async def prefill(js: JetStreamContext, subject: str, n: int, window: int = 1000) -> None:
    for start in range(0, n, window):
        await asyncio.gather(*(js.publish(subject, PAYLOAD) for _ in range(min(window, n - start))))


def rss_peak_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def start_runtime(url: str, manifests: Path, log_path: Path,
                  env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    with open(log_path, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--server", url, "--manifests",
                                 str(manifests), "--log-level", "WARNING"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


async def drain_time(js: JetStreamContext, stream: str, consumer: str, n: int, deadline: float = 120.0) -> float:
    """Seconds from the first delivery of the last ``n`` messages of ``stream`` to the last ack,
    seen from the server (10 ms polling)."""
    last = (await js.stream_info(stream)).state.last_seq
    first = last - n + 1
    started = None
    limit = time.monotonic() + deadline
    while time.monotonic() < limit:
        info = await js.consumer_info(stream, consumer)
        now = time.perf_counter()
        if started is None and info.delivered.stream_seq >= first:
            started = now
        if info.ack_floor.stream_seq >= last and info.num_ack_pending == 0:
            if started is None or now - started < 0.05:
                raise RuntimeError("the run finished before polling saw it start: increase -n")
            return now - started
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{consumer} did not finish {n} messages in {deadline}s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
