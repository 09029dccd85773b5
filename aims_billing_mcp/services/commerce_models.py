"""What the payment session tools return."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ..models import MutationMeta


class PaymentSession(BaseModel):
    id: str = Field(description="The payment session id (ps_...)")
    customer: str | None = Field(default=None, description="The customer paying (cus_...), when known")
    agent_id: str | None = Field(default=None, description="The agent buying; its wallet receives credit items")
    item: str | None = Field(default=None, description="The item bought (pricing file id), or null for an amount")
    amount: int = Field(description="Minor units of currency (cents for usd)")
    currency: str
    amount_display: str = Field(description="The amount for people, e.g. '10.00 USD'")
    description: str | None = None
    status: str = Field(description="The PaymentIntent's status: requires_payment_method, requires_confirmation, "
                        "requires_action, processing, succeeded or canceled")
    payment_intent: str | None = Field(default=None, description="The Stripe PaymentIntent (pi_...) behind it")
    amount_received: int = Field(default=0, description="What Stripe says it received, in minor units")
    last_error: str | None = Field(default=None, description="Why the last payment attempt failed, if it did")
    fulfilled: bool = Field(description="true once fulfilment ran (exactly once per session)")
    fulfilment: dict[str, Any] | None = Field(default=None, description="What fulfilment did, e.g. "
                                              "{luc_credited, wallet_balance}")
    created_at: str
    updated_at: str


class PaymentSessionResult(MutationMeta):
    session: PaymentSession | None = Field(default=None, description="The session (absent on a dry run)")
