"""Instructions per invocation, counted by callgrind: the runtime beside raw nats-py consumers.

A timed benchmark on a shared machine moves by a third from one hour to the next; the number of
instructions a process runs for the same work hardly moves. Each contender drains pre-filled
64-byte JSON invocations from a file-storage work-queue stream (the work of ``bench.throughput``),
its worker process running under valgrind's callgrind, once with ``--small`` and once with
``--large`` messages: the difference in instructions over the difference in messages is what one
invocation costs, start-up and shut-down left out.
  raw_pull_cb, raw_fetch100: the raw workers of ``bench.throughput`` (a no-op and an ack each);
  runtime_default: ``runtime serve`` with a no-op async function (pydantic input), default manifest;
  runtime_always: the same with ``store_results: always``;
  runtime_default_ids: the default manifest, every invocation with its own ``Nats-Msg-Id``.
With ``--rpc``, the round trips of ``bench.rpc`` instead, 100 calls outstanding, each on a fresh
server (the worker process counted):
  rpc_raw, rpc_raw_kept: its raw request-reply worker, and the one keeping ``invoke``'s promises;
  rpc_invoke: ``runtime serve`` called with ``Client.invoke``, default manifest.
Only the worker process is counted, not nats-server. Instructions are not time: the ratios say how
much more work the runtime does per invocation, not how much slower it drains (it overlaps its
work with the server's, which ``fetch(100)`` does not). Each pair of runs is repeated ``--reps``
times; prints one JSON line with the median and spread. Needs valgrind (Debian: ``valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats

from bench import rpc
from bench.common import ROOT, log, prefill, private_server, spread
from bench.throughput import manifest, raw_setup
from runtime.loop import run
from runtime.manifest import FunctionManifest
from runtime.streams import ensure_consumer, provision_base

CONTENDERS = ("raw_pull_cb", "raw_fetch100", "runtime_default", "runtime_always", "runtime_default_ids")
RPC_CONTENDERS = ("rpc_raw", "rpc_raw_kept", "rpc_invoke")
DEADLINE = 900.0   # seconds one instrumented run may take (start-up under callgrind is slow)


def instructions(out_file: Path) -> int:
    """The instructions a callgrind output file counts in all."""
    for line in out_file.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"{out_file} has no totals line")


def under_callgrind(argv: list[str], out_file: Path) -> list[str]:
    return ["valgrind", "-q", "--tool=callgrind", f"--callgrind-out-file={out_file}", *argv]


async def raw_count(url: str, impl: str, n: int, out_file: Path) -> int:
    """Instructions of a raw worker draining ``n`` messages (it exits once it has acked them)."""
    await raw_setup(url, n)
    argv = [sys.executable, "-m", "bench.throughput", "--role", impl, "--url", url, "-n", str(n)]
    proc = subprocess.Popen(under_callgrind(argv, out_file), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if await asyncio.to_thread(proc.wait, DEADLINE) != 0:
        raise RuntimeError(f"the {impl} worker failed (exit code {proc.returncode})")
    return instructions(out_file)


async def runtime_count(url: str, store: str | None, ids: bool, n: int, workdir: Path, out_file: Path) -> int:
    """Instructions of ``runtime serve`` that starts with ``n`` invocations queued, drains them and is stopped."""
    manifests = workdir / "manifests"
    manifests.mkdir(exist_ok=True)
    (manifests / "noop.yaml").write_text(manifest("noop", 512, store))
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await provision_base(js)
        await ensure_consumer(js, FunctionManifest(name="noop", handler="bench.handlers:noop", concurrency=512))
        await prefill(js, "fn.invoke.noop", n, ids=ids)
        last = (await js.stream_info("FN")).state.last_seq
        argv = [sys.executable, "-m", "runtime", "serve", "--server", url, "--manifests", str(manifests),
                "--log-level", "WARNING"]
        with open(workdir / "runtime.log", "wb") as log_file:
            proc = subprocess.Popen(under_callgrind(argv, out_file), cwd=ROOT, stdout=log_file,
                                    stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            await until(lambda: drained(js, last), proc)
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, DEADLINE)
    finally:
        await nc.close()
    return instructions(out_file)


async def rpc_count(name: str, n: int, workdir: Path, out_file: Path) -> int:
    """Instructions of ``name``'s worker process answering ``n`` calls (and its warm-up), 100 outstanding."""
    server = private_server()   # fresh: the raw loops number their calls from 0 again
    await server.start()
    try:
        wrap = functools.partial(under_callgrind, out_file=out_file)
        loop: rpc.RawLoop | rpc.RuntimeLoop
        if name == "rpc_invoke":
            loop = rpc.RuntimeLoop(server.url, workdir, 256, True, wrap=wrap, ready_within=DEADLINE)
            call, _ = await loop.start()
        else:
            loop = rpc.RawLoop(server.url, kept=name == "rpc_raw_kept", wrap=wrap)
            call = await loop.start()
        try:
            await rpc.throughput(call, n, 100)
        finally:
            await loop.stop()   # the worker ends: callgrind writes its counts
    finally:
        await server.stop()
    return instructions(out_file)


async def drained(js: nats.js.JetStreamContext, last: int) -> bool:
    info = await js.consumer_info("FN", "noop")
    return info.ack_floor.stream_seq >= last and not info.num_ack_pending and not info.num_pending


async def until(done: Callable[[], Awaitable[bool]], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not await done():
        if proc.poll() is not None:
            raise RuntimeError(f"the runtime exited with code {proc.returncode} before draining")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not drained in {DEADLINE:.0f}s")
        await asyncio.sleep(0.2)


async def per_invocation(name: str, url: str, small: int, large: int, workdir: Path) -> float:
    """Instructions one invocation costs ``name``: the difference between a large and a small drain."""
    counts = []
    for n in (small, large):
        out_file = workdir / f"{name}-{n}.callgrind"
        if name.startswith("rpc_"):
            counts.append(await rpc_count(name, n, workdir, out_file))
        elif name.startswith("raw_"):
            counts.append(await raw_count(url, "cb" if name == "raw_pull_cb" else "fetch", n, out_file))
        else:
            mode = name.removeprefix("runtime_")
            store = "always" if mode == "always" else None
            counts.append(await runtime_count(url, store, mode == "default_ids", n, workdir, out_file))
        out_file.unlink()
    return (counts[1] - counts[0]) / (large - small)


async def main_bench(args: argparse.Namespace) -> dict[str, object]:
    server = private_server()
    await server.start()
    contenders = tuple(args.only.split(",")) if args.only else RPC_CONTENDERS if args.rpc else CONTENDERS
    results: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
            for rep in range(args.reps):
                for name in contenders:
                    results[name].append(await per_invocation(name, server.url, args.small, args.large, Path(tmp)))
                log(f"rep {rep}: " + ", ".join(f"{k}={v[-1]:.0f}" for k, v in results.items()))
    finally:
        await server.stop()
    med = {k: spread(v)["median"] for k, v in results.items()}
    if args.only:
        return {"bench": "instructions", "payload_bytes": 64, "small": args.small, "large": args.large,
                "reps": args.reps, "instructions_per_call": {k: {s: round(x) for s, x in spread(v).items()}
                                                             for k, v in results.items()}}
    if args.rpc:
        return {
            "bench": "instructions", "workload": "rpc", "payload_bytes": 64, "outstanding": 100,
            "small": args.small, "large": args.large, "reps": args.reps,
            "instructions_per_call": {k: {s: round(x) for s, x in spread(v).items()} for k, v in results.items()},
            "ratio_invoke_vs_raw": round(med["rpc_invoke"] / med["rpc_raw"], 2),
            "ratio_invoke_vs_raw_kept": round(med["rpc_invoke"] / med["rpc_raw_kept"], 2),
        }
    return {
        "bench": "instructions", "payload_bytes": 64, "small": args.small, "large": args.large, "reps": args.reps,
        "instructions_per_invocation": {k: {s: round(x) for s, x in spread(v).items()} for k, v in results.items()},
        "ratio_vs_pull_cb": {k: round(med[k] / med["raw_pull_cb"], 2) for k in CONTENDERS if k.startswith("runtime_")},
        "ratio_vs_fetch100": {k: round(med[k] / med["raw_fetch100"], 2) for k in CONTENDERS
                              if k.startswith("runtime_")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=2000, help="invocations in the smaller drain")
    ap.add_argument("--large", type=int, default=8000, help="invocations in the larger drain")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rpc", action="store_true", help="count bench.rpc's round trips instead of drains")
    ap.add_argument("--only", default="", help="count these contenders alone (comma-separated), no ratios: "
                    + ", ".join(CONTENDERS + RPC_CONTENDERS))
    args = ap.parse_args()
    unknown = set(filter(None, args.only.split(","))) - set(CONTENDERS + RPC_CONTENDERS)
    if unknown:
        ap.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    if shutil.which("valgrind") is None:
        print("bench.instructions needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        sys.exit(2)
    if args.large <= args.small:
        ap.error("--large must be more than --small")
    print(json.dumps(run(main_bench(args))))


if __name__ == "__main__":
    main()
