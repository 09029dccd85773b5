"""Completing a Checkout Session as if the customer paid (sandbox-only action).

Reproduces what Stripe does behind the hosted page: a customer if there was none, then either a
succeeded PaymentIntent (payment mode) or a Subscription with a paid first Invoice (subscription
mode: ``active`` and charged for the first period, or ``trialing`` with a $0 invoice for the
trial when the session has ``subscription_data[trial_period_days]``), and the Events a webhook
consumer would receive.
"""

from __future__ import annotations

from . import checkout, connect, invoices, payments, subscriptions
from .core import Ctx, Obj, public
from .customers import new_customer
from .errors import StripeError
from .ids import new_id
from .params import Params

CARD = "pm_card_visa"


def _session_lines(ctx: Ctx, session_id: str) -> list[Obj]:
    lines, _ = ctx.store.page("item", {"_parent": session_id}, limit=1000, oldest_first=True)
    return lines


def complete_session(ctx: Ctx, session_id: str) -> Obj:
    """Pay an open session with a test Visa card; returns the completed session."""
    session = ctx.fetch("checkout.session", session_id, "checkout session", "id")
    if session["status"] != "open":
        raise StripeError(
            400,
            f"This Checkout Session is {session['status']} and can no longer be completed.",
            param="id",
        )
    customer = ctx.store.get(session["customer"], "customer") if session["customer"] else None
    if customer is None:
        customer = new_customer(ctx, email=session["customer_email"])
        ctx.record_event("customer.created", customer)
    pm = payments.resolve_payment_method(ctx, CARD)
    pm["customer"] = customer["id"]
    ctx.store.update(pm)
    session["customer"] = customer["id"]
    session["customer_details"] = {
        "address": None, "business_name": None, "email": customer["email"], "individual_name": None,
        "name": customer["name"], "phone": customer["phone"], "tax_exempt": "none", "tax_ids": [],
    }
    lines = _session_lines(ctx, session_id)
    mode = session["mode"]
    if mode == "payment":
        pi = payments.new_payment_intent(
            ctx, amount=session["amount_total"], currency=session["currency"], customer=customer["id"],
            metadata=dict(session.get("_payment_intent_metadata") or {}),
        )
        connect.apply_destination(pi, session.get("_destination"))
        payments.succeed(ctx, pi, pm["id"])
        session["payment_intent"] = pi["id"]
        session["payment_status"] = "paid"
    elif mode == "subscription":
        trial_days = session.get("_trial_period_days")
        recurring = [(line["price"], line["quantity"]) for line in lines if line["price"]["type"] == "recurring"]
        sub = subscriptions.new_subscription(ctx, customer["id"], recurring, dict(session["_subscription_metadata"]),
                                             pm["id"], trial_days=trial_days)
        invoice = invoices.new_invoice(ctx, customer, currency=session["currency"],
                                       billing_reason="subscription_create", subscription=sub)
        items = {item["price"]["id"]: item for item in sub["items"]["data"]}
        for line in lines:
            price = line["price"]
            item = items.get(price["id"])
            period = (ctx.now, ctx.now)
            amount, description = line["amount_total"], line["description"]
            if item:
                period = (item["current_period_start"], item["current_period_end"])
                if trial_days:
                    amount, description = 0, f"Trial period for {line['description']}"
            invoices.add_line(invoice, amount=amount, description=description, quantity=line["quantity"] or 0,
                              price=price, period=period, parent=subscriptions.subscription_line_parent(sub, item))
        invoice.update(period_start=sub["items"]["data"][0]["current_period_start"],
                       period_end=sub["items"]["data"][0]["current_period_start"])
        ctx.store.update(invoice)
        ctx.record_event("invoice.created", invoice)
        invoices.charge_invoice(ctx, invoice, pm["id"])
        sub["latest_invoice"] = invoice["id"]
        ctx.store.update(sub)
        ctx.record_event("customer.subscription.created", sub)
        session.update(subscription=sub["id"], invoice=invoice["id"],
                       payment_status="paid" if invoice["amount_paid"] or not trial_days
                       else "no_payment_required")
    else:
        session["setup_intent"] = new_id("seti_")
    session["status"] = "complete"
    session["url"] = None
    ctx.store.update(session)
    ctx.record_event("checkout.session.completed", session)
    return public(session)


def pay_link(ctx: Ctx, link_id: str) -> Obj:
    """A customer paying a Payment Link: the Checkout Session the hosted page would open (the link's line items,
    its destination), completed."""
    link = ctx.fetch("payment_link", link_id, "payment_link", "id")
    if not link["active"]:
        raise StripeError(400, f"This payment link ({link_id}) is not active.", param="id")
    lines, _ = ctx.store.page("item", {"_parent": link_id}, limit=1000, oldest_first=True)
    form: dict[str, object] = {"mode": "payment", "line_items": {
        str(i): {"price": line["price"]["id"], "quantity": str(line["quantity"])} for i, line in enumerate(lines)}}
    session = checkout.create_session(ctx, Params(form), {})
    session.update(payment_link=link_id, metadata=dict(link["metadata"] or {}), _destination=link.get("_destination"))
    ctx.store.update(session)
    return complete_session(ctx, session["id"])
