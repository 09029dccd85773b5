"""Invoices and invoice items (``/v1/invoices``, ``/v1/invoiceitems``).

Totals are recomputed from the lines whenever lines change, so ``subtotal``, ``total``,
``amount_due``, ``amount_paid`` and ``amount_remaining`` always agree. There is no tax or discount.
Finalizing an invoice applies the customer's balance (a credit lowers ``amount_due``, down to zero, and what
is not used stays on the customer), as Stripe does; an invoice left with nothing due is paid at once.
A subscription's invoice is collected the subscription's way (see ``subscriptions``), and paying its latest
invoice settles an unpaid subscription.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import payments
from .core import LIST_PARAMS, Ctx, Obj, Route, embedded_list, list_page, public
from .customers import change_balance
from .errors import StripeError, invalid, missing
from .ids import new_id
from .params import Params

INVOICE_STATUSES = ("draft", "open", "paid", "uncollectible", "void")
UNSETTLED = ("incomplete", "past_due", "unpaid")  # subscription statuses that paying the latest invoice ends
RETRY_AFTER = 3 * 86400  # when a failed invoice would be retried (Smart Retries vary; a fixed guess)
MAX_ATTEMPTS = 4


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
]
