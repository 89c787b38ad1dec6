"""Lateness of cron tick publication: two runtimes, a per-second schedule, a busy function.

Two ``runtime serve`` processes share a private nats-server. A publisher keeps a no-op function
busy with ``--rate`` invocations per second while a schedule (``* * * * * *``, six fields) fires
on the same function. A core subscription to ``fn.invoke.<function>`` sees every publish; the
lateness of a tick is the arrival of its first copy minus its ``Fn-Scheduled-At``. The first two
ticks once the load runs are warm-up. Prints one JSON line.

``publishes_per_tick_before_dedup`` counts the publishes of each tick seen on the subject: every
runtime publishes every tick (so it is about ``--runtimes``), and the FN stream's duplicate window
stores one of them, so the function still runs once per tick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg

from bench.common import PAYLOAD, log, percentile, private_server, start_runtime
from runtime.crontab import parse_tick
from runtime.loop import run

FUNCTION = "cron-bench"
SCHEDULE = "cron-bench-tick"
WARMUP = 2


def manifest() -> str:
    payload = json.loads(PAYLOAD)
    return (f"name: {FUNCTION}\nhandler: bench.handlers:noop\nconcurrency: 64\nstore_results: false\n"
            f"schedules:\n  - name: {SCHEDULE}\n    cron: '* * * * * *'\n    catchup: none\n"
            f"    payload: {json.dumps(payload)}\n")


async def load(js: Any, rate: int, stop: asyncio.Event) -> int:
    """Publish ``rate`` invocations per second, in 10 ms slices paced by the clock."""
    sent, started = 0, time.monotonic()
    subject = f"fn.invoke.{FUNCTION}"
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate)
        if due > sent:
            await asyncio.gather(*(js.publish(subject, PAYLOAD) for _ in range(due - sent)))
            sent = due
        await asyncio.sleep(0.01)
    return sent


async def bench(ticks: int, rate: int, runtimes: int) -> dict[str, Any]:
    server = private_server()
    work = Path(tempfile.mkdtemp(prefix="bench-cron-"))
    (work / "manifests").mkdir()
    (work / "manifests" / f"{FUNCTION}.yaml").write_text(manifest())
    procs = []
    async with server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        first_seen: dict[str, float] = {}
        copies: Counter[str] = Counter()

        async def on_publish(msg: Msg) -> None:
            stamp = (msg.headers or {}).get("Fn-Scheduled-At")
            if stamp:
                copies[stamp] += 1
                first_seen.setdefault(stamp, time.time())

        await nc.subscribe(f"fn.invoke.{FUNCTION}", cb=on_publish)
        try:
            procs = [start_runtime(server.url, work / "manifests", work / f"runtime-{i}.log") for i in range(runtimes)]
            # Ready when every runtime's scheduler publishes: a tick arrives once per runtime.
            deadline = time.monotonic() + 60
            while not any(n >= runtimes for n in copies.values()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the runtimes did not all publish ticks; see {work}")
                await asyncio.sleep(0.1)
            stop = asyncio.Event()
            publisher = asyncio.create_task(load(js, rate, stop))
            began = time.monotonic()
            start = time.time() + 1
            log(f"measuring {ticks} ticks with {runtimes} runtimes and {rate} invocations/s of load")
            while len(measured := [s for s in sorted(first_seen) if parse_tick(s).timestamp() > start]) \
                    < ticks + WARMUP:
                if publisher.done():
                    publisher.result()
                await asyncio.sleep(0.2)
            stop.set()
            sent = await publisher
            elapsed = time.monotonic() - began
            info = await js.consumer_info("FN", FUNCTION)
        finally:
            await nc.close()
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
    measured = measured[WARMUP:WARMUP + ticks]
    lateness = [(first_seen[s] - parse_tick(s).timestamp()) * 1000 for s in measured]
    return {
        "bench": "cron",
        "ticks": len(measured),
        "runtimes": runtimes,
        "load_per_s": round(sent / elapsed),
        "load_delivered": info.delivered.stream_seq,
        "publishes_per_tick_before_dedup": round(sum(copies[s] for s in measured) / len(measured), 2),
        "lateness_ms": {"p50": round(percentile(lateness, 0.5), 2), "p99": round(percentile(lateness, 0.99), 2),
                        "max": round(max(lateness), 2), "min": round(min(lateness), 2)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=60, help="ticks measured after warm-up (default 60)")
    parser.add_argument("--rate", type=int, default=1000, help="background invocations per second (default 1000)")
    parser.add_argument("--runtimes", type=int, default=2, help="runtime processes (default 2)")
    args = parser.parse_args()
    print(json.dumps(run(bench(args.ticks, args.rate, args.runtimes))), flush=True)


if __name__ == "__main__":
    main()
