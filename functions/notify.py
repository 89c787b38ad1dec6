"""Pipeline example: tells the customer about an invoice (``invoices.issued``, the output of ``invoice``).

The event's ``Fn-Call-Id`` header is the call id of the ``invoice`` call that issued it. Nothing
is sent here: the message is returned (and logged), as a mail or chat API call would be made.
"""

from __future__ import annotations

from pydantic import BaseModel

from runtime import Context

from .invoice import Invoice


class Notice(BaseModel):
    to: str
    text: str
    issued_by: str | None   # the call id of the invoice call


async def main(event: Invoice, ctx: Context) -> Notice:
    text = f"Invoice {event.number} for order {event.order}: {event.total:.2f} due."
    ctx.logger.info("notified %s of %s", event.customer, event.number)
    return Notice(to=event.customer, text=text, issued_by=ctx.headers.get("Fn-Call-Id"))
