"""Round trips through JetStream: ``Client.invoke`` beside a raw nats-py request-reply loop.

All contenders run against the same private nats-server in the same run, each with its worker
in a separate process, on a file-storage work-queue stream with 64-byte JSON payloads:
  raw:     the client subscribes to its inbox, ``js.publish``es with a reply-to header and awaits
           the matching future; the worker keeps MSG.NEXT pull requests (batch 100) topped up on a
           callback subscription, publishes the reply and acks each message;
  raw_kept: the same loop doing what ``invoke`` promises, the way it does it: each call carries
           its id as ``Nats-Msg-Id`` (the stream drops a duplicate); the worker writes the outcome
           once under the call id (``Nats-Expected-Last-Subject-Sequence: 0``) to a KV-style stream
           (one message per subject, 24 h max age) and acks the call only once that write is
           acknowledged; the write is the answer: the caller subscribes to the outcomes' subjects,
           and the worker sends no reply of its own;
  invoke:  ``runtime serve --server URL`` with a no-op function (pydantic input), default manifest,
           called with ``Client.invoke`` (each outcome stored by call id before the call is acked);
  gateway: the same runtime called with a plain nats-py request to ``fn.call.noop`` (for reference).
Phases: latency one call at a time, then throughput with 100 calls outstanding. The contenders
take turns in short blocks (ABBA order) so that load from elsewhere on the machine hits all alike.
With the throughput, the CPU time (µs per call, read from /proc) of the contender's worker process
(the raw worker, or the runtime), of nats-server and of this process (the caller). ``invoke`` is
compared with ``raw`` (the targets) and with ``raw_kept`` (what the runtime itself adds to the cost
of its promises). ``ratio_throughput_from_cpu`` is the throughput ratio that the CPU time per call
(worker, nats-server and caller together) predicts when the machine's cores are all busy.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from bench.common import PAYLOAD, ROOT, CpuMeter, Wrap, log, percentile, private_server, spread, start_runtime
from runtime import Client
from runtime.loop import run

RAW_STREAM = "RAWRPC"
RAW_SUBJECT = "rawrpc.invoke.noop"
KEPT_STREAM = "RAWKEPT"
KEPT_SUBJECT = "rawkept.invoke.noop"
KEPT_RESULTS = "KV_rawkept"   # the raw_kept worker's outcomes, under $KV.rawkept.<call id>
RAW_REPLY = "Raw-Reply-To"
RAW_ID = "Raw-Call-Id"
STOP = "bench.rpc.stop"

Call = Callable[[], Awaitable[Any]]


def stop_subject(kept: bool) -> str:
    return f"{STOP}.{'kept' if kept else 'raw'}"


# ------------------------------------------------------------------ the raw loop

async def raw_worker(url: str, kept: bool, batch: int = 100) -> None:
    nc = await nats.connect(url)
    inbox = nc.new_inbox()
    api = f"$JS.API.CONSUMER.MSG.NEXT.{KEPT_STREAM if kept else RAW_STREAM}.worker"
    request = json.dumps({"batch": batch, "expires": 30_000_000_000}).encode()
    outstanding = 0
    stop = asyncio.Event()
    stores = nc.new_inbox()
    storing: dict[str, str] = {}   # the store's reply token -> the ack subject of its call
    tokens = itertools.count()

    async def pull() -> None:
        nonlocal outstanding
        outstanding += batch
        await nc.publish(api, request, reply=inbox)

    async def on_msg(m: Msg) -> None:
        nonlocal outstanding
        if m.reply:
            outstanding -= 1
            hdrs = m.headers or {}
            if kept:   # the write answers the caller; acked once the outcome is stored (see on_stored)
                token = str(next(tokens))
                storing[token] = m.reply
                await nc.publish(f"$KV.rawkept.{hdrs[RAW_ID]}", b"null", reply=f"{stores}.{token}",
                                 headers={RAW_ID: hdrs[RAW_ID], "Nats-Expected-Last-Subject-Sequence": "0"})
            else:
                await nc.publish(hdrs[RAW_REPLY], b"null", headers={RAW_ID: hdrs[RAW_ID]})
                await nc.publish(m.reply, b"+ACK")
        else:  # a pull request ended (expired); it says how many it did not deliver
            left = (m.headers or {}).get("Nats-Pending-Messages")
            outstanding -= int(left) if left else 0
        if outstanding <= batch // 2:
            await pull()

    async def on_stored(m: Msg) -> None:
        reply = storing.pop(m.subject.rsplit(".", 1)[1], None)
        if reply is not None and b'"error"' not in m.data:
            await nc.publish(reply, b"+ACK")

    async def on_stop(m: Msg) -> None:
        await m.respond(b"")
        stop.set()

    await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await nc.subscribe(f"{stores}.*", cb=on_stored, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await nc.subscribe(stop_subject(kept), cb=on_stop)
    await pull()
    await nc.flush()
    print("READY", flush=True)
    await stop.wait()
    await nc.close()


class RawLoop:
    """A raw contender: its stream, its worker process and its calling connection."""

    def __init__(self, url: str, kept: bool = False, wrap: Wrap | None = None) -> None:
        self.url = url
        self.kept = kept
        self.wrap = wrap
        self.nc: NATS | None = None
        self.proc: subprocess.Popen[str] | None = None

    async def start(self) -> Call:
        nc = self.nc = await nats.connect(self.url)
        js = nc.jetstream()
        stream, subject = (KEPT_STREAM, KEPT_SUBJECT) if self.kept else (RAW_STREAM, RAW_SUBJECT)
        await js.add_stream(StreamConfig(name=stream, subjects=[subject], storage=StorageType.FILE,
                                         retention=RetentionPolicy.WORK_QUEUE))
        await js.add_consumer(stream, ConsumerConfig(durable_name="worker", ack_policy=AckPolicy.EXPLICIT,
                                                     filter_subject=subject, max_ack_pending=1000))
        if self.kept:
            await js.add_stream(StreamConfig(name=KEPT_RESULTS, subjects=["$KV.rawkept.>"], storage=StorageType.FILE,
                                             max_msgs_per_subject=1, max_age=24 * 3600, allow_direct=True))
        role = "kept-worker" if self.kept else "raw-worker"
        argv = [sys.executable, "-m", "bench.rpc", "--role", role, "--url", self.url]
        self.proc = subprocess.Popen(self.wrap(argv) if self.wrap else argv, cwd=ROOT, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        assert (await asyncio.to_thread(self.proc.stdout.readline)).strip() == "READY"
        inbox = nc.new_inbox()
        waiting: dict[str, asyncio.Future[Msg]] = {}
        ids = itertools.count()
        loop = asyncio.get_running_loop()

        async def on_reply(m: Msg) -> None:
            future = waiting.pop((m.headers or {})[RAW_ID], None)
            if future is not None:
                future.set_result(m)

        # raw_kept's answer is the write of the outcome, under the call's id.
        await nc.subscribe("$KV.rawkept.>" if self.kept else inbox, cb=on_reply, pending_msgs_limit=-1,
                           pending_bytes_limit=-1)

        async def call() -> Msg:
            cid = f"c{next(ids)}"
            future: asyncio.Future[Msg] = loop.create_future()
            waiting[cid] = future
            headers = {RAW_ID: cid, "Nats-Msg-Id": cid} if self.kept else {RAW_REPLY: inbox, RAW_ID: cid}
            await js.publish(subject, PAYLOAD, headers=headers)
            return await asyncio.wait_for(future, 10)

        return call

    async def stop(self) -> None:
        if self.nc is not None:
            try:
                await self.nc.request(stop_subject(self.kept), b"", timeout=5)
            finally:
                await self.nc.close()
        if self.proc is not None:
            await asyncio.to_thread(self.proc.wait, 10 if self.wrap is None else 300)


# ------------------------------------------------------------------ the runtime

MANIFEST = """\
name: noop
handler: bench.handlers:noop
concurrency: {concurrency}
timeout: 30s
"""


class RuntimeLoop:
    """The runtime contender: ``runtime serve`` in its own process, called through ``Client``."""

    def __init__(self, url: str, workdir: Path, concurrency: int, store: bool, wrap: Wrap | None = None,
                 ready_within: float = 30.0) -> None:
        self.url = url
        self.workdir = workdir
        self.concurrency = concurrency
        self.store = store
        self.wrap = wrap
        self.ready_within = ready_within
        self.client = Client(url)
        self.proc: subprocess.Popen[bytes] | None = None
        self.plain: NATS | None = None

    async def start(self) -> tuple[Call, Call]:
        manifests = self.workdir / "manifests"
        manifests.mkdir(exist_ok=True)
        (manifests / "noop.yaml").write_text(MANIFEST.format(concurrency=self.concurrency)
                                             + ("" if self.store else "store_results: never\n"))
        logfile = self.workdir / "runtime.log"
        self.proc = start_runtime(self.url, manifests, logfile, wrap=self.wrap)
        await self.client.start()
        fn = self.client
        deadline = time.monotonic() + self.ready_within
        while True:  # until the runtime serves
            try:
                await fn.invoke("noop", PAYLOAD, timeout=1)
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the runtime did not serve: {logfile.read_text()}") from None
                await asyncio.sleep(0.1)

        async def call() -> Any:
            return await fn.invoke("noop", PAYLOAD, timeout=10)

        plain = self.plain = await nats.connect(self.url)

        async def request() -> Msg:
            return await plain.request("fn.call.noop", PAYLOAD, timeout=10)

        return call, request

    async def stop(self) -> None:
        await self.client.stop()
        if self.plain is not None:
            await self.plain.close()
        if self.proc is not None:
            self.proc.terminate()
            await asyncio.to_thread(self.proc.wait, 30 if self.wrap is None else 300)


# ------------------------------------------------------------------ measuring

async def latencies(call: Call, n: int) -> list[float]:
    clock = time.perf_counter
    out = []
    for _ in range(n):
        started = clock()
        await call()
        out.append((clock() - started) * 1000)
    return out


async def throughput(call: Call, n: int, outstanding: int) -> float:
    remaining = n

    async def pump() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(pump() for _ in range(outstanding)))
    return n / (time.perf_counter() - started)


async def main_bench(args: argparse.Namespace) -> dict[str, Any]:
    server = private_server()
    await server.start()
    raw_loop, kept_loop = RawLoop(server.url), RawLoop(server.url, kept=True)
    names = ("raw", "raw_kept", "invoke", "gateway")
    lat: dict[str, list[float]] = {k: [] for k in names}
    rates: dict[str, list[float]] = {k: [] for k in names}
    cpus: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-rpc-") as tmp:
            runtime_loop = RuntimeLoop(server.url, Path(tmp), args.concurrency, not args.no_store_results)
            invoke, gateway = await runtime_loop.start()
            calls = {"raw": await raw_loop.start(), "raw_kept": await kept_loop.start(), "invoke": invoke,
                     "gateway": gateway}
            assert server.proc is not None and runtime_loop.proc is not None
            assert raw_loop.proc is not None and kept_loop.proc is not None
            meters = {name: CpuMeter({"worker": worker.pid, "nats_server": server.proc.pid, "caller": os.getpid()})
                      for name, worker in (("raw", raw_loop.proc), ("raw_kept", kept_loop.proc),
                                           ("invoke", runtime_loop.proc), ("gateway", runtime_loop.proc))}
            try:
                for call in calls.values():
                    await latencies(call, 300)  # warm up
                for block in range(args.blocks):
                    order = list(calls) if block % 2 == 0 else list(reversed(calls))
                    for name in order:
                        lat[name] += await latencies(calls[name], args.n)
                    for name in order:
                        meters[name].start()
                        rates[name].append(await throughput(calls[name], args.throughput_n, args.outstanding))
                        cpus[name].append(meters[name].per_call(args.throughput_n))
                    log(f"block {block}: " + ", ".join(f"{k} p50 {percentile(lat[k][-args.n:], 0.5):.3f} ms "
                                                       f"{rates[k][-1]:.0f}/s" for k in calls))
            finally:
                await runtime_loop.stop()
                await raw_loop.stop()
                await kept_loop.stop()
    finally:
        await server.stop()
    block_p50 = {k: [percentile(lat[k][i:i + args.n], 0.5) for i in range(0, len(lat[k]), args.n)] for k in lat}
    summary = {k: {"p50_ms": round(percentile(lat[k], 0.5), 3), "p99_ms": round(percentile(lat[k], 0.99), 3),
                   "block_p50_ms_min_max": [round(min(block_p50[k]), 3), round(max(block_p50[k]), 3)],
                   "calls_per_s": round(spread(rates[k])["median"]),
                   "calls_per_s_min_max": [round(min(rates[k])), round(max(rates[k]))],
                   "cpu_us_per_call": {p: round(statistics.median(c[p] for c in cpus[k])) for p in cpus[k][0]},
                   "cpu_us_per_call_all": round(statistics.median(sum(c.values()) for c in cpus[k]))}
               for k in lat}
    p50 = percentile(lat["invoke"], 0.5) / percentile(lat["raw"], 0.5)
    rate = spread(rates["invoke"])["median"] / spread(rates["raw"])["median"]
    kept_p50 = percentile(lat["invoke"], 0.5) / percentile(lat["raw_kept"], 0.5)
    kept_rate = spread(rates["invoke"])["median"] / spread(rates["raw_kept"])["median"]
    return {
        "bench": "rpc", "payload_bytes": len(PAYLOAD), "storage": "file",
        "store_results": "never" if args.no_store_results else "default",
        "blocks": args.blocks, "latency_calls": args.n * args.blocks, "throughput_calls": args.throughput_n,
        "outstanding": args.outstanding, "raw": summary["raw"], "raw_kept": summary["raw_kept"],
        "invoke": summary["invoke"], "gateway": summary["gateway"],
        "ratio_p50": round(p50, 2), "ratio_throughput": round(rate, 2),
        "ratio_to_raw_kept": {"p50": round(kept_p50, 2), "throughput": round(kept_rate, 2)},
        # The three processes share the machine's cores: with them all busy, throughput follows
        # the CPU time a call costs in all of them together.
        "ratio_throughput_from_cpu": round(summary["raw"]["cpu_us_per_call_all"]
                                           / summary["invoke"]["cpu_us_per_call_all"], 2),
        "targets": {"p50_le_1.2x": p50 <= 1.2, "throughput_ge_0.9x": rate >= 0.9},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=500, help="calls one at a time, per contender and block")
    ap.add_argument("--throughput-n", type=int, default=5000, help="calls per throughput block")
    ap.add_argument("--outstanding", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=256, help="the function's concurrency in the manifest")
    ap.add_argument("--no-store-results", action="store_true", help="manifest store_results: never")
    ap.add_argument("--role", choices=["main", "raw-worker", "kept-worker"], default="main")
    ap.add_argument("--url", default="")
    args = ap.parse_args()
    if args.role != "main":
        run(raw_worker(args.url, kept=args.role == "kept-worker"))
        return
    print(json.dumps(run(main_bench(args))))


if __name__ == "__main__":
    main()
