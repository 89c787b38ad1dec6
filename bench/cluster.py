"""What replication costs: one server beside a three-node cluster with R1 and with R3 streams.

Three setups in the same run, taking turns within each repetition (the order rotates):
  single:      one nats-server (the embedded kind), streams with one replica;
  cluster_r1:  three nodes (tests/cluster.py: loopback, own stores, routes), `--replicas 1`;
  cluster_r3:  the same cluster, `--replicas 3`: every write is stored on a quorum before its ack.
Each measures, with a fresh set of the runtime's streams:
  publish:     pipelined acknowledged publishes of 64-byte invocations into FN (the prefill);
  drain:       `runtime serve --server <all nodes> --replicas N` working them off (a no-op function);
  invoke:      ``Client.invoke`` one call at a time, p50/p99 round trip.
Everything shares one 2-core machine, so the ratios to `single` are what to read. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from bench.common import PAYLOAD, drain_time, log, percentile, prefill, private_server, start_runtime
from runtime import Client
from runtime.loop import run
from runtime.manifest import FunctionManifest
from runtime.streams import ensure_consumer, provision_base
from tests.cluster import Cluster

MANIFEST = """\
name: noop
handler: bench.handlers:noop
concurrency: {concurrency}
timeout: 30s
"""
SETUPS = ("single", "cluster_r1", "cluster_r3")


async def fresh_streams(nc: NATS, replicas: int, concurrency: int) -> None:
    """Remove every stream, then provision the runtime's own with ``replicas``."""
    js = nc.jetstream(timeout=20)
    for info in await js.streams_info():
        await js.delete_stream(str(info.config.name))
    await provision_base(js, replicas=replicas)
    await ensure_consumer(js, FunctionManifest(name="noop", handler="bench.handlers:noop", concurrency=concurrency))


async def invoke_latency(url: str, count: int) -> list[float]:
    async with Client(url) as client:
        deadline = time.monotonic() + 30
        while True:   # until the runtime serves
            try:
                await client.invoke("noop", PAYLOAD, timeout=2)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            await client.invoke("noop", PAYLOAD, timeout=10)
            latencies.append((time.perf_counter() - started) * 1000)
        return latencies


async def one_setup(url: str, replicas: int, n: int, calls: int, concurrency: int, workdir: Path) -> dict[str, float]:
    manifests = workdir / "manifests"
    manifests.mkdir(exist_ok=True)
    (manifests / "noop.yaml").write_text(MANIFEST.format(concurrency=concurrency))
    nc = await nats.connect(servers=url.split(","))
    try:
        js = nc.jetstream(timeout=20)
        await fresh_streams(nc, replicas, concurrency)
        started = time.perf_counter()
        await prefill(js, "fn.invoke.noop", n, window=256)
        publish = n / (time.perf_counter() - started)
        proc = start_runtime(url, manifests, workdir / f"runtime-r{replicas}.log",
                             {"RUNTIME_REPLICAS": str(replicas)})
        try:
            drain = n / await drain_time(js, "FN", "noop", n)
            latencies = await invoke_latency(url, calls)
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
    finally:
        await nc.close()
    return {"publish_per_s": publish, "drain_per_s": drain,
            "invoke_p50_ms": percentile(latencies, 0.5), "invoke_p99_ms": percentile(latencies, 0.99)}


def summary(values: list[float], digits: int) -> dict[str, Any]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


async def main_bench(n: int, calls: int, reps: int, concurrency: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {s: [] for s in SETUPS}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        workdir = Path(tmp)
        single = private_server()
        await single.start()
        cluster = Cluster(workdir / "cluster")
        try:
            await cluster.start()
            runs: dict[str, Callable[[], Awaitable[dict[str, float]]]] = {
                "single": lambda: one_setup(single.url, 1, n, calls, concurrency, workdir),
                "cluster_r1": lambda: one_setup(cluster.url, 1, n, calls, concurrency, workdir),
                "cluster_r3": lambda: one_setup(cluster.url, 3, n, calls, concurrency, workdir),
            }
            for rep in range(reps):
                order = SETUPS[rep % 3:] + SETUPS[:rep % 3]
                for setup in order:
                    results[setup].append(await runs[setup]())
                log(f"rep {rep}: " + "; ".join(
                    f"{s} publish {results[s][-1]['publish_per_s']:.0f}/s drain {results[s][-1]['drain_per_s']:.0f}/s "
                    f"p50 {results[s][-1]['invoke_p50_ms']:.2f} ms" for s in SETUPS))
        finally:
            await cluster.stop()
            await single.stop()
    metrics = ("publish_per_s", "drain_per_s", "invoke_p50_ms", "invoke_p99_ms")
    figures = {s: {m: summary([r[m] for r in results[s]], 0 if m.endswith("per_s") else 2) for m in metrics}
               for s in SETUPS}
    ratios = {s: {m: round(figures[s][m]["median"] / figures["single"][m]["median"], 2) for m in metrics}
              for s in SETUPS if s != "single"}
    return {"bench": "cluster", "messages": n, "invoke_calls": calls, "reps": reps, "concurrency": concurrency,
            "payload_bytes": len(PAYLOAD), "storage": "file", "nodes": 3, "figures": figures,
            "ratio_to_single": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="invocations prefilled and drained per setup")
    parser.add_argument("--calls", type=int, default=300, help="invoke round trips per setup")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(run(main_bench(args.n, args.calls, args.reps, args.concurrency))))


if __name__ == "__main__":
    main()
