"""Refunds (``/v1/refunds``): money back on a succeeded PaymentIntent, in whole or in part, never more than it
received. A refund succeeds at once (as test-mode card refunds do), lowers the available balance and records
``refund.created``; the PaymentIntent keeps what was refunded so a second refund can only take the rest. A payment
made with Stripe's refund-failing test card (``pm_card_refundFail``) gets a ``failed`` refund (``refund.failed``)
that returns nothing."""

from __future__ import annotations

from collections.abc import Mapping

from . import connect
from .core import LIST_PARAMS, Ctx, Obj, Route, list_page
from .errors import StripeError, invalid, invalid_state, missing
from .ids import new_id
from .params import Params
from .payments import REFUND_FAILS_LAST4

REASONS = ("duplicate", "fraudulent", "requested_by_customer")


def create_refund(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("payment_intent", "charge", "amount", "reason", "metadata", "reverse_transfer",
             "refund_application_fee"))
    pi_id, charge = p.string("payment_intent"), p.string("charge")
    if pi_id is None:
        if charge is None:
            raise missing("payment_intent")
        found = ctx.store.find_one("payment_intent", "latest_charge", charge)
        if found is None:
            raise StripeError(404, f"No such charge: '{charge}'", code="resource_missing", param="charge")
        pi_id = str(found["id"])
    pi = ctx.fetch("payment_intent", pi_id, "payment_intent", "payment_intent")
    if charge is not None and charge != pi["latest_charge"]:
        raise invalid("charge", f"Charge {charge} does not belong to PaymentIntent {pi['id']}.")
    if pi["status"] != "succeeded":
        raise invalid_state(f"This PaymentIntent ({pi['id']}) does not have a successful charge to refund.",
                            "payment_intent")
    refunded = int(pi.get("_amount_refunded") or 0)
    remaining = int(pi["amount_received"]) - refunded
    if remaining <= 0:
        raise StripeError(400, f"Charge {pi['latest_charge']} has already been refunded.",
                          code="charge_already_refunded", param="payment_intent")
    amount = p.integer("amount", minimum=1)
    amount = remaining if amount is None else amount
    if amount > remaining:
        raise invalid("amount", f"Refund amount ({amount}) is greater than unrefunded amount on charge "
                      f"({remaining})", code="amount_too_large")
    refund: Obj = {
        "id": new_id("re_"),
        "object": "refund",
        "amount": amount,
        "balance_transaction": new_id("txn_"),
        "charge": pi["latest_charge"],
        "created": ctx.now,
        "currency": pi["currency"],
        "destination_details": {"card": {"reference_status": "pending", "reference_type": "acquirer_reference_number",
                                         "type": "refund"}, "type": "card"},
        "metadata": p.metadata(),
        "payment_intent": pi["id"],
        "reason": p.string("reason", choices=REASONS),
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": "succeeded",
        "transfer_reversal": None,
    }
    if _refund_fails(ctx, pi):
        refund.update(status="failed", failure_reason="declined")
        ctx.store.insert(refund)
        ctx.record_event("refund.failed", refund)
        return refund
    connect.refund_destination(ctx, pi, refund, refunded, reverse_transfer=p.boolean("reverse_transfer") or False,
                               refund_application_fee=p.boolean("refund_application_fee") or False)
    ctx.store.insert(refund)
    pi["_amount_refunded"] = refunded + amount
    ctx.store.update(pi)
    ctx.store.balance_add(pi["currency"], -amount)
    ctx.record_event("refund.created", refund)
    return refund


def _refund_fails(ctx: Ctx, pi: Obj) -> bool:
    pm = ctx.store.get(pi["payment_method"], "payment_method") if pi.get("payment_method") else None
    return bool(pm and pm["card"]["last4"] == REFUND_FAILS_LAST4)


def retrieve_refund(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return ctx.fetch("refund", args["id"], "refund", "id")


def list_refunds(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "payment_intent", "charge"))
    return list_page(ctx, p, "refund", "/v1/refunds", {**p.string_filter("payment_intent"),
                                                        **p.string_filter("charge")})


ROUTES = [
    Route("POST", "/v1/refunds", create_refund),
    Route("GET", "/v1/refunds", list_refunds),
    Route("GET", "/v1/refunds/{id}", retrieve_refund),
]
