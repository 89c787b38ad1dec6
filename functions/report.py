"""An LLM worker: writes a structured report of a text with an OpenAI-compatible chat model
(see manifests/report.yaml and the README's "LLM functions").

The model is asked for JSON and its answer streams in; the caller gets a progress update every
few chunks, then the report, validated by :class:`Report`. ``OPENAI_API_KEY``, ``OPENAI_MODEL``
and ``OPENAI_BASE_URL`` (any OpenAI-compatible server) are read at each call, so the module
imports, and a runtime serves it, without them. API errors become the runtime's outcomes:

- 429: ``Retry`` after the server's ``Retry-After`` (or its rate-limit reset headers);
- 408, 409, 5xx, timeouts, connection errors: raised, so the manifest's backoff applies;
- any other 4xx (a bad request, a wrong key or model): ``Reject`` with the API's message, no retries.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import weakref
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Literal

import openai
from pydantic import BaseModel, Field, ValidationError

from runtime import Context, Reject, Retry

DEFAULT_MODEL = "gpt-4o-mini"
PROGRESS_EVERY = 10          # streamed chunks (about a token each) per progress update
RETRIED_STATUSES = (408, 409)  # 4xx the API may answer differently next time (as the openai client retries)

STYLES = {"brief": "a summary of one or two sentences and at most three key points",
          "detailed": "a summary of one paragraph and three to seven key points"}


class ReportIn(BaseModel):
    text: str = Field(min_length=1, max_length=200_000)
    style: Literal["brief", "detailed"] = "brief"


class Report(BaseModel):
    """What the model must answer, as JSON."""

    title: str
    summary: str
    key_points: list[str]


class ReportOut(Report):
    style: str
    model: str
    chunks: int    # how many chunks the answer streamed in


async def main(event: ReportIn, ctx: Context) -> ReportOut:
    client, model = _client()
    parts: list[str] = []
    chunks = sent = 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=_prompt(event), stream=True, response_format={"type": "json_object"},
            timeout=max(1.0, ctx.remaining - 1.0))   # the API's timeout, before the runtime's
        async with stream:
            async for chunk in stream:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if not delta:
                    continue
                parts.append(delta)
                chunks += 1
                if chunks % PROGRESS_EVERY == 0:
                    await ctx.progress({"chunks": chunks, "text": "".join(parts[sent:])})
                    sent = len(parts)
    except openai.APIError as exc:
        raise outcome_of(exc) from None
    if sent < len(parts):
        await ctx.progress({"chunks": chunks, "text": "".join(parts[sent:])})
    answer = "".join(parts)
    try:
        report = Report.model_validate_json(answer)
    except ValidationError as exc:
        # Another attempt may well answer better: raised, so the manifest's backoff applies.
        raise ValueError(f"the model's answer is not a report ({exc.error_count()} problem(s)): "
                         f"{answer[:200]!r}") from None
    return ReportOut(**report.model_dump(), style=event.style, model=model, chunks=chunks)


def _prompt(event: ReportIn) -> list[openai.types.chat.ChatCompletionMessageParam]:
    return [{"role": "system", "content": "You write reports. Answer with a JSON object with the keys title "
                                          "(a string), summary (a string) and key_points (an array of strings): "
                                          f"{STYLES[event.style]}."},
            {"role": "user", "content": event.text}]


# ------------------------------------------------------------------ errors → outcomes


def outcome_of(exc: openai.APIError) -> BaseException:
    """What to raise for an API error: ``Retry``, ``Reject``, or the error itself (the manifest's backoff)."""
    if not isinstance(exc, openai.APIStatusError):
        return exc   # timeouts, connection errors
    status = exc.status_code
    if status == 429:
        delay = retry_after(exc.response.headers)
        if delay is None:
            return exc
        return Retry(delay, reason=f"rate limited by the API ({api_message(exc)}); retrying in {delay:g}s")
    if 400 <= status < 500 and status not in RETRIED_STATUSES:
        return Reject(f"the API refused the request ({status}): {api_message(exc)}")
    return exc


def api_message(exc: openai.APIStatusError) -> str:
    """The message of an OpenAI-style error body, else the client's own description."""
    body = exc.body
    if isinstance(body, Mapping) and isinstance(body.get("message"), str) and body["message"]:
        return str(body["message"])
    return exc.message


_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms``, ``retry-after`` (seconds or an HTTP date),
    else the later of the ``x-ratelimit-reset-*`` headers (``6m0s``, ``20ms``); None if none says."""
    if (ms := _number(headers.get("retry-after-ms"))) is not None:
        return ms / 1000
    raw = headers.get("retry-after")
    if raw:
        if (seconds := _number(raw)) is not None:
            return seconds
        try:
            return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    resets = [d for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
              if (d := _go_duration(headers.get(name))) is not None]
    return max(resets) if resets else None


def _number(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    return value if value is not None and value >= 0 else None


def _go_duration(raw: str | None) -> float | None:
    if not raw or "".join(m.group(0) for m in _GO_DURATION.finditer(raw)) != raw:
        return None
    return sum(float(n) * _UNITS[unit] for n, unit in _GO_DURATION.findall(raw))


# ------------------------------------------------------------------ the client


# One client per event loop and configuration: its connection pool serves every call of the loop.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str | None], openai.AsyncOpenAI]] = (
    weakref.WeakKeyDictionary())


def _client() -> tuple[openai.AsyncOpenAI, str]:
    """The client and model the environment configures; ``Reject`` without an API key."""
    key = os.environ.get("OPENAI_API_KEY", "")
    if not key:
        raise Reject("OPENAI_API_KEY is not set in the runtime's environment: start the runtime with it "
                     "(and OPENAI_BASE_URL for a server other than OpenAI's)")
    base_url = os.environ.get("OPENAI_BASE_URL") or None
    model = os.environ.get("OPENAI_MODEL") or DEFAULT_MODEL
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    client = clients.get((key, base_url))
    if client is None:
        # The runtime retries (with the manifest's backoff, seen in attempts and dead letters), not the client.
        client = clients[(key, base_url)] = openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0)
    return client, model
