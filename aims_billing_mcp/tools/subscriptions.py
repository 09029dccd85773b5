"""Subscription tools on the 3-6-9 tiers: thin functions over SubscriptionService."""

import time
from typing import Annotated

import anyio
from pydantic import Field

from ..models import (
    CustomerId,
    DryRun,
    IdempotencyKey,
    Url,
)
from ..services.subscriptions_models import BillingStatus, CancellationResult, SubscriptionCheckoutResult, TierList
from .context import ToolContext, services
from .registry import tool

Email = Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=512)]


@tool(
    "List tiers", "read",
    summary="the 3-6-9 tiers: price, months billed and delivered, tokens/agents/concurrency, Stripe price id",
)
async def list_tiers(ctx: ToolContext) -> TierList:
    """The 3-6-9 tiers (P2P, 3mo, 6mo, 9mo): monthly price in cents, months billed and delivered, tokens per month,
    agents and concurrent tasks, and the Stripe price id of each paid tier where it is set up. Read-only."""
    return await services(ctx).subscriptions.list_tiers()


@tool(
    "Create subscription checkout", "write",
    summary="a Checkout Session in subscription mode for a tier, carrying customer and tier in metadata; refused "
        "while the customer has a live tier",
    params="**`tier`** (`3mo`/`6mo`/`9mo` or `starter`/`pro`/`enterprise`), `customer` or `customer_email`, "
        "`success_url`, `cancel_url`",
)
async def create_subscription_checkout(
    ctx: ToolContext,
    tier: Annotated[
        str, Field(min_length=1, max_length=40, description="3mo, 6mo or 9mo (or starter, pro, enterprise)")
    ],
    customer: Annotated[
        CustomerId | None, Field(description="Existing customer (cus_...); or give customer_email")
    ] = None,
    customer_email: Annotated[Email | None, Field(description="Email of a new customer; or give customer")] = None,
    success_url: Annotated[Url | None, Field(description="Where Stripe sends the human after paying")] = None,
    cancel_url: Annotated[Url | None, Field(description="Where Stripe sends the human who backs out")] = None,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> SubscriptionCheckoutResult:
    """Start a Stripe Checkout Session in subscription mode for a tier and return its URL for the human to pay.
    The session carries our customer and tier in metadata; the 9mo tier's 3 free months are a trial. Once paid,
    Stripe's webhook provisions the tier (see get_billing_status). Refused while the customer has a live tier: a
    tier changes between periods (cancel_subscription first)."""
    return await services(ctx).subscriptions.create_subscription_checkout(
        tier=tier, customer=customer, customer_email=customer_email, success_url=success_url, cancel_url=cancel_url,
        idempotency_key=idempotency_key, dry_run=dry_run,
    )


@tool(
    "Get billing status", "read",
    summary="a customer's tier, status and entitlements now, period end, commitment end, last event applied",
)
async def get_billing_status(
    ctx: ToolContext,
    customer: Annotated[CustomerId, Field(description="Customer (cus_...)")],
) -> BillingStatus:
    """A customer's tier, subscription status and entitlements now (tokens per month, agents, concurrent tasks),
    with the current period end, the commitment end and the last Stripe event applied. A customer without a
    subscription is on P2P (status none). past_due keeps the tier while Stripe retries the payment. Read-only."""
    return await services(ctx).subscriptions.get_billing_status(customer)


@tool(
    "Cancel subscription", "write", destructive=True,
    summary="cancels at the period end, or at the commitment end when later; `immediately` ends it now, the usage "
        "so far on a final invoice",
    params="`customer` or `subscription`, `immediately`",
)
async def cancel_subscription(
    ctx: ToolContext,
    customer: Annotated[CustomerId | None, Field(description="Customer whose subscription to cancel")] = None,
    subscription: Annotated[
        str | None, Field(pattern=r"^sub_[A-Za-z0-9_]+$", description="Or the subscription id (sub_...)")
    ] = None,
    immediately: Annotated[
        bool, Field(description="true: end it now, waiving any commitment. Default: at the end of the current "
                    "period, or at the commitment end if that is later")
    ] = False,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> CancellationResult:
    """Cancel a customer's subscription. By default service continues to the end of the paid period, or to the
    commitment end when that is later (Stripe's cancel_at); immediately=true ends it now and invoices the period's
    usage so far on a final invoice. The customer then falls back to P2P."""
    state = services(ctx)
    if immediately and not dry_run:
        # Stripe's final invoice bills the usage it holds stamped before the cancellation's second: deliver what is
        # recorded, and let the second of the latest event pass (at most 1 s), so every answered event is billed.
        await state.flusher.flush_once()
        await anyio.sleep(1 - time.time() % 1)
    return await state.subscriptions.cancel_subscription(
        customer=customer, subscription=subscription, immediately=immediately, idempotency_key=idempotency_key,
        dry_run=dry_run,
    )
