"""Idempotency keys belong to their owner: one agent's key never blocks or replays another agent's call.

Each wallet tool is called by mallory with key `task-1` on her own wallet first; alice's call with the same key on
her wallet must then take effect as a fresh call (not a replay, not idempotency_conflict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from aims_billing_mcp.app import BillingServer
from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.store import Store
from tests.conftest import ok
from tests.tools.test_wallets import give_tier, wallet

pytestmark = pytest.mark.anyio

KEY = "task-1"


async def hold_for(client: Client, agent: str) -> str:
    held = ok(await client.call_tool("hold_luc", {"agent_id": agent, "amount": 10, "idempotency_key": f"h-{agent}",
                                                  "reason": "task"}))
    return str(held["hold_id"])


async def args_for(tool: str, client: Client, agent: str) -> dict[str, Any]:
    """The arguments of one call of `tool` on `agent`'s wallet, under KEY."""
    base = {"idempotency_key": KEY, "reason": f"{agent}'s task"}
    if tool == "create_agent_wallet":
        return {"agent_id": f"{agent}-2", "customer": "cus_team", "idempotency_key": KEY}
    if tool in ("credit_agent_wallet", "debit_agent_wallet"):
        return {**base, "agent_id": agent, "amount": 7 if agent == "alice" else 3}
    if tool == "transfer_luc":
        return {**base, "from_agent": agent, "to_agent": "bob", "amount": 7 if agent == "alice" else 3}
    if tool == "hold_luc":
        return {**base, "agent_id": agent, "amount": 7 if agent == "alice" else 3}
    if tool == "capture_hold":
        return {**base, "hold_id": await hold_for(client, agent), "amount": 5}
    if tool == "release_hold":
        return {**base, "hold_id": await hold_for(client, agent)}
    assert tool == "freeze_agent_wallet"
    return {**base, "agent_id": agent}


@pytest.mark.parametrize("tool", ["create_agent_wallet", "credit_agent_wallet", "debit_agent_wallet", "transfer_luc",
                                  "hold_luc", "capture_hold", "release_hold", "freeze_agent_wallet"])
async def test_a_wallet_key_used_by_another_agent_stays_free_for_its_owner(server: BillingServer, tool: str) -> None:
    async with Client(server) as client:
        await give_tier(server, "cus_team", "9mo")
        for agent in ("alice", "mallory", "bob"):
            await wallet(client, agent)
            ok(await client.call_tool("credit_agent_wallet", {"agent_id": agent, "amount": 100,
                                                              "idempotency_key": "seed", "reason": "seed"}))
        squatted = ok(await client.call_tool(tool, await args_for(tool, client, "mallory")))

        mine = ok(await client.call_tool(tool, await args_for(tool, client, "alice")))

        assert mine["replayed"] is False and mine != squatted
        assert "mallory" not in str(mine)
        assert server.state is not None and server.state.ledger.check_ledger() == []


async def test_a_database_from_before_per_wallet_keys_upgrades_and_keeps_its_replays(tmp_path: Path) -> None:
    old = Store(tmp_path / "old.db", migrate_upto=10)
    try:
        old.write_sync(lambda conn: (
            conn.execute("INSERT INTO agent_wallets (id, agent_id, customer_id, balance, daily_cap, frozen, "
                         "created_at, updated_at) VALUES ('wal_1', 'alice', 'cus_1', 0, NULL, 0, 'now', 'now')"),
            conn.execute("INSERT INTO ledger_requests (operation, idempotency_key, request_hash, response, txn_id, "
                         "created_at) VALUES ('debit', 'task-1', 'h', '{\"agent_id\": \"alice\"}', NULL, 'now')"),
            conn.execute("INSERT INTO idempotency_keys (tool, key, request_hash, response, created_at) "
                         "VALUES ('create_product', 'k', 'h', '{}', 'now')"),
        ))
    finally:
        old.close()

    store = Store(tmp_path / "old.db")
    try:
        assert store.applied_migrations[0] == 11
        assert store.query("SELECT owner, operation, idempotency_key FROM ledger_requests") == [
            {"owner": "alice", "operation": "debit", "idempotency_key": "task-1"}]
        assert store.query("SELECT tool, owner, key FROM idempotency_keys") == [
            {"tool": "create_product", "owner": "", "key": "k"}]
        assert LedgerService(store, luc_per_usd=1000, agent_limit=lambda _c: None).check_ledger() == []
    finally:
        store.close()


@pytest.mark.parametrize("tool", ["create_checkout_session", "create_billing_portal_session"])
async def test_a_customers_session_key_used_for_another_customer_stays_free(client: Client, tool: str) -> None:
    from tests.tools.test_catalog import make_customer, make_price

    price = await make_price(client)
    mallory, alice = await make_customer(client, "mallory@example.com"), await make_customer(client)

    def args(customer: str) -> dict[str, Any]:
        if tool == "create_billing_portal_session":
            return {"customer": customer, "idempotency_key": KEY}
        return {"line_items": [{"price": price}], "customer": customer, "idempotency_key": KEY,
                "success_url": "https://example.com/ok"}

    squatted = ok(await client.call_tool(tool, args(mallory)))
    mine = ok(await client.call_tool(tool, args(alice)))

    key = "checkout_session" if tool == "create_checkout_session" else "portal_session"
    assert mine["replayed"] is False and mine[key]["id"] != squatted[key]["id"]
    assert mine[key]["customer"] == alice


async def test_a_customers_subscription_checkout_key_used_for_another_customer_stays_free(
        client: Client, prices: dict[str, str]) -> None:
    from tests.tools.test_catalog import make_customer

    mallory, alice = await make_customer(client, "mallory@example.com"), await make_customer(client)
    squatted = ok(await client.call_tool("create_subscription_checkout", {
        "tier": "3mo", "customer": mallory, "idempotency_key": KEY, "success_url": "https://example.com/ok"}))
    mine = ok(await client.call_tool("create_subscription_checkout", {
        "tier": "3mo", "customer": alice, "idempotency_key": KEY, "success_url": "https://example.com/ok"}))

    assert mine["replayed"] is False and mine["checkout_session"]["customer"] == alice
    assert mine["checkout_session"]["id"] != squatted["checkout_session"]["id"]
