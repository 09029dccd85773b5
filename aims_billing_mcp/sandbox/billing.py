"""Invoices, invoice items and subscriptions (``/v1/invoices``, ``/v1/invoiceitems``,
``/v1/subscriptions``).

Totals are recomputed from the lines whenever lines change, so ``subtotal``, ``total``,
``amount_due``, ``amount_paid`` and ``amount_remaining`` always agree. There is no tax or discount.
Finalizing an invoice applies the customer's balance (a credit lowers ``amount_due``, down to zero, and what
is not used stays on the customer), as Stripe does; an invoice left with nothing due is paid at once.

A subscription's invoices follow its ``collection_method``: ``charge_automatically`` ones are charged to its
default payment method, ``send_invoice`` ones are left ``open`` until their ``due_date`` (the subscription
stays ``active`` meanwhile) unless the balance paid them.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import payments
from .catalog import expanded_price, plan_of
from .core import LIST_PARAMS, Ctx, Obj, Route, add_interval, embedded_list, list_page, public
from .customers import change_balance
from .errors import StripeError, card_declined, invalid, missing
from .ids import new_id
from .params import Params
from .pricing import amount_for

INVOICE_STATUSES = ("draft", "open", "paid", "uncollectible", "void")
SUB_STATUSES = ("active", "past_due", "unpaid", "canceled", "incomplete", "incomplete_expired",
                "trialing", "paused")
COLLECTION_METHODS = ("charge_automatically", "send_invoice")
PAYMENT_BEHAVIORS = ("allow_incomplete", "default_incomplete", "error_if_incomplete")
UNSETTLED = ("incomplete", "past_due", "unpaid")  # subscription statuses that paying the latest invoice ends
RETRY_AFTER = 3 * 86400  # when a failed invoice would be retried (Smart Retries vary; a fixed guess)
MAX_ATTEMPTS = 4
MAX_TRIAL_DAYS = 730
NO_PAYMENT_METHOD = (
    "This customer has no attached payment source or default payment method. Please consider adding a default "
    "payment method. For more information, visit "
    "https://stripe.com/docs/billing/subscriptions/payment-methods-setting#payment-method-priority."
)


# -- invoices -------------------------------------------------------------------------------

def new_invoice(ctx: Ctx, customer: Obj, *, currency: str, billing_reason: str = "manual",
                subscription: Obj | None = None) -> Obj:
    """A draft invoice without lines (the caller adds them with :func:`add_line`)."""
    invoice_id = new_id("in_")
    parent = None
    if subscription is not None:
        parent = {
            "quote_details": None,
            "subscription_details": {"metadata": subscription["metadata"],
                                     "subscription": subscription["id"]},
            "type": "subscription_details",
        }
    invoice: Obj = {
        "id": invoice_id,
        "object": "invoice",
        "account_country": "US",
        "account_name": "AIMS Billing Sandbox",
        "account_tax_ids": None,
        "amount_due": 0,
        "amount_overpaid": 0,
        "amount_paid": 0,
        "amount_remaining": 0,
        "amount_shipping": 0,
        "application": None,
        "attempt_count": 0,
        "attempted": False,
        "auto_advance": False,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None,
                          "provider": None, "status": None},
        "automatically_finalizes_at": None,
        "billing_reason": billing_reason,
        "collection_method": "charge_automatically",
        "created": ctx.now,
        "currency": currency,
        "custom_fields": None,
        "customer": customer["id"],
        "customer_account": None,
        "customer_address": customer.get("address"),
        "customer_email": customer.get("email"),
        "customer_name": customer.get("name"),
        "customer_phone": customer.get("phone"),
        "customer_shipping": None,
        "customer_tax_exempt": "none",
        "default_payment_method": None,
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": [],
        "due_date": None,
        "effective_at": None,
        "ending_balance": None,
        "footer": None,
        "from_invoice": None,
        "hosted_invoice_url": None,
        "invoice_pdf": None,
        "issuer": {"type": "self"},
        "last_finalization_error": None,
        "latest_revision": None,
        "lines": embedded_list([], f"/v1/invoices/{invoice_id}/lines"),
        "livemode": False,
        "metadata": {},
        "next_payment_attempt": None,
        "number": None,
        "on_behalf_of": None,
        "parent": parent,
        "payment_settings": {"default_mandate": None, "payment_method_options": None,
                             "payment_method_types": None},
        "period_end": ctx.now,
        "period_start": ctx.now,
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": None,
        "rendering": None,
        "shipping_cost": None,
        "shipping_details": None,
        "starting_balance": customer_balance(customer, currency),
        "statement_descriptor": None,
        "status": "draft",
        "status_transitions": {"finalized_at": None, "marked_uncollectible_at": None, "paid_at": None,
                               "voided_at": None},
        "subtotal": 0,
        "subtotal_excluding_tax": 0,
        "test_clock": None,
        "total": 0,
        "total_discount_amounts": [],
        "total_excluding_tax": 0,
        "total_pretax_credit_amounts": [],
        "total_taxes": [],
        "webhooks_delivered_at": None,
        "_subscription": subscription["id"] if subscription else None,
    }
    if subscription is not None:
        _collection_terms(ctx, invoice, subscription)
    ctx.store.insert(invoice)
    return invoice


def _collection_terms(ctx: Ctx, invoice: Obj, sub: Obj) -> None:
    """A subscription's invoice is collected the subscription's way; a sent one is due ``days_until_due``
    days after it is issued."""
    invoice["collection_method"] = sub.get("collection_method") or "charge_automatically"
    if invoice["collection_method"] == "send_invoice" and sub.get("days_until_due") is not None:
        invoice["due_date"] = ctx.now + int(sub["days_until_due"]) * 86400


def customer_balance(customer: Obj, currency: str) -> int:
    """The customer's balance that an invoice in ``currency`` can use (none in another currency)."""
    return int(customer.get("balance") or 0) if customer.get("currency") == currency else 0


def add_line(invoice: Obj, *, amount: int, description: str | None, quantity: int, price: Obj | None,
             period: tuple[int, int], parent: Obj) -> None:
    """Append a line and bring the invoice totals in line with it."""
    line: Obj = {
        "id": new_id("il_"),
        "object": "line_item",
        "amount": amount,
        "currency": invoice["currency"],
        "description": description,
        "discount_amounts": [],
        "discountable": True,
        "discounts": [],
        "invoice": invoice["id"],
        "livemode": False,
        "metadata": {},
        "parent": parent,
        "period": {"end": period[1], "start": period[0]},
        "pretax_credit_amounts": [],
        "pricing": None if price is None else {
            "price_details": {"price": price["id"], "product": price["product"]},
            "type": "price_details",
            "unit_amount_decimal": price["unit_amount_decimal"],
        },
        "quantity": quantity,
        "subscription": invoice.get("_subscription"),
        "subtotal": amount,
        "taxes": [],
    }
    invoice["lines"]["data"].append(line)
    invoice["lines"]["total_count"] = len(invoice["lines"]["data"])
    _retotal(invoice)


def _applied_balance(invoice: Obj) -> int:
    """How much the invoice moved the customer's balance when finalized (a used credit is positive)."""
    return 0 if invoice["ending_balance"] is None else int(invoice["ending_balance"] - invoice["starting_balance"])


def _retotal(invoice: Obj) -> None:
    """Totals from the lines; once finalized, the balance the invoice applied counts in ``amount_due`` too,
    so recomputing never undoes it."""
    total = sum(int(line["amount"]) for line in invoice["lines"]["data"])
    due = max(total - _applied_balance(invoice), 0)
    invoice.update(subtotal=total, subtotal_excluding_tax=total, total=total, total_excluding_tax=total,
                   amount_due=due, amount_remaining=max(due - invoice["amount_paid"], 0))


def finalize(ctx: Ctx, invoice: Obj) -> None:
    """Draft -> open: number it, apply the customer's balance and emit ``invoice.finalized``."""
    customer = ctx.store.get(invoice["customer"], "customer")
    invoice["ending_balance"] = invoice["starting_balance"] = 0
    if customer is not None:
        sequence = int(customer.get("next_invoice_sequence") or 1)
        invoice["number"] = f"{customer['invoice_prefix']}-{sequence:04d}"
        customer["next_invoice_sequence"] = sequence + 1
        ctx.store.update(customer)
        _apply_balance(ctx, invoice, customer)
    invoice["status"] = "open"
    invoice["effective_at"] = ctx.now
    invoice["status_transitions"]["finalized_at"] = ctx.now
    invoice["hosted_invoice_url"] = f"https://invoice.sandbox.aims.invalid/i/{invoice['id']}"
    invoice["invoice_pdf"] = f"https://invoice.sandbox.aims.invalid/i/{invoice['id']}/pdf"
    ctx.record_event("invoice.finalized", invoice)


def _apply_balance(ctx: Ctx, invoice: Obj, customer: Obj) -> None:
    """Draw the customer's balance into a positive invoice, as Stripe does at finalization.

    A credit (negative balance) lowers ``amount_due`` down to zero and the rest stays on the customer; a debit
    is added to what is due. The draw is an ``applied_to_invoice`` balance transaction, and ``starting_balance``
    / ``ending_balance`` record the customer's balance before and after.
    """
    starting = customer_balance(customer, invoice["currency"])
    invoice["ending_balance"] = invoice["starting_balance"] = starting
    if invoice["total"] <= 0 or starting == 0:
        return
    ending = min(invoice["total"] + starting, 0)
    invoice["ending_balance"] = ending
    change_balance(ctx, customer, ending - starting, currency=invoice["currency"], kind="applied_to_invoice",
                   invoice=invoice["id"])
    _retotal(invoice)


def _unapply_balance(ctx: Ctx, invoice: Obj) -> None:
    """Give back the balance a voided invoice drew (Stripe's ``unapplied_from_invoice``)."""
    applied = _applied_balance(invoice)
    customer = ctx.store.get(invoice["customer"], "customer")
    if applied and customer is not None:
        change_balance(ctx, customer, -applied, currency=invoice["currency"], kind="unapplied_from_invoice",
                       invoice=invoice["id"])


def mark_paid(ctx: Ctx, invoice: Obj) -> None:
    """Record full payment of an open invoice and emit ``invoice.paid``."""
    invoice.update(status="paid", amount_paid=invoice["amount_due"], amount_remaining=0, attempted=True,
                   attempt_count=max(invoice["attempt_count"], 1))
    invoice["status_transitions"]["paid_at"] = ctx.now
    ctx.store.update(invoice)
    ctx.record_event("invoice.paid", invoice)
    ctx.record_event("invoice.payment_succeeded", invoice)


def charge_invoice(ctx: Ctx, invoice: Obj, token: str) -> Obj | None:
    """Finalize (if draft) and pay an invoice with a card; returns the PaymentIntent, if any."""
    if invoice["status"] == "draft":
        finalize(ctx, invoice)
    pi = None
    if invoice["amount_due"] > 0:
        pi = payments.new_payment_intent(
            ctx, amount=invoice["amount_due"], currency=invoice["currency"], customer=invoice["customer"],
            description=f"Invoice {invoice['number']}",
        )
        ctx.store.update(invoice)
        payments.confirm(ctx, pi, token)
    mark_paid(ctx, invoice)
    return pi


def fails(ctx: Ctx, customer_id: str) -> bool:
    """Whether the customer's payments are set to fail (:meth:`Sandbox.fail_payments`)."""
    customer = ctx.store.get(customer_id, "customer")
    return bool(customer and customer.get("_fail_payments"))


def fail_invoice(ctx: Ctx, invoice: Obj) -> Obj:
    """One failed collection attempt on a draft or open invoice: ``invoice.payment_failed``."""
    if invoice["status"] == "draft":
        finalize(ctx, invoice)
    attempts = int(invoice["attempt_count"]) + 1
    invoice.update(attempted=True, attempt_count=attempts,
                   next_payment_attempt=ctx.now + RETRY_AFTER if attempts < MAX_ATTEMPTS else None)
    ctx.store.update(invoice)
    return ctx.record_event("invoice.payment_failed", invoice)


def collect(ctx: Ctx, invoice: Obj, payment_method: str | None) -> bool:
    """Finalize a charge_automatically invoice and collect it; returns whether it ended paid.

    Nothing due (the balance covered it) pays it without a charge. Without a payment method, for a customer
    set to fail, or when the card declines, the attempt fails and the invoice stays ``open``.
    """
    if invoice["status"] == "draft":
        finalize(ctx, invoice)
    if invoice["amount_due"] == 0:
        mark_paid(ctx, invoice)
        return True
    if payment_method is None or fails(ctx, invoice["customer"]):
        fail_invoice(ctx, invoice)
        return False
    try:
        charge_invoice(ctx, invoice, payment_method)
    except StripeError as exc:
        if exc.status != 402:
            raise
        fail_invoice(ctx, invoice)  # the declined PaymentIntent keeps its last_payment_error
        return False
    return True


def issue(ctx: Ctx, invoice: Obj) -> None:
    """Finalize a send_invoice invoice: paid at once when the balance covers it, else ``open`` until the
    customer pays it (nothing is charged)."""
    finalize(ctx, invoice)
    if invoice["amount_due"] == 0:
        mark_paid(ctx, invoice)
    else:
        ctx.store.update(invoice)


def create_invoice(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("customer", "auto_advance", "collection_method", "days_until_due", "description",
             "metadata", "currency", "pending_invoice_items_behavior", "footer", "due_date"))
    customer = ctx.fetch("customer", p.req_str("customer"), "customer", "customer")
    method = p.string("collection_method", choices=("charge_automatically", "send_invoice")) \
        or "charge_automatically"
    days = p.integer("days_until_due", minimum=0)
    if method == "send_invoice" and days is None and not p.has("due_date"):
        raise missing("days_until_due")
    behavior = p.string("pending_invoice_items_behavior", choices=("include", "exclude")) or "include"
    metadata = p.metadata()
    pending: list[Obj] = []
    if behavior == "include":
        pending, _more = ctx.store.page("invoiceitem", {"customer": customer["id"], "invoice": ""},
                                        limit=1000, oldest_first=True)
    currency = p.currency() or (pending[0]["currency"] if pending else customer.get("currency") or "usd")
    invoice = new_invoice(ctx, customer, currency=currency)
    invoice.update(metadata=metadata, description=p.string("description"), collection_method=method,
                   auto_advance=p.boolean("auto_advance") or False, footer=p.string("footer"))
    if days is not None:
        invoice["due_date"] = ctx.now + days * 86400
    for item in pending:
        if item["currency"] == currency:
            _attach_item(ctx, invoice, item)
    ctx.store.update(invoice)
    ctx.record_event("invoice.created", invoice)
    return invoice


def _attach_item(ctx: Ctx, invoice: Obj, item: Obj) -> None:
    item["invoice"] = invoice["id"]
    ctx.store.update(item)
    price = item.get("_price")
    add_line(invoice, amount=item["amount"], description=item["description"], quantity=item["quantity"],
             price=price, period=(item["period"]["start"], item["period"]["end"]),
             parent={"invoice_item_details": {"invoice_item": item["id"], "proration": False,
                                              "proration_details": {"credited_items": None},
                                              "subscription": None},
                     "subscription_item_details": None, "type": "invoice_item_details"})


def retrieve_invoice(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return ctx.fetch("invoice", args["id"], "invoice", "id")


def update_invoice(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("metadata", "description", "footer", "auto_advance"))
    invoice = ctx.fetch("invoice", args["id"], "invoice", "id")
    for key in ("description", "footer"):
        if p.has(key):
            if invoice["status"] != "draft":
                raise invalid(key, "Finalized invoices can't be updated in this way.")
            invoice[key] = p.string(key)
    p.set_booleans(invoice, "auto_advance")
    invoice["metadata"] = p.metadata(invoice["metadata"])
    ctx.store.update(invoice)
    return invoice


def list_invoices(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "customer", "status", "subscription", "collection_method", "due_date"))
    filters = {**p.string_filter("customer"), **p.string_filter("status", choices=INVOICE_STATUSES),
               **p.string_filter("subscription", "_subscription")}
    return list_page(ctx, p, "invoice", "/v1/invoices", filters)


def list_invoice_lines(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(LIST_PARAMS)
    invoice = ctx.fetch("invoice", args["id"], "invoice", "id")
    lines: Obj = invoice["lines"]
    return lines


def finalize_invoice(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("auto_advance",))
    invoice = ctx.fetch("invoice", args["id"], "invoice", "id")
    if invoice["status"] != "draft":
        raise StripeError(
            400, "This invoice is already finalized, you can't re-finalize a non-draft invoice."
        )
    finalize(ctx, invoice)
    if invoice["amount_due"] == 0:
        mark_paid(ctx, invoice)
    ctx.store.update(invoice)
    return invoice


def pay_invoice(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("paid_out_of_band", "payment_method", "source", "off_session", "forgive"))
    invoice = ctx.fetch("invoice", args["id"], "invoice", "id")
    if invoice["status"] == "paid":
        raise StripeError(400, "Invoice is already paid.")
    if invoice["status"] not in ("draft", "open"):
        raise StripeError(400, f"You cannot pay an invoice with status {invoice['status']}.")
    if p.boolean("paid_out_of_band"):
        if invoice["status"] == "draft":
            finalize(ctx, invoice)
        invoice["paid_out_of_band"] = True
        mark_paid(ctx, invoice)
    else:
        charge_invoice(ctx, invoice, p.string("payment_method") or "pm_card_visa")
    _settle_subscription(ctx, invoice)
    return invoice


def _settle_subscription(ctx: Ctx, invoice: Obj) -> None:
    """Paying a subscription's latest invoice makes an incomplete (or past_due, unpaid) subscription
    ``active``, as Stripe does."""
    sub = ctx.store.get(invoice["_subscription"], "subscription") if invoice.get("_subscription") else None
    if sub is None or sub["latest_invoice"] != invoice["id"] or sub["status"] not in UNSETTLED:
        return
    previous = {"status": sub["status"]}
    sub["status"] = "active"
    ctx.store.update(sub)
    ctx.record_event("customer.subscription.updated", sub, previous)


def void(ctx: Ctx, invoice: Obj) -> None:
    """Void an open invoice (the balance it drew goes back to the customer) and emit ``invoice.voided``."""
    _unapply_balance(ctx, invoice)
    invoice["status"] = "void"
    invoice["amount_remaining"] = 0
    invoice["status_transitions"]["voided_at"] = ctx.now
    ctx.store.update(invoice)
    ctx.record_event("invoice.voided", invoice)


def void_invoice(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    invoice = ctx.fetch("invoice", args["id"], "invoice", "id")
    if invoice["status"] != "open":
        raise StripeError(400, f"You can only void open invoices. This invoice is {invoice['status']}.")
    void(ctx, invoice)
    return invoice


# -- invoice items --------------------------------------------------------------------------

def create_invoice_item(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("customer", "amount", "currency", "description", "metadata", "price", "pricing", "quantity",
             "invoice", "period", "subscription", "unit_amount_decimal", "discountable"))
    customer = ctx.fetch("customer", p.req_str("customer"), "customer", "customer")
    quantity = p.integer("quantity", minimum=1) or 1
    price_id = p.string("price")
    pricing = p.sub("pricing")
    if price_id is None and pricing is not None:
        pricing.allow(("price",))
        price_id = pricing.string("price")
    price: Obj | None = None
    if price_id is not None:
        price = ctx.fetch("price", price_id, "price", "price" if p.has("price") else "pricing[price]")
        if price["type"] != "one_time":
            raise invalid("price", "The price specified is set to `type=recurring` but this field only "
                          "accepts prices with `type=one_time`.")
        if price["unit_amount"] is None:
            raise invalid("price", "Prices with fractional unit amounts are not supported here.")
        amount = int(price["unit_amount"]) * quantity
        currency = price["currency"]
    else:
        raw_amount = p.integer("amount")
        if raw_amount is None:
            raise missing("amount")
        amount = raw_amount
        currency_value = p.currency(required=True)
        assert currency_value is not None
        currency = currency_value
    invoice: Obj | None = None
    invoice_id = p.string("invoice")
    if invoice_id is not None:
        invoice = ctx.fetch("invoice", invoice_id, "invoice", "invoice")
        if invoice["status"] != "draft":
            raise invalid("invoice", "You can only add invoice items to draft invoices.")
        if invoice["currency"] != currency:
            raise invalid("currency", "The currency of the invoice item must match the invoice's currency.")
    item: Obj = {
        "id": new_id("ii_"),
        "object": "invoiceitem",
        "amount": amount,
        "currency": currency,
        "customer": customer["id"],
        "customer_account": None,
        "date": ctx.now,
        "description": p.string("description") or (None if price is None else _product_name(ctx, price)),
        "discountable": True,
        "discounts": [],
        "invoice": None,
        "livemode": False,
        "metadata": p.metadata(),
        "parent": None,
        "period": {"end": ctx.now, "start": ctx.now},
        "pricing": None if price is None else {
            "price_details": {"price": price["id"], "product": price["product"]},
            "type": "price_details", "unit_amount_decimal": price["unit_amount_decimal"]},
        "proration": False,
        "quantity": quantity,
        "tax_rates": [],
        "test_clock": None,
        "_price": None if price is None else public(price),
    }
    ctx.store.insert(item)
    if invoice is not None:
        _attach_item(ctx, invoice, item)
        ctx.store.update(invoice)
    return item


def line_name(ctx: Ctx, price: Obj) -> str:
    """What an invoice line for `price` is called: its product's name, else the price id."""
    return _product_name(ctx, price) or str(price["id"])


def _product_name(ctx: Ctx, price: Obj) -> str | None:
    product = ctx.store.get(price["product"], "product")
    return None if product is None else str(product["name"])


def retrieve_invoice_item(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return ctx.fetch("invoiceitem", args["id"], "invoiceitem", "id")


def list_invoice_items(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "customer", "invoice", "pending"))
    filters = {**p.string_filter("customer"), **p.string_filter("invoice")}
    if "invoice" not in filters and p.boolean("pending"):
        filters["invoice"] = ""
    return list_page(ctx, p, "invoiceitem", "/v1/invoiceitems", filters)


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
    Route("POST", "/v1/invoices", create_invoice),
    Route("GET", "/v1/invoices", list_invoices),
    Route("GET", "/v1/invoices/{id}", retrieve_invoice),
    Route("POST", "/v1/invoices/{id}", update_invoice),
    Route("GET", "/v1/invoices/{id}/lines", list_invoice_lines),
    Route("POST", "/v1/invoices/{id}/finalize", finalize_invoice),
    Route("POST", "/v1/invoices/{id}/pay", pay_invoice),
    Route("POST", "/v1/invoices/{id}/void", void_invoice),
    Route("POST", "/v1/invoiceitems", create_invoice_item),
    Route("GET", "/v1/invoiceitems", list_invoice_items),
    Route("GET", "/v1/invoiceitems/{id}", retrieve_invoice_item),
    Route("POST", "/v1/subscriptions", create_subscription),
    Route("GET", "/v1/subscriptions", list_subscriptions),
    Route("GET", "/v1/subscriptions/{id}", retrieve_subscription),
    Route("POST", "/v1/subscriptions/{id}", update_subscription),
    Route("DELETE", "/v1/subscriptions/{id}", cancel_subscription),
]
