"""Greets someone: pydantic in, pydantic out."""

from __future__ import annotations

from pydantic import BaseModel

from runtime import Context


class HelloIn(BaseModel):
    name: str


class HelloOut(BaseModel):
    greeting: str


async def main(event: HelloIn, ctx: Context) -> HelloOut:
    ctx.logger.info("greeting %s (attempt %d)", event.name, ctx.attempt)
    return HelloOut(greeting=f"Hello, {event.name}!")
