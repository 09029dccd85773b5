"""Subscriptions (``/v1/subscriptions``): creating one bills its first invoice (through ``invoices``), updating
and cancelling one follow Stripe's rules.

A subscription's invoices follow its ``collection_method``: ``charge_automatically`` ones are charged to its
default payment method, ``send_invoice`` ones are left ``open`` until their ``due_date`` (the subscription
stays ``active`` meanwhile) unless the balance paid them.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import payments
from .catalog import expanded_price, plan_of
from .core import LIST_PARAMS, Ctx, Obj, Route, add_interval, embedded_list, list_page
from .errors import StripeError, card_declined, invalid, missing
from .ids import new_id
from .invoices import add_line, collect, finalize, issue, line_name, mark_paid, new_invoice
from .params import Params
from .pricing import amount_for

SUB_STATUSES = ("active", "past_due", "unpaid", "canceled", "incomplete", "incomplete_expired",
                "trialing", "paused")
COLLECTION_METHODS = ("charge_automatically", "send_invoice")
PAYMENT_BEHAVIORS = ("allow_incomplete", "default_incomplete", "error_if_incomplete")
MAX_TRIAL_DAYS = 730
NO_PAYMENT_METHOD = (
    "This customer has no attached payment source or default payment method. Please consider adding a default "
    "payment method. For more information, visit "
    "https://stripe.com/docs/billing/subscriptions/payment-methods-setting#payment-method-priority."
)


# -- subscriptions --------------------------------------------------------------------------

def subscription_line_parent(sub: Obj, item: Obj | None) -> Obj:
    """The ``parent`` of an invoice line billed for a subscription item."""
    return {
        "invoice_item_details": None,
        "subscription_item_details": {
            "invoice_item": None, "proration": False, "proration_details": {"credited_items": None},
            "subscription": sub["id"], "subscription_item": item["id"] if item else None,
        },
        "type": "subscription_item_details",
    }


def period_end_after(sub: Obj, ts: int) -> int:
    """The first period boundary after ``ts``: the billing cycle anchor plus whole intervals, so a
    monthly subscription anchored on the 31st bills on the 28th/30th/31st, never drifting."""
    rec = sub["items"]["data"][0]["price"]["recurring"]
    anchor = int(sub["billing_cycle_anchor"])
    n = 1
    while True:
        end = add_interval(anchor, rec["interval"], rec["interval_count"] * n)
        if end > ts:
            return end
        n += 1


def new_subscription(ctx: Ctx, customer_id: str, items: list[tuple[Obj, int | None]], metadata: dict[str, str],
                     payment_method: str | None, *, trial_days: int | None = None,
                     collection_method: str = "charge_automatically", days_until_due: int | None = None,
                     cancel_at: int | None = None, description: str | None = None) -> Obj:
    """A subscription whose items carry their current period (as in the clover API).

    With ``trial_days`` it is ``trialing`` and the first period is the trial; a metered item
    (quantity None) has no quantity. ``days_until_due`` only means something for ``send_invoice``;
    ``cancel_at`` schedules the end as an update would.
    """
    sub_id = new_id("sub_")
    trial_end = ctx.now + 86400 * trial_days if trial_days else None
    data: list[Obj] = []
    for price, quantity in items:
        rec = price["recurring"]
        item: Obj = {
            "id": new_id("si_", 14),
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": ctx.now,
            "current_period_end": trial_end or add_interval(ctx.now, rec["interval"], rec["interval_count"]),
            "current_period_start": ctx.now,
            "discounts": [],
            "metadata": {},
            "plan": plan_of(price),
            "price": expanded_price(ctx, price["id"]),
            "subscription": sub_id,
            "tax_rates": [],
        }
        if quantity is not None:
            item["quantity"] = quantity
        data.append(item)
    subscription: Obj = {
        "id": sub_id,
        "object": "subscription",
        "application": None,
        "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": trial_end or ctx.now,
        "billing_cycle_anchor_config": None,
        "billing_mode": {"flexible": None, "type": "classic"},
        "billing_thresholds": None,
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "cancellation_details": {"comment": None, "feedback": None, "reason": None},
        "collection_method": collection_method,
        "created": ctx.now,
        "currency": items[0][0]["currency"],
        "customer": customer_id,
        "customer_account": None,
        "days_until_due": days_until_due if collection_method == "send_invoice" else None,
        "default_payment_method": payment_method,
        "default_source": None,
        "default_tax_rates": [],
        "description": description,
        "discounts": [],
        "ended_at": None,
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": embedded_list(data, f"/v1/subscription_items?subscription={sub_id}"),
        "latest_invoice": None,
        "livemode": False,
        "metadata": metadata,
        "next_pending_invoice_item_invoice": None,
        "on_behalf_of": None,
        "pause_collection": None,
        "payment_settings": {"payment_method_options": None, "payment_method_types": None,
                             "save_default_payment_method": "off"},
        "pending_invoice_item_interval": None,
        "pending_setup_intent": None,
        "pending_update": None,
        "schedule": None,
        "start_date": ctx.now,
        "status": "trialing" if trial_end else "active",
        "test_clock": None,
        "transfer_data": None,
        "trial_end": trial_end,
        "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": ctx.now if trial_end else None,
        "_prices": [price["id"] for price, _ in items],
    }
    if cancel_at is not None:
        _schedule_cancel(ctx, subscription, cancel_at, at_period_end=False)
    ctx.store.insert(subscription)
    return subscription


def _metered(price: Obj) -> bool:
    return bool(price["recurring"].get("usage_type") == "metered")


def first_invoice(ctx: Ctx, customer: Obj, sub: Obj) -> Obj:
    """The ``subscription_create`` invoice (a draft): licensed items billed in advance for the first period,
    $0 "Trial period" lines during a trial, and metered items as $0 lines (their usage is billed in arrears,
    on the renewal invoice)."""
    invoice = new_invoice(ctx, customer, currency=sub["currency"], billing_reason="subscription_create",
                          subscription=sub)
    trial = sub["status"] == "trialing"
    for item in sub["items"]["data"]:
        price = item["price"]
        name = line_name(ctx, price)
        quantity = 0 if _metered(price) else int(item["quantity"])
        add_line(invoice, amount=0 if trial else amount_for(price, quantity),
                 description=f"Trial period for {name}" if trial else f"{quantity} × {name}", quantity=quantity,
                 price=price, period=(item["current_period_start"], item["current_period_end"]),
                 parent=subscription_line_parent(sub, item))
    invoice.update(period_start=ctx.now, period_end=ctx.now)
    ctx.store.update(invoice)
    ctx.record_event("invoice.created", invoice)
    return invoice


def _invoice_default(customer: Obj | None) -> str | None:
    found = customer["invoice_settings"]["default_payment_method"] if customer else None
    return None if found is None else str(found)


def payment_method_of(ctx: Ctx, sub: Obj) -> str | None:
    """What a subscription's invoices are charged to: its own default, else the customer's invoice default."""
    if sub["default_payment_method"]:
        return str(sub["default_payment_method"])
    return _invoice_default(ctx.store.get(sub["customer"], "customer"))


def _subscription_item(ctx: Ctx, it: Params) -> tuple[Obj, int | None]:
    """One ``items[n]``: an active recurring price, with a quantity (default 1) unless it is metered."""
    it.allow(("price", "quantity", "metadata"))
    price = ctx.fetch("price", it.req_str("price"), "price", it.name("price"))
    if price["type"] != "recurring":
        raise invalid(it.name("price"), "The price specified is set to `type=one_time` but this field only "
                      "accepts prices with `type=recurring`.")
    if not price["active"]:
        raise invalid(it.name("price"), "The price specified is inactive. This field only accepts active prices.")
    if _metered(price):
        if it.has("quantity"):
            raise invalid(it.name("quantity"), "Quantity should not be specified where usage_type is `metered`. "
                          f"Remove quantity from `{it.prefix}`.")
        return price, None
    return price, it.integer("quantity", minimum=1) or 1


def _subscription_items(ctx: Ctx, p: Params) -> list[tuple[Obj, int | None]]:
    """``items``: at least one, each price once, all billed in one currency on one interval."""
    items = [_subscription_item(ctx, it) for it in p.items("items", required=True)]
    if not items:
        raise missing("items")
    prices = [price for price, _ in items]
    if len({price["id"] for price in prices}) != len(prices):
        raise invalid("items", "Cannot add multiple subscription items with the same price.")
    if len({price["currency"] for price in prices}) > 1:
        raise _mismatch("currency")
    if len({(price["recurring"]["interval"], price["recurring"]["interval_count"]) for price in prices}) > 1:
        raise _mismatch("interval")
    return items


def _mismatch(field: str) -> StripeError:
    return invalid("items", "Currency and interval fields must match across all plans on this subscription. "
                   f"Found mismatch in {field} field.")


def _collection(p: Params) -> tuple[str, int | None]:
    """``collection_method`` and ``days_until_due`` (required with send_invoice, refused without it)."""
    method = p.string("collection_method", choices=COLLECTION_METHODS) or "charge_automatically"
    days = p.integer("days_until_due", minimum=0)
    if method == "send_invoice" and days is None:
        raise missing("days_until_due")
    if method == "charge_automatically" and days is not None:
        raise invalid("days_until_due", "Can't set `days_until_due` when `collection_method` is "
                      "`charge_automatically`.")
    return method, days


def _trial_days(p: Params) -> int | None:
    days = p.integer("trial_period_days", minimum=0)
    if days is not None and days > MAX_TRIAL_DAYS:
        raise invalid("trial_period_days", f"trial_period_days must be at most {MAX_TRIAL_DAYS}.",
                      code="parameter_invalid_integer")
    return days or None


def _future(ctx: Ctx, p: Params, key: str) -> int | None:
    """A timestamp param that must be later than now (``""`` unsets: None)."""
    when = p.integer(key)
    if when is not None and when <= ctx.now:
        raise invalid(key, f"`{key}` must be in the future.", code="parameter_invalid_integer")
    return when


def _default_payment_method(ctx: Ctx, p: Params, customer: Obj) -> str | None:
    """``default_payment_method``, attached to the customer (a test token makes a new card), else the
    customer's invoice default."""
    token = p.string("default_payment_method")
    if token is None:
        return _invoice_default(customer)
    pm = payments.resolve_payment_method(ctx, token, "default_payment_method")
    if pm["customer"] not in (None, customer["id"]):
        raise invalid("default_payment_method", f"The customer does not have a payment method with the ID "
                      f"{token}. The payment method must be attached to the customer.")
    pm["customer"] = customer["id"]
    ctx.store.update(pm)
    return str(pm["id"])


def _claim_currency(ctx: Ctx, customer: Obj, currency: str) -> None:
    """A subscription fixes the customer's currency; one in another currency is refused, as Stripe does."""
    if customer["currency"] not in (None, currency):
        raise StripeError(400, "You cannot combine currencies on a single customer. This customer has had a "
                          f"subscription, coupon, invoice item or balance with currency {customer['currency']}.")
    if customer["currency"] is None:
        customer["currency"] = currency
        ctx.store.update(customer)


def _declined() -> StripeError:
    """``error_if_incomplete``'s answer to a first invoice that could not be paid: nothing is kept."""
    error = card_declined()
    error.commit = False
    return error


def _start(ctx: Ctx, sub: Obj, invoice: Obj, behavior: str) -> None:
    """Collect the first invoice and settle the new subscription's status, as Stripe does at creation.

    send_invoice: issued, and the subscription is active (or trialing) while it is open. charge_automatically:
    nothing due pays it; otherwise ``default_incomplete`` leaves it for the customer to pay (``incomplete``),
    ``allow_incomplete`` charges and is ``incomplete`` when that fails, ``error_if_incomplete`` refuses the
    whole creation with the card error. Without a payment method only ``default_incomplete`` may start.
    """
    if sub["collection_method"] == "send_invoice":
        issue(ctx, invoice)
        return
    finalize(ctx, invoice)
    if invoice["amount_due"] == 0:
        mark_paid(ctx, invoice)
        return
    payment_method = sub["default_payment_method"]
    if behavior == "default_incomplete":
        ctx.store.update(invoice)
    elif payment_method is None:
        raise StripeError(400, NO_PAYMENT_METHOD)
    elif collect(ctx, invoice, payment_method):
        return
    elif behavior == "error_if_incomplete":
        raise _declined()
    sub["status"] = "incomplete"


def create_subscription(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("customer", "items", "metadata", "trial_period_days", "cancel_at", "collection_method",
             "days_until_due", "default_payment_method", "description", "payment_behavior", "off_session"))
    customer = ctx.fetch("customer", p.req_str("customer"), "customer", "customer")
    items = _subscription_items(ctx, p)
    method, days = _collection(p)
    behavior = p.string("payment_behavior", choices=PAYMENT_BEHAVIORS) or "allow_incomplete"
    trial_days = _trial_days(p)
    cancel_at = _future(ctx, p, "cancel_at")
    p.boolean("off_session")
    payment_method = _default_payment_method(ctx, p, customer)
    _claim_currency(ctx, customer, items[0][0]["currency"])
    sub = new_subscription(ctx, customer["id"], items, p.metadata(), payment_method, trial_days=trial_days,
                           collection_method=method, days_until_due=days, cancel_at=cancel_at,
                           description=p.string("description"))
    invoice = first_invoice(ctx, customer, sub)
    sub["latest_invoice"] = invoice["id"]
    _start(ctx, sub, invoice, behavior)
    ctx.store.update(sub)
    ctx.record_event("customer.subscription.created", sub)
    return sub


def retrieve_subscription(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return ctx.fetch("subscription", args["id"], "subscription", "id")


def list_subscriptions(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "customer", "status", "price", "collection_method"))
    filters: dict[str, str | list[str]] = {**p.string_filter("customer"), **p.string_filter("price", "_prices")}
    status = p.string("status", choices=(*SUB_STATUSES, "all", "ended"))
    if status is None:
        filters["status"] = [s for s in SUB_STATUSES if s != "canceled"]
    elif status == "ended":
        filters["status"] = ["canceled", "incomplete_expired"]
    elif status != "all":
        filters["status"] = status
    return list_page(ctx, p, "subscription", "/v1/subscriptions", filters)


def update_subscription(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("cancel_at_period_end", "cancel_at", "metadata", "description", "cancellation_details",
             "default_payment_method"))
    sub = ctx.fetch("subscription", args["id"], "subscription", "id")
    previous: Obj = {}
    if sub["status"] == "canceled" and any(k not in ("metadata", "cancellation_details") for k in p.data):
        raise StripeError(
            400, "A canceled subscription can only update its cancellation_details and metadata."
        )
    before = {k: sub[k] for k in ("cancel_at_period_end", "cancel_at", "canceled_at")}
    cape = p.boolean("cancel_at_period_end")
    if p.has("cancel_at") and cape:
        raise invalid("cancel_at", "You may only specify one of these parameters: cancel_at, cancel_at_period_end.")
    if cape is not None and cape != sub["cancel_at_period_end"]:
        period_end = max(item["current_period_end"] for item in sub["items"]["data"])
        _schedule_cancel(ctx, sub, period_end if cape else None, at_period_end=cape)
    if p.has("cancel_at"):
        _schedule_cancel(ctx, sub, _future(ctx, p, "cancel_at"), at_period_end=False)
    previous.update({k: v for k, v in before.items() if sub[k] != v})
    if p.has("description"):
        sub["description"] = p.string("description")
    if p.has("default_payment_method"):
        sub["default_payment_method"] = p.string("default_payment_method")
    details = p.sub("cancellation_details")
    if details is not None:
        details.allow(("comment", "feedback"))
        for key in ("comment", "feedback"):
            if details.has(key):
                sub["cancellation_details"][key] = details.string(key)
    old_metadata = sub["metadata"]
    sub["metadata"] = p.metadata(old_metadata)
    if sub["metadata"] != old_metadata:
        previous["metadata"] = old_metadata
    ctx.store.update(sub)
    ctx.record_event("customer.subscription.updated", sub, previous)
    return sub


def _schedule_cancel(ctx: Ctx, sub: Obj, cancel_at: int | None, *, at_period_end: bool) -> None:
    sub["cancel_at_period_end"] = at_period_end
    sub["cancel_at"] = cancel_at
    sub["canceled_at"] = ctx.now if cancel_at is not None else None
    sub["cancellation_details"]["reason"] = "cancellation_requested" if cancel_at is not None else None


def end_subscription(ctx: Ctx, sub: Obj, at: int) -> None:
    """Cancel ``sub`` as of ``at`` and emit ``customer.subscription.deleted``."""
    sub.update(status="canceled", ended_at=at, canceled_at=sub["canceled_at"] or at)
    sub["cancellation_details"]["reason"] = sub["cancellation_details"]["reason"] or "cancellation_requested"
    ctx.store.update(sub)
    ctx.record_event("customer.subscription.deleted", sub)


def cancel_subscription(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("invoice_now", "prorate", "cancellation_details"))
    sub = ctx.fetch("subscription", args["id"], "subscription", "id")
    if sub["status"] == "canceled":
        raise StripeError(404, f"No such subscription: '{sub['id']}'", code="resource_missing", param="id")
    invoice_now = p.boolean("invoice_now")
    p.boolean("prorate")
    sub["canceled_at"] = None
    if invoice_now:  # the period's un-invoiced metered usage on a final invoice; without it, discarded
        from .lifecycle import bill_final_usage  # lifecycle builds on this module

        bill_final_usage(ctx, sub, ctx.now)
    end_subscription(ctx, sub, ctx.now)
    return sub


ROUTES = [
    Route("POST", "/v1/subscriptions", create_subscription),
    Route("GET", "/v1/subscriptions", list_subscriptions),
    Route("GET", "/v1/subscriptions/{id}", retrieve_subscription),
    Route("POST", "/v1/subscriptions/{id}", update_subscription),
    Route("DELETE", "/v1/subscriptions/{id}", cancel_subscription),
]
