"""Fan-out example: issues an invoice for each new order (``orders.created``).

Its manifest (manifests/invoice.yaml) names an ``output``: the invoice it returns is published
as an ``invoices.issued`` event, which runs ``notify``. A retried call publishes it once (the
event's Nats-Msg-Id is made of the call id).
"""

from __future__ import annotations

from pydantic import BaseModel

from runtime import Context

from .orders import Order


class Invoice(BaseModel):
    number: str
    order: int
    customer: str
    total: float


async def main(event: Order, ctx: Context) -> Invoice:
    total = round(sum(item.quantity * item.price for item in event.items), 2)
    ctx.logger.info("invoice INV-%d of order %d: %.2f", event.id, event.id, total)
    return Invoice(number=f"INV-{event.id}", order=event.id, customer=event.customer, total=total)
