"""Expiry: an invocation still queued past its TTL (manifest ``ttl`` or ``Fn-TTL``) is never run."""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runtime import Client, Expired, FunctionError, InvocationTimeout, QueueFull
from runtime.dlq import list_dead_letters
from runtime.errors import InvalidInput, ManifestError, error_from_wire
from runtime.exitcodes import RET_FAILED
from runtime.expiry import parse_ttl
from runtime.manifest import FunctionManifest, parse_manifest
from runtime.policy import DeadLetter, Overdue, decide
from runtime.results import fetch_response
from runtime.server import EmbeddedServer

from .conftest import ROOT, RuntimeFactory, collect, eventually

SLOW = """\
name: waits
handler: tests.handlers.core:sleepy
concurrency: 1
{extra}
"""


def started(events: list[Any]) -> list[str]:
    """The call ids whose handler started, in order."""
    return [json.loads(m.data)["call_id"] for m in events if json.loads(m.data)["phase"] == "start"]


async def occupy(client: Client, events: list[Any], seconds: float) -> None:
    """Keep the only slot of ``waits`` busy for ``seconds`` from now on."""
    await client.submit("waits", {"seconds": seconds}, call_id="occupier")
    await eventually(lambda: "occupier" in started(events), message="the slow call to start")


async def test_fifty_calls_queued_past_their_ttl_never_run_and_are_dead_lettered(
        runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext) -> None:
    await runtime(waits=SLOW.format(extra="ttl: 1s"))
    events, _ = await collect(nc, "test.events.waits")
    async with Client(nats_server.url) as client:
        await occupy(client, events, 2.0)
        calls = [client.invoke("waits", {"seconds": 0}, call_id=f"late-{i}", timeout=15) for i in range(50)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)

        assert all(isinstance(o, Expired) for o in outcomes), outcomes
        first = outcomes[0]
        assert isinstance(first, Expired) and isinstance(first, InvocationTimeout)
        assert (first.type, first.code, first.call_id) == ("Expired", 504, "late-0")
        assert "past its TTL of 1s" in first.message
        # The outcome is stored by call id too.
        with pytest.raises(Expired):
            await client.result("late-7")
        # Once the queue is clear, a fresh call runs.
        assert await client.invoke("waits", {"seconds": 0}, call_id="fresh") == {"slept": 0}

    assert started(events) == ["occupier", "fresh"], "no expired call ever started"
    letters = (await list_dead_letters(nc, js, "waits")).letters
    assert sorted(d.call_id or "" for d in letters) == sorted(f"late-{i}" for i in range(50))
    assert {d.reason for d in letters} == {"expired"} and {d.deliveries for d in letters} == {1}

    listed = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "runtime", "dlq", "ls", "--function",
                                                      "waits", "--json", "--server", nats_server.url],
                                     cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    shown = json.loads(listed.stdout)
    assert len(shown) == 50 and {d["reason"] for d in shown} == {"expired"}
    assert shown[0]["error"].startswith("Expired: waited ")


async def test_a_raw_nats_client_sets_a_ttl_per_call_and_it_wins_over_the_manifest(
        runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext) -> None:
    await runtime(waits=SLOW.format(extra="ttl: 500ms"))
    events, _ = await collect(nc, "test.events.waits")
    answers, _ = await collect(nc, "test.answers.>")
    async with Client(nats_server.url) as client:
        await occupy(client, events, 1.5)
    body = json.dumps({"seconds": 0}).encode()
    for call_id, ttl in (("short", "300ms"), ("seconds", "0.4"), ("long", "30s"), ("manifest", None)):
        headers = {"Nats-Msg-Id": call_id, "Fn-Reply-To": f"test.answers.{call_id}"}
        if ttl is not None:
            headers["Fn-TTL"] = ttl
        await js.publish("fn.invoke.waits", body, headers=headers)

    await eventually(lambda: len(answers) == 4, message="four answers")
    by_call = {m.subject.rsplit(".", 1)[1]: m for m in answers}
    for expired in ("short", "seconds", "manifest"):
        headers = by_call[expired].headers
        assert headers["Nats-Service-Error-Code"] == "504", expired
        assert headers["Nats-Service-Error"].startswith("Expired: waited "), headers
        assert json.loads(by_call[expired].data)["error"]["type"] == "Expired"
    assert json.loads(by_call["long"].data) == {"slept": 0}
    assert started(events) == ["occupier", "long"]

    stored = await fetch_response(js, "short")
    assert stored is not None and isinstance(stored.error, Expired)
    letters = {d.call_id or "": d for d in (await list_dead_letters(nc, js, "waits")).letters}
    assert sorted(letters) == ["manifest", "seconds", "short"]
    assert letters["short"].reason == "expired" and "TTL of 0.3s" in letters["short"].error
    assert "TTL of 0.5s" in letters["manifest"].error


async def test_a_bad_ttl_header_is_refused_as_invalid_input_and_serving_goes_on(
        runtime: RuntimeFactory, nc: NATS, js: JetStreamContext) -> None:
    await runtime(waits=SLOW.format(extra=""))
    events, _ = await collect(nc, "test.events.waits")
    body = json.dumps({"seconds": 0}).encode()
    bad = ["soon", "-5", "0", "nan", "inf", "1e999", "x" * 5000, "30 s s"]
    for i, ttl in enumerate(bad):
        await js.publish("fn.invoke.waits", body, headers={"Nats-Msg-Id": f"bad-{i}", "Fn-TTL": ttl})
    await js.publish("fn.invoke.waits", body, headers={"Nats-Msg-Id": "good", "Fn-TTL": "1m"})

    await eventually(lambda: started(events) == ["good"], message="the good call to run")
    for i in range(len(bad)):
        stored = await eventually(functools.partial(fetch_response, js, f"bad-{i}"), message=f"bad-{i}'s outcome")
        assert isinstance(stored.error, InvalidInput), stored.error
        assert stored.error.message.startswith("the Fn-TTL header '"), stored.error.message
        assert len(stored.error.message) < 300
    letters = (await list_dead_letters(nc, js, "waits")).letters
    assert len(letters) == len(bad) and {d.reason for d in letters} == {"invalid_input"}


async def test_a_retry_runs_even_past_the_ttl(runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    # The TTL bounds the wait before a call starts; a started call's retries are not cut short.
    await runtime(later="name: later\nhandler: tests.handlers.core:retry_later\nttl: 300ms\n")
    async with Client(nats_server.url) as client:
        assert await client.invoke("later", {"delay": 0.8}, timeout=10) == {"attempt": 2}


async def test_submit_and_the_command_line_send_the_ttl(runtime: RuntimeFactory, nats_server: EmbeddedServer,
                                                        nc: NATS, js: JetStreamContext) -> None:
    await runtime(waits=SLOW.format(extra=""))
    events, _ = await collect(nc, "test.events.waits")
    async with Client(nats_server.url) as client:
        await occupy(client, events, 2.5)   # longer than the command takes to start and store its call
        call = await client.submit("waits", {"seconds": 0}, ttl=0.2)
        with pytest.raises(ValueError, match="ttl must be"):
            await client.submit("waits", {}, ttl=0)
        command = [sys.executable, "-m", "runtime", "invoke", "waits", '{"seconds": 0}', "--ttl", "200ms",
                   "--call-id", "from-cli", "--server", nats_server.url]
        result = await asyncio.to_thread(subprocess.run, command, cwd=ROOT, capture_output=True, text=True,
                                         timeout=30)
        with pytest.raises(Expired):
            await client.result(call.id, wait=5)
    assert result.returncode == RET_FAILED, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Expired: waited " in result.stderr
    assert "(code 504)" in result.stderr
    assert started(events) == ["occupier"]


@pytest.mark.parametrize("ttl,problem", [("0s", "greater than zero"), (-1, "negative"), ("soon", "duration")])
def test_a_manifest_ttl_must_be_a_positive_duration(ttl: object, problem: str) -> None:
    with pytest.raises(ManifestError, match=problem):
        parse_manifest({"name": "f", "handler": "m:f", "ttl": ttl}, "f.yaml")
    manifest = parse_manifest({"name": "f", "handler": "m:f", "ttl": "90s"}, "f.yaml")
    assert getattr(manifest, "ttl", None) == 90.0


def test_the_policy_dead_letters_an_overdue_call_as_expired_on_any_attempt_budget() -> None:
    manifest = parse_manifest({"name": "f", "handler": "m:f", "retry": {"max_deliver": 5}}, "f.yaml")
    assert isinstance(manifest, FunctionManifest)
    decision = decide(Overdue(ttl=1.0, waited=2.5), 1, manifest)
    assert isinstance(decision, DeadLetter) and decision.reason == "expired"
    assert isinstance(decision.error, Expired) and decision.error.code == 504
    assert decision.error.described == "Expired: waited 2.5s in the queue, past its TTL of 1s; it was not run"


def test_expired_comes_back_from_the_wire_as_itself_and_other_504s_do_not() -> None:
    assert type(error_from_wire(504, "Expired", "waited")) is Expired
    assert type(error_from_wire(504, "InvocationTimeout", "slow")) is InvocationTimeout
    assert type(error_from_wire(500, "Expired", "a function's own exception class")) is FunctionError
    assert type(error_from_wire(429, "QueueFull", "full")) is QueueFull


@pytest.mark.parametrize("text,seconds", [("30s", 30.0), ("250ms", 0.25), ("5m", 300.0), ("1.5", 1.5), ("2", 2.0)])
def test_a_ttl_header_is_a_duration_or_seconds(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds
