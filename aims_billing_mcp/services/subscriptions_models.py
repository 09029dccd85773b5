"""What the subscription service returns: tiers, the checkout that starts a subscription, billing status, and
cancellation. Prices are integer minor units; times are epoch seconds with an ISO-8601 twin where an agent reads
them."""

from __future__ import annotations

from pydantic import BaseModel, Field

from ..models import MutationMeta


class Entitlements(BaseModel):
    tokens_per_month: int = Field(description="LUC units included per month")
    agents: int = Field(description="Agent wallets allowed")
    concurrent: int = Field(description="Tasks running at once")


class TierInfo(BaseModel):
    id: str
    name: str
    description: str
    monthly_price: int = Field(description="Cents per month")
    monthly_price_display: str
    commitment_months: int = Field(description="Months billed")
    delivered_months: int = Field(description="Months of service")
    entitlements: Entitlements
    stripe_price: str | None = Field(description="The configured Stripe price id; null for P2P or before setup-stripe")
    aliases: list[str]


class TierList(BaseModel):
    tiers: list[TierInfo]
    mode: str = Field(description="sandbox, test or live")


class SubscriptionCheckout(BaseModel):
    id: str
    url: str | None
    tier: str
    customer: str | None = None
    customer_email: str | None = None
    price: str
    overage_price: str | None = Field(default=None, description="The metered price that bills usage beyond the "
                                      "allowance (null if setup-stripe ran before metering existed)")
    trial_days: int = Field(description="Free days before the first charge (the 9mo tier's 3 extra months)")
    expires_at: int | None = None


class SubscriptionCheckoutResult(MutationMeta):
    checkout_session: SubscriptionCheckout | None = None


class LastEvent(BaseModel):
    id: str
    type: str
    created: int


class BillingStatus(BaseModel):
    customer: str
    tier: str = Field(description="The tier the customer is entitled to now (p2p without a live subscription)")
    subscribed_tier: str | None = Field(description="The tier of the customer's subscription, whatever its status")
    status: str = Field(description="Stripe's subscription status (active, trialing, past_due, canceled, ...) or none")
    entitlements: Entitlements
    subscription: str | None = None
    current_period_end: int | None = None
    current_period_end_iso: str | None = None
    commitment_end: int | None = None
    commitment_end_iso: str | None = None
    cancel_at: int | None = None
    cancel_at_period_end: bool = False
    last_event: LastEvent | None = None


class CancellationOut(BaseModel):
    subscription: str
    status: str
    ends_at: int | None = Field(description="When service ends (epoch seconds); null if it already ended")
    ends_at_iso: str | None = None
    cancel_at_period_end: bool
    commitment_end: int | None = None
    commitment_waived: bool = Field(description="true when an immediate cancellation ended it before its commitment")


class CancellationResult(MutationMeta):
    cancellation: CancellationOut | None = None
