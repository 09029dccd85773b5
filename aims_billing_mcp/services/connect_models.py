"""What the Connect tools (creators, plugs, earnings) return."""

from __future__ import annotations

from pydantic import BaseModel, Field

from ..models import MutationMeta


class PayoutSchedule(BaseModel):
    """When Stripe pays the creator's balance out (their balance settings, `payments.payouts.schedule`)."""

    interval: str | None = Field(default=None, description="daily, weekly, monthly or manual (payouts made only "
                                 "through the API)")
    weekly_payout_days: list[str] | None = Field(default=None, description="weekly: the days, e.g. monday")
    monthly_payout_days: list[int] | None = Field(default=None, description="monthly: the days of the month")
    delay_days: int | None = Field(default=None, description="Days a charge's funds are held before they become "
                                   "available (settlement_timing.delay_days)")
    status: str | None = Field(default=None, description="enabled or disabled: whether the balance can be paid out")


class ConnectedAccountView(BaseModel):
    id: str = Field(description="The creator's connected account (acct_...)")
    display_name: str
    email: str | None = None
    country: str = Field(description="ISO 3166-1 alpha-2")
    currency: str = Field(description="The currency the account receives transfers in")
    status: str = Field(description="onboarding (link not completed), active (can receive transfers) or restricted "
                        "(Stripe requires more before it can)")
    can_receive_transfers: bool
    requirements_due: list[str] = Field(default_factory=list, description="What Stripe still requires")
    payouts: str | None = Field(default=None, description="Stripe's payouts capability status (get only): active, "
                                "pending, restricted or unsupported")
    payout_schedule: PayoutSchedule | None = Field(default=None, description="get only: when Stripe pays the "
                                                   "account's balance out")
    balance: dict[str, int] | None = Field(default=None, description="get only: the account's available Stripe "
                                           "balance by currency, minor units (read with the Stripe-Account header)")
    updated_at: str | None = None


class ConnectedAccountResult(MutationMeta):
    account: ConnectedAccountView | None = Field(default=None, description="The account (absent on a dry run)")


class ConnectedAccountList(BaseModel):
    accounts: list[ConnectedAccountView]


class AccountLinkResult(MutationMeta):
    account: str | None = None
    url: str | None = Field(default=None, description="Send the creator here; it works once and expires soon")
    expires_at: str | None = Field(default=None, description="RFC 3339 time after which the link no longer works")


class PlugView(BaseModel):
    id: str = Field(description="The plug's id")
    name: str
    product: str = Field(description="Stripe product (prod_...)")
    price: str = Field(description="Stripe one-time price (price_...) buyers pay")
    account: str = Field(description="The creator's connected account (acct_...)")
    currency: str
    unit_amount: int = Field(description="Minor units per unit sold")
    creator_share_bp: int | None = Field(default=None, description="The creator's share in basis points")
    platform_fee: int | None = Field(default=None, description="Or the platform's fixed fee per unit, minor units")
    creator_amount_per_unit: int = Field(description="What the creator receives per unit sold")


class PlugResult(MutationMeta):
    plug: PlugView | None = None


class SplitView(BaseModel):
    path: str = Field(description="checkout, payment_link, payment_session, acp or x402")
    sale: str = Field(description="The sale on that path (cs_..., ps_..., the x402 receipt)")
    plug: str
    account: str
    currency: str
    gross: int
    platform_fee: int
    creator_amount: int
    status: str = Field(description="declared (offered), pending (paid, transfer to make) or transferred")
    payment_intent: str | None = None
    transfer: str | None = None
    transfer_group: str | None = None
    refunded: int = 0
    reversed: int = 0
    fee_refunded: int = 0


class CreatorEarnings(BaseModel):
    account: str
    currency: str
    sales: int = Field(description="Paid sales")
    gross: int = Field(description="What buyers paid for the creator's plugs, minor units")
    platform_fees: int
    transferred: int = Field(description="Creator shares transferred to the account")
    reversed: int = Field(description="Taken back from the creator by refunds")
    fee_refunded: int = Field(description="Platform fees given back by refunds")
    pending: int = Field(description="Creator shares paid to the platform but not transferred yet")
    net_to_creator: int = Field(description="transferred - reversed")


class EarningsReport(BaseModel):
    earnings: list[CreatorEarnings]
    splits: list[SplitView] = Field(description="The latest sales, newest first, with their Stripe ids")


class RefundSplitResult(MutationMeta):
    refund: str | None = Field(default=None, description="The Stripe refund (re_...)")
    amount: int | None = None
    reversed: int | None = Field(default=None, description="Taken back from the creator(s)")
    fee_refunded: int | None = Field(default=None, description="Application fee given back")
