"""Subscriptions on the 3-6-9 tiers through the MCP tools, with the sandbox delivering real signed webhooks to the
server's endpoint in process: the story an agent and a human go through, and the bad inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from aims_billing_mcp.cli import main
from aims_billing_mcp.sandbox import Sandbox
from aims_billing_mcp.services.stripe_setup import setup_stripe, write_env
from aims_billing_mcp.services.tiers import Pricing
from aims_billing_mcp.stripe_gateway import build_gateway
from tests.conftest import error_of, ok

pytestmark = pytest.mark.anyio


async def subscribe(client: Client, sandbox: Sandbox, tier: str, email: str = "ada@example.com") -> str:
    customer = ok(await client.call_tool("create_customer", {"email": email}))["customer"]["id"]
    out = ok(await client.call_tool("create_subscription_checkout", {
        "tier": tier, "customer": customer, "success_url": "https://example.com/welcome"}))
    sandbox.complete_checkout_session(out["checkout_session"]["id"])
    assert sandbox.webhooks.drain(timeout=10)
    return customer  # type: ignore[no-any-return]


async def test_list_tiers_shows_the_table_with_price_ids_after_setup(client: Client, prices: dict[str, str]) -> None:
    tiers = {t["id"]: t for t in ok(await client.call_tool("list_tiers", {}))["tiers"]}
    assert list(tiers) == ["p2p", "3mo", "6mo", "9mo"]
    assert (tiers["6mo"]["monthly_price"], tiers["6mo"]["monthly_price_display"]) == (1799, "17.99 USD")
    assert tiers["9mo"]["commitment_months"] == 9 and tiers["9mo"]["delivered_months"] == 12
    assert tiers["6mo"]["entitlements"] == {"tokens_per_month": 250_000, "agents": 15, "concurrent": 5}
    assert tiers["p2p"]["stripe_price"] is None and tiers["3mo"]["stripe_price"] == prices["3mo"]


async def test_configured_price_ids_win_over_lookup(make_server: Any, prices: dict[str, str]) -> None:
    async with Client(make_server(stripe_price_pro="price_configured123")) as client:
        tiers = {t["id"]: t for t in ok(await client.call_tool("list_tiers", {}))["tiers"]}
    assert tiers["6mo"]["stripe_price"] == "price_configured123"


async def test_a_paid_6mo_checkout_provisions_tier_and_entitlements(
    client: Client, sandbox: Sandbox, prices: dict[str, str]
) -> None:
    customer = await subscribe(client, sandbox, "6mo")

    status = ok(await client.call_tool("get_billing_status", {"customer": customer}))

    assert (status["tier"], status["status"]) == ("6mo", "active")
    assert status["entitlements"] == {"tokens_per_month": 250_000, "agents": 15, "concurrent": 5}
    assert status["subscription"].startswith("sub_")
    assert status["current_period_end"] < status["commitment_end"]
    assert status["last_event"]["type"].startswith(("customer.subscription", "checkout.session", "invoice"))


async def test_the_checkout_carries_customer_and_tier_in_metadata(
    client: Client, sandbox: Sandbox, prices: dict[str, str]
) -> None:
    out = ok(await client.call_tool("create_subscription_checkout", {"tier": "pro", "customer_email": "b@example.com"}))
    session = sandbox.get_object(out["checkout_session"]["id"])
    assert session is not None and session["mode"] == "subscription"
    assert session["metadata"]["aims_tier"] == "6mo"
    assert out["checkout_session"]["price"] == prices["6mo"] and out["checkout_session"]["trial_days"] == 0
    overage = out["checkout_session"]["overage_price"]
    assert overage.startswith("price_") and sandbox.get_object(overage)["recurring"]["usage_type"] == "metered"


async def test_the_9mo_tier_delivers_its_free_months_as_a_trial(
    client: Client, sandbox: Sandbox, prices: dict[str, str]
) -> None:
    customer = await subscribe(client, sandbox, "9mo")
    status = ok(await client.call_tool("get_billing_status", {"customer": customer}))
    assert (status["tier"], status["status"]) == ("9mo", "trialing")
    assert status["entitlements"]["agents"] == 50
    days = (status["commitment_end"] - status["current_period_end"]) / 86400
    assert 270 <= days <= 276  # 12 months delivered = a 3-month trial + 9 billed months


async def test_a_customer_without_a_subscription_is_p2p_not_an_error(client: Client) -> None:
    customer = ok(await client.call_tool("create_customer", {"email": "p@example.com"}))["customer"]["id"]
    status = ok(await client.call_tool("get_billing_status", {"customer": customer}))
    assert (status["tier"], status["status"], status["subscription"]) == ("p2p", "none", None)
    assert status["entitlements"] == {"tokens_per_month": 0, "agents": 0, "concurrent": 1}


async def test_billing_status_of_an_unknown_customer_is_an_error(client: Client) -> None:
    err = error_of(await client.call_tool("get_billing_status", {"customer": "cus_nobody"}))
    assert err["param"] == "customer" and "create_customer" in err["message"]


async def test_an_unknown_tier_lists_the_valid_ones(client: Client, prices: dict[str, str]) -> None:
    err = error_of(await client.call_tool("create_subscription_checkout", {"tier": "gold",
                                                                          "customer_email": "a@example.com"}))
    assert err["code"] == "unknown_tier"
    for name in ("3mo", "6mo", "9mo", "starter", "pro", "enterprise"):
        assert name in err["message"]


async def test_a_tier_without_a_price_tells_to_run_setup_stripe(client: Client, sandbox: Sandbox) -> None:
    err = error_of(await client.call_tool("create_subscription_checkout", {"tier": "6mo",
                                                                          "customer_email": "a@example.com"}))
    assert err["code"] == "configuration_error"
    assert "setup-stripe" in err["message"] and "STRIPE_PRICE_PRO" in err["message"]
    assert sandbox.count("checkout.session") == 0


@pytest.mark.parametrize("email", ["not-an-email", "a@b", "two@@example.com"])
async def test_a_malformed_email_is_refused(client: Client, prices: dict[str, str], email: str) -> None:
    err = error_of(await client.call_tool("create_subscription_checkout", {"tier": "3mo", "customer_email": email}))
    assert err["param"] == "customer_email"


async def test_p2p_has_no_subscription_checkout(client: Client, prices: dict[str, str]) -> None:
    err = error_of(await client.call_tool("create_subscription_checkout", {"tier": "p2p",
                                                                          "customer_email": "a@example.com"}))
    assert "3mo" in err["message"]


async def test_cancel_defaults_to_the_commitment_end_not_now(
    client: Client, sandbox: Sandbox, prices: dict[str, str]
) -> None:
    customer = await subscribe(client, sandbox, "6mo")
    before = ok(await client.call_tool("get_billing_status", {"customer": customer}))

    out = ok(await client.call_tool("cancel_subscription", {"customer": customer}))

    cancellation = out["cancellation"]
    assert cancellation["ends_at"] == before["commitment_end"] and cancellation["commitment_waived"] is False
    status = ok(await client.call_tool("get_billing_status", {"customer": customer}))
    assert (status["tier"], status["cancel_at"]) == ("6mo", before["commitment_end"])


async def test_immediate_cancel_falls_back_to_p2p(client: Client, sandbox: Sandbox, prices: dict[str, str]) -> None:
    customer = await subscribe(client, sandbox, "3mo")

    out = ok(await client.call_tool("cancel_subscription", {"customer": customer, "immediately": True}))
    assert sandbox.webhooks.drain(timeout=10)

    assert (out["cancellation"]["status"], out["cancellation"]["commitment_waived"]) == ("canceled", True)
    status = ok(await client.call_tool("get_billing_status", {"customer": customer}))
    assert (status["tier"], status["status"]) == ("p2p", "canceled")


async def test_cancel_is_annotated_destructive(client: Client) -> None:
    tool = next(t for t in (await client.list_tools()).tools if t.name == "cancel_subscription")
    assert tool.annotations is not None and tool.annotations.destructive_hint is True


async def test_cancel_for_a_customer_on_p2p_is_a_clear_error(client: Client) -> None:
    err = error_of(await client.call_tool("cancel_subscription", {"customer": "cus_nosub"}))
    assert "P2P" in err["message"]


async def test_setup_stripe_twice_creates_nothing_the_second_time(
    make_settings: Any, sandbox_app: Any, sandbox: Sandbox
) -> None:
    gateway = build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)
    first = await setup_stripe(gateway, Pricing.load())
    counts = (sandbox.count("billing.meter"), sandbox.count("product"), sandbox.count("price"))
    second = await setup_stripe(gateway, Pricing.load())
    await gateway.close()
    assert counts == (4, 4, 19)  # a meter per meter; a product per tier; 3 monthly prices, 4 x 4 metered prices
    assert (sandbox.count("billing.meter"), sandbox.count("product"), sandbox.count("price")) == counts
    assert [(r.price, r.metered_prices) for r in first.tiers] == [(r.price, r.metered_prices) for r in second.tiers]
    assert all(r.created == [] for r in second.tiers) and second.meters_created == []


def test_write_env_replaces_our_lines_and_keeps_every_other_line(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("# comment\nFOO=1\nSTRIPE_PRICE_PRO=price_old\n\nexport BAR=2")
    write_env(env, {"STRIPE_PRICE_PRO": "price_new", "STRIPE_PRICE_STARTER": "price_s"})
    expected = "# comment\nFOO=1\nSTRIPE_PRICE_PRO=price_new\n\nexport BAR=2\nSTRIPE_PRICE_STARTER=price_s\n"
    assert env.read_text() == expected


def test_setup_stripe_cli_prints_the_env_lines_and_refuses_live_keys(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "b.db"))
    assert main(["setup-stripe"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = [line.split("=")[0] for line in out]
    assert names == ["STRIPE_PRICE_STARTER", "STRIPE_PRICE_PRO", "STRIPE_PRICE_ENTERPRISE"]
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_live_abcdefghijklmnop")
    assert main(["setup-stripe"]) == 2


async def test_a_failed_renewal_shows_as_past_due_and_keeps_the_tier(
    client: Client, sandbox: Sandbox, prices: dict[str, str]
) -> None:
    customer = await subscribe(client, sandbox, "6mo")
    sandbox.fail_payments(customer, True)

    sandbox.advance(days=32)
    assert sandbox.webhooks.drain(timeout=10)

    status = ok(await client.call_tool("get_billing_status", {"customer": customer}))
    assert (status["status"], status["tier"], status["entitlements"]["concurrent"]) == ("past_due", "6mo", 5)


async def test_a_paid_renewal_moves_the_period_end(client: Client, sandbox: Sandbox, prices: dict[str, str]) -> None:
    customer = await subscribe(client, sandbox, "3mo")
    first = ok(await client.call_tool("get_billing_status", {"customer": customer}))["current_period_end"]

    sandbox.advance(days=32)
    assert sandbox.webhooks.drain(timeout=10)

    status = ok(await client.call_tool("get_billing_status", {"customer": customer}))
    assert status["status"] == "active" and status["current_period_end"] > first


async def test_triggered_payment_failure_is_past_due(client: Client, sandbox: Sandbox, prices: dict[str, str]) -> None:
    customer = await subscribe(client, sandbox, "3mo")
    sandbox.trigger("invoice.payment_failed", customer=customer)
    assert sandbox.webhooks.drain(timeout=10)
    assert ok(await client.call_tool("get_billing_status", {"customer": customer}))["status"] == "past_due"


async def test_a_cancellation_takes_effect_when_the_commitment_ends(
    client: Client, sandbox: Sandbox, prices: dict[str, str]
) -> None:
    customer = await subscribe(client, sandbox, "3mo")
    ok(await client.call_tool("cancel_subscription", {"customer": customer}))

    sandbox.advance(days=60)
    assert sandbox.webhooks.drain(timeout=10)
    assert ok(await client.call_tool("get_billing_status", {"customer": customer}))["tier"] == "3mo"

    sandbox.advance(days=40)
    assert sandbox.webhooks.drain(timeout=10)
    status = ok(await client.call_tool("get_billing_status", {"customer": customer}))
    assert (status["tier"], status["status"]) == ("p2p", "canceled")


async def test_a_second_tier_checkout_while_a_tier_is_live_is_refused_naming_the_live_tier(
    client: Client, sandbox: Sandbox, prices: dict[str, str]
) -> None:
    customer = await subscribe(client, sandbox, "3mo")

    err = error_of(await client.call_tool("create_subscription_checkout", {"tier": "6mo", "customer": customer}))

    assert err["param"] == "customer" and "3mo" in err["message"] and "cancel_subscription" in err["message"]
