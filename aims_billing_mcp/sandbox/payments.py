"""PaymentIntents (``/v1/payment_intents``), test card tokens and the balance (``/v1/balance``).

Test tokens follow Stripe's: ``pm_card_visa`` and friends succeed, ``pm_card_chargeDeclined``
style tokens decline with a 402 ``card_error`` and leave the PaymentIntent in
``requires_payment_method`` with ``last_payment_error`` set. Succeeded payments are added to the
available balance at once (real Stripe makes them pending first) so callers can see them.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import connect
from .core import LIST_PARAMS, Ctx, Obj, Route, list_page, public
from .errors import StripeError, card_declined, no_such
from .ids import new_id, random_base62
from .params import ZERO_DECIMAL, Params

BRANDS = {
    "visa": ("visa", "4242", "credit"),
    "visa_debit": ("visa", "5556", "debit"),
    "mastercard": ("mastercard", "4444", "credit"),
    "mastercard_debit": ("mastercard", "8210", "debit"),
    "amex": ("amex", "8431", "credit"),
    "discover": ("discover", "1117", "credit"),
    "diners": ("diners", "0004", "credit"),
    "jcb": ("jcb", "0000", "credit"),
    "unionpay": ("unionpay", "0005", "credit"),
    "us": ("visa", "4242", "credit"),
    "refundFail": ("visa", "5126", "credit"),  # pays; a refund of it fails (Stripe's 4000 0000 0000 5126)
}
REFUND_FAILS_LAST4 = "5126"
# token -> (code, decline_code, message) for declining test cards
DECLINES = {
    "pm_card_chargeDeclined": ("card_declined", "generic_decline", "Your card was declined."),
    "pm_card_visa_chargeDeclined": ("card_declined", "generic_decline", "Your card was declined."),
    "pm_card_chargeDeclinedInsufficientFunds": (
        "card_declined", "insufficient_funds", "Your card has insufficient funds."),
    "pm_card_visa_chargeDeclinedInsufficientFunds": (
        "card_declined", "insufficient_funds", "Your card has insufficient funds."),
    "pm_card_chargeDeclinedLostCard": ("card_declined", "lost_card", "Your card was declined."),
    "pm_card_chargeDeclinedStolenCard": ("card_declined", "stolen_card", "Your card was declined."),
    "pm_card_chargeDeclinedFraudulent": ("card_declined", "fraudulent", "Your card was declined."),
    "pm_card_chargeDeclinedExpiredCard": ("expired_card", "expired_card", "Your card has expired."),
    "pm_card_chargeDeclinedIncorrectCvc": (
        "incorrect_cvc", "incorrect_cvc", "Your card's security code is incorrect."),
    "pm_card_chargeDeclinedProcessingError": (
        "processing_error", "processing_error", "An error occurred while processing your card."),
}
SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "cad": "$", "aud": "$"}
MINIMUM = {"gbp": 30, "jpy": 50, "hkd": 400, "mxn": 1000, "dkk": 250, "nok": 300, "sek": 300}
CANCELABLE = ("requires_payment_method", "requires_capture", "requires_confirmation", "requires_action",
              "processing")


def _format_amount(amount: int, currency: str) -> str:
    symbol = SYMBOLS.get(currency, "")
    text = str(amount) if currency in ZERO_DECIMAL else f"{amount // 100}.{amount % 100:02d}"
    return f"{symbol}{text} {currency}"


# Test Shared Payment Tokens, as Stripe's test mode names them by outcome: any other spt_ succeeds like a Visa.
SPT_CARDS = {
    "spt_test_declined": "pm_card_chargeDeclined",
    "spt_test_insufficient_funds": "pm_card_chargeDeclinedInsufficientFunds",
}
SPT_EXPIRED_PREFIX = "spt_test_expired"


def redeem_shared_payment_token(ctx: Ctx, spt: str) -> str:
    """The test card a granted token stands for. A token is single-use (a second redemption is refused, as Stripe
    refuses a used grant), and `spt_test_expired...` has expired."""
    param = "shared_payment_granted_token"
    if not spt.startswith("spt_"):
        raise no_such("shared payment granted token", spt, param)
    if spt.startswith(SPT_EXPIRED_PREFIX):
        raise StripeError(400, "This shared payment granted token has expired; ask the buyer's agent for a new one.",
                          code="shared_payment_granted_token_expired", param=param)
    if ctx.store.get(spt, "shared_payment_granted_token") is not None:
        raise StripeError(400, "This shared payment granted token has already been used.",
                          code="shared_payment_granted_token_used", param=param)
    ctx.store.insert({"id": spt, "object": "shared_payment_granted_token", "created": ctx.now})
    return next((card for prefix, card in SPT_CARDS.items() if spt.startswith(prefix)), "pm_card_visa")


def resolve_payment_method(ctx: Ctx, token: str, param: str = "payment_method") -> Obj:
    """A stored PaymentMethod for a test token (created on first use) or a stored ``pm_`` id."""
    stored = ctx.store.get(token, "payment_method")
    if stored is not None:
        return stored
    if not token.startswith("pm_card_"):
        raise no_such("PaymentMethod", token, param)
    suffix = token[len("pm_card_"):]
    if token in DECLINES:
        brand, last4, funding = "visa", "0002", "credit"
    elif suffix in BRANDS:
        brand, last4, funding = BRANDS[suffix]
    else:
        raise no_such("PaymentMethod", token, param)
    pm: Obj = {
        "id": new_id("pm_"),
        "object": "payment_method",
        "allow_redisplay": "unspecified",
        "billing_details": {"address": None, "email": None, "name": None, "phone": None, "tax_id": None},
        "card": {
            "brand": brand,
            "checks": {"address_line1_check": None, "address_postal_code_check": None, "cvc_check": None},
            "country": "US",
            "display_brand": brand,
            "exp_month": 12,
            "exp_year": 2034,
            "funding": funding,
            "generated_from": None,
            "last4": last4,
            "networks": {"available": [brand], "preferred": None},
            "regulated_status": "unregulated",
            "three_d_secure_usage": {"supported": True},
            "wallet": None,
        },
        "created": ctx.now,
        "customer": None,
        "customer_account": None,
        "livemode": False,
        "metadata": {},
        "type": "card",
        "_decline": list(DECLINES[token]) if token in DECLINES else None,
    }
    ctx.store.insert(pm)
    return pm


def new_payment_intent(
    ctx: Ctx, *, amount: int, currency: str, customer: str | None, description: str | None = None,
    metadata: dict[str, str] | None = None,
) -> Obj:
    """Build and store a PaymentIntent awaiting a payment method."""
    pi_id = new_id("pi_")
    pi: Obj = {
        "id": pi_id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_details": {"tip": {}},
        "amount_received": 0,
        "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": None,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": "automatic",
        "client_secret": f"{pi_id}_secret_{random_base62(25)}",
        "confirmation_method": "automatic",
        "created": ctx.now,
        "currency": currency,
        "customer": customer,
        "customer_account": None,
        "description": description,
        "excluded_payment_method_types": None,
        "last_payment_error": None,
        "latest_charge": None,
        "livemode": False,
        "metadata": metadata or {},
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": None,
        "payment_method_configuration_details": None,
        "payment_method_options": {},
        "payment_method_types": ["card"],
        "processing": None,
        "receipt_email": None,
        "review": None,
        "setup_future_usage": None,
        "shipping": None,
        "source": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": "requires_payment_method",
        "transfer_data": None,
        "transfer_group": None,
    }
    ctx.store.insert(pi)
    return pi


def succeed(ctx: Ctx, pi: Obj, pm_id: str) -> Obj:
    """Mark ``pi`` paid with ``pm_id``: balance, charge id and ``payment_intent.succeeded``."""
    pi.update(
        status="succeeded",
        amount_received=pi["amount"],
        payment_method=pm_id,
        latest_charge=new_id("ch_"),
        last_payment_error=None,
    )
    ctx.store.balance_add(pi["currency"], pi["amount"])
    connect.settle_destination(ctx, pi)  # a destination charge: the transfer and the application fee
    ctx.store.update(pi)
    ctx.record_event("payment_intent.succeeded", pi)
    return pi


def confirm(ctx: Ctx, pi: Obj, token: str, param: str = "payment_method") -> Obj:
    """Charge ``pi`` with a payment method: succeed, or record the decline and raise the 402."""
    pm = resolve_payment_method(ctx, token, param)
    decline = pm.get("_decline")
    if not decline:
        return succeed(ctx, pi, pm["id"])
    code, decline_code, message = decline
    error: Obj = {
        "type": "card_error",
        "code": code,
        "decline_code": decline_code,
        "message": message,
        "doc_url": f"https://stripe.com/docs/error-codes/{code}",
        "payment_method": public(pm),
    }
    pi.update(status="requires_payment_method", payment_method=None, last_payment_error=error,
              latest_charge=new_id("ch_"))
    ctx.store.update(pi)
    ctx.record_event("payment_intent.payment_failed", pi)
    exc = card_declined(message, payment_intent=public(pi), charge=pi["latest_charge"])
    exc.code = code
    exc.decline_code = decline_code
    raise exc


def _unexpected_state(message: str) -> StripeError:
    return StripeError(400, message, code="payment_intent_unexpected_state")


def create_payment_intent(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((
        "amount", "currency", "customer", "payment_method", "confirm", "metadata", "description",
        "automatic_payment_methods", "payment_method_types", "receipt_email", "capture_method",
        "setup_future_usage", "statement_descriptor", "statement_descriptor_suffix", "off_session",
        "return_url", "shared_payment_granted_token", "error_on_requires_action",
        "transfer_data", "application_fee_amount", "transfer_group",
    ))
    amount = p.integer("amount", required=True)
    currency = p.currency(required=True)
    assert amount is not None and currency is not None
    minimum = MINIMUM.get(currency, 50)
    if amount < minimum:
        raise StripeError(
            400,
            f"Amount must be at least {_format_amount(minimum, currency)}",
            code="amount_too_small",
            param="amount",
        )
    if amount > 99999999:
        raise StripeError(400, "Amount must be no more than $999,999.99", code="amount_too_large",
                          param="amount")
    customer = p.string("customer")
    if customer is not None:
        ctx.fetch("customer", customer, "customer", "customer")
    p.string("capture_method", choices=("automatic", "automatic_async"))
    metadata = p.metadata()
    confirm_now = p.boolean("confirm") or False
    token = p.string("payment_method")
    spt = p.string("shared_payment_granted_token")
    apm = p.sub("automatic_payment_methods")
    destination = connect.destination_params(ctx, p, amount, currency)
    pi = new_payment_intent(ctx, amount=amount, currency=currency, customer=customer,
                            description=p.string("description"), metadata=metadata)
    connect.apply_destination(pi, destination)
    if apm is not None:
        pi["automatic_payment_methods"] = {"allow_redirects": apm.string("allow_redirects") or "always",
                                           "enabled": apm.boolean("enabled") or False}
    pi["receipt_email"] = p.string("receipt_email")
    pi["setup_future_usage"] = p.string("setup_future_usage")
    pi["statement_descriptor"] = p.string("statement_descriptor")
    if spt is not None:
        token = token or redeem_shared_payment_token(ctx, spt)  # a granted token stands for the buyer's card
    if token is not None:
        pm = resolve_payment_method(ctx, token)
        pi["payment_method"] = pm["id"]
        pi["status"] = "requires_confirmation"
    ctx.store.update(pi)
    if confirm_now:
        if token is None:
            raise _unexpected_state(
                "You cannot confirm this PaymentIntent because it's missing a payment method. To "
                "confirm the PaymentIntent with a payment method, pass `payment_method`."
            )
        return confirm(ctx, pi, pi["payment_method"])
    return pi


def retrieve_payment_intent(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("client_secret",))
    return ctx.fetch("payment_intent", args["id"], "payment_intent", "id")


def update_payment_intent(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("metadata", "description", "receipt_email"))
    pi = ctx.fetch("payment_intent", args["id"], "payment_intent", "id")
    for key in ("description", "receipt_email"):
        if p.has(key):
            pi[key] = p.string(key)
    pi["metadata"] = p.metadata(pi["metadata"])
    ctx.store.update(pi)
    return pi


def confirm_payment_intent(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("payment_method", "return_url", "off_session", "receipt_email", "error_on_requires_action",
             "setup_future_usage", "shared_payment_granted_token"))
    pi = ctx.fetch("payment_intent", args["id"], "payment_intent", "id")
    spt = p.string("shared_payment_granted_token")
    if pi["status"] == "succeeded":
        raise _unexpected_state(
            "You cannot confirm this PaymentIntent because it has already succeeded after being "
            "previously confirmed."
        )
    if pi["status"] == "canceled":
        raise _unexpected_state(
            "You cannot confirm this PaymentIntent because it has a status of canceled. Only a "
            "PaymentIntent with one of the following statuses may be confirmed: "
            "requires_confirmation, requires_action, requires_payment_method."
        )
    # a granted token stands for the buyer's saved card, as at creation
    token = (p.string("payment_method") or (redeem_shared_payment_token(ctx, spt) if spt is not None else None)
             or pi["payment_method"])
    if token is None:
        raise _unexpected_state(
            "You cannot confirm this PaymentIntent because it's missing a payment method. To confirm "
            "the PaymentIntent with a payment method, pass `payment_method`."
        )
    return confirm(ctx, pi, token)


def cancel_payment_intent(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("cancellation_reason",))
    pi = ctx.fetch("payment_intent", args["id"], "payment_intent", "id")
    reason = p.string("cancellation_reason", choices=(
        "duplicate", "fraudulent", "requested_by_customer", "abandoned"))
    if pi["status"] not in CANCELABLE:
        raise _unexpected_state(
            f"You cannot cancel this PaymentIntent because it has a status of {pi['status']}. Only a "
            "PaymentIntent with one of the following statuses may be canceled: "
            + ", ".join(CANCELABLE) + "."
        )
    pi.update(status="canceled", canceled_at=ctx.now, cancellation_reason=reason)
    ctx.store.update(pi)
    ctx.record_event("payment_intent.canceled", pi)
    return pi


def list_payment_intents(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "customer"))
    return list_page(ctx, p, "payment_intent", "/v1/payment_intents", p.string_filter("customer"))


def retrieve_balance(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    if ctx.account is not None:  # Stripe-Account: the connected account's own balance
        return connect.connected_balance(ctx, ctx.account)
    rows = ctx.store.balance_rows() or [("usd", 0, 0)]
    return {
        "object": "balance",
        "available": [{"amount": a, "currency": c, "source_types": {"card": card}} for c, a, card in rows],
        "pending": [{"amount": 0, "currency": c, "source_types": {"card": 0}} for c, _, _ in rows],
        "connect_reserved": [{"amount": 0, "currency": c} for c, _, _ in rows],
        "livemode": False,
    }


ROUTES = [
    Route("POST", "/v1/payment_intents", create_payment_intent),
    Route("GET", "/v1/payment_intents", list_payment_intents),
    Route("GET", "/v1/payment_intents/{id}", retrieve_payment_intent),
    Route("POST", "/v1/payment_intents/{id}", update_payment_intent),
    Route("POST", "/v1/payment_intents/{id}/confirm", confirm_payment_intent),
    Route("POST", "/v1/payment_intents/{id}/cancel", cancel_payment_intent),
    Route("GET", "/v1/balance", retrieve_balance),
]
