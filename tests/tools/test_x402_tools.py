"""x402 as an agent meets it: the paid tool over MCP `_meta`, the challenge and receipt tools, and GET
/x402/credits over real HTTP, each paying with a payment signed by a generated key and refusing its replay."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from mcp import Client

from aims_billing_mcp.app import BillingServer
from tests.conftest import error_of, ok, serving_http
from tests.support.x402_worker import Payer, header
from tests.tools.test_wallets import give_tier, wallet

pytestmark = pytest.mark.anyio


async def with_wallet(client: Client, server: BillingServer, agent: str = "buyer") -> None:
    await give_tier(server, "cus_team", "3mo")
    await wallet(client, agent)


async def balance(client: Client, agent: str = "buyer") -> int:
    return ok(await client.call_tool("get_agent_wallet", {"agent_id": agent}))["balance"]  # type: ignore[no-any-return]


async def test_the_paid_tool_answers_402_then_credits_once_for_a_signed_payment(server: BillingServer) -> None:
    payer = Payer()
    async with Client(server) as client:
        await with_wallet(client, server)
        challenge = await client.call_tool("purchase_luc_credits", {"agent_id": "buyer", "luc": 5000})
        required = challenge.structured_content
        payment = payer.pay(required)  # type: ignore[arg-type]
        paid = await client.call_tool("purchase_luc_credits", {"agent_id": "buyer", "luc": 5000},
                                      meta={"x402/payment": payment})
        replay = await client.call_tool("purchase_luc_credits", {"agent_id": "buyer", "luc": 5000},
                                        meta={"x402/payment": payment})
        after = await balance(client)

    assert challenge.is_error and required is not None
    requirements = required["accepts"][0]
    assert (required["x402Version"], requirements["scheme"], requirements["network"]) == (2, "exact", "eip155:84532")
    assert requirements["amount"] == "5000000"  # 5,000 LUC at 1,000 per dollar = 5 USDC
    receipt = ok(paid)
    assert (receipt["luc_credited"], receipt["payer"]) == (5000, payer.address.lower())
    assert paid.meta is not None and paid.meta["x402/payment-response"]["success"] is True
    assert error_of(replay)["code"] == "invalid_exact_evm_nonce_already_used"
    assert after == 5000


async def test_requirements_then_receipt_through_the_tools(server: BillingServer) -> None:
    async with Client(server) as client:
        await with_wallet(client, server)
        quote = ok(await client.call_tool("create_x402_payment_requirements", {
            "description": "credits", "luc": 1500, "agent_id": "buyer"}))
        payment = Payer().pay(quote["payment_required"])
        receipt = ok(await client.call_tool("verify_x402_receipt", {"payment": header(payment)}))
        after = await balance(client)
    assert quote["amount_usd"] == "1.5" and quote["header"]
    assert (receipt["quote_id"], receipt["luc_credited"], after) == (quote["quote_id"], 1500, 1500)


@pytest.mark.parametrize(
    ("tamper", "code"),
    [
        ({"value": "1"}, "invalid_exact_evm_payload_authorization_value_mismatch"),
        ({"to": "0x000000000000000000000000000000000000dEaD"}, "invalid_exact_evm_payload_recipient_mismatch"),
        ({"validBefore": "1"}, "invalid_exact_evm_payload_authorization_valid_before"),
    ],
)
async def test_a_tampered_payment_is_refused_with_the_spec_reason_and_credits_nothing(
    server: BillingServer, tamper: dict[str, str], code: str
) -> None:
    async with Client(server) as client:
        await with_wallet(client, server)
        quote = ok(await client.call_tool("create_x402_payment_requirements", {
            "description": "credits", "luc": 1000, "agent_id": "buyer"}))
        payment = Payer().pay(quote["payment_required"], **tamper)
        err = error_of(await client.call_tool("verify_x402_receipt", {"payment": payment,
                                                                       "quote_id": quote["quote_id"]}))
        after = await balance(client)
    assert err["code"] == code
    assert after == 0


@pytest.fixture
async def http_base(server: BillingServer) -> AsyncIterator[str]:
    async with serving_http(server, token="mcp-token") as base:
        yield base


async def test_x402_over_http_402_then_200_then_the_replay_is_refused(server: BillingServer, http_base: str) -> None:
    assert server.state is not None
    await give_tier(server, "cus_team", "3mo")
    await server.state.ledger.create_wallet("buyer", "cus_team", None, "w-buyer")
    url = f"{http_base}/x402/credits?agent_id=buyer&luc=2000"
    async with httpx.AsyncClient(headers={"Authorization": "Bearer mcp-token"}) as http:
        first = await http.get(url)
        required = json.loads(base64.b64decode(first.headers["payment-required"]))
        payment = header(Payer().pay(required))
        paid = await http.get(url, headers={"PAYMENT-SIGNATURE": payment})
        replay = await http.get(url, headers={"PAYMENT-SIGNATURE": payment})
    wallet_after = server.state.ledger.get_wallet("buyer")
    assert first.status_code == 402 and required["accepts"][0]["amount"] == "2000000"
    assert paid.status_code == 200 and json.loads(base64.b64decode(paid.headers["payment-response"]))["success"]
    assert replay.status_code == 402 and replay.json()["error"] == "invalid_exact_evm_nonce_already_used"
    assert wallet_after.balance == 2000
