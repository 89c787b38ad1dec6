"""One event to three functions: event and function-run rates through one runtime process,
beside the single-function rate of bench/throughput.py measured in the same run.

Each repetition, on one private file-storage server:
  single: bench/throughput.py's runtime figure: 10,000 pre-filled 64-byte JSON invocations of one
          no-op function on ``fn.invoke.noop``, drained by a fresh `runtime serve`;
  fanout: 10,000 pre-filled 64-byte JSON events on ``bench.fanout.created``, captured by FN_TRIGGERS,
          with three no-op functions triggered by it (each on its own consumer, each with the same
          concurrency as the single function), drained by a fresh `runtime serve`: 30,000 runs.
The order of the two alternates between repetitions (the second of a pair finds a warmer server).
Times are seen from the server: from the first delivery to the last acknowledgement (10 ms polling).
Prints one JSON line: medians, every repetition, and the spread (min to max) of each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import nats
from nats.js import JetStreamContext

from bench.common import PAYLOAD, log, prefill, private_server, rss_peak_kb, start_runtime
from bench.throughput import runtime_rate
from runtime.loop import run
from runtime.manifest import FunctionManifest, load_manifest
from runtime.streams import provision_base
from runtime.triggers import TRIGGERS_STREAM, bind, consumer_name

SUBJECT = "bench.fanout.created"
FUNCTIONS = ("fan-a", "fan-b", "fan-c")

MANIFEST = """\
name: {name}
handler: bench.handlers:noop
concurrency: {concurrency}
timeout: 30s
store_results: {store}
triggers:
  - subject: bench.fanout.>
    name: created
"""


def write_manifests(directory: Path, concurrency: int, store: str) -> list[FunctionManifest]:
    directory.mkdir(exist_ok=True)
    manifests = []
    for name in FUNCTIONS:
        path = directory / f"{name}.yaml"
        path.write_text(MANIFEST.format(name=name, concurrency=concurrency, store=store))
        manifest = load_manifest(path)
        assert isinstance(manifest, FunctionManifest)
        manifests.append(manifest)
    return manifests


async def fanout_time(js: JetStreamContext, consumers: list[str], n: int, deadline: float = 180.0) -> float:
    """Seconds from the first delivery to any consumer of the last ``n`` events of FN_TRIGGERS to the
    moment every consumer has acknowledged all of them, seen from the server (10 ms polling)."""
    last = (await js.stream_info(TRIGGERS_STREAM)).state.last_seq
    first = last - n + 1
    started = None
    limit = time.monotonic() + deadline
    while time.monotonic() < limit:
        infos = await asyncio.gather(*(js.consumer_info(TRIGGERS_STREAM, c) for c in consumers))
        now = time.perf_counter()
        if started is None and any(i.delivered.stream_seq >= first for i in infos):
            started = now
        if all(i.ack_floor.stream_seq >= last and i.num_ack_pending == 0 for i in infos):
            if started is None or now - started < 0.05:
                raise RuntimeError("the run finished before polling saw it start: increase -n")
            return now - started
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{', '.join(consumers)} did not finish {n} events in {deadline}s")


async def fanout_rate(url: str, n: int, concurrency: int, store: str, workdir: Path) -> tuple[float, int]:
    """Events per second through one runtime serving three functions triggered by every event; its peak RSS."""
    manifests = write_manifests(workdir / "manifests-fanout", concurrency, store)
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await provision_base(js)
        # The trigger consumers exist before the events do (a new trigger starts with the events
        # published from then on), as after a `runtime deploy`.
        consumers = [b.consumer for m in manifests for b in await bind(js, m)]
        assert consumers == [consumer_name(name, "created") for name in FUNCTIONS]
        await prefill(js, SUBJECT, n)
        stored = (await js.stream_info(TRIGGERS_STREAM)).state.messages
        assert stored == n, f"FN_TRIGGERS holds {stored} events, not {n}"
        proc = start_runtime(url, workdir / "manifests-fanout", workdir / "runtime-fanout.log")
        try:
            seconds = await fanout_time(js, consumers, n)
            rss = rss_peak_kb(proc.pid)
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
        left = (await js.stream_info(TRIGGERS_STREAM)).state.messages
        assert left == 0, f"{left} events still in FN_TRIGGERS after every function settled them"
    finally:
        await nc.close()
    return n / seconds, rss


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max, and (max - min) / median."""
    ordered = sorted(values)
    med = ordered[len(ordered) // 2]
    return {"median": round(med), "min": round(ordered[0]), "max": round(ordered[-1]),
            "spread": round((ordered[-1] - ordered[0]) / med, 3)}


async def main_bench(n: int, reps: int, concurrency: int, store: str) -> dict[str, object]:
    server = private_server()
    await server.start()
    single: list[float] = []
    events: list[float] = []
    rss: list[int] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            workdir = Path(tmp)
            for rep in range(reps):
                for which in ("single", "fanout") if rep % 2 == 0 else ("fanout", "single"):
                    if which == "single":
                        single.append((await runtime_rate(server.url, n, concurrency, store, workdir))[0])
                    else:
                        rate, peak = await fanout_rate(server.url, n, concurrency, store, workdir)
                        events.append(rate)
                        rss.append(peak)
                log(f"rep {rep}: single={single[-1]:.0f}/s fanout events={events[-1]:.0f}/s "
                    f"runs={events[-1] * len(FUNCTIONS):.0f}/s")
    finally:
        await server.stop()
    runs = [e * len(FUNCTIONS) for e in events]
    ratios = [r / s for r, s in zip(runs, single, strict=True)]   # same repetition, same server
    med_single = sorted(single)[len(single) // 2]
    med_runs = sorted(runs)[len(runs) // 2]
    return {
        "bench": "fanout", "events": n, "functions": len(FUNCTIONS), "reps": reps,
        "payload_bytes": len(PAYLOAD), "storage": "file", "concurrency_per_function": concurrency,
        "store_results": store,
        "events_per_s": spread(events),
        "runs_per_s": spread(runs),
        "single_function_runs_per_s": spread(single),
        "ratio_runs_vs_single": round(med_runs / med_single, 2),
        "ratio_per_rep": [round(r, 2) for r in ratios],
        "all_rates": {"events": [round(x) for x in events], "runs": [round(x) for x in runs],
                      "single": [round(x) for x in single]},
        "runtime_peak_rss_kb": max(rss),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10_000, help="events (and invocations of the single function)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=512, help="of each function")
    ap.add_argument("--store-results", choices=("auto", "always", "never"), default="auto",
                    help="every function's store_results, the single one's too (default: auto, the manifest default)")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    print(json.dumps(run(main_bench(args.n, args.reps, args.concurrency, args.store_results))))


if __name__ == "__main__":
    main()
