"""Handlers for the trigger tests: each records what it saw in memory, by function."""

from __future__ import annotations

from typing import Any

from runtime.context import Context

seen: dict[str, list[dict[str, Any]]] = {}
attempts: dict[str, int] = {}
fixed = {"value": False}


def _record(name: str, event: Any, ctx: Context) -> None:
    seen.setdefault(name, []).append({"event": event, "subject": ctx.subject, "trigger": ctx.trigger,
                                      "call_id": ctx.call_id, "attempt": ctx.attempt,
                                      "caused_by": ctx.headers.get("Fn-Call-Id")})


async def audit(event: Any, ctx: Context) -> Any:
    _record("audit", event, ctx)
    return {"audited": event}


async def billing(event: Any, ctx: Context) -> Any:
    _record("billing", event, ctx)
    return {"billed": event}


async def broken(event: Any, ctx: Context) -> Any:
    """Raises until ``fixed`` is set."""
    _record("broken", event, ctx)
    if not fixed["value"]:
        raise ValueError("the mail server is down")
    return "sent"


async def shaky(event: Any, ctx: Context) -> Any:
    """Fails its first two attempts of each event, then returns its output."""
    _record("shaky", event, ctx)
    if ctx.attempt < 3:
        raise RuntimeError(f"attempt {ctx.attempt} fails")
    return {"from": event}


async def after(event: Any, ctx: Context) -> Any:
    _record("after", event, ctx)
    return None


gate: dict[str, Any] = {}


async def gated(event: Any, ctx: Context) -> Any:
    """Waits for ``gate["open"]`` (an asyncio.Event the test sets) before it returns."""
    _record("gated", event, ctx)
    await gate["open"].wait()
    return None
