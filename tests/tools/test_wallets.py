"""Agent wallet tools through the MCP client: the ledger's rules as an agent meets them, with the tier's agent limit
coming from the customer's provision (set by a real signed subscription event)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from mcp import Client

from aims_billing_mcp.app import BillingServer
from aims_billing_mcp.sandbox import SANDBOX_WEBHOOK_SECRET
from aims_billing_mcp.webhooks import sign_webhook_payload, verify_webhook_signature
from tests.conftest import error_of, ok

pytestmark = pytest.mark.anyio


async def give_tier(server: BillingServer, customer: str, tier: str) -> None:
    """Provision `tier` for `customer` the way Stripe does: a signed subscription event through the endpoint's
    service."""
    assert server.state is not None
    event = {"id": f"evt_{customer}_{tier}", "type": "customer.subscription.created", "created": int(time.time()),
             "data": {"object": {"id": f"sub_{customer}", "customer": customer, "status": "active",
                                 "start_date": int(time.time()), "metadata": {"aims_tier": tier},
                                 "items": {"data": [{"current_period_end": int(time.time()) + 86400 * 30}]}}}}
    payload = json.dumps(event)
    verify_webhook_signature(payload.encode(), sign_webhook_payload(payload, SANDBOX_WEBHOOK_SECRET),
                             SANDBOX_WEBHOOK_SECRET)
    await server.state.webhook_events.ingest(event, payload)


async def wallet(client: Client, agent: str, customer: str = "cus_team", **extra: Any) -> dict[str, Any]:
    return ok(await client.call_tool("create_agent_wallet", {"agent_id": agent, "customer": customer,
                                                             "idempotency_key": f"open-{agent}", **extra}))


async def funded_wallet(client: Client, server: BillingServer) -> None:
    """Agent a1's wallet, for a 3mo customer, holding 500 LUC."""
    await give_tier(server, "cus_team", "3mo")
    await wallet(client, "a1")
    ok(await client.call_tool("credit_agent_wallet", {"agent_id": "a1", "amount": 500, "idempotency_key": "c",
                                                      "reason": "seed"}))


async def test_the_wallet_story_top_up_hold_capture_transfer(server: BillingServer) -> None:
    async with Client(server) as client:
        await give_tier(server, "cus_team", "6mo")
        await wallet(client, "planner")
        await wallet(client, "coder", daily_cap=5000)
        ok(await client.call_tool("credit_agent_wallet", {"agent_id": "planner", "usd_cents": 1000,
                                                          "idempotency_key": "topup-1", "reason": "top-up"}))
        hold = ok(await client.call_tool("hold_luc", {"agent_id": "planner", "amount": 3000, "idempotency_key": "h1",
                                                      "reason": "research task", "ttl_seconds": 600}))
        held = ok(await client.call_tool("get_agent_wallet", {"agent_id": "planner"}))
        captured = ok(await client.call_tool("capture_hold", {"hold_id": hold["hold_id"], "amount": 1800,
                                                              "idempotency_key": "c1", "reason": "actual cost"}))
        moved = ok(await client.call_tool("transfer_luc", {"from_agent": "planner", "to_agent": "coder",
                                                           "amount": 2000, "idempotency_key": "t1",
                                                           "reason": "delegate"}))
        planner = ok(await client.call_tool("get_agent_wallet", {"agent_id": "planner"}))
        coder = ok(await client.call_tool("get_agent_wallet", {"agent_id": "coder"}))

    assert (held["balance"], held["held"], held["available"]) == (10_000, 3000, 7000)
    assert (captured["captured"], captured["released"]) == (1800, 1200)
    assert moved["to_balance_after"] == 2000
    assert (planner["balance"], planner["available"], planner["held"]) == (10_000 - 1800 - 2000, 6200, 0)
    assert coder["balance"] == 2000 and coder["daily_cap"] == 5000


async def test_a_retried_debit_with_the_same_key_moves_luc_once(server: BillingServer) -> None:
    async with Client(server) as client:
        await funded_wallet(client, server)
        first = ok(await client.call_tool("debit_agent_wallet", {"agent_id": "a1", "amount": 200,
                                                                 "idempotency_key": "d", "reason": "task"}))
        again = ok(await client.call_tool("debit_agent_wallet", {"agent_id": "a1", "amount": 200,
                                                                 "idempotency_key": "d", "reason": "task"}))
        other = error_of(await client.call_tool("debit_agent_wallet", {"agent_id": "a1", "amount": 300,
                                                                       "idempotency_key": "d", "reason": "task"}))
        balance = ok(await client.call_tool("get_agent_wallet", {"agent_id": "a1"}))["balance"]
    assert (first["replayed"], again["replayed"], again["txn_id"]) == (False, True, first["txn_id"])
    assert other["code"] == "idempotency_conflict"
    assert balance == 300


@pytest.mark.parametrize(
    ("tool", "arguments", "code", "words"),
    [
        ("debit_agent_wallet", {"agent_id": "a1", "amount": 501, "idempotency_key": "k", "reason": "r"},
         "insufficient_funds", ["501", "500"]),
        ("debit_agent_wallet", {"agent_id": "a1", "amount": 0, "idempotency_key": "k", "reason": "r"},
         "invalid_input", ["amount"]),
        ("debit_agent_wallet", {"agent_id": "a1", "amount": -5, "idempotency_key": "k", "reason": "r"},
         "invalid_input", ["amount"]),
        ("transfer_luc", {"from_agent": "a1", "to_agent": "a1", "amount": 5, "idempotency_key": "k", "reason": "r"},
         "invalid_input", ["itself"]),
        ("transfer_luc", {"from_agent": "a1", "to_agent": "ghost", "amount": 5, "idempotency_key": "k",
                          "reason": "r"}, "not_found", ["ghost"]),
        ("credit_agent_wallet", {"agent_id": "a1", "idempotency_key": "k", "reason": "r"}, "invalid_input",
         ["amount"]),
        ("credit_agent_wallet", {"agent_id": "a1", "amount": 5, "usd_cents": 5, "idempotency_key": "k",
                                 "reason": "r"}, "invalid_input", ["amount"]),
        ("debit_agent_wallet", {"agent_id": "a1", "amount": 5, "reason": "r"}, "invalid_input", ["idempotency_key"]),
        ("capture_hold", {"hold_id": "hold_nope", "amount": 5, "idempotency_key": "k", "reason": "r"}, "not_found",
         ["hold_nope"]),
    ],
)
async def test_bad_wallet_calls_are_clear_errors_that_change_nothing(
    server: BillingServer, tool: str, arguments: dict[str, Any], code: str, words: list[str]
) -> None:
    async with Client(server) as client:
        await funded_wallet(client, server)
        err = error_of(await client.call_tool(tool, arguments))
        after = ok(await client.call_tool("get_agent_wallet", {"agent_id": "a1"}))
    assert err["code"] == code, err
    assert all(word in err["text"] for word in words), err["text"]
    assert (after["balance"], after["held"]) == (500, 0)


async def test_capture_above_the_hold_and_after_release_are_refused(server: BillingServer) -> None:
    async with Client(server) as client:
        await funded_wallet(client, server)
        hold = ok(await client.call_tool("hold_luc", {"agent_id": "a1", "amount": 100, "idempotency_key": "h",
                                                      "reason": "task"}))["hold_id"]
        above = error_of(await client.call_tool("capture_hold", {"hold_id": hold, "amount": 101,
                                                                 "idempotency_key": "c1", "reason": "r"}))
        ok(await client.call_tool("release_hold", {"hold_id": hold, "idempotency_key": "r1", "reason": "cancelled"}))
        after = error_of(await client.call_tool("capture_hold", {"hold_id": hold, "amount": 50,
                                                                 "idempotency_key": "c2", "reason": "r"}))
        balance = ok(await client.call_tool("get_agent_wallet", {"agent_id": "a1"}))["available"]
    assert "101" in above["text"] and "100" in above["text"]
    assert after["code"] == "invalid_state"
    assert balance == 500


@pytest.mark.parametrize(("tier", "limit"), [("3mo", 5), ("6mo", 15)])
async def test_the_tier_limits_how_many_agent_wallets_a_customer_has(
    server: BillingServer, tier: str, limit: int
) -> None:
    async with Client(server) as client:
        await give_tier(server, "cus_team", tier)
        for index in range(limit):
            await wallet(client, f"agent{index}")
        err = error_of(await client.call_tool("create_agent_wallet", {
            "agent_id": "one-too-many", "customer": "cus_team", "idempotency_key": "extra"}))
    assert err["code"] == "limit_reached"
    assert str(limit) in err["text"]


async def test_a_p2p_customer_gets_no_wallet_unless_the_operator_allows(make_server: Any) -> None:
    async with Client(make_server()) as client:
        refused = error_of(await client.call_tool("create_agent_wallet", {
            "agent_id": "solo", "customer": "cus_p2p", "idempotency_key": "w"}))
    async with Client(make_server(aims_billing_p2p_agents=1)) as client:
        allowed = ok(await client.call_tool("create_agent_wallet", {
            "agent_id": "solo", "customer": "cus_p2p", "idempotency_key": "w"}))
    assert refused["code"] == "limit_reached"
    assert allowed["agent_id"] == "solo"


async def test_a_frozen_wallet_refuses_debits_but_takes_credits(server: BillingServer) -> None:
    async with Client(server) as client:
        await funded_wallet(client, server)
        ok(await client.call_tool("freeze_agent_wallet", {"agent_id": "a1", "reason": "suspicious",
                                                          "idempotency_key": "f"}))
        refused = error_of(await client.call_tool("debit_agent_wallet", {"agent_id": "a1", "amount": 5,
                                                                         "idempotency_key": "d", "reason": "r"}))
        ok(await client.call_tool("credit_agent_wallet", {"agent_id": "a1", "amount": 5, "idempotency_key": "c2",
                                                          "reason": "refund"}))
        balance = ok(await client.call_tool("get_agent_wallet", {"agent_id": "a1"}))["balance"]
    assert refused["code"] == "wallet_frozen"
    assert balance == 505


async def test_transactions_page_newest_first_with_a_cursor_and_kind_filter(server: BillingServer) -> None:
    async with Client(server) as client:
        await give_tier(server, "cus_team", "3mo")
        await wallet(client, "a1")
        for index in range(5):
            ok(await client.call_tool("credit_agent_wallet", {"agent_id": "a1", "amount": 10 + index,
                                                              "idempotency_key": f"c{index}", "reason": "r"}))
        ok(await client.call_tool("debit_agent_wallet", {"agent_id": "a1", "amount": 3, "idempotency_key": "d",
                                                         "reason": "r"}))
        first = ok(await client.call_tool("list_agent_transactions", {"agent_id": "a1", "limit": 4}))
        rest = ok(await client.call_tool("list_agent_transactions", {"agent_id": "a1", "limit": 4,
                                                                     "cursor": first["next_cursor"]}))
        debits = ok(await client.call_tool("list_agent_transactions", {"agent_id": "a1", "kind": "debit",
                                                                       "since": str(int(time.time()) - 60)}))
    amounts = [e["amount"] for e in first["entries"] + rest["entries"]]
    assert amounts == [-3, 14, 13, 12, 11, 10] and rest["next_cursor"] is None
    assert [e["kind"] for e in debits["entries"]] == ["debit"]


@pytest.mark.parametrize(("tool", "arguments", "field"), [
    ("list_agent_transactions", {"agent_id": "a1", "cursor": "9" * 100}, "cursor"),
    ("list_agent_transactions", {"agent_id": "a1", "cursor": str(2**63)}, "cursor"),
    ("list_agent_transactions", {"agent_id": "a1", "cursor": "\u00b2"}, "cursor"),
    ("list_agent_transactions", {"agent_id": "a1", "since": "\u00b2"}, "since"),
    ("list_agent_transactions", {"agent_id": "a1", "until": "9" * 400}, "until"),
    ("create_agent_wallet", {"agent_id": "a2", "customer": "cus_team", "idempotency_key": "k", "daily_cap": 2**63},
     "daily_cap"),
    ("credit_agent_wallet", {"agent_id": "a1", "usd_cents": 10**13, "idempotency_key": "k", "reason": "r"},
     "usd_cents"),
    ("credit_agent_wallet", {"agent_id": "a1", "amount": 2**63, "idempotency_key": "k", "reason": "r"}, "amount"),
    ("hold_luc", {"agent_id": "a1", "amount": 10**15 + 1, "idempotency_key": "k", "reason": "r"}, "amount"),
])
async def test_integers_beyond_the_documented_maximum_are_errors_naming_the_field(
    server: BillingServer, tool: str, arguments: dict[str, Any], field: str
) -> None:
    async with Client(server) as client:
        await funded_wallet(client, server)
        err = error_of(await client.call_tool(tool, arguments))
        after = ok(await client.call_tool("get_agent_wallet", {"agent_id": "a1"}))
    assert err["code"] == "invalid_input", err
    assert field in err["text"] and "internal error" not in err["text"], err["text"]
    assert (after["balance"], after["held"], len(after["recent"])) == (500, 0, 1)


async def test_every_wallet_amount_publishes_its_maximum_in_the_schema(client: Client) -> None:
    tools = {tool.name: tool.input_schema for tool in (await client.list_tools()).tools}
    amounts = [("credit_agent_wallet", "amount", 10**15), ("credit_agent_wallet", "usd_cents", 10**12),
               ("debit_agent_wallet", "amount", 10**15), ("transfer_luc", "amount", 10**15),
               ("hold_luc", "amount", 10**15), ("capture_hold", "amount", 10**15),
               ("create_agent_wallet", "daily_cap", 10**15)]
    for tool, field, maximum in amounts:
        schema = str(tools[tool]["properties"][field])
        said = f"10**{len(str(maximum)) - 1}"  # the description says it, as well as the schema's maximum
        assert f"'maximum': {maximum}" in schema and said in schema, (tool, field, schema)
