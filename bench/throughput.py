"""Invocations per second through the runtime, beside two raw nats-py consumers.

Each contender drains the same shape of work in its own process: 20,000 pre-filled 64-byte JSON
messages (plain publishes: no call id, no reply subject) on a file-storage work-queue stream, a
no-op, an ack per message.
  (a) raw fetch(100) loop, acking each message;
  (b) raw hand-rolled pull: a core subscription on an inbox with MSG.NEXT batch requests kept topped up;
  runtime_default: `runtime serve` with a no-op async function (pydantic input), default manifest;
  runtime_always: the same with `store_results: always` (every outcome written to fn_results);
  runtime_default_ids: the default manifest, every invocation with its own Nats-Msg-Id, as
    `Client.submit` sends them: each outcome is stored, and acked only once JetStream has it.
Every repetition runs each contender once; the JSON line gives medians, min and max of the same run.
Then one runtime process against two on 3x the messages, timed over the middle 20-90% of the
drain (so that the processes' start-up does not count), with the CPU time per invocation of the
runtimes and of nats-server over the same part and the cores they kept busy (if one process
already keeps most of them busy, two cannot do much better), the resident memory of an idle runtime
serving 10 functions, publish-to-start latency at light load and the runtime's peak RSS.
With --secure, instead: the runtime on a plain server against the runtime on a server that
requires TLS and a user/password, in the same run. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from bench.common import (
    PAYLOAD,
    CpuMeter,
    drain_rate,
    drain_time,
    log,
    percentile,
    prefill,
    private_server,
    rss_kb,
    rss_peak_kb,
    spread,
    start_runtime,
)
from runtime.connection import ConnectOptions, open_connection
from runtime.loop import run
from runtime.manifest import FunctionManifest
from runtime.server import EmbeddedServer, free_port
from runtime.streams import ensure_consumer, provision_base

RAW_STREAM = "RAW"


# ------------------------------------------------------------------ raw consumers (own process)

async def raw_worker(url: str, impl: str, n: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    done = 0
    if impl == "fetch":
        psub = await js.pull_subscribe("raw.in", durable="raw", stream=RAW_STREAM)
        while done < n:
            try:
                msgs = await psub.fetch(100, timeout=5)
            except nats.errors.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
                done += 1
    else:
        finished = asyncio.Event()
        inbox = nc.new_inbox()
        api = f"$JS.API.CONSUMER.MSG.NEXT.{RAW_STREAM}.raw"
        batch = 100
        outstanding = 0

        async def pull() -> None:
            nonlocal outstanding
            outstanding += batch
            await nc.publish(api, json.dumps({"batch": batch, "expires": 30_000_000_000}).encode(), reply=inbox)

        async def on_msg(m: Msg) -> None:
            nonlocal done, outstanding
            if m.reply:
                await m.ack()
                done += 1
                outstanding -= 1
                if done >= n:
                    finished.set()
            elif m.headers and m.headers.get("Nats-Pending-Messages"):
                outstanding -= int(m.headers["Nats-Pending-Messages"])
            if outstanding <= batch // 2:
                await pull()

        await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await pull()
        await pull()
        await finished.wait()
    await nc.flush()
    await nc.close()


async def raw_setup(url: str, n: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await js.delete_stream(RAW_STREAM)
    except nats.js.errors.NotFoundError:
        pass
    await js.add_stream(StreamConfig(name=RAW_STREAM, subjects=["raw.in"], retention=RetentionPolicy.WORK_QUEUE,
                                     storage=StorageType.FILE))
    await prefill(js, "raw.in", n)
    await js.add_consumer(RAW_STREAM, ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.EXPLICIT))
    await nc.close()


async def raw_rate(url: str, impl: str, n: int) -> float:
    await raw_setup(url, n)
    nc = await nats.connect(url)
    proc = subprocess.Popen([sys.executable, "-m", "bench.throughput", "--role", impl, "--url", url, "-n", str(n)],
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        seconds = await drain_time(nc.jetstream(), RAW_STREAM, "raw", n)
    finally:
        await asyncio.to_thread(proc.wait, 60)
        await nc.close()
    return n / seconds


# ------------------------------------------------------------------------------ the runtime

MANIFEST = """\
name: {name}
handler: bench.handlers:{handler}
concurrency: {concurrency}
timeout: 30s
"""


def manifest(name: str, concurrency: int, store: str | bool | None, handler: str = "") -> str:
    """A manifest of a bench function; ``store``: its store_results, None to leave the default."""
    text = MANIFEST.format(name=name, handler=handler or name, concurrency=concurrency)
    if isinstance(store, bool):
        store = str(store).lower()
    return text + (f"store_results: {store}\n" if store else "")


async def runtime_rate(url: str, n: int, concurrency: int, store: str | bool | None, workdir: Path,
                       secure: SecureServer | None = None, http: str | None = None,
                       processes: int = 1, steady: bool = False, ids: bool = False,
                       cpu: dict[str, float] | None = None, server_pid: int | None = None) -> tuple[float, int]:
    """Invocations/s of ``processes`` runtime processes draining ``n`` pre-filled invocations,
    and the largest peak RSS among them. ``steady``: timed over the middle of the drain only,
    with the CPU time per invocation (µs) of the runtimes together and of nats-server put in
    ``cpu``; ``ids``: every invocation carries a call id (so its outcome is stored before it is acked)."""
    manifests = workdir / "manifests"
    manifests.mkdir(exist_ok=True)
    (manifests / "noop.yaml").write_text(manifest("noop", concurrency, store))
    nc = await open_connection(url, secure.options if secure else None)
    js = nc.jetstream()
    await provision_base(js)
    await ensure_consumer(js, FunctionManifest(name="noop", handler="bench.handlers:noop", concurrency=concurrency))
    await prefill(js, "fn.invoke.noop", n, ids=ids)
    env = {**(secure.env if secure else {}), **({"RUNTIME_HTTP": http} if http else {})}
    procs = [start_runtime(url, manifests, workdir / f"runtime-rate-{i}.log", env) for i in range(processes)]
    scraper = asyncio.create_task(scrape_forever(http)) if http else None
    try:
        if steady:
            assert server_pid is not None
            meter = CpuMeter({**{f"runtime{i}": proc.pid for i, proc in enumerate(procs)}, "nats_server": server_pid})
            rate = await drain_rate(js, "FN", "noop", n, meter=meter)
            used = meter.per_call(round(0.7 * n))
            if cpu is not None:
                cpu["runtimes_us"] = sum(v for k, v in used.items() if k.startswith("runtime"))
                cpu["nats_server_us"] = used["nats_server"]
        else:
            rate = n / await drain_time(js, "FN", "noop", n)
        rss = max(rss_peak_kb(proc.pid) for proc in procs)
    finally:
        if scraper is not None:
            scraper.cancel()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await asyncio.to_thread(proc.wait, 30)
        await nc.close()
    return rate, rss


async def idle_rss(url: str, workdir: Path, functions: int = 10, settle: float = 5.0) -> int:
    """Resident memory (kB) of a runtime serving ``functions`` no-op functions, idle once they all serve."""
    manifests = workdir / "manifests-idle"
    manifests.mkdir(exist_ok=True)
    names = [f"idle{i}" for i in range(functions)]
    for name in names:
        (manifests / f"{name}.yaml").write_text(manifest(name, 4, None, handler="noop"))
    proc = start_runtime(url, manifests, workdir / "runtime-idle.log")
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        deadline = time.monotonic() + 60
        for name in names:   # each function's consumer exists once the runtime serves it
            while True:
                try:
                    await js.consumer_info("FN", name)
                    break
                except nats.js.errors.NotFoundError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the runtime did not serve its functions") from None
                    await asyncio.sleep(0.1)
        await asyncio.sleep(settle)
        return rss_kb(proc.pid)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        await nc.close()


async def scrape_forever(http: str, every: float = 1.0) -> None:
    """Read /metrics like a (busy) Prometheus would while the runtime works."""
    import urllib.request

    def scrape() -> None:
        with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as response:
            response.read()

    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.to_thread(scrape)
        except OSError:
            pass   # not listening yet


async def http_compare_bench(n: int, reps: int, concurrency: int, store: str | None) -> dict[str, object]:
    """The runtime without, then with, its HTTP endpoint and metrics (scraped every second), same run."""
    server = private_server()
    await server.start()
    results: dict[str, list[float]] = {"http_off": [], "http_on": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            workdir = Path(tmp)
            for rep in range(reps):
                # Alternating which goes first: the second run of a pair finds a warmer server.
                for key in ("http_off", "http_on") if rep % 2 == 0 else ("http_on", "http_off"):
                    http = f"127.0.0.1:{free_port()}" if key == "http_on" else None
                    results[key].append((await runtime_rate(server.url, n, concurrency, store, workdir,
                                                            http=http))[0])
                log(f"rep {rep}: " + ", ".join(f"{k}={v[-1]:.0f}/s" for k, v in results.items()))
    finally:
        await server.stop()
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    return {
        "bench": "throughput-http", "messages": n, "reps": reps, "store_results": store or "default",
        "rate_per_s": {k: round(v) for k, v in med.items()},
        "all_rates": {k: [round(x) for x in v] for k, v in results.items()},
        "ratio_http_on_vs_off": round(med["http_on"] / med["http_off"], 3),
    }


async def runtime_latency(url: str, count: int, workdir: Path) -> dict[str, float]:
    manifests = workdir / "manifests-latency"
    manifests.mkdir(exist_ok=True)
    (manifests / "stamp.yaml").write_text(manifest("stamp", 16, None))
    proc = start_runtime(url, manifests, workdir / "runtime-latency.log")
    nc = await nats.connect(url)
    started: dict[int, float] = {}
    got = asyncio.Event()

    async def on_started(msg: Msg) -> None:
        data = json.loads(msg.data)
        started[data["id"]] = data["t"]
        got.set()

    try:
        await nc.subscribe("bench.started", cb=on_started)
        js = nc.jetstream()
        for _ in range(200):  # wait for the runtime to serve
            got.clear()
            await js.publish("fn.invoke.stamp", json.dumps({"fn": "s", "id": -1, "args": [], "pad": ""}).encode())
            try:
                await asyncio.wait_for(got.wait(), 0.5)
                break
            except TimeoutError:
                continue
        sent: dict[int, float] = {}
        for i in range(count):
            got.clear()
            sent[i] = time.time()
            await nc.publish("fn.invoke.stamp", json.dumps({"fn": "s", "id": i, "args": [], "pad": ""}).encode())
            await asyncio.wait_for(got.wait(), 5)
            await asyncio.sleep(0.005)
        lat = [(started[i] - sent[i]) * 1000 for i in range(count)]
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        await nc.close()
    return {"p50_ms": round(percentile(lat, 0.5), 3), "p99_ms": round(percentile(lat, 0.99), 3)}


def per_rep(results: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """Each runtime contender's ratio to ``base`` within each repetition: median, min and max."""
    out = {}
    for key in (k for k in results if k.startswith("runtime_")):
        ratios = [a / b for a, b in zip(results[key], results[base], strict=True)]
        out[key] = {"median": round(statistics.median(ratios), 2), "min": round(min(ratios), 2),
                    "max": round(max(ratios), 2)}
    return out


def summary(results: dict[str, list[float]]) -> dict[str, dict[str, int]]:
    return {k: {key: round(v) for key, v in spread(vals).items()} for k, vals in results.items()}


async def main_bench(n: int, reps: int, concurrency: int, store: str | None, scaleout: bool = True
                     ) -> dict[str, object]:
    server = private_server()
    await server.start()
    results: dict[str, list[float]] = {"raw_fetch100": [], "raw_pull_cb": [], "runtime_default": [],
                                       "runtime_always": [], "runtime_default_ids": []}
    if store is not None:   # --no-store-results: one more contender
        results[f"runtime_{store}"] = []
    scale: dict[str, list[float]] = {"one_process": [], "two_processes": []}
    scale_cpu: dict[str, list[dict[str, float]]] = {"one_process": [], "two_processes": []}
    rss: list[int] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            workdir = Path(tmp)
            for rep in range(reps):
                results["raw_fetch100"].append(await raw_rate(server.url, "fetch", n))
                results["raw_pull_cb"].append(await raw_rate(server.url, "cb", n))
                for key in [k for k in results if k.startswith("runtime_")]:
                    mode, _, ids = key.removeprefix("runtime_").partition("_")
                    rate, peak = await runtime_rate(server.url, n, concurrency, None if mode == "default" else mode,
                                                    workdir, ids=bool(ids))
                    results[key].append(rate)
                    rss.append(peak)
                if scaleout:
                    assert server.proc is not None
                    for procs, key in ((1, "one_process"), (2, "two_processes")):
                        cpu: dict[str, float] = {}
                        scale[key].append((await runtime_rate(server.url, 3 * n, concurrency, None, workdir,
                                                              processes=procs, steady=True, cpu=cpu,
                                                              server_pid=server.proc.pid))[0])
                        scale_cpu[key].append(cpu)
                log(f"rep {rep}: " + ", ".join(f"{k}={v[-1]:.0f}/s" for k, v in {**results, **scale}.items() if v))
            latency = await runtime_latency(server.url, 300, workdir)
            idle = await idle_rss(server.url, workdir)
    finally:
        await server.stop()
    med = {k: spread(v)["median"] for k, v in results.items()}
    out: dict[str, object] = {
        "bench": "throughput", "messages": n, "reps": reps, "payload_bytes": len(PAYLOAD), "storage": "file",
        "concurrency": concurrency,
        "rate_per_s": summary(results),
        "all_rates": {k: [round(x) for x in v] for k, v in results.items()},
        "ratio_vs_pull_cb": {k: round(med[k] / med["raw_pull_cb"], 2) for k in results if k.startswith("runtime_")},
        "ratio_vs_fetch100": {k: round(med[k] / med["raw_fetch100"], 2) for k in results if k.startswith("runtime_")},
        # Each repetition runs every contender back to back: its own ratios drift less with the machine.
        "ratio_per_rep_vs_pull_cb": per_rep(results, "raw_pull_cb"),
        "ratio_per_rep_vs_fetch100": per_rep(results, "raw_fetch100"),
        "publish_to_start_latency": latency,
        "runtime_peak_rss_kb": max(rss),
        "idle_rss_kb_10_functions": idle,
    }
    if scaleout:
        out["scaleout_steady_rate_per_s"] = summary(scale)
        out["scaleout_all_rates"] = {k: [round(x) for x in v] for k, v in scale.items()}
        out["ratio_two_vs_one_process"] = round(spread(scale["two_processes"])["median"]
                                                / spread(scale["one_process"])["median"], 2)
        # Where the time goes: CPU per invocation, and the cores the runtimes and the server kept
        # busy (CPU per invocation times rate). With every core busy at the cost per invocation of
        # one process, two processes could reach at most cores / cores busy with one.
        busy = {k: [(c["runtimes_us"] + c["nats_server_us"]) * r / 1e6 for c, r in zip(scale_cpu[k], scale[k],
                                                                                       strict=True)]
                for k in scale}
        out["scaleout_cpu_us_per_invocation"] = {
            k: {part: round(statistics.median(c[part] for c in scale_cpu[k]), 1)
                for part in ("runtimes_us", "nats_server_us")} for k in scale}
        out["scaleout_cores_busy"] = {k: round(statistics.median(v), 2) for k, v in busy.items()}
        cores = os.cpu_count() or 1
        out["two_vs_one_ceiling_at_full_cores"] = round(cores / statistics.median(busy["one_process"]), 2)
    return out


# ------------------------------------------------------------------ TLS and authentication


@dataclass(frozen=True)
class SecureServer:
    server: EmbeddedServer
    options: ConnectOptions
    env: dict[str, str]


def secure_server(directory: Path) -> SecureServer:
    """A private server that requires TLS (a throwaway CA) and a user with a password."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    password = secrets.token_urlsafe(24)
    conf = directory / "nats.conf"
    conf.write_text(f'tls {{ cert_file: "{cert_file}", key_file: "{key_file}" }}\n'
                    f'authorization {{ users: [ {{ user: bench, password: "{password}" }} ] }}\n')
    server = EmbeddedServer(directory / "store", port=free_port(), config=conf)
    options = ConnectOptions(user="bench", password=password, tls_ca=ca_file)
    return SecureServer(server, options, {"NATS_USER": "bench", "NATS_PASSWORD": password, "NATS_CA": str(ca_file)})


async def secure_bench(n: int, reps: int, concurrency: int, store: str | None) -> dict[str, object]:
    plain = private_server()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "tls").mkdir()
        secure = secure_server(workdir / "tls")
        await plain.start()
        await secure.server.start()
        url = f"tls://127.0.0.1:{secure.server.port}"
        results: dict[str, list[float]] = {"plain": [], "tls_auth": []}
        try:
            for rep in range(reps):
                results["plain"].append((await runtime_rate(plain.url, n, concurrency, store, workdir))[0])
                results["tls_auth"].append((await runtime_rate(url, n, concurrency, store, workdir, secure))[0])
                log(f"rep {rep}: " + ", ".join(f"{k}={v[-1]:.0f}/s" for k, v in results.items()))
        finally:
            await secure.server.stop()
            await plain.stop()
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    ratios = sorted(s / p for p, s in zip(results["plain"], results["tls_auth"], strict=True))
    return {
        "bench": "throughput-secure", "messages": n, "reps": reps, "store_results": store or "default",
        "rate_per_s": {k: round(v) for k, v in med.items()},
        "all_rates": {k: [round(x) for x in v] for k, v in results.items()},
        "ratio_tls_auth_vs_plain": round(med["tls_auth"] / med["plain"], 2),
        "ratio_per_rep": [round(r, 2) for r in ratios],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=512)
    ap.add_argument("--no-store-results", action="store_true",
                    help="also (--secure, --http-compare: instead) a runtime with store_results: never")
    ap.add_argument("--no-scaleout", action="store_true", help="skip the one-against-two-processes runs")
    ap.add_argument("--secure", action="store_true", help="plain server against TLS + user/password, same run")
    ap.add_argument("--http-compare", action="store_true",
                    help="the runtime without, then with, --http and a scrape of /metrics every second, same run")
    ap.add_argument("--role", choices=["main", "fetch", "cb"], default="main")
    ap.add_argument("--url", default="")
    args = ap.parse_args()
    if args.role != "main":
        run(raw_worker(args.url, args.role, args.n))
        return
    store = "never" if args.no_store_results else None
    if args.secure or args.http_compare:
        bench = secure_bench if args.secure else http_compare_bench
        print(json.dumps(run(bench(args.n, args.reps, args.concurrency, store))))
        return
    print(json.dumps(run(main_bench(args.n, args.reps, args.concurrency, store, not args.no_scaleout))))


if __name__ == "__main__":
    main()
