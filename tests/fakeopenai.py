"""An OpenAI-compatible HTTP server on loopback, for tests and benchmarks that run the real ``openai`` client.

It serves ``POST /v1/chat/completions``, streamed (server-sent events: ``data: {chunk}`` lines,
then ``data: [DONE]``) or not. Each request takes the next scripted :class:`Reply`; with the
script empty it answers a report made from the request's text. Every request is recorded with
the time it arrived, so a test can check when a retry came.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from runtime.server import free_port


@dataclass(frozen=True)
class Reply:
    """One scripted answer: a success (``content``, or a report made from the request when None), or
    an error ``status`` with an OpenAI-style body carrying ``message``."""

    status: int = 200
    content: str | None = None
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float | None = None   # seconds before the response starts; None: the server's latency


@dataclass(frozen=True)
class Seen:
    """A request as it arrived: ``at`` is ``time.monotonic()``."""

    at: float
    body: dict[str, Any]
    status: int


def report_for(text: str) -> str:
    """The JSON report the server answers for ``text`` by default."""
    words = text.split()
    sentences = [s.strip() for s in text.replace("!", ".").replace("?", ".").split(".") if s.strip()]
    return json.dumps({"title": " ".join(words[:5]) or "Empty", "summary": " ".join(words[:30]),
                       "key_points": sentences[:3] or [text]})


def pieces(content: str, size: int) -> list[str]:
    """``content`` cut as a model streams it: ``size`` characters per chunk, about a token each."""
    return [content[i:i + size] for i in range(0, len(content), size)] or [""]


class FakeOpenAI:
    """``async with FakeOpenAI() as api:`` serves on ``api.url`` (the ``OPENAI_BASE_URL``) until the block ends."""

    def __init__(self, latency: float = 0.0, chunk_chars: int = 4, chunk_delay: float = 0.0) -> None:
        self.latency = latency
        self.chunk_chars = chunk_chars
        self.chunk_delay = chunk_delay
        self.script: list[Reply] = []
        self.requests: list[Seen] = []
        self.port = free_port()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def then(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order; the default answer afterwards."""
        self.script.extend(replies)

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        reply = self.script.pop(0) if self.script else Reply()
        self.requests.append(Seen(time.monotonic(), body, reply.status))
        delay = self.latency if reply.delay is None else reply.delay
        if delay:
            await asyncio.sleep(delay)
        if reply.status != 200:
            error = {"error": {"message": reply.message or f"status {reply.status}", "type": "invalid_request_error",
                               "param": None, "code": None}}
            return web.json_response(error, status=reply.status, headers=reply.headers)
        user = next((m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
        content = report_for(user) if reply.content is None else reply.content
        model = body.get("model", "fake-model")
        if body.get("stream"):
            return await self._stream(request, model, content, reply.headers)
        return web.json_response({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": len(content) // 4,
                      "total_tokens": (len(user) + len(content)) // 4}}, headers=reply.headers)

    async def _stream(self, request: web.Request, model: str, content: str,
                      headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await response.prepare(request)
        created = int(time.time())

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            data = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(data)}\n\n".encode()

        await response.write(chunk({"role": "assistant", "content": ""}))
        for piece in pieces(content, self.chunk_chars):
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            await response.write(chunk({"content": piece}))
        await response.write(chunk({}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
