"""Shared pieces of the benchmarks: a private server, prefill, runtime subprocesses, polling."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from runtime.server import EmbeddedServer, free_port

ROOT = Path(__file__).resolve().parent.parent
PROFILERS: list[subprocess.Popen[bytes]] = []   # py-spy samplers started with $BENCH_PROFILE set
PAYLOAD = json.dumps({"fn": "noop", "id": 0, "args": [1, 2, 3], "pad": "x" * 11}).encode()
assert len(PAYLOAD) == 64


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def private_server() -> EmbeddedServer:
    return EmbeddedServer(tempfile.mkdtemp(prefix="bench-nats-"), port=free_port())


async def prefill(js: JetStreamContext, subject: str, n: int, window: int = 1000, ids: bool = False) -> None:
    """``n`` invocations of ``PAYLOAD``; ``ids``: each with its own ``Nats-Msg-Id``, as a client sends them."""
    tag = os.urandom(6).hex()

    def headers(i: int) -> dict[str, str] | None:
        return {"Nats-Msg-Id": f"bench-{tag}-{i}"} if ids else None

    for start in range(0, n, window):
        await asyncio.gather(*(js.publish(subject, PAYLOAD, headers=headers(i))
                               for i in range(start, min(start + window, n))))


def rss_peak_kb(pid: int) -> int:
    """Peak resident memory (VmHWM), in kB."""
    return _status_kb(pid, "VmHWM:")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time each of ``pids`` (name -> pid) spends from :meth:`start`, per call, in µs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def per_call(self, calls: int) -> dict[str, float]:
        return {name: (cpu_seconds(pid) - self._before[name]) * 1e6 / calls for name, pid in self.pids.items()}


def rss_kb(pid: int) -> int:
    """Resident memory now (VmRSS), in kB."""
    return _status_kb(pid, "VmRSS:")


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of one run's repetitions."""
    ordered = sorted(values)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1]}


Wrap = Callable[[list[str]], list[str]]
"""What runs a worker's command line instead of itself (``bench.instructions``: under callgrind)."""


def start_runtime(url: str, manifests: Path, log_path: Path, env_extra: dict[str, str] | None = None,
                  wrap: Wrap | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    argv = [sys.executable, "-m", "runtime", "serve", "--server", url, "--manifests", str(manifests),
            "--log-level", "WARNING"]
    if wrap is not None:
        argv = wrap(argv)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    profile_dir = os.environ.get("BENCH_PROFILE")
    if profile_dir:
        # Sampled by py-spy until it exits (collapsed stacks, one file per runtime process).
        spy = Path(sys.executable).with_name("py-spy")
        out_file = Path(profile_dir) / f"runtime-{proc.pid}.txt"
        PROFILERS.append(subprocess.Popen([str(spy), "record", "--format", "raw", "--rate", "250", "--nonblocking",
                                           "-o", str(out_file), "--pid", str(proc.pid)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return proc


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


async def drain_rate(js: JetStreamContext, stream: str, consumer: str, n: int, low: float = 0.2, high: float = 0.9,
                     deadline: float = 180.0, meter: CpuMeter | None = None) -> float:
    """Acks per second while the acked share of the last ``n`` messages went from ``low`` to ``high``,
    seen from the server (10 ms polling): start-up and the tail do not count. ``meter`` is started
    at ``low``; read it for the ``(high - low) * n`` messages in between."""
    marks: dict[float, float] = {}
    limit = time.monotonic() + deadline
    while time.monotonic() < limit:
        info = await js.consumer_info(stream, consumer)
        now = time.perf_counter()
        done = n - info.num_pending - info.num_ack_pending
        for share in (low, high):
            if share not in marks and done >= share * n:
                marks[share] = now
                if share == low and meter is not None:
                    meter.start()
        if high in marks:
            if low not in marks or marks[high] - marks[low] < 0.05:
                raise RuntimeError("the drain went by faster than polling can time it: increase -n")
            return (high - low) * n / (marks[high] - marks[low])
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{consumer} did not finish {n} messages in {deadline}s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
