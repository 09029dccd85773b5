"""What the wallet ledger returns: small pydantic models a tool can hand back as its structured result.

Amounts are integer LUC; a signed `amount` is seen from the account it belongs to (positive: credits in). Times are
UTC ISO-8601 with milliseconds, as everywhere in the store.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..store.ledger import HoldView, LedgerEntry, LedgerViolation, TxnKind  # rows the store reads, returned as they are

__all__ = ["FreezeResult", "HoldPlaced", "HoldResolved", "HoldView", "LedgerEntry", "LedgerResult", "LedgerViolation",
           "Posting", "TransactionPage", "Transfer", "TxnKind", "UsdCredit", "Wallet", "WalletCreated"]


class LedgerResult(BaseModel):
    replayed: bool = Field(
        default=False, description="true when this is the stored first result of a call repeated with the same key"
    )


class WalletCreated(LedgerResult):
    wallet_id: str
    agent_id: str
    customer_id: str
    daily_cap: int | None = Field(description="LUC the wallet may spend per UTC day; null = no cap")
    created_at: str


class Posting(LedgerResult):
    """A credit or a debit of one wallet."""

    txn_id: str
    kind: Literal["credit", "debit"]
    agent_id: str
    amount: int = Field(description="LUC moved (positive)")
    balance_after: int
    available_after: int = Field(description="balance minus active holds, after this transaction")
    counterparty: str = Field(description="the system account on the other side, e.g. system:issuance")
    created_at: str


class UsdCredit(Posting):
    cents: int = Field(description="USD cents paid for the top-up")
    luc_per_usd: int = Field(description="the rate applied: LUC = cents * luc_per_usd // 100 (rounded down)")


class Transfer(LedgerResult):
    txn_id: str
    from_agent: str
    to_agent: str
    amount: int
    from_balance_after: int
    from_available_after: int
    to_balance_after: int
    created_at: str


class HoldPlaced(LedgerResult):
    hold_id: str
    txn_id: str
    agent_id: str
    amount: int = Field(description="LUC reserved")
    expires_at: str = Field(description="when the hold releases itself if not captured or released")
    balance: int
    available_after: int
    created_at: str


class HoldResolved(LedgerResult):
    hold_id: str
    txn_id: str
    agent_id: str
    status: Literal["captured", "released"]
    captured: int = Field(description="LUC posted to system:revenue")
    released: int = Field(description="LUC returned to the available balance")
    balance_after: int
    available_after: int
    created_at: str


class FreezeResult(LedgerResult):
    agent_id: str
    frozen: bool
    changed: bool = Field(description="false when the wallet was already in this state")
    reason: str


class Wallet(BaseModel):
    wallet_id: str
    agent_id: str
    customer_id: str
    balance: int
    held: int = Field(description="LUC reserved by active, unexpired holds")
    available: int = Field(description="balance - held: what a debit, hold or transfer may use")
    daily_cap: int | None
    spent_today: int = Field(description="LUC spent this UTC day: debits, captured holds, outgoing transfers")
    cap_remaining: int | None = Field(description="daily_cap - spent_today - held; null without a cap")
    cap_resets_at: str = Field(description="the next 00:00 UTC, when spent_today starts again from 0")
    frozen: bool
    holds: list[HoldView]
    recent: list[LedgerEntry] = Field(description="the latest entries, newest first")
    created_at: str
    updated_at: str


class TransactionPage(BaseModel):
    agent_id: str
    entries: list[LedgerEntry] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as cursor for the next (older) page; null on the last page")
