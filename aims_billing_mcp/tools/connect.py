"""Marketplace tools (Stripe Connect): creators' connected accounts, their onboarding links, plugs and earnings."""

from typing import Annotated, Literal

from pydantic import Field

from ..models import Currency, DryRun, IdempotencyKey, PriceId, Url
from ..services.connect_models import (
    AccountLinkResult,
    ConnectedAccountList,
    ConnectedAccountResult,
    ConnectedAccountView,
    EarningsReport,
    PlugResult,
    RefundSplitResult,
)
from .context import ToolContext, services
from .registry import tool

AccountId = Annotated[str, Field(pattern=r"^acct_[A-Za-z0-9]{1,64}$", description="Connected account id (acct_...)")]


@tool(
    "Create connected account", "write",
    summary="registers a plug creator: a Stripe connected account (Accounts v2, recipient configuration) that can "
        "receive transfers once onboarded",
    params="**`display_name`**, **`country`**, `email`, `currency`, `idempotency_key`, `dry_run`",
)
async def create_connected_account(
    ctx: ToolContext,
    display_name: Annotated[str, Field(min_length=1, max_length=200, description="The creator's name, as buyers see "
                                       "it")],
    country: Annotated[str, Field(pattern=r"^[A-Za-z]{2}$", description="The creator's country, ISO 3166-1 alpha-2, "
                                  "e.g. US")],
    email: Annotated[str | None, Field(min_length=3, max_length=512, pattern=r"^[^@\s]+@[^@\s]+$",
                                       description="The creator's email")] = None,
    currency: Annotated[Currency | None, Field(description="The currency the creator receives (default: their "
                                               "country's)")] = None,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> ConnectedAccountResult:
    """Register a plug creator: a Stripe connected account (Accounts v2) able to receive transfers once onboarded.
    It starts in `onboarding`: send the creator an onboarding link with create_account_link."""
    return await services(ctx).connect.create_connected_account(
        display_name=display_name, email=email, country=country, currency=currency, idempotency_key=idempotency_key,
        dry_run=dry_run)


@tool(
    "Create account link", "write",
    summary="a one-time onboarding (or update) URL for the creator, expiring within minutes",
    params="**`account`**, **`refresh_url`**, **`return_url`**, `purpose`",
)
async def create_account_link(
    ctx: ToolContext,
    account: AccountId,
    refresh_url: Annotated[Url, Field(description="Where an expired or used link sends the creator (make a new link "
                                      "there)")],
    return_url: Annotated[Url, Field(description="Where the creator lands when done")],
    purpose: Annotated[Literal["onboarding", "update"], Field(description="onboarding (first time) or update (give "
                                                               "Stripe what it asks for later)")] = "onboarding",
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> AccountLinkResult:
    """A one-time URL where the creator gives Stripe what it requires to pay them (expires within minutes)."""
    return await services(ctx).connect.create_account_link(
        account=account, refresh_url=refresh_url, return_url=return_url, update=purpose == "update",
        idempotency_key=idempotency_key, dry_run=dry_run)


@tool(
    "Get connected account", "read",
    summary="the creator's account as Stripe has it now: can it receive transfers, what Stripe still requires, "
        "payouts",
)
async def get_connected_account(ctx: ToolContext, account: AccountId) -> ConnectedAccountView:
    """A creator's account as Stripe has it now: whether it can receive transfers, what Stripe still requires,
    its payouts status."""
    return await services(ctx).connect.get_connected_account(account)


@tool(
    "List connected accounts", "read", open_world=False,
    summary="the creators registered here with their status as Stripe's events reported it",
)
async def list_connected_accounts(
    ctx: ToolContext,
    status: Annotated[Literal["onboarding", "active", "restricted"] | None, Field(
        description="Only accounts in this status")] = None,
    limit: Annotated[int, Field(ge=1, le=100, description="At most this many, newest first")] = 20,
) -> ConnectedAccountList:
    """The creators registered here, with their status as Stripe's events last reported it."""
    return services(ctx).connect.list_connected_accounts(status, limit)


@tool(
    "Create plug", "write",
    summary="declares a plug: a one-time price sold for a creator, with their share (basis points) or the platform's "
        "fixed fee",
    params="**`plug_id`**, **`price`**, **`account`**, `creator_share_bp` or `platform_fee`, `name`",
)
async def create_plug(
    ctx: ToolContext,
    plug_id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="The plug's id, e.g. "
                                  "seo-audit")],
    price: Annotated[PriceId, Field(description="The one-time price (price_...) buyers pay for one unit")],
    account: AccountId,
    creator_share_bp: Annotated[int | None, Field(ge=0, le=10_000, description="The creator's share of each sale in "
                                                  "basis points: 0-10000 (7000 = 70%). Give this or platform_fee")]
    = None,
    platform_fee: Annotated[int | None, Field(ge=0, le=10**12, description="Or: the platform's fixed fee per unit, "
                                              "in minor units, at most the price; the creator gets the rest")] = None,
    name: Annotated[str | None, Field(min_length=1, max_length=200, description="Display name")] = None,
    idempotency_key: IdempotencyKey = None,
) -> PlugResult:
    """Declare a plug: a creator's product sold for them. Every sale of its price through checkout sessions and
    payment links, and of item `plug:<id>` through payment sessions, ACP checkouts and x402, pays the creator their
    share through Stripe Connect; the platform keeps the rest."""
    return await services(ctx).connect.create_plug(
        plug_id=plug_id, name=name, price=price, account=account, creator_share_bp=creator_share_bp,
        platform_fee=platform_fee, idempotency_key=idempotency_key)


@tool(
    "Get creator earnings", "read", open_world=False,
    summary="per creator and currency: gross, platform fees, transferred, reversed, pending; the latest sales with "
        "Stripe ids",
)
async def get_creator_earnings(
    ctx: ToolContext,
    account: Annotated[str | None, Field(pattern=r"^acct_[A-Za-z0-9]{1,64}$", description="Only this creator "
                                         "(acct_...)")] = None,
    since: Annotated[str | None, Field(pattern=r"^\d{4}-\d{2}-\d{2}", description="Only sales since this UTC date "
                                       "(YYYY-MM-DD or ISO time)")] = None,
) -> EarningsReport:
    """Per creator and currency: gross sales, platform fees, transferred, reversed by refunds, pending; and the
    latest sales with their Stripe ids."""
    return services(ctx).connect.earnings(account, since)


@tool(
    "Refund split sale", "write", destructive=True,
    summary="refunds (part of) a sale of a plug: the buyer's money back, the creator's transfer reversed and the "
        "platform fee refunded in proportion; never more than is left",
    params="**`sale`**, **`amount`**, **`idempotency_key`**, `reason`",
)
async def refund_split_sale(
    ctx: ToolContext,
    sale: Annotated[str, Field(pattern=r"^(cs_|ps_)[A-Za-z0-9_]+$", description="The sale: its checkout session "
                               "or ACP checkout (cs_...) or payment session (ps_...), as get_creator_earnings lists "
                               "it")],
    amount: Annotated[int, Field(gt=0, le=10**12, description="Minor units to give back, at most what is left of "
                                 "the sale")],
    idempotency_key: Annotated[str, Field(min_length=1, max_length=255, description="Required: the same key "
                                          "returns the first result instead of refunding twice")],
    reason: Annotated[Literal["duplicate", "fraudulent", "requested_by_customer"] | None, Field(
        description="Stripe's refund reason")] = None,
) -> RefundSplitResult:
    """Refund (part of) a sale of a plug: the buyer gets the amount back, the creator's transfer is reversed and the
    platform's fee refunded in the same proportion. Never more than what is left of the sale."""
    return await services(ctx).connect.refund_sale(sale=sale, amount=amount, reason=reason,
                                                   idempotency_key=idempotency_key)
