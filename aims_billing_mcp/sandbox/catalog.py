"""Products and prices (``/v1/products``, ``/v1/prices``)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation

from .core import LIST_PARAMS, Ctx, Obj, Route, list_page, public
from .errors import StripeError, invalid, missing
from .ids import new_id
from .params import Params

PRODUCT_FIELDS = ("description", "statement_descriptor", "tax_code", "unit_label", "url")


def new_product(ctx: Ctx, p: Params, *, name: str | None = None) -> Obj:
    """Build and store a product from create params (or an inline ``product_data`` hash)."""
    product_id = p.string("id") or new_id("prod_", 14)
    if p.has("id") and ctx.store.get(product_id) is not None:
        raise StripeError(400, "Product already exists.", code="resource_already_exists", param="id")
    active = p.boolean("active")
    product: Obj = {
        "id": product_id,
        "object": "product",
        "active": True if active is None else active,
        "created": ctx.now,
        "default_price": None,
        "description": None,
        "images": p.strings("images"),
        "livemode": False,
        "marketing_features": [],
        "metadata": p.metadata(),
        "name": name if name is not None else p.req_str("name"),
        "package_dimensions": None,
        "shippable": p.boolean("shippable"),
        "statement_descriptor": None,
        "tax_code": None,
        "type": "service",
        "unit_label": None,
        "updated": ctx.now,
        "url": None,
    }
    for key in PRODUCT_FIELDS:
        if p.has(key):
            product[key] = p.string(key)
    ctx.store.insert(product)
    return product


def create_product(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(
        ("id", "name", "active", "metadata", "default_price_data", "images", "shippable", *PRODUCT_FIELDS)
    )
    name = p.req_str("name")
    dpd = p.sub("default_price_data")
    if dpd is not None:
        dpd.allow(("currency", "unit_amount", "unit_amount_decimal", "recurring", "tax_behavior", "metadata"))
        price_params(dpd)  # validate before anything is stored
    product = new_product(ctx, p, name=name)
    if dpd is not None:
        price = new_price(ctx, dpd, product_id=product["id"], active=True)
        product["default_price"] = price["id"]
        ctx.store.update(product)
    return product


def retrieve_product(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return ctx.fetch("product", args["id"], "product", "id")


def update_product(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("name", "active", "metadata", "default_price", "images", "shippable", *PRODUCT_FIELDS))
    product = ctx.fetch("product", args["id"], "product", "id")
    if p.has("name"):
        product["name"] = p.req_str("name")
    p.set_booleans(product, "active")
    for key in PRODUCT_FIELDS:
        if p.has(key):
            product[key] = p.string(key)
    if p.has("images"):
        product["images"] = p.strings("images")
    if p.has("shippable"):
        product["shippable"] = p.boolean("shippable")
    if p.has("default_price"):
        price_id = p.string("default_price")
        if price_id is not None:
            price = ctx.fetch("price", price_id, "price", "default_price")
            if price["product"] != product["id"]:
                raise invalid("default_price", "The price must belong to this product.")
        product["default_price"] = price_id
    product["metadata"] = p.metadata(product["metadata"])
    product["updated"] = ctx.now
    ctx.store.update(product)
    return product


def list_products(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "active", "ids", "shippable", "url"))
    filters: dict[str, str | list[str]] = {**p.boolean_filter("active")}
    if p.has("ids"):
        filters["id"] = p.strings("ids")
    return list_page(ctx, p, "product", "/v1/products", filters)


# -- prices -----------------------------------------------------------------------------------

INTERVALS = ("day", "week", "month", "year")


def _decimal(p: Params, key: str) -> str | None:
    """A non-negative decimal amount, normalised (``"1.50"`` -> ``"1.5"``, ``"2.0"`` -> ``"2"``)."""
    text = p.string(key)
    if text is None:
        return None
    try:
        dec = Decimal(text)
    except InvalidOperation:
        raise invalid(p.name(key), f"Invalid decimal: {text}", code="parameter_invalid_decimal") from None
    if not dec.is_finite() or dec < 0:
        raise invalid(p.name(key), f"Invalid decimal: {text}", code="parameter_invalid_decimal")
    return str(int(dec)) if dec == dec.to_integral_value() else format(dec.normalize(), "f")


def _money_pair(p: Params, whole: str, decimal: str) -> tuple[int | None, str | None]:
    """One of ``whole`` (integer) / ``decimal`` (decimal string), both forms returned when set."""
    amount = p.integer(whole, minimum=0)
    text = _decimal(p, decimal)
    if amount is not None and text is not None:
        raise invalid(p.name(whole), f"You may only specify one of these parameters: {whole}, {decimal}.")
    if amount is not None:
        return amount, str(amount)
    if text is not None:
        return (int(text) if "." not in text else None), text
    return None, None


def tier_params(p: Params) -> tuple[str, str | None, list[Obj] | None]:
    """``billing_scheme``, ``tiers_mode`` and validated ``tiers`` (the last one ``up_to: null``)."""
    scheme = p.string("billing_scheme", choices=("per_unit", "tiered")) or "per_unit"
    if scheme == "per_unit":
        for key in ("tiers", "tiers_mode"):
            if p.has(key):
                raise invalid(key, f"You can only specify `{key}` when `billing_scheme` is `tiered`.")
        return scheme, None, None
    mode = p.string("tiers_mode", choices=("graduated", "volume"))
    if mode is None:
        raise missing("tiers_mode")
    raw = p.items("tiers")
    if not raw:
        raise missing("tiers")
    if p.sub("recurring") is None:
        raise invalid("billing_scheme", "Tiered pricing is only available for recurring prices.")
    for key in ("unit_amount", "unit_amount_decimal"):
        if p.has(key):
            raise invalid(key, f"You may not specify `{key}` when `billing_scheme` is `tiered`.")
    tiers: list[Obj] = []
    previous = 0
    for index, tp in enumerate(raw):
        tp.allow(("up_to", "unit_amount", "unit_amount_decimal", "flat_amount", "flat_amount_decimal"))
        limit = tp.req_str("up_to")
        up_to: int | None
        if limit == "inf":
            up_to = None
            if index != len(raw) - 1:
                raise invalid(tp.name("up_to"), "Only the last tier can have `up_to` set to `inf`.")
        else:
            up_to = tp.integer("up_to", minimum=1)
            assert up_to is not None
            if index == len(raw) - 1:
                raise invalid(tp.name("up_to"), "The last tier must have `up_to` set to `inf`.")
            if up_to <= previous:
                raise invalid(tp.name("up_to"), "Tiers must be in ascending order of `up_to`.",
                              code="parameter_invalid_integer")
            previous = up_to
        unit, unit_text = _money_pair(tp, "unit_amount", "unit_amount_decimal")
        flat, flat_text = _money_pair(tp, "flat_amount", "flat_amount_decimal")
        if unit_text is None and flat_text is None:
            raise missing(tp.name("unit_amount"))
        tiers.append({"flat_amount": flat, "flat_amount_decimal": flat_text, "unit_amount": unit,
                      "unit_amount_decimal": unit_text, "up_to": up_to})
    return scheme, mode, tiers


def price_params(p: Params) -> tuple[str, int | None, str | None, Obj | None]:
    """Validate the money part of a price: currency, amount, recurring. Shared by inline prices."""
    currency = p.currency(required=True)
    assert currency is not None
    recurring = _recurring(p)
    if p.string("billing_scheme") == "tiered":
        return currency, None, None, recurring
    unit_amount = p.integer("unit_amount")
    decimal_text = p.string("unit_amount_decimal")
    if unit_amount is not None and decimal_text is not None:
        raise invalid(
            "unit_amount",
            "You may only specify one of these parameters: unit_amount, unit_amount_decimal.",
        )
    if unit_amount is not None:
        if unit_amount < 0:
            raise invalid(
                p.name("unit_amount"),
                "Invalid non-negative integer",
                code="parameter_invalid_integer",
            )
        decimal_text = str(unit_amount)
    elif decimal_text is not None:
        try:
            dec = Decimal(decimal_text)
        except InvalidOperation:
            raise invalid(
                p.name("unit_amount_decimal"), f"Invalid decimal: {decimal_text}",
                code="parameter_invalid_decimal",
            ) from None
        if not dec.is_finite() or dec < 0:
            raise invalid(p.name("unit_amount_decimal"), f"Invalid decimal: {decimal_text}")
        if dec == dec.to_integral_value():
            unit_amount = int(dec)
            decimal_text = str(unit_amount)
        else:
            decimal_text = format(dec.normalize(), "f")
    else:
        raise missing(p.name("unit_amount"))
    return currency, unit_amount, decimal_text, recurring


def _recurring(p: Params) -> Obj | None:
    recurring = None
    rec = p.sub("recurring")
    if rec is not None:
        rec.allow(("interval", "interval_count", "usage_type", "meter", "trial_period_days"))
        interval = rec.req_str("interval", choices=INTERVALS)
        count = rec.integer("interval_count", minimum=1) or 1
        limits = {"day": 1095, "week": 156, "month": 36, "year": 3}
        if count > limits[interval]:
            raise invalid(
                rec.name("interval_count"),
                "The maximum billing interval is three years.",
                code="parameter_invalid_integer",
            )
        usage_type = rec.string("usage_type", choices=("licensed", "metered")) or "licensed"
        meter = rec.string("meter")
        if usage_type == "metered" and meter is None:
            raise missing(rec.name("meter"))
        if usage_type == "licensed" and meter is not None:
            raise invalid(rec.name("meter"), "You can only specify `meter` when `usage_type` is `metered`.")
        recurring = {
            "interval": interval,
            "interval_count": count,
            "meter": meter,
            "trial_period_days": rec.integer("trial_period_days", minimum=0),
            "usage_type": usage_type,
        }
    return recurring


def new_price(ctx: Ctx, p: Params, *, product_id: str, active: bool) -> Obj:
    """Build and store a price from validated params."""
    currency, unit_amount, decimal_text, recurring = price_params(p)
    scheme, tiers_mode, tiers = tier_params(p)
    if recurring is not None and recurring["meter"] is not None:
        meter = ctx.fetch("billing.meter", recurring["meter"], "billing.meter", "recurring[meter]")
        if meter["status"] != "active":
            raise invalid("recurring[meter]", f"The meter `{meter['id']}` is inactive.")
    price: Obj = {
        "id": new_id("price_"),
        "object": "price",
        "active": active,
        "billing_scheme": scheme,
        "created": ctx.now,
        "currency": currency,
        "custom_unit_amount": None,
        "livemode": False,
        "lookup_key": None,
        "metadata": p.metadata(),
        "nickname": p.string("nickname"),
        "product": product_id,
        "recurring": recurring,
        "tax_behavior": p.string("tax_behavior", choices=("inclusive", "exclusive", "unspecified"))
        or "unspecified",
        "tiers_mode": tiers_mode,
        "transform_quantity": None,
        "type": "recurring" if recurring else "one_time",
        "unit_amount": unit_amount,
        "unit_amount_decimal": decimal_text,
    }
    if tiers is not None:
        price["tiers"] = tiers  # Stripe returns them with expand[]=tiers; the sandbox always does
    ctx.store.insert(price)
    return price


def _claim_lookup_key(ctx: Ctx, p: Params, price: Obj) -> None:
    """Give ``price`` the requested lookup_key, moving it only with ``transfer_lookup_key``."""
    if not p.has("lookup_key"):
        return
    key = p.string("lookup_key")
    if key is not None and len(key) > 200:
        raise invalid("lookup_key", "lookup_key can be at most 200 characters.")
    transfer = p.boolean("transfer_lookup_key") or False
    if key is not None:
        holder = ctx.store.find_one("price", "lookup_key", key)
        if holder is not None and holder["id"] != price["id"]:
            if not transfer:
                raise invalid(
                    "lookup_key",
                    f"A price (`{holder['id']}`) already uses that lookup key.",
                )
            holder["lookup_key"] = None
            ctx.store.update(holder)
    price["lookup_key"] = key
    ctx.store.update(price)


def create_price(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((
        "currency", "product", "product_data", "unit_amount", "unit_amount_decimal", "recurring",
        "lookup_key", "transfer_lookup_key", "nickname", "metadata", "active", "tax_behavior",
        "billing_scheme", "tiers", "tiers_mode",
    ))
    price_params(p)
    tier_params(p)
    product_id = p.string("product")
    product_data = p.sub("product_data")
    if product_id is None and product_data is None:
        raise missing("product")
    if product_id is not None and product_data is not None:
        raise invalid("product", "You may only specify one of these parameters: product, product_data.")
    if product_id is not None:
        ctx.fetch("product", product_id, "product", "product")
    else:
        assert product_data is not None
        product_data.allow(
            ("name", "active", "metadata", "statement_descriptor", "tax_code", "unit_label", "id")
        )
        product_id = new_product(ctx, product_data)["id"]
    active = p.boolean("active")
    price = new_price(ctx, p, product_id=product_id, active=True if active is None else active)
    _claim_lookup_key(ctx, p, price)
    return price


def retrieve_price(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return ctx.fetch("price", args["id"], "price", "id")


def update_price(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("active", "metadata", "nickname", "lookup_key", "transfer_lookup_key", "tax_behavior"))
    price = ctx.fetch("price", args["id"], "price", "id")
    p.set_booleans(price, "active")
    if p.has("nickname"):
        price["nickname"] = p.string("nickname")
    if p.has("tax_behavior"):
        price["tax_behavior"] = p.req_str("tax_behavior", choices=("inclusive", "exclusive", "unspecified"))
    price["metadata"] = p.metadata(price["metadata"])
    ctx.store.update(price)
    _claim_lookup_key(ctx, p, price)
    return price


def list_prices(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "active", "product", "type", "currency", "lookup_keys", "recurring"))
    filters: dict[str, str | list[str]] = {**p.boolean_filter("active"), **p.string_filter("product"),
                                           **p.string_filter("type", choices=("one_time", "recurring"))}
    currency = p.currency()
    if currency is not None:
        filters["currency"] = currency
    if p.has("lookup_keys"):
        keys = p.strings("lookup_keys")
        if len(keys) > 10:
            raise invalid("lookup_keys", "You may pass at most 10 lookup_keys.")
        filters["lookup_key"] = keys
    return list_page(ctx, p, "price", "/v1/prices", filters)


def plan_of(price: Obj) -> Obj:
    """The (legacy) plan Stripe still shows beside a subscription item's recurring price."""
    rec = price["recurring"]
    plan: Obj = {
        "id": price["id"],
        "object": "plan",
        "active": price["active"],
        "amount": price["unit_amount"],
        "amount_decimal": price["unit_amount_decimal"],
        "billing_scheme": price["billing_scheme"],
        "created": price["created"],
        "currency": price["currency"],
        "interval": rec["interval"],
        "interval_count": rec["interval_count"],
        "livemode": False,
        "metadata": price["metadata"],
        "meter": rec.get("meter"),
        "nickname": price["nickname"],
        "product": price["product"],
        "tiers_mode": price["tiers_mode"],
        "transform_usage": None,
        "trial_period_days": rec.get("trial_period_days"),
        "usage_type": rec.get("usage_type", "licensed"),
    }
    if "tiers" in price:
        plan["tiers"] = price["tiers"]
    return plan


def expanded_price(ctx: Ctx, price_id: str) -> Obj:
    """The price as embedded (expanded) in line items and subscription items."""
    return public(ctx.fetch("price", price_id, "price", "price"))


ROUTES = [
    Route("POST", "/v1/products", create_product),
    Route("GET", "/v1/products", list_products),
    Route("GET", "/v1/products/{id}", retrieve_product),
    Route("POST", "/v1/products/{id}", update_product),
    Route("POST", "/v1/prices", create_price),
    Route("GET", "/v1/prices", list_prices),
    Route("GET", "/v1/prices/{id}", retrieve_price),
    Route("POST", "/v1/prices/{id}", update_price),
]
