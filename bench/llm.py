"""LLM calls through the runtime: the ``report`` example beside the same openai calls made directly.

An OpenAI-compatible server (tests/fakeopenai.py) runs in its own process on loopback and answers
each chat completion after a simulated latency (50 ms by default), streaming a JSON report of
about 50 chunks. Against it, in the same run:
  raw:     ``asyncio.gather`` of the same streamed openai calls (same prompt, same client settings),
           at most ``concurrency`` at a time, each answer validated by the same pydantic model;
  runtime: ``runtime serve`` in its own process serving functions/report.py (the shipped manifest
           with ``concurrency`` set, without its rate limit and cache), called with ``Client.invoke``
           at most ``concurrency`` at a time, each call with a distinct text.
The contenders take turns (ABAB...), ``--reps`` rounds. Prints one JSON line: calls/s, median and
range of each, and their ratio.
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

import openai
import yaml

from bench.common import ROOT, log, private_server, start_runtime
from functions.report import Report, ReportIn, _prompt
from runtime import Client
from runtime.loop import run
from runtime.server import free_port

TEXT = ("JetStream keeps every invocation until a runtime acknowledges it. Retries follow the manifest's "
        "backoff. Dead letters keep what failed for good.")


async def serve_api(port: int, latency: float) -> None:
    from tests.fakeopenai import FakeOpenAI

    api = FakeOpenAI(latency=latency)
    api.port = port
    async with api:
        print("READY", flush=True)
        await asyncio.Event().wait()


async def bounded(n: int, concurrency: int, one: Callable[[int], Awaitable[Any]]) -> float:
    """Seconds to make ``n`` calls, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def call(i: int) -> None:
        async with gate:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(call(i) for i in range(n)))
    return time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    api = subprocess.Popen([sys.executable, "-m", "bench.llm", "--role", "api", "--port", str(port),
                            "--latency", str(args.latency)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert api.stdout is not None
    assert (await asyncio.to_thread(api.stdout.readline)).strip() == "READY"
    env = {"OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": url, "OPENAI_MODEL": "bench-model"}
    workdir = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    manifests = workdir / "manifests"
    manifests.mkdir()
    manifest = yaml.safe_load((ROOT / "manifests" / "report.yaml").read_text())
    manifest.pop("rate_limit", None)
    manifest.pop("cache", None)
    manifest["concurrency"] = args.concurrency
    (manifests / "report.yaml").write_text(yaml.safe_dump(manifest))
    raw_client = openai.AsyncOpenAI(api_key="sk-bench", base_url=url, max_retries=0)

    async def raw(i: int) -> None:
        event = ReportIn(text=f"{TEXT} ({i})")
        stream = await raw_client.chat.completions.create(
            model="bench-model", messages=_prompt(event), stream=True, response_format={"type": "json_object"})
        parts: list[str] = []
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
        Report.model_validate_json("".join(parts))

    figures: dict[str, list[float]] = {"raw": [], "runtime": []}
    async with private_server() as server:
        proc = start_runtime(server.url, manifests, workdir / "runtime.log", {**os.environ, **env})
        try:
            async with Client(server.url) as fn:
                async def through(i: int) -> None:
                    await fn.invoke("report", {"text": f"{TEXT} ({i})"}, timeout=60)

                deadline = time.monotonic() + 30
                while True:   # until the runtime serves
                    try:
                        await fn.invoke("report", {"text": "warm-up"}, timeout=2)
                        break
                    except Exception:
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError((workdir / "runtime.log").read_text()) from None
                        await asyncio.sleep(0.2)
                await bounded(args.concurrency, args.concurrency, raw)   # warm both pools
                await bounded(args.concurrency, args.concurrency, through)
                for rep in range(args.reps):
                    for name, one in (("raw", raw), ("runtime", through)) if rep % 2 == 0 else (
                            ("runtime", through), ("raw", raw)):
                        seconds = await bounded(args.n, args.concurrency, one)
                        figures[name].append(args.n / seconds)
                        log(f"rep {rep + 1} {name}: {args.n / seconds:.0f} calls/s")
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
            api.terminate()
            await asyncio.to_thread(api.wait, 10)
            await raw_client.close()

    def summary(values: list[float]) -> dict[str, float]:
        return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
                "max": round(max(values), 1)}

    print(json.dumps({
        "bench": "llm", "calls": args.n, "concurrency": args.concurrency, "latency_ms": args.latency * 1000,
        "reps": args.reps, "runtime_calls_per_s": summary(figures["runtime"]),
        "raw_gather_calls_per_s": summary(figures["raw"]),
        "ratio": round(statistics.median(figures["runtime"]) / statistics.median(figures["raw"]), 2)}))


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="calls per measurement")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the API takes per call")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--role", choices=("bench", "api"), default="bench")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.role == "api":
        run(serve_api(args.port, args.latency))
    else:
        run(main(args))


if __name__ == "__main__":
    cli()
