"""`setup-stripe`: a billing meter per meter of pricing.toml, and for every tier its product, monthly price and one
metered overage price per meter, created once and found after.

Idempotent by construction: a meter is found by its event name (an active meter of that name with another
aggregation is refused: Stripe cannot change it, so the operator decides), a price by its lookup key
(`aims_tier_<id>_monthly`; `aims_tier_<id>_overage` for LUC tokens, `aims_tier_<id>_<meter>_overage` for the other
meters) and a product by its `aims_tier` metadata before anything is created, so a second run creates nothing. A
price that no longer matches pricing.toml is replaced by a new price that takes over the lookup key (Stripe prices
are immutable).

An overage price is metered on its meter: graduated, the tier's included units free, then the rate per unit (a
decimal of cents: 150 cents per 1,000 units is 0.15); P2P's is per unit from the first one. So Stripe invoices the
overage itself, one line per meter, and the local usage summary of each meter predicts its line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..stripe_gateway import StripeGateway, StripeRequest, encode_form, stripe_idempotency_key
from .tiers import LUC_METER, TIER_METADATA, Meter, Pricing, Tier


@dataclass(frozen=True)
class TierSetup:
    tier: str
    env: str | None
    product: str
    price: str | None  # the monthly price (None for P2P)
    overage_price: str  # LUC tokens' metered price
    created: list[str]  # what this run created ("product", "price", "overage price", "<meter> price"), or empty
    metered_prices: dict[str, str] = field(default_factory=dict)  # every meter's metered price, by meter id


@dataclass(frozen=True)
class StripeSetup:
    meter: str  # LUC tokens' Stripe meter
    meter_created: bool
    tiers: list[TierSetup]
    meters: dict[str, str] = field(default_factory=dict)  # Stripe meter id by meter id
    meters_created: list[str] = field(default_factory=list)  # the meter ids this run created

    @property
    def paid(self) -> list[TierSetup]:
        return [t for t in self.tiers if t.env is not None]


async def setup_stripe(gateway: StripeGateway, pricing: Pricing) -> StripeSetup:
    active = await _active_meters(gateway)
    meters: dict[str, str] = {}
    created: list[str] = []
    for meter in pricing.meters.values():
        meters[meter.id], made = await _meter(gateway, meter, active)
        if made:
            created.append(meter.id)
    products = await _tier_products(gateway)
    results = []
    for tier in pricing.tiers.values():
        results.append(await _setup_tier(gateway, pricing, tier, products, meters))
    return StripeSetup(meters[LUC_METER], LUC_METER in created, results, meters, created)


async def _active_meters(gateway: StripeGateway) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    params: dict[str, Any] = {"status": "active", "limit": 100}
    while True:
        page = (await gateway.send(StripeRequest("get", "/v1/billing/meters", params))).data
        for meter in page.get("data", []):
            found.setdefault(str(meter.get("event_name")), meter)
        if not page.get("has_more") or not page.get("data"):
            return found
        params = {**params, "starting_after": page["data"][-1]["id"]}


async def _meter(gateway: StripeGateway, meter: Meter, active: dict[str, dict[str, Any]]) -> tuple[str, bool]:
    existing = active.get(meter.event_name)
    if existing is not None:
        formula = (existing.get("default_aggregation") or {}).get("formula")
        if formula != meter.aggregation:
            raise ConfigurationError(
                f"Stripe's active meter {existing['id']} for event name {meter.event_name!r} aggregates by "
                f"{formula}, but pricing.toml's meter {meter.id} says {meter.aggregation}: Stripe cannot change a "
                "meter's aggregation; deactivate that meter or give the meter another event_name", param="meters")
        return str(existing["id"]), False
    made = await gateway.send(StripeRequest(
        "post", "/v1/billing/meters",
        {"display_name": meter.display_name or f"AIMS {meter.id}", "event_name": meter.event_name,
         "default_aggregation": {"formula": meter.aggregation},
         "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
         "value_settings": {"event_payload_key": "value"}},
        stripe_idempotency_key("setup-stripe", f"meter:{meter.event_name}:{meter.aggregation}")))
    return str(made.data["id"]), True


async def _tier_products(gateway: StripeGateway) -> dict[str, str]:
    found: dict[str, str] = {}
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = (await gateway.send(StripeRequest("get", "/v1/products", params))).data
        for product in page.get("data", []):
            tier = (product.get("metadata") or {}).get(TIER_METADATA)
            if tier and tier not in found and product.get("active", True):
                found[tier] = product["id"]
        if not page.get("has_more") or not page.get("data"):
            return found
        params = {"limit": 100, "starting_after": page["data"][-1]["id"]}


async def _price_by_lookup_key(gateway: StripeGateway, key: str) -> dict[str, Any] | None:
    page = (await gateway.send(StripeRequest("get", "/v1/prices", {"lookup_keys": [key], "active": True}))).data
    return next(iter(page.get("data", [])), None)


async def _setup_tier(
    gateway: StripeGateway, pricing: Pricing, tier: Tier, products: dict[str, str], meters: dict[str, str]
) -> TierSetup:
    created: list[str] = []
    monthly = await _price_by_lookup_key(gateway, tier.lookup_key) if tier.paid else None
    overage = await _price_by_lookup_key(gateway, tier.overage_lookup_key)
    product = products.get(tier.id) or (monthly and _id(monthly["product"])) or (overage and _id(overage["product"]))
    if not product:
        made = await gateway.send(StripeRequest(
            "post", "/v1/products",
            {"name": f"AIMS {tier.name}", "description": tier.description, "metadata": {TIER_METADATA: tier.id}},
            stripe_idempotency_key("setup-stripe", f"product:{tier.id}")))
        product = made.data["id"]
        created.append("product")
    monthly_id: str | None = None
    if tier.paid:
        if monthly is not None and _matches(monthly, tier, pricing):
            monthly_id = monthly["id"]
        else:
            monthly_id = await _create_price(gateway, tier.id, {
                "product": product, "currency": pricing.currency, "unit_amount": tier.monthly_price,
                "recurring": {"interval": "month"}, "lookup_key": tier.lookup_key, "transfer_lookup_key": True,
                "nickname": f"{tier.name} monthly", "metadata": {TIER_METADATA: tier.id}})
            created.append("price")
    metered: dict[str, str] = {}
    for meter in pricing.meters.values():
        found = overage if meter.id == LUC_METER else await _price_by_lookup_key(
            gateway, meter.overage_lookup_key(tier))
        wanted = overage_price_params(pricing, tier, product, meters[meter.id], meter)
        if found is not None and _overage_matches(found, wanted):
            metered[meter.id] = found["id"]
        else:
            metered[meter.id] = await _create_price(gateway, tier.id, wanted)
            created.append("overage price" if meter.id == LUC_METER else f"{meter.id} price")
    return TierSetup(tier.id, tier.price_env, product, monthly_id, metered[LUC_METER], created, metered)


async def _create_price(gateway: StripeGateway, tier: str, params: dict[str, Any]) -> str:
    key = stripe_idempotency_key("setup-stripe", f"price:{tier}:{encode_form(params)}")
    return str((await gateway.send(StripeRequest("post", "/v1/prices", params, key))).data["id"])


def overage_price_params(pricing: Pricing, tier: Tier, product: str, meter: str,
                         kind: Meter | None = None) -> dict[str, Any]:
    """The metered price of a tier on a meter (`kind`, LUC tokens when not given; `meter` its Stripe id)."""
    kind = kind or pricing.meters[LUC_METER]
    terms = kind.terms(tier)
    rate = str(Decimal(terms.overage_rate) / 1000)  # cents per unit, e.g. "0.15"
    params: dict[str, Any] = {
        "product": product, "currency": pricing.currency, "lookup_key": kind.overage_lookup_key(tier),
        "transfer_lookup_key": True, "metadata": {TIER_METADATA: tier.id},
        "nickname": f"{tier.name} usage" if kind.id == LUC_METER else f"{tier.name} {kind.unit}s",
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter},
    }
    if kind.id != LUC_METER:
        params["metadata"]["aims_meter"] = kind.id
    if terms.tokens_per_month:
        params.update({"billing_scheme": "tiered", "tiers_mode": "graduated", "tiers": [
            {"up_to": terms.tokens_per_month, "unit_amount": 0},
            {"up_to": "inf", "unit_amount_decimal": rate}]})
    else:
        params["unit_amount_decimal"] = rate
    return params


def _overage_matches(price: dict[str, Any], wanted: dict[str, Any]) -> bool:
    recurring = price.get("recurring") or {}
    if recurring.get("meter") != wanted["recurring"]["meter"] or recurring.get("usage_type") != "metered":
        return False
    if "tiers" not in wanted:
        return Decimal(str(price.get("unit_amount_decimal") or "-1")) == Decimal(wanted["unit_amount_decimal"])
    tiers = price.get("tiers") or []
    if len(tiers) != 2 or price.get("tiers_mode") != "graduated":
        return False
    first, last = tiers
    return (first.get("up_to") == wanted["tiers"][0]["up_to"] and not first.get("unit_amount")
            and last.get("up_to") is None
            and Decimal(str(last.get("unit_amount_decimal") or last.get("unit_amount") or "-1"))
            == Decimal(wanted["tiers"][1]["unit_amount_decimal"]))


def _matches(price: dict[str, Any], tier: Tier, pricing: Pricing) -> bool:
    recurring = price.get("recurring") or {}
    return (price.get("unit_amount") == tier.monthly_price and price.get("currency") == pricing.currency
            and recurring.get("interval") == "month" and recurring.get("interval_count", 1) == 1)


def _id(value: Any) -> str:
    return value["id"] if isinstance(value, dict) else str(value)


def env_lines(setup: StripeSetup) -> list[str]:
    return [f"{result.env}={result.price}" for result in setup.paid]


def write_env(path: Path, values: dict[str, str]) -> None:
    """Set `NAME=value` lines in a .env file in place: a line for NAME is replaced, a missing one appended, every
    other line (comments, other variables, blank lines) kept byte for byte."""
    lines = path.read_text("utf-8").splitlines(keepends=True) if path.exists() else []
    pending = dict(values)
    for index, line in enumerate(lines):
        match = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if match and match.group(1) in pending:
            ending = "\n" if line.endswith("\n") else ""
            lines[index] = f"{match.group(1)}={pending.pop(match.group(1))}{ending}"
    if pending and lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    lines.extend(f"{name}={value}\n" for name, value in pending.items())
    path.write_text("".join(lines), "utf-8")
