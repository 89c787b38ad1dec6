"""Accuracy of delayed calls: how late they start after their due time.

1,000 delayed calls, 10 due at each of 100 distinct whole seconds (the server's schedules have
second resolution), submitted with ``Client.submit(at=...)`` to one ``runtime serve`` process
whose function notes when it starts. The same shape is measured raw in the same run: nats-py
publishes ``Nats-Schedule: @at`` messages to a stream of its own and an ordered consumer notes
when each produced message arrives, the floor the server's scheduler sets; both run at once,
due at the same seconds. Lateness is start
(or arrival) minus due time. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from bench.common import log, percentile, private_server, start_runtime
from runtime.client import Client
from runtime.loop import run

MANIFEST = """\
name: stamp
handler: bench.handlers:stamp
concurrency: 64
timeout: 30s
"""
LEAD = 5.0   # seconds between the start of submitting and the first due time


def due_times(count: int, times: int) -> list[float]:
    first = int(time.time() + LEAD) + 1
    return [float(first + i % times) for i in range(count)]


def summary(lateness_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(lateness_ms, 0.5), 1), "p99_ms": round(percentile(lateness_ms, 0.99), 1),
            "max_ms": round(max(lateness_ms), 1), "early": sum(1 for x in lateness_ms if x < 0)}


async def raw_lateness(url: str, count: int, times: int) -> list[float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="RAW_SCHED", subjects=["raw.sched.>", "raw.due.>"],
                                     retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                                     allow_msg_schedules=True))
    arrived: dict[int, float] = {}
    done = asyncio.Event()

    async def on_due(msg: Msg) -> None:
        arrived[int(msg.subject.rsplit(".", 1)[1])] = time.time()
        if len(arrived) == count:
            done.set()

    await js.subscribe("raw.due.>", cb=on_due, ordered_consumer=True)
    due = due_times(count, times)
    for i, moment in enumerate(due):
        at = datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await js.publish(f"raw.sched.{i}", b"x", headers={"Nats-Schedule": f"@at {at}",
                                                          "Nats-Schedule-Target": f"raw.due.{i}"})
    await asyncio.wait_for(done.wait(), LEAD + times + 30)
    await js.delete_stream("RAW_SCHED")
    await nc.close()
    return [(arrived[i] - due[i]) * 1000 for i in range(count)]


async def runtime_lateness(url: str, count: int, times: int, workdir: Path) -> list[float]:
    manifests = workdir / "manifests"
    manifests.mkdir(exist_ok=True)
    (manifests / "stamp.yaml").write_text(MANIFEST)
    proc = start_runtime(url, manifests, workdir / "runtime.log")
    nc = await nats.connect(url)
    started: dict[int, float] = {}
    done = asyncio.Event()

    async def on_started(msg: Msg) -> None:
        data = json.loads(msg.data)
        started[data["id"]] = data["t"]
        if len(started) == count:
            done.set()

    try:
        await nc.subscribe("bench.started", cb=on_started)
        async with Client(nc) as fn:
            for _ in range(200):   # until the runtime serves
                try:
                    await fn.invoke("stamp", {"fn": "s", "id": -1, "args": [], "pad": ""}, timeout=0.5)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            started.clear()
            due = due_times(count, times)
            for chunk in range(0, count, 100):
                await asyncio.gather(*(fn.submit("stamp", {"fn": "s", "id": i, "args": [], "pad": ""},
                                                 at=datetime.fromtimestamp(due[i], UTC))
                                       for i in range(chunk, min(chunk + 100, count))))
            await asyncio.wait_for(done.wait(), LEAD + times + 30)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        await nc.close()
    return [(started[i] - due[i]) * 1000 for i in range(count)]


async def main_bench(count: int, times: int, reps: int) -> dict[str, object]:
    server = private_server()
    await server.start()
    raw: list[dict[str, float]] = []
    ours: list[dict[str, float]] = []
    try:
        for rep in range(reps):
            with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
                # Side by side, due at the same seconds: the raw floor under the same load.
                raw_ms, ours_ms = await asyncio.gather(raw_lateness(server.url, count, times),
                                                       runtime_lateness(server.url, count, times, Path(tmp)))
                raw.append(summary(raw_ms))
                ours.append(summary(ours_ms))
            log(f"rep {rep}: raw {raw[-1]}, runtime {ours[-1]}")
    finally:
        await server.stop()

    def median(runs: list[dict[str, float]], key: str) -> float:
        return sorted(r[key] for r in runs)[len(runs) // 2]

    return {
        "bench": "delay", "calls": count, "distinct_times": times, "reps": reps,
        "runtime": {k: median(ours, k) for k in ("p50_ms", "p99_ms", "max_ms", "early")},
        "raw_schedules": {k: median(raw, k) for k in ("p50_ms", "p99_ms", "max_ms", "early")},
        "all_runtime_p99_ms": [r["p99_ms"] for r in ours], "all_raw_p99_ms": [r["p99_ms"] for r in raw],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--times", type=int, default=100, help="distinct due seconds")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(run(main_bench(args.n, args.times, args.reps))))


if __name__ == "__main__":
    main()
