"""Payment Links (``/v1/payment_links``) and Checkout Sessions (``/v1/checkout/sessions``).

Line items are stored as ``item`` objects pointing at their parent (private ``_parent``), so
``.../line_items`` lists them in the order they were given.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import connect
from .catalog import new_price, new_product, price_params
from .core import LIST_PARAMS, Ctx, Obj, Route, list_page, public
from .errors import StripeError, invalid, missing
from .ids import checkout_session_id, new_id, random_base62
from .params import Params
from .pricing import amount_for

SESSION_TTL = 86400


def _metered(price: Obj) -> bool:
    return bool(price.get("recurring") and price["recurring"].get("usage_type") == "metered")


def _item(ctx: Ctx, parent: str, price: Obj, quantity: int | None) -> Obj:
    """A line item; a metered price's has no quantity and costs nothing up front."""
    product = ctx.store.get(price["product"], "product")
    amount = 0 if quantity is None else amount_for(price, quantity)
    item: Obj = {
        "id": new_id("li_"),
        "object": "item",
        "amount_discount": 0,
        "amount_subtotal": amount,
        "amount_tax": 0,
        "amount_total": amount,
        "currency": price["currency"],
        "adjustable_quantity": None,
        "description": product["name"] if product else None,
        "metadata": None,
        "price": public(price),
        "quantity": quantity,
        "_parent": parent,
    }
    return item


def _line_prices(ctx: Ctx, p: Params, *, allow_price_data: bool) -> list[tuple[Obj, int | None]]:
    """Validate ``line_items`` into (price, quantity) pairs, creating inline prices last.

    A metered price takes no quantity (None here)."""
    items = p.items("line_items")
    planned: list[tuple[Obj | Params, int | None]] = []
    for li in items:
        keys = ["price", "quantity", "adjustable_quantity"] + (["price_data"] if allow_price_data else [])
        li.allow(keys)
        stored = ctx.store.get(li.string("price") or "", "price")
        quantity: int | None
        if stored is not None and _metered(stored):
            if li.has("quantity"):
                raise invalid(li.name("quantity"), "Quantity should not be specified where usage_type is "
                              f"`metered`. Remove quantity from `{li.prefix}`.")
            quantity = None
        else:
            quantity = li.integer("quantity", required=True, minimum=1)
        price_id = li.string("price")
        pdata = li.sub("price_data") if allow_price_data else None
        if price_id is None and pdata is None:
            raise missing(li.name("price"))
        if price_id is not None and pdata is not None:
            raise invalid(
                li.name("price"), "You may only specify one of these parameters: price, price_data."
            )
        if price_id is not None:
            price = ctx.fetch("price", price_id, "price", li.name("price"))
            if not price["active"]:
                raise invalid(
                    li.name("price"),
                    "The price specified is inactive. This field only accepts active prices.",
                )
            planned.append((price, quantity))
        else:
            assert pdata is not None
            pdata.allow(("currency", "unit_amount", "unit_amount_decimal", "product", "product_data",
                         "recurring", "tax_behavior"))
            price_params(pdata)
            if pdata.string("product") is None and pdata.sub("product_data") is None:
                raise missing(pdata.name("product"))
            if pdata.string("product") is not None:
                ctx.fetch("product", pdata.string("product"), "product", pdata.name("product"))
            else:
                pd = pdata.sub("product_data")
                assert pd is not None
                pd.allow(("name", "description", "metadata", "images", "tax_code", "unit_label"))
                pd.req_str("name")
            planned.append((pdata, quantity))
    result: list[tuple[Obj, int | None]] = []
    for entry, quantity in planned:
        if isinstance(entry, Params):
            product_id = entry.string("product")
            if product_id is None:
                pd = entry.sub("product_data")
                assert pd is not None
                product_id = new_product(ctx, pd)["id"]
            result.append((new_price(ctx, entry, product_id=product_id, active=False), quantity))
        else:
            result.append((entry, quantity))
    currencies = {price["currency"] for price, _ in result}
    if len(currencies) > 1:
        raise invalid("line_items", "All line items must have the same currency.")
    return result


def _after_completion(p: Params) -> Obj:
    sub = p.sub("after_completion")
    if sub is None:
        return {"hosted_confirmation": {"custom_message": None}, "type": "hosted_confirmation"}
    sub.allow(("type", "redirect", "hosted_confirmation"))
    kind = sub.req_str("type", choices=("redirect", "hosted_confirmation"))
    if kind == "redirect":
        redirect = sub.sub("redirect", required=True)
        assert redirect is not None
        redirect.allow(("url",))
        url = redirect.url("url", required=True)
        return {"redirect": {"url": url}, "type": "redirect"}
    hosted = sub.sub("hosted_confirmation")
    message = hosted.string("custom_message") if hosted else None
    return {"hosted_confirmation": {"custom_message": message}, "type": "hosted_confirmation"}


# -- payment links ----------------------------------------------------------------------------

def create_payment_link(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("line_items", "metadata", "after_completion", "allow_promotion_codes", "currency",
             "customer_creation", "billing_address_collection", "phone_number_collection",
             "subscription_data", "payment_intent_data", "submit_type", "transfer_data",
             "application_fee_amount"))
    if not p.items("line_items", required=True):
        raise missing("line_items")
    after = _after_completion(p)
    metadata = p.metadata()
    promo = p.boolean("allow_promotion_codes") or False
    lines = _line_prices(ctx, p, allow_price_data=False)
    link_total = sum(amount_for(price, quantity) for price, quantity in lines if quantity is not None)
    destination = connect.destination_params(ctx, p, link_total, lines[0][0]["currency"])
    link_id = new_id("plink_")
    link: Obj = {
        "id": link_id,
        "object": "payment_link",
        "active": True,
        "after_completion": after,
        "allow_promotion_codes": promo,
        "application": None,
        "application_fee_amount": (destination or {}).get("application_fee_amount"),
        "application_fee_percent": None,
        "automatic_tax": {"enabled": False, "liability": None},
        "billing_address_collection": p.string("billing_address_collection") or "auto",
        "consent_collection": None,
        "currency": lines[0][0]["currency"],
        "custom_fields": [],
        "custom_text": {"after_submit": None, "shipping_address": None, "submit": None,
                        "terms_of_service_acceptance": None},
        "customer_creation": p.string("customer_creation") or "if_required",
        "inactive_message": None,
        "invoice_creation": None,
        "livemode": False,
        "metadata": metadata,
        "on_behalf_of": None,
        "payment_intent_data": None,
        "payment_method_collection": "always",
        "payment_method_types": None,
        "phone_number_collection": {"enabled": False},
        "restrictions": None,
        "shipping_address_collection": None,
        "shipping_options": [],
        "submit_type": p.string("submit_type") or "auto",
        "subscription_data": None,
        "tax_id_collection": {"enabled": False, "required": "never"},
        "transfer_data": (destination or {}).get("transfer_data"),
        "url": f"https://buy.sandbox.aims.invalid/test_{random_base62(20)}",
        "_destination": destination,
    }
    ctx.store.insert(link)
    for price, quantity in lines:
        ctx.store.insert(_item(ctx, link_id, price, quantity))
    return link


def retrieve_payment_link(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return ctx.fetch("payment_link", args["id"], "payment_link", "id")


def update_payment_link(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("active", "metadata", "after_completion", "allow_promotion_codes"))
    link = ctx.fetch("payment_link", args["id"], "payment_link", "id")
    p.set_booleans(link, "active")
    if p.has("after_completion"):
        link["after_completion"] = _after_completion(p)
    p.set_booleans(link, "allow_promotion_codes")
    link["metadata"] = p.metadata(link["metadata"])
    ctx.store.update(link)
    return link


def list_payment_links(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "active"))
    return list_page(ctx, p, "payment_link", "/v1/payment_links", p.boolean_filter("active"))


def list_link_items(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(LIST_PARAMS)
    link = ctx.fetch("payment_link", args["id"], "payment_link", "id")
    return list_page(ctx, p, "item", f"/v1/payment_links/{link['id']}/line_items",
                     {"_parent": link["id"]}, oldest_first=True)


# -- checkout sessions ------------------------------------------------------------------------

def create_session(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("mode", "line_items", "customer", "customer_email", "success_url", "cancel_url",
             "client_reference_id", "metadata", "subscription_data", "allow_promotion_codes",
             "payment_method_types", "currency", "locale", "ui_mode", "customer_creation",
             "billing_address_collection", "payment_intent_data", "expires_at", "return_url",
             "submit_type", "automatic_tax"))
    mode = p.req_str("mode", choices=("payment", "subscription", "setup"))
    customer = p.string("customer")
    email = p.string("customer_email")
    if customer is not None and email is not None:
        raise invalid("customer", "You may only specify one of these parameters: customer, customer_email.")
    if customer is not None:
        ctx.fetch("customer", customer, "customer", "customer")
    success_url = p.url("success_url")
    cancel_url = p.url("cancel_url")
    p.url("return_url")
    metadata = p.metadata()
    sub_data = p.sub("subscription_data")
    sub_metadata: dict[str, str] = {}
    trial_days: int | None = None
    if sub_data is not None:
        if mode != "subscription":
            raise invalid(
                "subscription_data", "You can only specify `subscription_data` in `subscription` mode."
            )
        sub_data.allow(("metadata", "description", "trial_period_days"))
        sub_metadata = sub_data.metadata()
        trial_days = sub_data.integer("trial_period_days", minimum=1)
    expires_at = p.integer("expires_at")
    if expires_at is not None and not ctx.now + 1800 <= expires_at <= ctx.now + SESSION_TTL:
        raise invalid("expires_at", "The `expires_at` timestamp must be between 30 minutes and 24 hours "
                      "from Checkout Session creation.", code="parameter_invalid_integer")
    promo = p.boolean("allow_promotion_codes")
    if mode == "setup":
        if p.has("line_items"):
            raise invalid("line_items", "You cannot pass `line_items` in `setup` mode.")
        lines: list[tuple[Obj, int | None]] = []
    else:
        if not p.items("line_items"):
            raise missing("line_items")
        lines = _line_prices(ctx, p, allow_price_data=True)
        recurring = [price for price, _ in lines if price["type"] == "recurring"]
        if mode == "payment" and recurring:
            raise invalid(
                "line_items",
                "You specified `payment` mode but passed a recurring price. Either switch to "
                "`subscription` mode or use only one-time prices.",
            )
        if mode == "subscription" and not recurring:
            raise invalid(
                "line_items",
                "You must provide at least one recurring price in `subscription` mode when using prices.",
            )
    # during a trial, recurring prices are not charged now (one-time ones are)
    total = sum(amount_for(price, quantity) for price, quantity in lines
                if quantity is not None and not (trial_days and price["type"] == "recurring"))
    currency = lines[0][0]["currency"] if lines else p.currency()
    pi_data = p.sub("payment_intent_data")
    destination = None
    if pi_data is not None:
        if mode != "payment":
            raise invalid("payment_intent_data", "You can only specify `payment_intent_data` in `payment` mode.")
        pi_data.allow(("transfer_data", "application_fee_amount", "transfer_group", "metadata", "description"))
        destination = connect.destination_params(ctx, pi_data, total, currency)
    session_id = checkout_session_id()
    session: Obj = {
        "id": session_id,
        "object": "checkout.session",
        "adaptive_pricing": None,
        "after_expiration": None,
        "allow_promotion_codes": promo,
        "amount_subtotal": total if lines else None,
        "amount_total": total if lines else None,
        "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
        "billing_address_collection": p.string("billing_address_collection"),
        "cancel_url": cancel_url,
        "client_reference_id": p.string("client_reference_id"),
        "client_secret": None,
        "collected_information": None,
        "consent": None,
        "consent_collection": None,
        "created": ctx.now,
        "currency": currency,
        "currency_conversion": None,
        "custom_fields": [],
        "custom_text": {"after_submit": None, "shipping_address": None, "submit": None,
                        "terms_of_service_acceptance": None},
        "customer": customer,
        "customer_account": None,
        "customer_creation": None if customer or mode == "subscription" else "if_required",
        "customer_details": None,
        "customer_email": email,
        "discounts": [],
        "expires_at": expires_at or ctx.now + SESSION_TTL,
        "invoice": None,
        "invoice_creation": None,
        "livemode": False,
        "locale": p.string("locale"),
        "metadata": metadata,
        "mode": mode,
        "origin_context": None,
        "payment_intent": None,
        "payment_link": None,
        "payment_method_collection": "always" if mode == "subscription" else None,
        "payment_method_configuration_details": None,
        "payment_method_options": {},
        "payment_method_types": p.strings("payment_method_types") or ["card"],
        "payment_status": "no_payment_required" if mode == "setup" else "unpaid",
        "permissions": None,
        "phone_number_collection": {"enabled": False},
        "recovered_from": None,
        "saved_payment_method_options": None,
        "setup_intent": None,
        "shipping_address_collection": None,
        "shipping_cost": None,
        "shipping_options": [],
        "status": "open",
        "submit_type": p.string("submit_type"),
        "subscription": None,
        "success_url": success_url,
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0} if lines else None,
        "ui_mode": p.string("ui_mode", choices=("hosted", "embedded", "custom")) or "hosted",
        "url": f"https://checkout.sandbox.aims.invalid/c/pay/{session_id}",
        "wallet_options": None,
        "_subscription_metadata": sub_metadata,
        "_trial_period_days": trial_days,
        "_destination": destination,
        "_payment_intent_metadata": pi_data.metadata() if pi_data is not None else {},
    }
    ctx.store.insert(session)
    for price, quantity in lines:
        ctx.store.insert(_item(ctx, session_id, price, quantity))
    return session


def retrieve_session(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return ctx.fetch("checkout.session", args["id"], "checkout session", "id")


def update_session(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("metadata",))
    session = ctx.fetch("checkout.session", args["id"], "checkout session", "id")
    session["metadata"] = p.metadata(session["metadata"])
    ctx.store.update(session)
    return session


def list_sessions(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "customer", "status", "payment_intent", "payment_link", "customer_details"))
    filters = {**p.string_filter("customer"), **p.string_filter("payment_intent"), **p.string_filter("payment_link"),
               **p.string_filter("status", choices=("open", "complete", "expired"))}
    return list_page(ctx, p, "checkout.session", "/v1/checkout/sessions", filters)


def expire_session(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    session = ctx.fetch("checkout.session", args["id"], "checkout session", "id")
    if session["status"] != "open":
        raise StripeError(
            400,
            f"Only Checkout Sessions with a status in [\"open\"] can be expired. This Checkout "
            f"Session has a status of \"{session['status']}\".",
        )
    session["status"] = "expired"
    session["url"] = None
    ctx.store.update(session)
    ctx.record_event("checkout.session.expired", session)
    return session


def list_session_items(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(LIST_PARAMS)
    session = ctx.fetch("checkout.session", args["id"], "checkout session", "id")
    return list_page(ctx, p, "item", f"/v1/checkout/sessions/{session['id']}/line_items",
                     {"_parent": session["id"]}, oldest_first=True)


ROUTES = [
    Route("POST", "/v1/payment_links", create_payment_link),
    Route("GET", "/v1/payment_links", list_payment_links),
    Route("GET", "/v1/payment_links/{id}", retrieve_payment_link),
    Route("POST", "/v1/payment_links/{id}", update_payment_link),
    Route("GET", "/v1/payment_links/{id}/line_items", list_link_items),
    Route("POST", "/v1/checkout/sessions", create_session),
    Route("GET", "/v1/checkout/sessions", list_sessions),
    Route("GET", "/v1/checkout/sessions/{id}", retrieve_session),
    Route("POST", "/v1/checkout/sessions/{id}", update_session),
    Route("POST", "/v1/checkout/sessions/{id}/expire", expire_session),
    Route("GET", "/v1/checkout/sessions/{id}/line_items", list_session_items),
]
