"""Fails on purpose to show retries: succeeds only from attempt ``succeed_on`` onwards."""

from __future__ import annotations

from pydantic import BaseModel

from runtime import Context, Reject


class FlakyIn(BaseModel):
    succeed_on: int = 3
    reject: bool = False


async def main(event: FlakyIn, ctx: Context) -> dict[str, int]:
    if event.reject:
        raise Reject("asked to reject")
    if ctx.attempt < event.succeed_on:
        raise ConnectionError(f"upstream unavailable (attempt {ctx.attempt} of {ctx.max_attempts})")
    return {"attempts": ctx.attempt}
