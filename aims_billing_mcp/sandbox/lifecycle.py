"""What Stripe does to subscriptions as time passes, and ``stripe trigger``-style state changes.

:func:`run_due` walks every live subscription period by period up to ``ctx.now`` (the sandbox
clock after :meth:`Sandbox.advance`): a scheduled cancellation ends it; otherwise the period rolls
over (a trial ends) and a ``subscription_cycle`` invoice bills the next period for licensed items
and the ended period's usage for metered ones. The customer's balance is applied first; what is
left is charged to the default card unless the customer is set to fail or has no card (then it
stays ``open`` and the subscription goes ``past_due``), or, for a ``send_invoice`` subscription,
left ``open`` until its due date while the subscription stays ``active``. An ``incomplete``
subscription does not renew: unpaid 23 hours after creation it expires (``incomplete_expired``,
its invoice voided). Each step is dated at the boundary it happened at, so invoices and events
carry Stripe's timestamps.
"""

from __future__ import annotations

import copy

from . import invoices, subscriptions
from .core import Ctx, Obj
from .errors import invalid_state
from .pricing import amount_for

INCOMPLETE_TTL = 23 * 3600  # how long an incomplete subscription waits for its first payment
CARD = "pm_card_visa"
LIVE = ("active", "trialing", "past_due", "unpaid", "incomplete", "paused")
TRIGGERS = ("invoice.payment_failed", "invoice.paid", "customer.subscription.deleted",
            "customer.subscription.updated")


def set_fail(ctx: Ctx, customer_id: str, fail: bool) -> Obj:
    customer = ctx.fetch("customer", customer_id, "customer", "customer")
    customer["_fail_payments"] = fail
    ctx.store.update(customer)
    return customer


def _period(sub: Obj) -> tuple[int, int]:
    item = sub["items"]["data"][0]
    return int(item["current_period_start"]), int(item["current_period_end"])


def run_due(ctx: Ctx) -> None:
    """Bring every live subscription up to ``ctx.now``."""
    target = ctx.now
    subs, _ = ctx.store.page("subscription", {"status": list(LIVE)}, limit=1_000_000, oldest_first=True)
    try:
        for sub in subs:
            _catch_up(ctx, sub, target)
    finally:
        ctx.now = target


def _catch_up(ctx: Ctx, sub: Obj, target: int) -> None:
    if sub["status"] == "incomplete":
        _expire_if_unpaid(ctx, sub, target)
        return
    while True:
        _, end = _period(sub)
        cancel_at = sub["cancel_at"]
        if cancel_at is not None and cancel_at <= end:
            if cancel_at <= target:
                ctx.now = cancel_at
                _end_as_scheduled(ctx, sub, cancel_at)
            return
        if end > target:
            return
        ctx.now = end
        if sub["cancel_at_period_end"]:
            _end_as_scheduled(ctx, sub, end)
            return
        renew(ctx, sub)


def _end_as_scheduled(ctx: Ctx, sub: Obj, at: int) -> None:
    """A scheduled cancellation: the last period's metered usage is billed on a final invoice (as Stripe does when
    a subscription cancels at its period end or `cancel_at`), then it ends."""
    bill_final_usage(ctx, sub, at)
    subscriptions.end_subscription(ctx, sub, at)


def bill_final_usage(ctx: Ctx, sub: Obj, at: int) -> None:
    """The metered usage of the period so far, [period start, at), on a final invoice, collected the subscription's
    way: a scheduled end, or an immediate cancel with ``invoice_now`` (without it Stripe discards that usage)."""
    start, _ = _period(sub)
    metered = [item for item in sub["items"]["data"] if item["price"]["recurring"]["usage_type"] == "metered"]
    if metered and sub["status"] != "trialing":  # usage during a trial is free
        customer = ctx.fetch("customer", sub["customer"], "customer", "customer")
        invoice = invoices.new_invoice(ctx, customer, currency=sub["currency"], billing_reason="subscription_cycle",
                                       subscription=sub)
        invoice.update(period_start=start, period_end=at)
        for item in metered:
            _bill_usage(ctx, invoice, sub, item, start, at)
        ctx.store.update(invoice)
        ctx.record_event("invoice.created", invoice)
        sub["latest_invoice"] = invoice["id"]
        _collect_renewal(ctx, sub, invoice)


def _expire_if_unpaid(ctx: Ctx, sub: Obj, target: int) -> None:
    """An incomplete subscription whose first invoice is still unpaid 23 hours after creation ends as
    ``incomplete_expired`` (a terminal status) and its open invoice is voided, as Stripe does."""
    deadline = int(sub["created"]) + INCOMPLETE_TTL
    if deadline > target:
        return
    ctx.now = deadline
    invoice = ctx.store.get(sub["latest_invoice"], "invoice") if sub["latest_invoice"] else None
    if invoice is not None and invoice["status"] == "open":
        invoices.void(ctx, invoice)
    previous = {"status": sub["status"], "canceled_at": sub["canceled_at"], "ended_at": sub["ended_at"]}
    sub.update(status="incomplete_expired", canceled_at=deadline, ended_at=deadline)
    ctx.store.update(sub)
    ctx.record_event("customer.subscription.updated", sub, previous)


def _bill_usage(ctx: Ctx, invoice: Obj, sub: Obj, item: Obj, start: int, end: int) -> None:
    """A metered item's line: its meter's usage by the customer over [start, end), priced."""
    price = item["price"]
    meter = ctx.store.get(price["recurring"]["meter"], "billing.meter")
    formula = meter["default_aggregation"]["formula"] if meter else "sum"
    quantity = ctx.store.meter_usage(price["recurring"]["meter"], sub["customer"], start, end, formula)
    invoices.add_line(invoice, amount=amount_for(price, quantity),
                      description=f"{quantity} × {invoices.line_name(ctx, price)}", quantity=quantity, price=price,
                      period=(start, end), parent=subscriptions.subscription_line_parent(sub, item))


def renew(ctx: Ctx, sub: Obj) -> Obj:
    """Roll ``sub`` into its next period (at ``ctx.now``, its period end) and bill it."""
    start, end = _period(sub)
    previous: Obj = {"items": copy.deepcopy(sub["items"]), "latest_invoice": sub["latest_invoice"]}
    trial_ended = sub["status"] == "trialing"
    if trial_ended:
        previous["status"] = sub["status"]
        sub["status"] = "active"
    new_end = subscriptions.period_end_after(sub, end)
    customer = ctx.fetch("customer", sub["customer"], "customer", "customer")
    invoice = invoices.new_invoice(ctx, customer, currency=sub["currency"], billing_reason="subscription_cycle",
                                   subscription=sub)
    invoice.update(period_start=start, period_end=end)
    for item in sub["items"]["data"]:
        price = item["price"]
        if price["recurring"]["usage_type"] == "metered":
            if not trial_ended:  # usage during a trial is free
                _bill_usage(ctx, invoice, sub, item, start, end)
        else:
            quantity = int(item.get("quantity") or 1)
            invoices.add_line(invoice, amount=amount_for(price, quantity),
                              description=f"{quantity} × {invoices.line_name(ctx, price)}", quantity=quantity,
                              price=price, period=(end, new_end),
                              parent=subscriptions.subscription_line_parent(sub, item))
        item["current_period_start"], item["current_period_end"] = end, new_end
    ctx.store.update(invoice)
    ctx.record_event("invoice.created", invoice)
    sub["latest_invoice"] = invoice["id"]
    status = _collect_renewal(ctx, sub, invoice)
    if sub["status"] != status:
        previous.setdefault("status", sub["status"])
        sub["status"] = status
    ctx.store.update(sub)
    ctx.record_event("customer.subscription.updated", sub, previous)
    return invoice


def _collect_renewal(ctx: Ctx, sub: Obj, invoice: Obj) -> str:
    """Collect a cycle invoice the subscription's way; returns the subscription's status after it.

    send_invoice: issued and not charged, so the subscription keeps its status while the invoice is open.
    charge_automatically: ``active`` when paid (the balance may cover it), ``past_due`` when the charge fails.
    """
    if sub["collection_method"] == "send_invoice":
        invoices.issue(ctx, invoice)
        return str(sub["status"])
    return "active" if invoices.collect(ctx, invoice, subscriptions.payment_method_of(ctx, sub)) else "past_due"


# -- trigger --------------------------------------------------------------------------------------

def _subscription_for(ctx: Ctx, customer: str | None, subscription: str | None) -> Obj:
    if subscription is not None:
        return ctx.fetch("subscription", subscription, "subscription", "subscription")
    if customer is None:
        raise invalid_state("Pass a customer or a subscription to trigger this event.")
    ctx.fetch("customer", customer, "customer", "customer")
    found, _ = ctx.store.page("subscription", {"customer": customer, "status": list(LIVE)}, limit=1)
    if not found:
        raise invalid_state(f"Customer '{customer}' has no subscription that is not canceled.", "customer")
    return found[0]


def _open_invoice(ctx: Ctx, sub: Obj) -> Obj | None:
    latest = ctx.store.get(sub["latest_invoice"], "invoice") if sub["latest_invoice"] else None
    if latest is not None and latest["status"] == "open":
        return latest
    found, _ = ctx.store.page("invoice", {"_subscription": sub["id"], "status": "open"}, limit=1)
    return found[0] if found else None


def _period_invoice(ctx: Ctx, sub: Obj, reason: str) -> Obj:
    """A draft invoice for the current period's licensed items (without moving the period)."""
    customer = ctx.fetch("customer", sub["customer"], "customer", "customer")
    invoice = invoices.new_invoice(ctx, customer, currency=sub["currency"], billing_reason=reason, subscription=sub)
    start, end = _period(sub)
    invoice.update(period_start=start, period_end=end)
    for item in sub["items"]["data"]:
        price = item["price"]
        if price["recurring"]["usage_type"] == "metered":
            continue
        quantity = int(item.get("quantity") or 1)
        invoices.add_line(invoice, amount=amount_for(price, quantity),
                          description=f"{quantity} × {invoices.line_name(ctx, price)}",
                          quantity=quantity, price=price, period=(start, end),
                          parent=subscriptions.subscription_line_parent(sub, item))
    ctx.store.update(invoice)
    ctx.record_event("invoice.created", invoice)
    return invoice


def _set_status(ctx: Ctx, sub: Obj, status: str, previous: Obj) -> None:
    if sub["status"] != status:
        previous["status"] = sub["status"]
        sub["status"] = status
    ctx.store.update(sub)
    ctx.record_event("customer.subscription.updated", sub, previous)


def trigger(ctx: Ctx, event_type: str, customer: str | None, subscription: str | None) -> Obj:
    """Make ``event_type`` happen for real (state changes included); returns that event."""
    if event_type not in TRIGGERS:
        raise ValueError(f"cannot trigger {event_type!r}; supported: {', '.join(TRIGGERS)}")
    sub = _subscription_for(ctx, customer, subscription)
    if sub["status"] == "canceled":
        raise invalid_state(f"Subscription '{sub['id']}' is canceled.", "subscription")
    if event_type == "customer.subscription.deleted":
        sub["canceled_at"] = None
        subscriptions.end_subscription(ctx, sub, ctx.now)
        return ctx.events[-1]
    if event_type == "customer.subscription.updated":
        old = {"metadata": dict(sub["metadata"])}
        sub["metadata"] = {**sub["metadata"], "sandbox_triggered_at": str(ctx.now)}
        ctx.store.update(sub)
        return ctx.record_event("customer.subscription.updated", sub, old)
    previous: Obj = {"latest_invoice": sub["latest_invoice"]}
    invoice = _open_invoice(ctx, sub)
    if event_type == "invoice.payment_failed":
        if invoice is None:
            invoice = _period_invoice(ctx, sub, "subscription_cycle")
        event = invoices.fail_invoice(ctx, invoice)
        sub["latest_invoice"] = invoice["id"]
        _set_status(ctx, sub, "past_due", previous)
        return event
    # invoice.paid
    if invoice is None:
        invoice = _period_invoice(ctx, sub, "manual")
    invoice["next_payment_attempt"] = None
    invoices.charge_invoice(ctx, invoice, sub["default_payment_method"] or CARD)
    event = next(e for e in reversed(ctx.events) if e["type"] == "invoice.paid")
    sub["latest_invoice"] = invoice["id"]
    _set_status(ctx, sub, "active" if sub["status"] in ("past_due", "unpaid") else sub["status"], previous)
    return event

