"""What an order event looks like: shared by the fan-out example's functions (audit, invoice)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Item(BaseModel):
    sku: str = Field(min_length=1)
    quantity: int = Field(default=1, ge=1)
    price: float = Field(ge=0)   # per unit


class Order(BaseModel):
    """The body of ``orders.created`` (and of the other ``orders.*`` events ``audit`` records)."""

    id: int
    customer: str = Field(min_length=1)
    items: list[Item] = Field(default_factory=list)
