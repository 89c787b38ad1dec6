"""The ``runtime`` micro service: any NATS client calls ``fn.call.<name>`` with a plain request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from runtime.manifest import FunctionManifest
from runtime.results import fetch_response
from runtime.streams import INVOKE_STREAM

from .conftest import RuntimeFactory, RuntimeProcess, collect, eventually
from .test_client import fn, runs

ERROR = "Nats-Service-Error"
CODE = "Nats-Service-Error-Code"


def body(msg: Msg) -> Any:
    return json.loads(msg.data)


async def srv(nc: NATS, verb: str, count: int = 1) -> list[dict[str, Any]]:
    """Ask ``$SRV.<verb>.runtime``; collect the answers of ``count`` runtimes."""
    received, sub = await collect(nc, inbox := nc.new_inbox())
    await nc.publish(f"$SRV.{verb}.runtime", b"", reply=inbox)
    await eventually(lambda: len(received) >= count, timeout=5, message=f"{count} {verb} answers")
    await sub.unsubscribe()
    return [body(m) for m in received]


async def test_a_plain_request_gets_the_answer(runtime_process: Callable[..., RuntimeProcess],
                                               manifest_dir: Callable[..., Path], nc: NATS) -> None:
    proc = runtime_process(manifest_dir(greet=fn("greet", "core:greet")))
    await proc.wait_ready()
    # Nothing of the project on this side: a request as any NATS client sends it.
    reply = await nc.request("fn.call.greet", b'{"name": "Ada"}', timeout=10)
    assert body(reply) == {"greeting": "Hello, Ada!"}
    assert reply.headers and reply.headers.get("Fn-Call-Id") and ERROR not in reply.headers


async def test_unknown_function_is_404_at_once(runtime: RuntimeFactory, nc: NATS) -> None:
    await runtime(greet=fn("greet", "core:greet"))
    for subject in ("fn.call.nothing", "fn.call.a.b"):
        reply = await nc.request(subject, b"{}", timeout=2)
        assert reply.headers is not None and reply.headers[CODE] == "404", subject
        assert "no function named" in reply.headers[ERROR]
        assert body(reply)["error"]["type"] == "UnknownFunction"


async def test_failures_carry_the_micro_error_headers(runtime: RuntimeFactory, nc: NATS) -> None:
    await runtime(fails=fn("fails", "core:always_fail", retry={"max_deliver": 2, "backoff": ["100ms"]}),
                  greet=fn("greet", "core:greet"))
    failed = await nc.request("fn.call.fails", b'{"n": 3}', timeout=10)
    assert failed.headers is not None
    assert (failed.headers[CODE], failed.headers[ERROR]) == ("500", "ValueError: boom 3")
    assert body(failed)["error"] == {"type": "ValueError", "message": "boom 3", "code": 500}
    invalid = await nc.request("fn.call.greet", b'{"age": 1}', timeout=10)
    assert invalid.headers is not None and invalid.headers[CODE] == "400"
    assert "name: Field required" in body(invalid)["error"]["message"]


async def test_srv_ping_info_and_stats_list_the_functions(runtime: RuntimeFactory, nc: NATS) -> None:
    await runtime(greet=fn("greet", "core:greet", description="Greets"), echo=fn("echo", "core:echo"))
    await nc.request("fn.call.echo", b'{"x": 1}', timeout=10)
    [ping] = await srv(nc, "PING")
    [info] = await srv(nc, "INFO")
    [stats] = await srv(nc, "STATS")
    assert ping["name"] == info["name"] == stats["name"] == "runtime"
    assert ping["id"] == info["id"] == stats["id"]
    endpoints = {e["name"]: e for e in info["endpoints"]}
    assert set(endpoints) == {"greet", "echo"}
    assert endpoints["greet"]["subject"] == "fn.call.greet" and endpoints["greet"]["queue_group"] == "q"
    assert endpoints["greet"]["metadata"]["description"] == "Greets"
    counts = {e["name"]: e["num_requests"] for e in stats["endpoints"]}
    assert counts == {"greet": 0, "echo": 1}


async def test_caller_msg_id_is_the_call_id_and_runs_once(runtime: RuntimeFactory, nc: NATS,
                                                          js: JetStreamContext, scratch: Path) -> None:
    await runtime(counted=fn("counted", "rpc:counted"))
    headers = {"Nats-Msg-Id": "gw-1"}
    first, second = await asyncio.gather(
        nc.request("fn.call.counted", b'{"seconds": 0.3, "value": 1}', timeout=10, headers=headers),
        nc.request("fn.call.counted", b'{"seconds": 0.3, "value": 2}', timeout=10, headers=headers))
    assert first.data == second.data and body(first)["call_id"] == "gw-1"
    assert first.headers and first.headers["Fn-Call-Id"] == "gw-1"
    assert runs(scratch, "counted") == ["gw-1"]
    stored = await fetch_response(js, "gw-1")
    assert stored is not None and stored.body == first.data


async def test_endpoints_follow_what_the_runtime_serves(runtime: RuntimeFactory, nc: NATS) -> None:
    rt = await runtime(greet=fn("greet", "core:greet"))
    await rt.apply(FunctionManifest(name="square", handler="tests.handlers.rpc:square"))
    [info] = await srv(nc, "INFO")
    assert {e["name"] for e in info["endpoints"]} == {"greet", "square"}
    assert body(await nc.request("fn.call.square", b'{"n": 3, "token": "a"}', timeout=10))["square"] == 9
    await rt.remove("square")
    [info] = await srv(nc, "INFO")
    assert {e["name"] for e in info["endpoints"]} == {"greet"}
    gone = await nc.request("fn.call.square", b'{"n": 3, "token": "a"}', timeout=2)
    assert gone.headers is not None and gone.headers[CODE] == "404"


async def test_503_when_the_invocation_cannot_be_stored(runtime: RuntimeFactory, nc: NATS,
                                                         js: JetStreamContext) -> None:
    await runtime(greet=fn("greet", "core:greet"))
    await js.delete_stream(INVOKE_STREAM)
    reply = await nc.request("fn.call.greet", b'{"name": "Ada"}', timeout=10)
    assert reply.headers is not None and reply.headers[CODE] == "503"
    assert body(reply)["error"]["type"] == "Unavailable"


async def test_one_runtime_of_many_takes_each_request(runtime: RuntimeFactory, nc: NATS, scratch: Path) -> None:
    manifest = fn("counted", "rpc:counted", concurrency=8)
    await runtime(counted=manifest)
    await runtime(counted=manifest)
    assert len(await srv(nc, "PING", count=2)) == 2
    replies = await asyncio.gather(*(nc.request("fn.call.counted", json.dumps({"value": i}).encode(), timeout=10)
                                     for i in range(20)))
    assert sorted(body(r)["value"] for r in replies) == list(range(20))
    assert len(runs(scratch, "counted")) == 20, "each request is stored (and run) once"
