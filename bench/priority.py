"""Priority under load, and its cost: one runtime, 20,000 level-1 invocations queued, then 2,000 at level 10.

Each repetition runs two drains through one ``runtime serve`` process with a no-op function that
notes when each invocation started (in memory, written out when the runtime exits):
  single: 22,000 invocations on the plain subject (one level), the shape of ``bench.throughput``;
  mixed: 20,000 at level 1, and once the runtime is busy with them, 2,000 at level 10.
Reports the rate of each (invocations / time from first to last start) and their ratio, and for
the mixed run how many level-1 invocations started after the first level-10 one was queued and
before the last level-10 one started (up to ``concurrency`` of them may have been fetched before
it was queued), how many started between the first and the last level-10 start (0 is strict
priority), and how long the level-10 batch took from queued to its last start. Prints one JSON line.
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

from bench.common import PAYLOAD, ROOT, log, prefill, private_server
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
    queued_at = 0.0
    try:
        if high:
            # Once the runtime is busy with level-1 work, queue the urgent batch.
            while (await js.stream_info("FN")).state.messages > low - 2000:
                await asyncio.sleep(0.005)
            await js.publish("fn.invoke.leveled.10", PAYLOAD)
            queued_at = time.time()
            await prefill(js, "fn.invoke.leveled.10", high - 1)
        deadline = time.monotonic() + 120
        while (await js.stream_info("FN")).state.messages and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60)
        await nc.close()
    starts = json.loads(starts_file.read_text())
    assert len(starts) == total, f"{len(starts)} of {total} ran"
    times = [t for t, _ in starts]
    out = {"rate": total / (max(times) - min(times))}
    if high:
        urgent = [t for t, is_high in starts if is_high]
        out["low_started_while_high_queued"] = sum(1 for t, is_high in starts
                                                   if not is_high and queued_at <= t <= max(urgent))
        # Started between the first and the last level-10 start: overtaking, not work already fetched.
        out["low_started_between_high"] = sum(1 for t, is_high in starts
                                              if not is_high and min(urgent) <= t <= max(urgent))
        out["high_wait_ms"] = (max(urgent) - queued_at) * 1000
    return out


async def main_bench(reps: int, concurrency: int, low: int, high: int) -> dict[str, object]:
    server = private_server()
    await server.start()
    runs: dict[str, list[float]] = {"single_rate": [], "mixed_rate": [], "low_started_while_high_queued": [],
                                    "low_started_between_high": [], "high_wait_ms": []}
    try:
        for rep in range(reps):
            with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
                single = await drain(server.url, Path(tmp), concurrency, low + high, 0, "single")
                mixed = await drain(server.url, Path(tmp), concurrency, low, high, "mixed")
            runs["single_rate"].append(single["rate"])
            runs["mixed_rate"].append(mixed["rate"])
            runs["low_started_while_high_queued"].append(mixed["low_started_while_high_queued"])
            runs["low_started_between_high"].append(mixed["low_started_between_high"])
            runs["high_wait_ms"].append(mixed["high_wait_ms"])
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
