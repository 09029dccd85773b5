"""Catalog and checkout tools: thin functions whose signature is the input schema and docstring the description."""

from typing import Annotated, Literal

from pydantic import Field

from ..models import Currency, CustomerId, DryRun, IdempotencyKey, LineItem, Metadata, ProductId, Recurring, Url
from ..services.catalog import (
    Balance,
    CheckoutSessionResult,
    CustomerResult,
    InvoiceList,
    PaymentLinkResult,
    PortalSessionResult,
    PriceResult,
    ProductResult,
)
from .context import ToolContext, services
from .registry import tool

NonEmpty = Annotated[str, Field(min_length=1, max_length=5000)]


@tool(
    "Create product", "write",
    summary="creates a product (`prod_`)",
)
async def create_product(
    ctx: ToolContext,
    name: Annotated[str, Field(min_length=1, max_length=250, description="Product name shown at checkout")],
    description: Annotated[str | None, Field(max_length=5000, description="Longer description")] = None,
    metadata: Metadata = None,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> ProductResult:
    """Create a Stripe product (prod_...): the thing you sell. Add prices to it with create_price."""
    return await services(ctx).catalog.create_product(
        name=name, description=description, metadata=metadata, idempotency_key=idempotency_key, dry_run=dry_run
    )


@tool(
    "Create price", "write",
    summary="creates a one-time or recurring price (`price_`) for a product",
    params="**`product`**, **`currency`**, **`unit_amount`**, `recurring{interval, interval_count}`, `lookup_key`, "
        "`nickname`",
)
async def create_price(
    ctx: ToolContext,
    product: Annotated[ProductId, Field(description="Product id (prod_...) this price belongs to")],
    currency: Annotated[Currency, Field(description="ISO currency code, e.g. usd")],
    unit_amount: Annotated[
        int, Field(gt=0, le=10**12, description="Price in minor units (cents for usd): 1999 means $19.99. Above 0, "
                   "at most 10**12")
    ],
    recurring: Annotated[
        Recurring | None, Field(description="Set for a subscription price, e.g. {interval: month}; omit for one-time")
    ] = None,
    lookup_key: Annotated[
        str | None, Field(min_length=1, max_length=200, description="Stable name to find this price by later")
    ] = None,
    nickname: Annotated[str | None, Field(max_length=250, description="Internal label")] = None,
    metadata: Metadata = None,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> PriceResult:
    """Create a price (price_...) for a product: one-time, or recurring when `recurring` is given.
    Amounts are integers in minor units and are refused above the operator's per-call ceiling."""
    return await services(ctx).catalog.create_price(
        product=product, currency=currency, unit_amount=unit_amount, recurring=recurring, lookup_key=lookup_key,
        nickname=nickname, metadata=metadata, idempotency_key=idempotency_key, dry_run=dry_run,
    )


@tool(
    "Create customer", "write",
    summary="creates a customer (`cus_`)",
    params="`email` and/or `name`, `description`, `metadata`",
)
async def create_customer(
    ctx: ToolContext,
    email: Annotated[
        str | None, Field(min_length=3, max_length=512, pattern=r"^[^@\s]+@[^@\s]+$", description="Email address")
    ] = None,
    name: Annotated[str | None, Field(min_length=1, max_length=256, description="Full name or business name")] = None,
    description: Annotated[str | None, Field(max_length=5000, description="Internal note")] = None,
    metadata: Metadata = None,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> CustomerResult:
    """Create a Stripe customer (cus_...) to bill, with an email and/or a name."""
    return await services(ctx).catalog.create_customer(
        email=email, name=name, description=description, metadata=metadata, idempotency_key=idempotency_key,
        dry_run=dry_run,
    )


@tool(
    "Create payment link", "write",
    summary="creates a shareable payment link (`plink_`); checks each price exists and holds the total against the "
        "ceiling",
    params="**`line_items`**, `line_items[{price, quantity}]`, `after_completion_url`",
)
async def create_payment_link(
    ctx: ToolContext,
    line_items: Annotated[
        list[LineItem], Field(min_length=1, max_length=20, description="What the link sells: [{price, quantity}]")
    ],
    after_completion_url: Annotated[
        Url | None, Field(description="Where to send the buyer after paying (after_completion[redirect][url])")
    ] = None,
    metadata: Metadata = None,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> PaymentLinkResult:
    """Create a shareable payment link (plink_...) for one or more prices; anyone with the URL can pay it.
    Each price is checked to exist and the total is held against the per-call ceiling."""
    return await services(ctx).catalog.create_payment_link(
        line_items=line_items, after_completion_url=after_completion_url, metadata=metadata,
        idempotency_key=idempotency_key, dry_run=dry_run,
    )


@tool(
    "Create checkout session", "write",
    summary="starts a Stripe Checkout Session (`cs_`) for a human to pay, one-time or subscription",
    params="**`line_items`**, `mode` (`payment`/`subscription`), `success_url`, `cancel_url`, `customer` or "
        "`customer_email`, `client_reference_id`",
)
async def create_checkout_session(
    ctx: ToolContext,
    line_items: Annotated[list[LineItem], Field(min_length=1, max_length=20, description="[{price, quantity}]")],
    mode: Annotated[
        Literal["payment", "subscription"],
        Field(description="payment: one-time prices; subscription: recurring prices"),
    ] = "payment",
    success_url: Annotated[
        Url | None, Field(description="Where Stripe sends the buyer after paying; may contain {CHECKOUT_SESSION_ID}")
    ] = None,
    cancel_url: Annotated[Url | None, Field(description="Where Stripe sends the buyer who backs out")] = None,
    customer: Annotated[CustomerId | None, Field(description="Existing customer (cus_...) to charge")] = None,
    customer_email: Annotated[
        str | None, Field(pattern=r"^[^@\s]+@[^@\s]+$", max_length=512, description="Prefill email for a new buyer")
    ] = None,
    client_reference_id: Annotated[
        str | None, Field(min_length=1, max_length=200, description="Your own id for this purchase")
    ] = None,
    metadata: Metadata = None,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> CheckoutSessionResult:
    """Start a Stripe Checkout Session (cs_...) and return its URL for a human to pay: one-time (mode=payment)
    or a subscription (mode=subscription)."""
    return await services(ctx).catalog.create_checkout_session(
        mode=mode, line_items=line_items, success_url=success_url, cancel_url=cancel_url, customer=customer,
        customer_email=customer_email, client_reference_id=client_reference_id, metadata=metadata,
        idempotency_key=idempotency_key, dry_run=dry_run,
    )


@tool(
    "Create billing portal session", "write",
    summary="a customer portal URL (`bps_`) to manage cards, invoices, subscriptions",
)
async def create_billing_portal_session(
    ctx: ToolContext,
    customer: Annotated[CustomerId, Field(description="Customer (cus_...) who will manage their billing")],
    return_url: Annotated[Url | None, Field(description="Where the portal's back link goes")] = None,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> PortalSessionResult:
    """Create a customer portal session (bps_...): a short-lived URL where the customer updates cards,
    downloads invoices and cancels subscriptions."""
    return await services(ctx).catalog.create_billing_portal_session(
        customer=customer, return_url=return_url, idempotency_key=idempotency_key, dry_run=dry_run
    )


@tool(
    "List invoices", "read",
    summary="invoices newest first, one page at a time",
)
async def list_invoices(
    ctx: ToolContext,
    customer: Annotated[CustomerId | None, Field(description="Only this customer's invoices")] = None,
    status: Annotated[
        Literal["draft", "open", "paid", "uncollectible", "void"] | None, Field(description="Only this status")
    ] = None,
    subscription: Annotated[
        str | None, Field(pattern=r"^sub_[A-Za-z0-9_]+$", description="Only this subscription's invoices")
    ] = None,
    limit: Annotated[int, Field(ge=1, le=100, description="Page size, 1-100")] = 10,
    starting_after: Annotated[
        str | None, Field(pattern=r"^in_[A-Za-z0-9_]+$", description="next_cursor from the previous page")
    ] = None,
) -> InvoiceList:
    """List invoices, newest first, one page at a time: pass next_cursor back as starting_after while has_more."""
    return await services(ctx).catalog.list_invoices(
        customer=customer, status=status, subscription=subscription, limit=limit, starting_after=starting_after
    )


@tool(
    "Retrieve balance", "read",
    summary="the account balance by currency (available, pending) and which Stripe it is (sandbox/test/live)",
)
async def retrieve_balance(ctx: ToolContext) -> Balance:
    """The Stripe account balance by currency: available to pay out, and pending. Read-only."""
    return await services(ctx).catalog.retrieve_balance()
