"""ACP's MCP binding on /acp/mcp: the five checkout tools with `{meta, id, payload}`, the same sessions as the REST
binding, ACP errors as JSON-RPC -32000 with the Error object in `data`, and every result schema-valid."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import serving_http
from tests.services.test_acp import conforms, pay
from tests.support.money_invariant import money_kept  # noqa: F401  (autouse: the money invariant after each test)
from tests.tools.test_wallets import give_tier

pytestmark = pytest.mark.anyio
KEY = "platform-key"
META = {"api_version": "2026-04-17"}


@pytest.fixture
async def seller(make_server: Any) -> AsyncIterator[tuple[str, Any]]:
    server = make_server(aims_billing_acp_api_keys=[KEY])
    async with serving_http(server, token="mcp-only") as base:
        assert server.state is not None
        await give_tier(server, "cus_team", "3mo")
        await server.state.ledger.create_wallet("buyer", "cus_team", None, "w-buyer")
        yield base, server


def acp_client(base: str, key: str = KEY) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"})
    return Client(streamable_http_client(f"{base}/acp/mcp", http_client=http))


def body(items: list[str]) -> dict[str, Any]:
    return {"currency": "usd", "line_items": [{"id": item} for item in items], "capabilities": {},
            "metadata": {"agent_id": "buyer"}}


async def result(client: Client, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    answer = await client.call_tool(tool, arguments)
    assert not answer.is_error, answer.content
    assert isinstance(answer.structured_content, dict)
    data: dict[str, Any] = answer.structured_content
    conforms(data, "CheckoutSessionWithOrder" if data["status"] == "completed" else "CheckoutSession")
    return data


async def test_the_binding_serves_five_checkout_tools_separate_from_billing(seller: tuple[str, Any]) -> None:
    base, _ = seller
    async with acp_client(base) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
    assert names == {"create_checkout_session", "get_checkout_session", "update_checkout_session",
                     "complete_checkout_session", "cancel_checkout_session"}


async def test_checkout_over_mcp_completes_and_rest_sees_the_same_session(seller: tuple[str, Any]) -> None:
    base, server = seller
    async with acp_client(base) as client:
        created = await result(client, "create_checkout_session",
                               {"meta": {**META, "idempotency_key": "c-1"}, "payload": body(["luc_10k"])})
        again = await result(client, "create_checkout_session",
                             {"meta": {**META, "idempotency_key": "c-1"}, "payload": body(["luc_10k"])})
        done = await result(client, "complete_checkout_session", {
            "meta": {**META, "idempotency_key": "pay-1"}, "id": created["id"], "payload": pay("spt_test_mcp")})
    async with httpx.AsyncClient() as http:
        rest = await http.get(f"{base}/acp/checkout_sessions/{created['id']}",
                              headers={"Authorization": f"Bearer {KEY}", "API-Version": "2026-04-17"})
    assert again["id"] == created["id"]
    assert done["status"] == "completed" and done["order"]["id"]
    assert rest.json()["status"] == "completed"
    assert server.state.ledger.get_wallet("buyer").balance == 10_000


async def test_acp_errors_are_json_rpc_minus_32000_with_the_error_object(seller: tuple[str, Any]) -> None:
    base, _ = seller
    async with acp_client(base) as client:
        with pytest.raises(MCPError) as missing:
            await client.call_tool("get_checkout_session", {"meta": META, "id": "cs_nope"})
        with pytest.raises(MCPError) as no_version:
            await client.call_tool("get_checkout_session", {"meta": {}, "id": "cs_nope"})
    assert missing.value.code == -32000
    conforms(missing.value.data, "Error")
    assert (no_version.value.code, no_version.value.data["param"]) == (-32000, "$.meta.api_version")


async def test_a_wrong_platform_key_is_refused(seller: tuple[str, Any]) -> None:
    base, _ = seller
    async with acp_client(base, key="not-a-key") as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("create_checkout_session", {"meta": META, "payload": body(["luc_10k"])})
    assert refused.value.data["code"] in ("invalid_api_key", "unauthorized")
    assert json.dumps(refused.value.data).count("not-a-key") == 0


async def test_a_tier_bought_over_mcp_starts_its_subscription(seller: tuple[str, Any]) -> None:
    from aims_billing_mcp.services.stripe_setup import setup_stripe
    from aims_billing_mcp.stripe_gateway import StripeRequest

    base, server = seller
    state = server.state
    await setup_stripe(state.gateway, state.pricing)
    customer = (await state.gateway.send(StripeRequest("post", "/v1/customers", {}))).data["id"]
    from aims_billing_mcp.services.ledger import LedgerService  # a P2P customer may hold no wallet by policy

    await LedgerService(state.store, luc_per_usd=1000, agent_limit=lambda _c: None).create_wallet(
        "subscriber", customer, None, "w-subscriber")
    payload = {**body(["tier_6mo"]), "metadata": {"agent_id": "subscriber"}}
    async with acp_client(base) as client:
        created = await result(client, "create_checkout_session", {"meta": {**META, "idempotency_key": "t-1"},
                                                                   "payload": payload})
        done = await result(client, "complete_checkout_session", {
            "meta": {**META, "idempotency_key": "t-pay"}, "id": created["id"], "payload": pay("spt_test_tier")})
        refused = await result(client, "create_checkout_session", {"meta": {**META, "idempotency_key": "t-2"},
                                                                   "payload": payload})

    assert done["order"]["status"] == "completed"
    assert state.subscriptions.entitled_tier(customer).id == "6mo"
    assert refused["status"] == "not_ready_for_payment" and "already has the 6mo tier" in refused["messages"][0][
        "content"]


async def test_two_servers_in_one_process_each_answer_from_their_own_state(make_server: Any, tmp_path: Any) -> None:
    """The binding's tools are built once per process (acp_mcp.py `_bound`): each server must still call its own."""
    first = make_server(aims_billing_acp_api_keys=[KEY])
    second = make_server(aims_billing_acp_api_keys=["other-key"], aims_billing_db=tmp_path / "second.db")
    async with serving_http(first) as one, serving_http(second) as two:
        async with acp_client(one) as client:
            created = await result(client, "create_checkout_session",
                                   {"meta": {**META, "idempotency_key": "c-1"}, "payload": body(["luc_10k"])})
        async with acp_client(two, "other-key") as client:
            with pytest.raises(MCPError, match="no checkout session"):
                await client.call_tool("get_checkout_session", {"meta": META, "id": created["id"]})
    assert created["id"].startswith("cs_")
