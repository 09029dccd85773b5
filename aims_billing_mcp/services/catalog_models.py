"""What the catalog service returns for invoices and the balance (its other results are shared value types in
models.py). Amounts are integer minor units with a display string beside them."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Invoice(BaseModel):
    id: str
    number: str | None = None
    customer: str | None
    status: str | None
    currency: str
    amount_due: int
    amount_paid: int
    amount_remaining: int
    total: int
    total_display: str
    hosted_invoice_url: str | None = None
    subscription: str | None = None
    created: int


class InvoiceList(BaseModel):
    invoices: list[Invoice]
    has_more: bool
    next_cursor: str | None = Field(description="Pass as starting_after to get the next page; null on the last page")


class BalanceAmount(BaseModel):
    currency: str
    amount: int
    display: str


class Balance(BaseModel):
    mode: str = Field(description="sandbox, test or live: which Stripe this balance is from")
    available: list[BalanceAmount]
    pending: list[BalanceAmount]
