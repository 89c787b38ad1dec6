"""Fan-out example: records every order event (``orders.>``), whatever else runs on it.

One of three functions on the example's events (see manifests/audit.yaml): ``invoice`` also runs
on each ``orders.created``, on its own consumer, so neither waits for nor fails with the other.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from runtime import Context


class AuditRecord(BaseModel):
    subject: str    # the event's own subject, such as orders.created
    trigger: str | None
    order: Any      # recorded as it came, valid order or not: an audit trail keeps everything


async def main(event: Any, ctx: Context) -> AuditRecord:
    ctx.logger.info("recorded %s (trigger %s)", ctx.subject, ctx.trigger)
    return AuditRecord(subject=ctx.subject, trigger=ctx.trigger, order=event)
