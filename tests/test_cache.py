"""Result caching (manifest ``cache``): the same input within the TTL is answered from the cache
(``Fn-Cache: hit``) without running the function; failures are never cached."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from runtime import Client, FunctionError, codec
from runtime.cache import cache_key
from runtime.errors import ManifestError
from runtime.loader import load_handler
from runtime.manifest import parse_manifest
from runtime.server import EmbeddedServer

from .conftest import RuntimeFactory, collect

CACHED = """\
name: cached
handler: tests.handlers.limits:computed
retry:
  max_deliver: 1
cache:
  ttl: {ttl}
"""


class Caller:
    """Calls ``cached`` as any NATS client does, keeping the answers' headers."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.count = 0

    async def __call__(self, payload: Any, headers: dict[str, str] | None = None) -> tuple[dict[str, str], Any]:
        self.count += 1
        inbox = f"_INBOX.cache-test.{self.count}"
        answered: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

        async def on_answer(msg: Msg) -> None:
            answered.set_result(msg)

        sub = await self.nc.subscribe(inbox, cb=on_answer)
        # Encoded as runtime.Client encodes it: the cache compares bytes.
        await self.nc.jetstream().publish("fn.invoke.cached", codec.encode(payload), headers={
            "Nats-Msg-Id": f"cache-test-{self.count}", "Fn-Reply-To": inbox, **(headers or {})})
        msg = await asyncio.wait_for(answered, 10)
        await sub.unsubscribe()
        return dict(msg.headers or {}), json.loads(msg.data)


async def test_the_same_input_runs_once_and_the_second_answer_is_a_hit(runtime: RuntimeFactory, nc: NATS,
                                                                       nats_server: EmbeddedServer) -> None:
    runs, _ = await collect(nc, "test.events.cached")
    await runtime(cached=CACHED.format(ttl="1h"))
    call = Caller(nc)
    first_headers, first = await call({"text": "a"})
    second_headers, second = await call({"text": "a"})
    assert "Fn-Cache" not in first_headers
    assert second_headers["Fn-Cache"] == "hit"
    assert second_headers["Fn-Call-Id"] == "cache-test-2", "a hit answers its own call id"
    assert second == first == {"text": "a", "call_id": "cache-test-1"}, "the stored result, as it was"
    assert len(runs) == 1
    _, other = await call({"text": "b"})
    assert other == {"text": "b", "call_id": "cache-test-3"} and len(runs) == 2, "a different input runs"
    bypass_headers, fresh = await call({"text": "a"}, {"Fn-Cache": "bypass"})
    assert "Fn-Cache" not in bypass_headers and fresh["call_id"] == "cache-test-4" and len(runs) == 3
    _, refreshed = await call({"text": "a"})
    assert refreshed["call_id"] == "cache-test-4", "a bypassing call's result replaces the stored one"
    async with Client(nats_server.url) as fn:
        assert await fn.invoke("cached", {"text": "a"}) == refreshed
        assert await fn.result("cache-test-2") == first, "a hit's outcome is stored by call id like any"
    assert len(runs) == 3


async def test_a_failure_is_not_cached(runtime: RuntimeFactory, nc: NATS, nats_server: EmbeddedServer) -> None:
    runs, _ = await collect(nc, "test.events.cached")
    await runtime(cached=CACHED.format(ttl="1h"))
    async with Client(nats_server.url) as fn:
        for _ in range(2):
            with pytest.raises(FunctionError, match="asked to fail"):
                await fn.invoke("cached", {"fail": True}, timeout=10)
    assert len(runs) == 2


async def test_after_the_ttl_the_function_runs_again(runtime: RuntimeFactory, nc: NATS) -> None:
    runs, _ = await collect(nc, "test.events.cached")
    await runtime(cached=CACHED.format(ttl="1s"))
    call = Caller(nc)
    await call({"text": "a"})
    hit, _ = await call({"text": "a"})
    assert hit.get("Fn-Cache") == "hit" and len(runs) == 1
    await asyncio.sleep(1.1)
    expired, again = await call({"text": "a"})
    assert "Fn-Cache" not in expired and again["call_id"] == "cache-test-3" and len(runs) == 2


async def test_entries_carry_a_message_ttl_so_the_server_removes_them(runtime: RuntimeFactory, nc: NATS) -> None:
    await runtime(cached=CACHED.format(ttl="90m"))
    await Caller(nc)({"text": "a"})
    code = load_handler("tests.handlers.limits:computed").code
    key = cache_key("cached", None, codec.encode({"text": "a"}), code)
    stored = await nc.jetstream().get_msg("KV_fn_cache", subject=f"$KV.fn_cache.{key}", direct=True)
    assert (stored.headers or {})["Nats-TTL"] == "5400s"


def test_the_key_is_the_function_and_a_digest_of_content_type_and_body() -> None:
    key = cache_key("report", "application/json", b'{"text": "a"}')
    function, digest = key.split(".")
    assert function == "report" and len(digest) == 64
    assert cache_key("report", None, b'{"text": "a"}') == key, "JSON when the call does not say"
    assert cache_key("report", "application/msgpack", b'{"text": "a"}') != key
    assert cache_key("other", "application/json", b'{"text": "a"}') != key
    assert cache_key("report", "application/json", b'{"text": "a"}', code="0123abcd") != key, "another version"


VERSIONED = """\
VERSION = {version}


async def main(event: dict) -> dict:
    return {{"version": VERSION, "text": event["text"]}}
"""


async def test_a_new_version_of_the_handler_is_not_answered_from_the_old_ones_cache(
        runtime_process: Callable[..., Any], manifest_dir: Callable[..., Path], tmp_path: Path,
        nats_server: EmbeddedServer) -> None:
    code = tmp_path / "code"
    code.mkdir()
    module = code / "cachever.py"
    manifests = manifest_dir(cachever="name: cachever\nhandler: cachever:main\ncache: {ttl: 1h}\n")
    env = {"PYTHONPATH": str(code), "RUNTIME_TRUST": "cachever", "PYTHONDONTWRITEBYTECODE": "1"}

    async def serve_and_call(times: int) -> list[tuple[Any, str | None]]:
        proc = runtime_process(manifests, env=env)
        try:
            await proc.wait_ready()
            async with Client(nats_server.url) as fn:
                answers = []
                for _ in range(times):
                    response = await fn.invoke_response("cachever", {"text": "a"}, timeout=10)
                    answers.append((response.value(), response.headers.get("Fn-Cache")))
                return answers
        finally:
            proc.stop()

    module.write_text(VERSIONED.format(version=1))
    assert await serve_and_call(2) == [({"version": 1, "text": "a"}, None), ({"version": 1, "text": "a"}, "hit")]
    assert await serve_and_call(1) == [({"version": 1, "text": "a"}, "hit")], "the same code: still cached"
    module.write_text(VERSIONED.format(version=22))
    assert await serve_and_call(2) == [({"version": 22, "text": "a"}, None), ({"version": 22, "text": "a"}, "hit")]


@pytest.mark.parametrize("cache,problem", [
    ({"ttl": "500ms"}, "cache.ttl: must be at least 1s"),
    ({}, "cache.ttl: Field required"),
    ({"ttl": "1h", "size": 3}, "cache.size: unknown field"),
])
def test_a_bad_cache_names_the_file_and_the_field(cache: dict[str, Any], problem: str) -> None:
    with pytest.raises(ManifestError) as raised:
        parse_manifest({"name": "f", "handler": "m:f", "cache": cache}, "manifests/f.yaml")
    assert str(raised.value) == f"manifests/f.yaml: {problem}"
