"""Customers (``/v1/customers``), their balance transactions (``/v1/customers/{id}/balance_transactions``)
and customer portal sessions (``/v1/billing_portal/sessions``).

A customer's ``balance`` is what Stripe applies to their next finalized invoice: negative is a credit the
customer holds, positive an amount they owe. Every change to it leaves a ``customer_balance_transaction``, so
the balance can always be explained from its ledger.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from .core import LIST_PARAMS, Ctx, Obj, Route, list_page
from .errors import invalid, no_such
from .ids import new_id, random_base62
from .params import Params

CUSTOMER_FIELDS = ("email", "name", "description", "phone")
ADDRESS_FIELDS = ("city", "country", "line1", "line2", "postal_code", "state")


def _address(p: Params) -> Obj | None:
    sub = p.sub("address")
    if sub is None:
        return None
    sub.allow(ADDRESS_FIELDS)
    return {k: sub.string(k) for k in ADDRESS_FIELDS}


def _check_email(p: Params) -> None:
    email = p.string("email")
    if email is not None and ("@" not in email or len(email) > 512):
        raise invalid("email", f"Invalid email address: {email}", code="email_invalid")


def new_customer(ctx: Ctx, *, email: str | None = None, name: str | None = None) -> Obj:
    """Build and store a customer with Stripe's defaults (also used when a checkout creates one)."""
    customer: Obj = {
        "id": new_id("cus_", 14),
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": ctx.now,
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "discount": None,
        "email": email,
        "invoice_prefix": secrets.token_hex(4).upper(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": False,
        "metadata": {},
        "name": name,
        "next_invoice_sequence": 1,
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    }
    ctx.store.insert(customer)
    return customer


def create_customer(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*CUSTOMER_FIELDS, "metadata", "address", "preferred_locales"))
    _check_email(p)
    metadata = p.metadata()
    address = _address(p)
    customer = new_customer(ctx, email=p.string("email"), name=p.string("name"))
    customer.update(
        description=p.string("description"),
        phone=p.string("phone"),
        metadata=metadata,
        address=address,
        preferred_locales=p.strings("preferred_locales"),
    )
    ctx.store.update(customer)
    return customer


DELETED_CUSTOMER = "deleted_customer"  # the stored mark of a deleted customer (a type no handler fetches)


def _deleted(customer_id: str) -> Obj:
    return {"id": customer_id, "object": "customer", "deleted": True}


def retrieve_customer(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    """The customer; a deleted one is still retrievable, as Stripe's ``{id, object, deleted: true}``."""
    if ctx.store.get(args["id"], DELETED_CUSTOMER) is not None:
        return _deleted(args["id"])
    return ctx.fetch("customer", args["id"], "customer", "id")


def update_customer(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow((*CUSTOMER_FIELDS, "metadata", "address", "preferred_locales"))
    customer = ctx.fetch("customer", args["id"], "customer", "id")
    _check_email(p)
    for key in CUSTOMER_FIELDS:
        if p.has(key):
            customer[key] = p.string(key)
    if p.has("address"):
        customer["address"] = _address(p)
    if p.has("preferred_locales"):
        customer["preferred_locales"] = p.strings("preferred_locales")
    customer["metadata"] = p.metadata(customer["metadata"])
    ctx.store.update(customer)
    return customer


def delete_customer(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    customer = ctx.fetch("customer", args["id"], "customer", "id")
    ctx.store.delete(customer["id"])
    ctx.store.insert({"id": customer["id"], "object": DELETED_CUSTOMER})  # every other call: No such customer
    return _deleted(customer["id"])


def list_customers(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "email", "test_clock"))
    return list_page(ctx, p, "customer", "/v1/customers", p.string_filter("email"))


# -- balance transactions -------------------------------------------------------------------

def change_balance(ctx: Ctx, customer: Obj, amount: int, *, currency: str, kind: str, invoice: str | None = None,
                   description: str | None = None, metadata: dict[str, str] | None = None) -> Obj:
    """Move ``customer.balance`` by ``amount`` and store the ledger entry Stripe shows for it.

    The first change fixes the customer's currency (Stripe keeps one balance per customer, in one currency).
    """
    customer["balance"] = int(customer["balance"]) + amount
    customer["currency"] = customer["currency"] or currency
    ctx.store.update(customer)
    txn: Obj = {
        "id": new_id("cbtxn_"),
        "object": "customer_balance_transaction",
        "amount": amount,
        "checkout_session": None,
        "created": ctx.now,
        "credit_note": None,
        "currency": currency,
        "customer": customer["id"],
        "customer_account": None,
        "description": description,
        "ending_balance": customer["balance"],
        "invoice": invoice,
        "livemode": False,
        "metadata": metadata,
        "type": kind,
    }
    ctx.store.insert(txn)
    return txn


def _balance_amount(p: Params) -> int:
    amount = p.integer("amount", required=True)
    assert amount is not None
    if amount == 0:
        raise invalid("amount", "The amount of a customer balance transaction must not be zero.",
                      code="parameter_invalid_integer")
    return amount


def _balance_currency(p: Params, customer: Obj) -> str:
    """The transaction's currency, which must be the customer's once the customer has one."""
    currency = p.currency(required=True)
    assert currency is not None
    if customer["currency"] not in (None, currency):
        raise invalid("currency", f"The currency {currency} does not match this customer's currency "
                      f"({customer['currency']}): a customer's balance is kept in one currency.")
    return currency


def create_balance_transaction(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("amount", "currency", "description", "metadata"))
    customer = ctx.fetch("customer", args["id"], "customer", "id")
    amount = _balance_amount(p)
    currency = _balance_currency(p, customer)
    return change_balance(ctx, customer, amount, currency=currency, kind="adjustment",
                          description=p.string("description"), metadata=p.metadata())


def _balance_transaction(ctx: Ctx, args: Mapping[str, str]) -> Obj:
    """The customer's transaction (another customer's id is as unknown as a missing one)."""
    customer = ctx.fetch("customer", args["id"], "customer", "id")
    txn = ctx.store.get(args["txn"], "customer_balance_transaction")
    if txn is None or txn["customer"] != customer["id"]:
        raise no_such("customer balance transaction", args["txn"], "transaction")
    return txn


def retrieve_balance_transaction(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return _balance_transaction(ctx, args)


def update_balance_transaction(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("description", "metadata"))
    txn = _balance_transaction(ctx, args)
    if p.has("description"):
        txn["description"] = p.string("description")
    if p.has("metadata"):
        txn["metadata"] = p.metadata(txn["metadata"])
    ctx.store.update(txn)
    return txn


def list_balance_transactions(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "invoice"))
    customer = ctx.fetch("customer", args["id"], "customer", "id")
    filters = {"customer": customer["id"], **p.string_filter("invoice")}
    return list_page(ctx, p, "customer_balance_transaction", f"/v1/customers/{customer['id']}/balance_transactions",
                     filters)


# -- portal -----------------------------------------------------------------------------------

def create_portal_session(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("customer", "return_url", "configuration", "locale", "on_behalf_of", "flow_data"))
    customer_id = p.req_str("customer")
    return_url = p.url("return_url")
    ctx.fetch("customer", customer_id, "customer", "customer")
    session: Obj = {
        "id": new_id("bps_"),
        "object": "billing_portal.session",
        "configuration": p.string("configuration") or "bpc_aims_sandbox_default",
        "created": ctx.now,
        "customer": customer_id,
        "customer_account": None,
        "flow": None,
        "livemode": False,
        "locale": p.string("locale"),
        "on_behalf_of": p.string("on_behalf_of"),
        "return_url": return_url,
        "url": f"https://billing.sandbox.aims.invalid/p/session/test_{random_base62(32)}",
    }
    ctx.store.insert(session)
    return session


ROUTES = [
    Route("POST", "/v1/customers", create_customer),
    Route("GET", "/v1/customers", list_customers),
    Route("GET", "/v1/customers/{id}", retrieve_customer),
    Route("POST", "/v1/customers/{id}", update_customer),
    Route("DELETE", "/v1/customers/{id}", delete_customer),
    Route("POST", "/v1/customers/{id}/balance_transactions", create_balance_transaction),
    Route("GET", "/v1/customers/{id}/balance_transactions", list_balance_transactions),
    Route("GET", "/v1/customers/{id}/balance_transactions/{txn}", retrieve_balance_transaction),
    Route("POST", "/v1/customers/{id}/balance_transactions/{txn}", update_balance_transaction),
    Route("POST", "/v1/billing_portal/sessions", create_portal_session),
]
