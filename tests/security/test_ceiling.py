"""The per-call ceiling (AIMS_BILLING_MAX_AMOUNT) holds on every path that asks for money, in every currency, with
one error code: amount_above_ceiling, naming the field. Each test is one promise; each refused call writes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from mcp import Client

from aims_billing_mcp.app import BillingServer
from aims_billing_mcp.sandbox import Sandbox
from aims_billing_mcp.stripe_gateway import StripeRequest
from tests.conftest import error_of, ok
from tests.tools.test_wallets import funded_wallet

pytestmark = pytest.mark.anyio

MakeServer = Callable[..., BillingServer]


def above_ceiling(err: dict[str, Any], field: str) -> None:
    assert (err["code"], err.get("param")) == ("amount_above_ceiling", field), err
    assert "ceiling" in err["text"] and "internal error" not in err["text"]


async def tiered_price(server: BillingServer, mode: str) -> str:
    """A licensed (not metered) monthly price whose unit_amount is null: $10 a seat up to 10, then $15."""
    assert server.state is not None
    gateway = server.state.gateway
    product = (await gateway.send(StripeRequest("post", "/v1/products", {"name": "Seats"}))).data["id"]
    price = await gateway.send(StripeRequest("post", "/v1/prices", {
        "product": product, "currency": "usd", "recurring": {"interval": "month"}, "billing_scheme": "tiered",
        "tiers_mode": mode, "tiers": [{"up_to": 10, "unit_amount": 1000}, {"up_to": "inf", "unit_amount": 1500}]}))
    return str(price.data["id"])


@pytest.mark.parametrize(("mode", "quantity", "allowed"), [
    ("graduated", 10_000, False),  # 10 x 1000 + 9,990 x 1500 = 14,995,000 cents: the 15,000,000 of the probe
    ("volume", 1_000, False),      # 1,000 x 1500 = 1,500,000 cents
    ("graduated", 600, True),      # 10 x 1000 + 590 x 1500 = 895,000 cents
    ("volume", 666, True),         # 999,000 cents
])
async def test_a_tiered_or_volume_price_is_held_to_the_ceiling_at_its_quantity(
    server: BillingServer, sandbox: Sandbox, mode: str, quantity: int, allowed: bool
) -> None:
    async with Client(server) as client:
        price = await tiered_price(server, mode)
        before = sandbox.count("checkout.session")
        result = await client.call_tool("create_checkout_session", {
            "mode": "subscription", "line_items": [{"price": price, "quantity": quantity}],
            "success_url": "https://example.com/ok"})
    if allowed:
        ok(result)
    else:
        above_ceiling(error_of(result), "line_items")
        assert sandbox.count("checkout.session") == before


@pytest.mark.parametrize("item", ["tier_9mo", "luc_50k"])
async def test_a_payment_session_for_an_item_is_held_to_the_ceiling(make_server: MakeServer, item: str) -> None:
    async with Client(make_server(aims_billing_max_amount=1000)) as client:
        err = error_of(await client.call_tool("create_payment_session", {"item": item, "customer": "cus_x",
                                                                         "agent_id": "a1"}))
    above_ceiling(err, "item")


async def test_a_subscription_checkout_is_held_to_the_ceiling(
    make_server: MakeServer, prices: dict[str, str]
) -> None:
    async with Client(make_server(aims_billing_max_amount=1000)) as client:
        err = error_of(await client.call_tool("create_subscription_checkout", {
            "tier": "3mo", "customer_email": "ada@example.com"}))  # $19.99 a month
    above_ceiling(err, "tier")


@pytest.mark.parametrize(("arguments", "field"), [
    ({"amount_usd": "10000.01"}, "amount_usd"),
    ({"amount_usd": "9999999"}, "amount_usd"),
    ({"amount_atomic": 10_000_000_001}, "amount_atomic"),
])
async def test_x402_payment_requirements_are_held_to_the_ceiling_in_usdc(
    client: Client, arguments: dict[str, Any], field: str
) -> None:
    err = error_of(await client.call_tool("create_x402_payment_requirements", {"description": "x", **arguments}))
    above_ceiling(err, field)
    ok(await client.call_tool("create_x402_payment_requirements", {"description": "x", "amount_usd": "10000"}))


async def test_a_wallet_top_up_in_usd_cents_is_held_to_the_ceiling(server: BillingServer) -> None:
    async with Client(server) as client:
        await funded_wallet(client, server)
        err = error_of(await client.call_tool("credit_agent_wallet", {
            "agent_id": "a1", "usd_cents": 100_000_000_000, "idempotency_key": "big", "reason": "top-up"}))
        after = ok(await client.call_tool("get_agent_wallet", {"agent_id": "a1"}))
    above_ceiling(err, "usd_cents")
    assert after["balance"] == 500


async def test_a_meter_event_is_held_to_the_ceiling_on_the_most_its_units_can_cost(make_server: MakeServer) -> None:
    async with Client(make_server(aims_billing_max_amount=1000)) as client:  # $10: 5,000 P2P units at 200c/1,000
        customer = ok(await client.call_tool("create_customer", {"email": "p2p@example.com"}))["customer"]["id"]
        err = error_of(await client.call_tool("create_meter_event", {"customer": customer, "units": 5_003}))
        summary = ok(await client.call_tool("get_usage_summary", {"customer": customer}))
        ok(await client.call_tool("create_meter_event", {"customer": customer, "units": 5_000}))
    above_ceiling(err, "units")
    assert (summary["raw_units"], summary["events"]["pending"]) == (0, 0)


@pytest.mark.parametrize(("settings", "currency", "amount", "refused"), [
    ({}, "jpy", 1_000_000, True),             # ¥1,000,000 against $10,000: compared as ¥10,000
    ({}, "jpy", 10_000, False),
    ({}, "kwd", 10_000_001, True),            # 10,000.001 KWD (3 decimals)
    ({}, "usd", 1_000_000, False),
    ({"aims_billing_max_amounts": "kwd=3000000"}, "kwd", 3_000_001, True),   # a currency's own ceiling wins
    ({"aims_billing_max_amounts": "kwd=3000000"}, "kwd", 3_000_000, False),
    ({"aims_billing_max_amounts": "jpy=1500000"}, "jpy", 1_000_000, False),
    ({"aims_billing_ceiling_currency": "jpy", "aims_billing_max_amount": 1_500_000}, "usd", 150_000_001, True),
])
async def test_amounts_in_any_currency_are_compared_by_their_minor_unit_exponent(
    make_server: MakeServer, settings: dict[str, Any], currency: str, amount: int, refused: bool
) -> None:
    async with Client(make_server(**settings)) as client:
        result = await client.call_tool("create_price", {"product": "prod_x", "currency": currency,
                                                         "unit_amount": amount, "dry_run": True})
    if refused:
        above_ceiling(error_of(result), "unit_amount")
    else:
        assert ok(result)["dry_run"] is True
