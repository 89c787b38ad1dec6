"""CPU-bound work in a plain ``def``: the runtime runs it in a worker thread."""

from __future__ import annotations

from pydantic import BaseModel, Field


class PrimesIn(BaseModel):
    limit: int = Field(ge=2, le=5_000_000)


class PrimesOut(BaseModel):
    limit: int
    count: int
    largest: int


def main(event: PrimesIn) -> PrimesOut:
    sieve = bytearray([1]) * (event.limit + 1)
    sieve[0:2] = b"\x00\x00"
    for n in range(2, int(event.limit**0.5) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytearray(len(range(n * n, event.limit + 1, n)))
    count = sum(sieve)
    largest = max(i for i in range(event.limit, 1, -1) if sieve[i]) if count else 0
    return PrimesOut(limit=event.limit, count=count, largest=largest)
