"""`setup-stripe`: the product and monthly price of every paid tier, created once and found by lookup key after.

Idempotent by construction: a price is found by its lookup key (`aims_tier_<id>_monthly`) before anything is
created, and a product by its `aims_tier` metadata, so a second run creates nothing. A price whose amount no longer
matches pricing.toml is replaced by a new price that takes over the lookup key (Stripe prices are immutable).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..stripe_gateway import StripeGateway, StripeRequest, stripe_idempotency_key
from .tiers import TIER_METADATA, Pricing, Tier


@dataclass(frozen=True)
class TierSetup:
    tier: str
    env: str
    product: str
    price: str
    created: list[str]  # what this run created ("product", "price"), empty when everything was found


async def setup_stripe(gateway: StripeGateway, pricing: Pricing) -> list[TierSetup]:
    products = await _tier_products(gateway)
    results = []
    for tier in pricing.paid_tiers():
        results.append(await _setup_tier(gateway, pricing, tier, products))
    return results


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


async def _setup_tier(gateway: StripeGateway, pricing: Pricing, tier: Tier, products: dict[str, str]) -> TierSetup:
    assert tier.price_env is not None
    created: list[str] = []
    page = (await gateway.send(StripeRequest("get", "/v1/prices", {"lookup_keys": [tier.lookup_key],
                                                                   "active": True}))).data
    existing = next(iter(page.get("data", [])), None)
    if existing and _matches(existing, tier, pricing):
        return TierSetup(tier.id, tier.price_env, _id(existing["product"]), existing["id"], created)
    product = products.get(tier.id) or (existing and _id(existing["product"]))
    if not product:
        made = await gateway.send(StripeRequest(
            "post", "/v1/products",
            {"name": f"AIMS {tier.name}", "description": tier.description, "metadata": {TIER_METADATA: tier.id}},
            stripe_idempotency_key("setup-stripe", f"product:{tier.id}")))
        product = made.data["id"]
        created.append("product")
    price = await gateway.send(StripeRequest(
        "post", "/v1/prices",
        {"product": product, "currency": pricing.currency, "unit_amount": tier.monthly_price,
         "recurring": {"interval": "month"}, "lookup_key": tier.lookup_key, "transfer_lookup_key": True,
         "nickname": f"{tier.name} monthly", "metadata": {TIER_METADATA: tier.id}},
        stripe_idempotency_key("setup-stripe", f"price:{tier.id}:{tier.monthly_price}:{product}")))
    created.append("price")
    return TierSetup(tier.id, tier.price_env, product, price.data["id"], created)


def _matches(price: dict[str, Any], tier: Tier, pricing: Pricing) -> bool:
    recurring = price.get("recurring") or {}
    return (price.get("unit_amount") == tier.monthly_price and price.get("currency") == pricing.currency
            and recurring.get("interval") == "month" and recurring.get("interval_count", 1) == 1)


def _id(value: Any) -> str:
    return value["id"] if isinstance(value, dict) else str(value)


def env_lines(results: list[TierSetup]) -> list[str]:
    return [f"{result.env}={result.price}" for result in results]


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
