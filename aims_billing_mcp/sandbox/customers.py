"""Customers (``/v1/customers``) and customer portal sessions (``/v1/billing_portal/sessions``)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from .core import LIST_PARAMS, Ctx, Obj, Route, list_page
from .errors import invalid
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


def retrieve_customer(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
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
    return {"id": customer["id"], "object": "customer", "deleted": True}


def list_customers(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "email", "test_clock"))
    email = p.string("email")
    return list_page(ctx, p, "customer", "/v1/customers", {"email": email} if email is not None else {})


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
    Route("POST", "/v1/billing_portal/sessions", create_portal_session),
]
