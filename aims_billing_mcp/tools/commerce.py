"""Payment session tools: an agent pays for a LUC credit pack, a prepaid tier subscription (or an amount) through a
Stripe PaymentIntent, confirmed with a payment method or a Shared Payment Token, and the item is delivered exactly
once."""

from typing import Annotated

from pydantic import Field

from ..models import AgentId, Currency, CustomerId, DryRun, IdempotencyKey
from ..services.commerce_models import PaymentSession, PaymentSessionResult
from .context import ToolContext, services
from .registry import tool

SessionId = Annotated[str, Field(pattern=r"^ps_[A-Za-z0-9_]+$", description="The payment session id (ps_...)")]
Key = Annotated[str, Field(min_length=1, max_length=255, description="Required: the same key returns the first "
                           "result instead of paying (or canceling) twice; other arguments with it are refused")]


@tool(
    "Create payment session", "write",
    summary="a payment session on a Stripe PaymentIntent for a LUC pack (`luc_10k`, `luc_50k`), a prepaid tier "
        "(`tier_3mo`, `tier_6mo`, `tier_9mo`), a creator's plug (`plug:<id>`, split through Stripe Connect) "
        "or an amount",
    params="`item` or `amount` + `currency`, `agent_id`, `customer`, `description`, `idempotency_key`, `dry_run`",
)
async def create_payment_session(
    ctx: ToolContext,
    item: Annotated[str | None, Field(min_length=1, max_length=64, description="An item id from the pricing file, "
                                      "e.g. luc_10k (10,000 LUC for $10.00), luc_50k, or tier_3mo / tier_6mo / "
                                      "tier_9mo (a tier's whole commitment, prepaid), or plug:<id> (a creator's "
                                      "plug: see create_plug); or give amount + currency")]
    = None,
    agent_id: Annotated[AgentId | None, Field(description="The buying agent: its wallet receives a LUC pack "
                                          "(required for credit items; the wallet must exist; for a tier item its "
                                          "customer subscribes unless customer is given)")] = None,
    customer: Annotated[CustomerId | None, Field(description="The Stripe customer (cus_...) paying, if any; a tier "
                                                 "item subscribes this customer")] = None,
    amount: Annotated[int | None, Field(gt=0, le=10**12, description="Instead of an item: minor units (cents for "
                                                                     "usd), at most 10**12")] = None,
    currency: Annotated[Currency | None, Field(description="With amount: ISO currency code, e.g. usd")] = None,
    description: Annotated[str | None, Field(max_length=1000, description="Shown on the payment; defaults to "
                                             "the item's title")] = None,
    idempotency_key: IdempotencyKey = None,
    dry_run: DryRun = False,
) -> PaymentSessionResult:
    """Start paying for an item (a LUC credit pack or a prepaid tier) or an amount: creates a payment session (ps_...)
    backed by a Stripe PaymentIntent awaiting a payment method. Pay it with confirm_payment_session. A tier is
    refused for a customer who already has one (two subscriptions would bill twice)."""
    return await services(ctx).commerce.create_session(
        customer=customer, agent_id=agent_id, item=item, amount=amount, currency=currency, description=description,
        idempotency_key=idempotency_key, dry_run=dry_run,
    )


@tool(
    "Confirm payment session", "write",
    summary="confirms it with a payment method (`pm_card_visa`) or a Shared Payment Token (`spt_...`); delivers the "
        "item once (a pack credited, a tier started)",
    params="**`session_id`**, `payment_method` or `shared_payment_token`, **`idempotency_key`**",
    hints="write",
)
async def confirm_payment_session(
    ctx: ToolContext,
    session_id: SessionId,
    idempotency_key: Key,
    payment_method: Annotated[str | None, Field(pattern=r"^pm_[A-Za-z0-9_]+$", description="A payment method, "
                                                "e.g. pm_card_visa in test mode")] = None,
    shared_payment_token: Annotated[str | None, Field(pattern=r"^spt_[A-Za-z0-9_]+$", description="Or a Shared "
                                                      "Payment Token (spt_...) granted by the buyer")] = None,
) -> PaymentSession:
    """Pay a payment session with exactly one of a payment method or a Shared Payment Token. On success the item is
    delivered once (a LUC pack credits the agent's wallet; a tier item starts its subscription in Stripe, prepaid:
    see fulfilment.status and fulfilment.subscription). A decline leaves the session payable with last_error."""
    return await services(ctx).commerce.confirm_session(
        session_id, payment_method=payment_method, shared_payment_token=shared_payment_token,
        idempotency_key=idempotency_key,
    )


@tool(
    "Get payment session", "read",
    summary="re-reads the PaymentIntent (status, amount_received, currency) and delivers a paid item not yet "
        "delivered",
    hints="read-only hint (it reads Stripe; the one write it may do is the delivery the payment already owes, so it "
        "stays available in read-only mode)",
)
async def get_payment_session(ctx: ToolContext, session_id: SessionId) -> PaymentSession:
    """A payment session, verified by re-reading its PaymentIntent from Stripe (status, amount received,
    currency); delivers the item if the payment succeeded and it was not delivered yet."""
    return await services(ctx).commerce.get_session(session_id)


@tool(
    "Cancel payment session", "write", destructive=True,
    summary="cancels an unpaid session (a paid one cannot be)",
)
async def cancel_payment_session(ctx: ToolContext, session_id: SessionId, idempotency_key: Key) -> PaymentSession:
    """Cancel an unpaid payment session (its PaymentIntent is canceled). A paid session cannot be canceled."""
    return await services(ctx).commerce.cancel_session(session_id, idempotency_key)
