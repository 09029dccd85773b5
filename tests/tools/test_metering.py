"""Metering through the MCP tools: usage recorded against the tier's allowance, delivered to Stripe meters, and
invoiced by Stripe for exactly the overage the local summary predicted."""

from __future__ import annotations

import time
from typing import Any

import pytest
from mcp import Client

from aims_billing_mcp.app import BillingServer
from aims_billing_mcp.sandbox import Sandbox
from aims_billing_mcp.services.stripe_setup import setup_stripe
from aims_billing_mcp.stripe_gateway import StripeRequest
from tests.conftest import error_of, ok

pytestmark = pytest.mark.anyio


@pytest.fixture
async def server(make_server: Any) -> BillingServer:
    return make_server(aims_billing_flush_interval_seconds=0)  # tests flush on demand


async def subscribed(client: Client, server: BillingServer, sandbox: Sandbox, tier: str) -> str:
    assert server.state is not None
    await setup_stripe(server.state.gateway, server.state.pricing)
    customer = ok(await client.call_tool("create_customer", {"email": f"{tier}@example.com"}))["customer"]["id"]
    session = ok(await client.call_tool("create_subscription_checkout", {"tier": tier, "customer": customer}))
    sandbox.complete_checkout_session(session["checkout_session"]["id"])
    assert sandbox.webhooks.drain(timeout=10)
    return customer  # type: ignore[no-any-return]


async def test_usage_counts_against_the_allowance_with_the_task_multiplier(
    server: BillingServer, sandbox: Sandbox
) -> None:
    async with Client(server) as client:
        customer = await subscribed(client, server, sandbox, "3mo")
        out = ok(await client.call_tool("create_meter_event", {"customer": customer, "units": 1001,
                                                               "operation": "code", "identifier": "run-1"}))
    assert (out["weighted_units"], out["multiplier"], out["tier"]) == (1502, 1.5, "3mo")  # 1001 x 1.5 = 1501.5 -> 1502
    assert (out["allowance"], out["period_usage"], out["remaining"]) == (100_000, 1502, 98_498)
    assert (out["overage_units"], out["cost_cents"], out["replayed"]) == (0, 0, False)


async def test_the_same_identifier_replays_and_other_content_is_refused(
    server: BillingServer, sandbox: Sandbox
) -> None:
    async with Client(server) as client:
        customer = await subscribed(client, server, sandbox, "3mo")
        args = {"customer": customer, "units": 10, "operation": "chat", "identifier": "same"}
        first = ok(await client.call_tool("create_meter_event", args))
        again = ok(await client.call_tool("create_meter_event", args))
        other = error_of(await client.call_tool("create_meter_event", {**args, "units": 11}))
        summary = ok(await client.call_tool("get_usage_summary", {"customer": customer}))
    assert (again["replayed"], again["period_usage"]) == (True, first["period_usage"])
    assert other["code"] == "idempotency_conflict" and "same" in other["message"]
    assert summary["weighted_units"] == 10


async def test_a_p2p_customer_pays_every_unit(server: BillingServer) -> None:
    async with Client(server) as client:
        customer = ok(await client.call_tool("create_customer", {"email": "p2p@example.com"}))["customer"]["id"]
        out = ok(await client.call_tool("create_meter_event", {"customer": customer, "units": 2500,
                                                               "operation": "chat"}))
    assert (out["tier"], out["allowance"], out["overage_units"]) == ("p2p", 0, 2500)
    assert out["cost_cents"] == 500  # 2,500 units at 200 cents per 1,000


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"units": 0, "operation": "chat"}, "units"),
        ({"units": -3, "operation": "chat"}, "units"),
        ({"units": 5, "operation": "painting"}, "operation"),
        ({"units": 5, "multiplier": 3.5}, "multiplier"),
        ({"units": 5, "multiplier": 0.5}, "multiplier"),
        ({"units": 5, "operation": "chat", "timestamp": int(time.time()) - 36 * 86400}, "timestamp"),
        ({"units": 5, "operation": "chat", "timestamp": int(time.time()) + 3600}, "timestamp"),
        ({"units": 5, "operation": "chat", "identifier": "x" * 101}, "identifier"),
    ],
)
async def test_bad_usage_is_refused_naming_the_field_and_writes_nothing(
    server: BillingServer, sandbox: Sandbox, arguments: dict[str, Any], field: str
) -> None:
    async with Client(server) as client:
        customer = ok(await client.call_tool("create_customer", {"email": "bad@example.com"}))["customer"]["id"]
        err = error_of(await client.call_tool("create_meter_event", {"customer": customer, **arguments}))
        summary = ok(await client.call_tool("get_usage_summary", {"customer": customer}))
    assert field in err["text"]
    assert summary["weighted_units"] == 0


@pytest.mark.parametrize("timestamp", [2**63, -(2**63), 10**15, 2**63 - 1, -1])
async def test_a_timestamp_far_outside_any_date_is_refused_naming_it_not_an_internal_error(
    server: BillingServer, timestamp: int
) -> None:
    async with Client(server) as client:
        customer = ok(await client.call_tool("create_customer", {"email": "far@example.com"}))["customer"]["id"]
        err = error_of(await client.call_tool("create_meter_event", {"customer": customer, "units": 5,
                                                                     "timestamp": timestamp}))
    assert (err["code"], err["param"]) == ("invalid_input", "timestamp")
    assert "internal error" not in err["text"] and "35 days" in err["message"]


async def test_an_unknown_operation_lists_the_valid_ones(server: BillingServer) -> None:
    async with Client(server) as client:
        customer = ok(await client.call_tool("create_customer", {"email": "ops@example.com"}))["customer"]["id"]
        err = error_of(await client.call_tool("create_meter_event", {"customer": customer, "units": 5,
                                                                     "operation": "painting"}))
    assert all(op in err["message"] for op in ("chat", "tool_call", "code", "research", "image", "agent_swarm"))


async def test_usage_for_an_unknown_customer_is_refused(server: BillingServer) -> None:
    async with Client(server) as client:
        err = error_of(await client.call_tool("create_meter_event", {"customer": "cus_nobody", "units": 5,
                                                                     "operation": "chat"}))
    assert "cus_nobody" in err["message"]


async def test_quote_usage_prices_without_writing(server: BillingServer, sandbox: Sandbox) -> None:
    async with Client(server) as client:
        customer = await subscribed(client, server, sandbox, "6mo")
        quote = ok(await client.call_tool("quote_usage", {"units": 1000, "operation": "research",
                                                          "customer": customer}))
        anonymous = ok(await client.call_tool("quote_usage", {"units": 1000, "operation": "image"}))
        summary = ok(await client.call_tool("get_usage_summary", {"customer": customer}))
    assert (quote["weighted_units"], quote["cost_cents"], quote["tier"]) == (2000, 0, "6mo")
    assert (anonymous["tier"], anonymous["weighted_units"], anonymous["cost_cents"]) == ("p2p", 2500, 500)
    assert summary["weighted_units"] == 0


async def test_task_slots_stop_at_the_tier_limit_and_free_on_release(server: BillingServer, sandbox: Sandbox) -> None:
    async with Client(server) as client:
        customer = await subscribed(client, server, sandbox, "3mo")  # 2 concurrent tasks
        first = ok(await client.call_tool("acquire_task_slot", {"customer": customer, "task_id": "t1"}))
        again = ok(await client.call_tool("acquire_task_slot", {"customer": customer, "task_id": "t1",
                                                                "lease": first["lease"]}))
        ok(await client.call_tool("acquire_task_slot", {"customer": customer, "task_id": "t2"}))
        refused = error_of(await client.call_tool("acquire_task_slot", {"customer": customer, "task_id": "t3"}))
        ok(await client.call_tool("release_task_slot", {"customer": customer, "task_id": "t1",
                                                        "lease": first["lease"]}))
        third = ok(await client.call_tool("acquire_task_slot", {"customer": customer, "task_id": "t3"}))
    assert again["replayed"] is True
    assert refused["code"] == "limit_reached" and "2" in refused["message"] and "t1" not in refused["message"]
    assert (third["in_use"], third["limit"]) == (2, 2)


async def test_stripe_invoices_exactly_the_overage_the_summary_predicted(
    server: BillingServer, sandbox: Sandbox
) -> None:
    async with Client(server) as client:
        customer = await subscribed(client, server, sandbox, "3mo")  # 100,000 included, then 150 cents per 1,000
        for index, units in enumerate((60_000, 70_000, 21_001)):
            ok(await client.call_tool("create_meter_event", {"customer": customer, "units": units,
                                                             "operation": "chat", "identifier": f"u{index}"}))
        predicted = ok(await client.call_tool("get_usage_summary", {"customer": customer}))
        assert server.state is not None
        report = await server.state.flusher.flush_once()
        status = ok(await client.call_tool("get_metering_status", {}))

        sandbox.advance(days=32)  # the renewal invoice bills the period's metered usage
        invoices = (await server.state.gateway.send(StripeRequest("get", "/v1/invoices", {"customer": customer,
                                                                                            "limit": 10}))).data
    assert (predicted["weighted_units"], predicted["overage_units"]) == (151_001, 51_001)
    assert predicted["overage_cost_cents"] == 7650  # 51,001 x 0.15 = 7,650.15 -> 7,650
    assert (report.sent, report.pending) == (3, 0) and status["pending"] == 0
    renewal = next(i for i in invoices["data"] if i.get("billing_reason") == "subscription_cycle")
    metered = [line for line in renewal["lines"]["data"] if line["amount"] and line["amount"] != 1999]
    assert [line["amount"] for line in metered] == [7650]


async def test_an_immediate_cancel_invoices_the_usage_recorded_so_far_even_before_the_flusher_ran(
    server: BillingServer, sandbox: Sandbox
) -> None:
    async with Client(server) as client:
        customer = await subscribed(client, server, sandbox, "3mo")
        answer = ok(await client.call_tool("create_meter_event", {"customer": customer, "units": 150_000}))
        predicted = ok(await client.call_tool("get_usage_summary", {"customer": customer}))

        out = ok(await client.call_tool("cancel_subscription", {"customer": customer, "immediately": True}))
        assert sandbox.webhooks.drain(timeout=10)
        assert server.state is not None
        sub_id = out["cancellation"]["subscription"]
        sub = (await server.state.gateway.send(StripeRequest("get", f"/v1/subscriptions/{sub_id}"))).data
        final = (await server.state.gateway.send(StripeRequest("get", f"/v1/invoices/{sub['latest_invoice']}"))).data
        after = ok(await client.call_tool("create_meter_event", {"customer": customer, "units": 1000}))

    assert answer["cost_cents"] == predicted["overage_cost_cents"] == 7500
    assert sorted(((line["quantity"], line["amount"]) for line in final["lines"]["data"]), reverse=True) == [
        (150_000, 7500), (0, 0), (0, 0), (0, 0)]  # LUC's line; the other meters' metered prices bill nothing
    assert (after["tier"], after["cost_cents"]) == ("p2p", 200)
