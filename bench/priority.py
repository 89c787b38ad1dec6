"""Priority under load, and its cost: one runtime, 20,000 level-1 invocations queued, then 2,000 at level 10.

Each repetition runs two drains through one ``runtime serve`` process with a no-op function that
notes when each invocation started (in memory, written out when the runtime exits):
  single: 22,000 invocations on the plain subject (one level), the shape of ``bench.throughput``;
  mixed: 20,000 at level 1, and once the runtime is busy with them, 2,000 at level 10.
Reports the rate of each (invocations / time from first to last start) and their ratio, and for
the mixed run: how long each level-10 invocation waited from its publish acknowledgement to its
start (p50, p99), how many level-1 invocations started after the first level-10 one was queued
and before the last one started (the level-10 ones are published over a while, and the runtime
drains them as fast as they come), and how many level-1 invocations started at a moment when some level-10 one was
stored and not yet started (0 is strict priority; a level-1 batch fetched just before a level-10
one arrived and started just after it counts too). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

from bench.common import PAYLOAD, ROOT, log, percentile, prefill, private_server
from runtime.loop import run
from runtime.manifest import FunctionManifest
from runtime.streams import ensure_consumer, provision_base

MANIFEST = """\
name: leveled
handler: bench.handlers:leveled
concurrency: {concurrency}
timeout: 30s
"""


def start(url: str, manifests: Path, starts: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BENCH_STARTS": str(starts)}
    with open(log_path, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--server", url, "--manifests",
                                 str(manifests), "--log-level", "WARNING"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


async def drain(url: str, workdir: Path, concurrency: int, low: int, high: int, tag: str) -> dict[str, float]:
    manifests = workdir / "manifests"
    manifests.mkdir(exist_ok=True)
    (manifests / "leveled.yaml").write_text(MANIFEST.format(concurrency=concurrency))
    nc = await nats.connect(url)
    js = nc.jetstream()
    await provision_base(js)
    await ensure_consumer(js, FunctionManifest(name="leveled", handler="bench.handlers:leveled",
                                               concurrency=concurrency))
    total = low + high
    await prefill(js, "fn.invoke.leveled" if not high else "fn.invoke.leveled.1", low if high else total)
    starts_file = workdir / f"starts-{tag}.json"
    proc = start(url, manifests, starts_file, workdir / f"runtime-{tag}.log")
    acked: dict[int, float] = {}

    async def urgent(i: int) -> None:
        await js.publish("fn.invoke.leveled.10", b'{"i":%d}' % i)
        acked[i] = time.time()

    try:
        if high:
            # Once the runtime is busy with level-1 work, queue the urgent ones as fast as possible.
            while (await js.stream_info("FN")).state.messages > low - 2000:
                await asyncio.sleep(0.005)
            for first in range(0, high, 500):
                await asyncio.gather(*(urgent(i) for i in range(first, min(first + 500, high))))
        deadline = time.monotonic() + 120
        while (await js.stream_info("FN")).state.messages and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60)
        await nc.close()
    starts = json.loads(starts_file.read_text())
    assert len(starts) == total, f"{len(starts)} of {total} ran"
    times = [t for t, _, _ in starts]
    out = {"rate": total / (max(times) - min(times))}
    if high:
        started = {i: t for t, is_high, i in starts if is_high}
        waits = [(started[i] - acked[i]) * 1000 for i in acked]
        out["high_wait_p50_ms"] = percentile(waits, 0.5)
        out["high_wait_p99_ms"] = percentile(waits, 0.99)
        first_queued, last_started = min(acked.values()), max(started.values())
        out["low_started_after_first_high_queued"] = sum(1 for t, is_high, _ in starts
                                                         if not is_high and first_queued < t < last_started)
        out["low_started_while_high_waited"] = overtaken(
            [t for t, is_high, _ in starts if not is_high], [(acked[i], started[i]) for i in acked])
    return out


def overtaken(low_starts: list[float], high: list[tuple[float, float]]) -> int:
    """Level-1 starts at a moment some level-10 invocation was stored (acknowledged) and not yet started."""
    high.sort()
    count = j = 0
    latest_start = float("-inf")
    for t in sorted(low_starts):
        while j < len(high) and high[j][0] < t:
            latest_start = max(latest_start, high[j][1])
            j += 1
        count += latest_start > t
    return count


async def main_bench(reps: int, concurrency: int, low: int, high: int) -> dict[str, object]:
    server = private_server()
    await server.start()
    keys = ("single_rate", "mixed_rate", "low_started_while_high_waited", "low_started_after_first_high_queued",
            "high_wait_p50_ms", "high_wait_p99_ms")
    runs: dict[str, list[float]] = {key: [] for key in keys}
    try:
        for rep in range(reps):
            with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
                single = await drain(server.url, Path(tmp), concurrency, low + high, 0, "single")
                mixed = await drain(server.url, Path(tmp), concurrency, low, high, "mixed")
            runs["single_rate"].append(single["rate"])
            runs["mixed_rate"].append(mixed["rate"])
            for key in ("low_started_while_high_waited", "low_started_after_first_high_queued",
                        "high_wait_p50_ms", "high_wait_p99_ms"):
                runs[key].append(mixed[key])
            log(f"rep {rep}: " + ", ".join(f"{k}={v[-1]:.1f}" for k, v in runs.items()))
    finally:
        await server.stop()
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    return {
        "bench": "priority", "reps": reps, "concurrency": concurrency, "low": low, "high": high,
        "payload_bytes": len(PAYLOAD),
        "median": {k: round(v, 1) for k, v in med.items()},
        "all": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "mixed_vs_single": round(med["mixed_rate"] / med["single_rate"], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=512)
    ap.add_argument("--low", type=int, default=20_000)
    ap.add_argument("--high", type=int, default=2_000)
    args = ap.parse_args()
    print(json.dumps(run(main_bench(args.reps, args.concurrency, args.low, args.high))))


if __name__ == "__main__":
    main()
