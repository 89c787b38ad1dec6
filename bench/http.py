"""Synchronous calls over HTTP: ``POST /function/hello`` beside ``Client.invoke``, at the same concurrency.

One ``runtime serve --server URL --http HOST:PORT`` process serves ``functions.hello`` (pydantic in
and out, results stored) on a private nats-server; this process calls it with ``concurrency``
callers at a time, through the HTTP gateway or with ``Client.invoke`` on its own NATS connection.

Contenders: ``http`` posts with a lean keep-alive HTTP client (``bench.httpload``: a load
generator in the manner of wrk, a connection per caller), ``http_aiohttp`` with an aiohttp
session (a connection per caller), ``invoke`` with ``Client.invoke``. All share two cores with
the runtime and nats-server, so what the callers spend per call is taken from the system under
test: aiohttp's client costs about twice what nats-py's does, which is why both HTTP figures
are given. Each rep runs every contender (rotating which goes first) for ``-n`` calls; calls/s
and p50/p99 latency are their medians over the reps, with the spread (max - min) of calls/s,
and the CPU time each process (the runtime, nats-server, and this one: the load generator)
spent per call, read from /proc. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import ROOT, CpuMeter, log, percentile, private_server
from bench.httpload import LoadClient
from runtime import Client
from runtime.loop import run
from runtime.server import free_port

MANIFEST = "name: hello\nhandler: functions.hello:main\nconcurrency: 256\n"
BODY = json.dumps({"name": "bench"}).encode()

Call = Callable[[], Awaitable[Any]]


async def measure(call: Call, n: int, concurrency: int, pids: dict[str, int] | None = None
                  ) -> tuple[float, list[float], dict[str, float]]:
    """Calls per second and every call's latency (ms) for ``n`` calls, ``concurrency`` at a time,
    and the CPU time (µs per call) each process of ``pids`` spent meanwhile."""
    meter = CpuMeter(pids or {})
    meter.start()
    remaining = n
    latencies: list[float] = []
    clock = time.perf_counter

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = clock()
            await call()
            latencies.append((clock() - started) * 1000)

    started = clock()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    rate = n / (clock() - started)
    return rate, latencies, meter.per_call(n)


async def wait_serving(call: Call, proc: subprocess.Popen[bytes], logfile: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            await call()
            return
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the runtime did not serve: {logfile.read_text()}") from None
            await asyncio.sleep(0.1)


async def main_bench(args: argparse.Namespace) -> dict[str, Any]:
    server = private_server()
    await server.start()
    names = ("http", "http_aiohttp", "invoke")
    rates: dict[str, list[float]] = {k: [] for k in names}
    p50s: dict[str, list[float]] = {k: [] for k in names}
    p99s: dict[str, list[float]] = {k: [] for k in names}
    cpus: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    address = f"127.0.0.1:{free_port()}"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
            manifests = Path(tmp) / "manifests"
            manifests.mkdir()
            (manifests / "hello.yaml").write_text(MANIFEST)
            logfile = Path(tmp) / "runtime.log"
            with open(logfile, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--server", server.url,
                                         "--manifests", str(manifests), "--http", address, "--log-level", "WARNING"],
                                        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            connector = aiohttp.TCPConnector(limit=args.concurrency)
            host, port = address.split(":")
            lean = LoadClient(host, int(port), "/function/hello", BODY, {"Content-Type": "application/json"})
            try:
                async with Client(server.url) as client, aiohttp.ClientSession(connector=connector) as http:
                    url = f"http://{address}/function/hello"

                    async def post_aiohttp() -> Any:
                        async with http.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                            body = await r.read()
                            if r.status != 200:
                                raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
                            return body

                    async def invoke() -> Any:
                        return await client.invoke("hello", {"name": "bench"}, timeout=30)

                    calls: dict[str, Call] = {"http": lean.post, "http_aiohttp": post_aiohttp, "invoke": invoke}
                    await wait_serving(post_aiohttp, proc, logfile)
                    for call in calls.values():   # warm up
                        await measure(call, 1000, args.concurrency)
                    # The callers' process is the load generator: an HTTP client costs it more per call.
                    assert server.proc is not None
                    pids = {"runtime": proc.pid, "nats_server": server.proc.pid, "load_generator": os.getpid()}
                    for rep in range(args.reps):
                        order = list(calls)[rep % 3:] + list(calls)[:rep % 3]
                        for name in order:
                            rate, latencies, cpu = await measure(calls[name], args.n, args.concurrency, pids)
                            cpus[name].append(cpu)
                            rates[name].append(rate)
                            p50s[name].append(percentile(latencies, 0.5))
                            p99s[name].append(percentile(latencies, 0.99))
                        log(f"rep {rep}: " + ", ".join(f"{k} {rates[k][-1]:.0f}/s p50 {p50s[k][-1]:.2f} ms"
                                                        for k in calls))
            finally:
                lean.close()
                proc.terminate()
                await asyncio.to_thread(proc.wait, 30)
    finally:
        await server.stop()
    summary: dict[str, dict[str, Any]] = {k: {"calls_per_s": round(statistics.median(rates[k])),
                   "calls_per_s_spread": round(max(rates[k]) - min(rates[k])),
                   "p50_ms": round(statistics.median(p50s[k]), 3),
                   "p99_ms": round(statistics.median(p99s[k]), 3),
                   "cpu_us_per_call": {p: round(statistics.median(c[p] for c in cpus[k])) for p in cpus[k][0]}}
               for k in rates}
    invoke_rate, invoke_p50 = statistics.median(rates["invoke"]), statistics.median(p50s["invoke"])
    rate = statistics.median(rates["http"]) / invoke_rate
    p50 = statistics.median(p50s["http"]) / invoke_p50
    # Per rep too: the contenders of one rep ran back to back, under the same load.
    per_rep = [round(h / i, 2) for h, i in zip(rates["http"], rates["invoke"], strict=True)]
    return {
        "bench": "http", "function": "hello", "concurrency": args.concurrency, "calls_per_rep": args.n,
        "reps": args.reps, **summary,
        "ratio_throughput": round(rate, 2), "ratio_throughput_per_rep": per_rep, "ratio_p50": round(p50, 2),
        "aiohttp_client": {"ratio_throughput": round(statistics.median(rates["http_aiohttp"]) / invoke_rate, 2),
                           "ratio_p50": round(statistics.median(p50s["http_aiohttp"]) / invoke_p50, 2)},
        "targets": {"throughput_ge_0.5x": rate >= 0.5, "p50_le_2x": p50 <= 2.0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5000, help="calls per contender and rep")
    ap.add_argument("--concurrency", type=int, default=50, help="callers at a time")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(run(main_bench(args))))


if __name__ == "__main__":
    main()
