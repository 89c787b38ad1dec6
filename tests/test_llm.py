"""The LLM example (functions/report.py) served for real, talking HTTP with the real ``openai`` client
to an OpenAI-compatible server on loopback: progress while it streams, the structured result, and how
API errors become retries, backoff and dead letters."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from nats.aio.client import Client as NATS

from functions.report import PROGRESS_EVERY, retry_after
from runtime import Client, Final, Progress, Rejected
from runtime.dlqlist import list_dead_letters
from runtime.server import EmbeddedServer
from runtime.testing import call

from .conftest import ROOT, RuntimeFactory, eventually
from .fakeopenai import FakeOpenAI, Reply, pieces, report_for

SHIPPED = ROOT / "manifests" / "report.yaml"
TEXT = ("JetStream keeps every invocation until a runtime acknowledges it. Retries follow the manifest's "
        "backoff. Dead letters keep what failed for good, with the reason and the error.")


def report_manifest(**changes: Any) -> str:
    """The shipped manifest with ``changes``; without rate limit and cache unless given, and a short backoff."""
    data = yaml.safe_load(SHIPPED.read_text())
    data.pop("rate_limit", None)
    data.pop("cache", None)
    data["retry"]["backoff"] = ["100ms"]
    data.update(changes)
    return yaml.safe_dump(data)


@pytest.fixture
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeOpenAI]:
    """The loopback server, and the environment that points the function at it."""
    async with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_MODEL", "fake-model")
        yield server


def expected_report(style: str = "brief") -> dict[str, Any]:
    content = report_for(TEXT)
    return {**json.loads(content), "style": style, "model": "fake-model", "chunks": len(pieces(content, 4))}


async def test_stream_yields_progress_as_the_answer_streams_then_the_report(
        api: FakeOpenAI, runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(report=report_manifest())
    async with Client(nats_server.url) as fn:
        events = [event async for event in fn.stream("report", {"text": TEXT, "style": "detailed"}, timeout=20)]
    *updates, final = events
    assert len(updates) >= 3 and all(isinstance(u, Progress) for u in updates)
    assert [(u.attempt, u.seq) for u in updates] == [(1, i) for i in range(1, len(updates) + 1)]
    assert [u.data["chunks"] for u in updates][:3] == [PROGRESS_EVERY, 2 * PROGRESS_EVERY, 3 * PROGRESS_EVERY]
    assert "".join(u.data["text"] for u in updates) == report_for(TEXT), "the updates carry the answer as it came"
    assert isinstance(final, Final) and final.value == expected_report("detailed")
    (request,) = api.requests
    assert request.body["stream"] is True and request.body["model"] == "fake-model"
    assert request.body["response_format"] == {"type": "json_object"}
    assert request.body["messages"][-1] == {"role": "user", "content": TEXT}
    assert "one paragraph" in request.body["messages"][0]["content"]


async def test_invoke_follow_prints_the_updates_then_the_report(
        api: FakeOpenAI, runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    await runtime(report=report_manifest())
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "runtime", "invoke", "report", json.dumps({"text": TEXT}),
                         "--follow", "--server", nats_server.url], cwd=ROOT, capture_output=True, text=True,
        timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) >= 3 and all(line.startswith("progress [attempt 1] {") for line in lines), lines
    assert [json.loads(line.split("] ", 1)[1])["chunks"] for line in lines][:3] == [10, 20, 30]
    assert json.loads(result.stdout) == expected_report()


async def test_a_429_is_retried_after_the_servers_retry_after_then_succeeds(
        api: FakeOpenAI, runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    api.then(Reply(429, message="Rate limit reached for requests", headers={"Retry-After": "2"}))
    await runtime(report=report_manifest())   # its backoff is 100 ms: the wait must come from the API
    async with Client(nats_server.url) as fn:
        events = [event async for event in fn.stream("report", {"text": TEXT}, timeout=20)]
    assert isinstance(events[-1], Final) and events[-1].value == expected_report()
    assert {e.attempt for e in events if isinstance(e, Progress)} == {2}
    first, second = api.requests
    assert first.status == 429 and second.status == 200
    assert 2.0 <= second.at - first.at < 4.0


async def test_a_400_is_dead_lettered_after_one_attempt_with_the_apis_message(
        api: FakeOpenAI, runtime: RuntimeFactory, nats_server: EmbeddedServer, nc: NATS) -> None:
    message = "Invalid 'messages[1].content': string too long."
    api.then(Reply(400, message=message))
    await runtime(report=report_manifest())
    async with Client(nats_server.url) as fn:
        with pytest.raises(Rejected) as raised:
            await fn.invoke("report", {"text": TEXT}, timeout=20)
    assert message in raised.value.message
    assert len(api.requests) == 1, "no retry was spent on it"
    letters = await eventually(lambda: _letters(nc), message="the dead letter")
    (letter,) = letters
    assert (letter.function, letter.reason, letter.deliveries) == ("report", "rejected", 1)
    assert message in letter.error


async def _letters(nc: NATS) -> list[Any]:
    return (await list_dead_letters(nc, nc.jetstream())).letters


async def test_a_500_twice_then_success_completes_on_attempt_3(
        api: FakeOpenAI, runtime: RuntimeFactory, nats_server: EmbeddedServer) -> None:
    api.then(Reply(500, message="The server had an error"), Reply(503, message="Overloaded"))
    await runtime(report=report_manifest())
    async with Client(nats_server.url) as fn:
        events = [event async for event in fn.stream("report", {"text": TEXT}, timeout=20)]
    assert isinstance(events[-1], Final) and events[-1].value == expected_report()
    assert {e.attempt for e in events if isinstance(e, Progress)} == {3}
    assert [r.status for r in api.requests] == [500, 503, 200]


async def test_a_connection_error_is_retried_with_the_backoff(
        api: FakeOpenAI, runtime: RuntimeFactory, nats_server: EmbeddedServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")   # nothing listens there
    await runtime(report=report_manifest(retry={"max_deliver": 2, "backoff": ["100ms"]}))
    async with Client(nats_server.url) as fn:
        with pytest.raises(Exception, match="Connection error") as raised:
            await fn.invoke("report", {"text": TEXT}, timeout=20)
    assert raised.value.type == "APIConnectionError"   # type: ignore[attr-defined]


def test_without_an_api_key_a_call_is_rejected_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = call("functions.report:main", {"text": TEXT}, root=ROOT)
    assert out.dead_letter is not None and out.dead_letter.reason == "rejected"
    assert "OPENAI_API_KEY is not set" in out.dead_letter.error.message


@pytest.mark.parametrize("headers,seconds", [
    ({"retry-after": "2"}, 2.0),
    ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
    ({"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-reset-tokens": "20ms"}, 360.0),
    ({"x-ratelimit-reset-requests": "1.5s"}, 1.5),
    ({"retry-after": "soon"}, None),
    ({}, None),
])
def test_the_wait_a_429_asks_for(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after(headers) == seconds
