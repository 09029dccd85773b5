"""What the x402 service returns: plain pydantic models (no x402 import, so importing them costs nothing).

Amounts are atomic USDC units as decimal strings (6 decimals: "1000000" is 1 USD), as on the x402 wire, with the
USD value beside them; LUC are integers. Times are UTC ISO-8601 with milliseconds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Mode = Literal["local", "http", "stripe"]


class RequirementsResult(BaseModel):
    """A stored quote and its 402 challenge."""

    quote_id: str = Field(description="pass it back with the payment: verify_x402_receipt(quote_id=...)")
    x402_version: Literal[1, 2]
    network: str = Field(description="CAIP-2 network id, e.g. eip155:84532 (Base Sepolia)")
    asset: str = Field(description="the USDC contract address on that network")
    pay_to: str
    amount_atomic: str = Field(description="atomic USDC units (6 decimals)")
    amount_usd: str
    agent_id: str | None = Field(description="the agent wallet a payment for this quote credits")
    luc: int = Field(description="LUC credited to agent_id when paid (0: nothing to credit)")
    max_timeout_seconds: int
    expires_at: str
    payment_required: dict[str, Any] = Field(description="the x402 PaymentRequired object (wire JSON, camelCase)")
    header: str = Field(description="its base64 value for the PAYMENT-REQUIRED header")


class Receipt(BaseModel):
    """A payment verified, settled and recorded once, and the wallet credit written with it."""

    receipt_id: str
    quote_id: str
    mode: Mode
    x402_version: int
    network: str = Field(description="CAIP-2 network of the payment ('stripe' for a reconciled PaymentIntent)")
    asset: str
    payer: str
    pay_to: str
    amount_atomic: str
    amount_usd: str
    nonce: str
    tx_hash: str | None = Field(description="settlement transaction (simulated and deterministic in local mode)")
    payment_intent: str | None = Field(description="the Stripe PaymentIntent reconciled (stripe mode)")
    agent_id: str | None
    luc_credited: int
    balance_after: int | None = Field(description="the credited wallet's balance after the credit")
    settlement: dict[str, Any] = Field(description="the x402 SettleResponse (wire JSON)")
    payment_response_header: str = Field(description="its base64 value for the PAYMENT-RESPONSE header")
    created_at: str


class ReceiptRow(BaseModel):
    """One line of the operator's receipts report."""

    receipt_id: str
    quote_id: str | None
    created_at: str
    mode: str
    network: str
    asset: str
    payer: str
    amount_atomic: str
    amount_usd: str
    tx_hash: str | None
    payment_intent: str | None
    agent_id: str | None
    luc_credited: int


class PayerRegistration(BaseModel):
    """A payer address registered for an agent wallet."""

    agent_id: str
    address: str = Field(description="the registered payer address (lowercase)")
    payers: list[str] = Field(description="every payer address registered for this wallet")
    message: str = Field(description="the registration message the address signed")
