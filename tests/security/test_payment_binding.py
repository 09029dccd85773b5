"""Security promise: a payment credits only the purchase it was made for.

The quote a payment settles is the one it accepted (`accepted.extra.quoteId`); a caller's quote_id, agent_id or luc
that disagrees is refused and nothing is credited, on every surface (verify_x402_receipt, purchase_luc_credits,
GET /x402/credits). A challenge token cannot be forged. A wallet that registered its payer addresses is paid only
from them, and a registered address's payment cannot be redirected to another wallet's quote (the quote id is not
covered by the EIP-3009 signature: without registration a payment header is a bearer instrument)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from mcp import Client

from aims_billing_mcp.app import BillingServer
from tests.conftest import error_of, ok, serving_http
from tests.support.x402_worker import Payer, header
from tests.tools.test_wallets import give_tier, wallet

pytestmark = pytest.mark.anyio

PRICE = 500  # LUC, the same price for alice's and mallory's quotes


def rename(payment: dict[str, Any], quote_id: str) -> dict[str, Any]:
    """What a holder of an unredeemed payment can do: rewrite the quote it names (the signature does not cover it)."""
    out = json.loads(json.dumps(payment))
    out["accepted"]["extra"]["quoteId"] = quote_id
    return out


async def two_wallets(client: Client, server: BillingServer) -> None:
    await give_tier(server, "cus_team", "3mo")
    await wallet(client, "alice")
    await wallet(client, "mallory")


def balances(server: BillingServer) -> dict[str, int]:
    assert server.state is not None
    return {agent: server.state.ledger.get_wallet(agent).balance for agent in ("alice", "mallory")}


def receipts(server: BillingServer) -> int:
    assert server.state is not None
    row = server.state.store.query_one("SELECT COUNT(*) AS n FROM x402_receipts")
    return int(row["n"]) if row else 0


def pay_to_of(server: BillingServer) -> str:
    assert server.state is not None
    return server.state.x402.pay_to


async def quote(client: Client, agent: str) -> dict[str, Any]:
    return ok(await client.call_tool("create_x402_payment_requirements", {
        "description": "credits", "luc": PRICE, "agent_id": agent}))


async def test_verify_x402_receipt_refuses_alices_payment_with_mallorys_quote_id_and_credits_nothing(
        server: BillingServer) -> None:
    async with Client(server) as client:
        await two_wallets(client, server)
        alices, mallorys = await quote(client, "alice"), await quote(client, "mallory")
        payment = Payer().pay(alices["payment_required"])
        swapped = error_of(await client.call_tool("verify_x402_receipt", {
            "payment": header(payment), "quote_id": mallorys["quote_id"]}))
        assert (swapped["code"], swapped["param"], swapped["quote_status"]) == (
            "invalid_payment_requirements", "quote_id", "mismatch")
        assert alices["quote_id"] in swapped["message"] and mallorys["quote_id"] in swapped["message"]
        assert balances(server) == {"alice": 0, "mallory": 0} and receipts(server) == 0
        # the payment itself was not spent: presented for its own quote it credits alice
        paid = ok(await client.call_tool("verify_x402_receipt", {"payment": header(payment)}))
        assert (paid["agent_id"], paid["quote_id"]) == ("alice", alices["quote_id"])
        assert balances(server) == {"alice": PRICE, "mallory": 0}


@pytest.fixture
async def http_base(server: BillingServer) -> AsyncIterator[str]:
    async with serving_http(server) as base:
        yield base


@pytest.mark.parametrize(("query", "param"), [
    ("agent_id=alice&luc={luc}&quote_id={mallorys}", "quote_id"),
    ("agent_id=mallory&luc={luc}", "agent_id"),
    ("agent_id=alice&luc=400", "luc"),
])
async def test_get_x402_credits_refuses_a_payment_made_for_another_purchase_and_credits_nothing(
        server: BillingServer, http_base: str, query: str, param: str) -> None:
    assert server.state is not None
    await give_tier(server, "cus_team", "3mo")
    for agent in ("alice", "mallory"):
        await server.state.ledger.create_wallet(agent, "cus_team", None, f"w-{agent}")
    mallorys = (await server.state.x402.create_requirements(luc=PRICE, agent_id="mallory", description="credits",
                                                            resource="urn:luc")).model_dump()
    async with httpx.AsyncClient(base_url=http_base) as http:
        first = await http.get(f"/x402/credits?agent_id=alice&luc={PRICE}")
        required = json.loads(base64.b64decode(first.headers["payment-required"]))
        payment = header(Payer().pay(required))
        refused = await http.get("/x402/credits?" + query.format(luc=PRICE, mallorys=mallorys["quote_id"]),
                                 headers={"PAYMENT-SIGNATURE": payment})
        assert refused.status_code == 402, refused.text
        assert (refused.json()["error"], refused.json()["param"]) == ("invalid_payment_requirements", param)
        assert balances(server) == {"alice": 0, "mallory": 0} and receipts(server) == 0
        honest = await http.get(f"/x402/credits?agent_id=alice&luc={PRICE}", headers={"PAYMENT-SIGNATURE": payment})
    assert honest.status_code == 200 and honest.json()["agent_id"] == "alice"
    assert balances(server) == {"alice": PRICE, "mallory": 0}


@pytest.mark.parametrize(("arguments", "param"), [
    ({"agent_id": "mallory", "luc": PRICE}, "agent_id"),
    ({"agent_id": "alice", "luc": PRICE * 2}, "luc"),
])
async def test_purchase_luc_credits_refuses_a_payment_made_for_another_agents_challenge(
        server: BillingServer, arguments: dict[str, Any], param: str) -> None:
    async with Client(server) as client:
        await two_wallets(client, server)
        challenge = await client.call_tool("purchase_luc_credits", {"agent_id": "alice", "luc": PRICE})
        payment = Payer().pay(challenge.structured_content)  # type: ignore[arg-type]
        refused = error_of(await client.call_tool("purchase_luc_credits", arguments,
                                                  meta={"x402/payment": payment}))
        assert (refused["code"], refused["param"]) == ("invalid_payment_requirements", param)
        assert balances(server) == {"alice": 0, "mallory": 0} and receipts(server) == 0
        ok(await client.call_tool("purchase_luc_credits", {"agent_id": "alice", "luc": PRICE},
                                  meta={"x402/payment": payment}))
        assert balances(server) == {"alice": PRICE, "mallory": 0}


@pytest.mark.parametrize("forge", ["more luc", "other agent", "other signature"])
async def test_a_forged_challenge_token_is_an_unknown_quote(server: BillingServer, forge: str) -> None:
    async with Client(server) as client:
        await two_wallets(client, server)
        challenge = await client.call_tool("purchase_luc_credits", {"agent_id": "alice", "luc": PRICE})
        required: dict[str, Any] = json.loads(json.dumps(challenge.structured_content))
        token = required["accepts"][0]["extra"]["quoteId"]
        body, mac = token.removeprefix("qt_").split(".")
        fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        if forge == "more luc":
            fields["l"] = PRICE * 100
        elif forge == "other agent":
            fields["a"] = "mallory"
        else:
            mac = "A" + mac[1:] if mac[0] != "A" else "B" + mac[1:]
        forged_body = base64.urlsafe_b64encode(json.dumps(fields, separators=(",", ":")).encode()).decode()
        required["accepts"][0]["extra"]["quoteId"] = f"qt_{forged_body.rstrip('=')}.{mac}"
        payment = Payer().pay(required)
        refused = error_of(await client.call_tool("verify_x402_receipt", {"payment": payment}))
        assert (refused["code"], refused["quote_status"]) == ("invalid_payment_requirements", "unknown")
        assert balances(server) == {"alice": 0, "mallory": 0} and receipts(server) == 0


async def register(client: Client, payer: Payer, agent: str, pay_to: str, *, signer: Payer | None = None) -> Any:
    return await client.call_tool("register_x402_payer", {
        "agent_id": agent, "address": payer.address, "signature": (signer or payer).register(agent, pay_to)})


async def test_payer_registration_needs_the_addresss_own_signature(server: BillingServer) -> None:
    alice_key = Payer()
    async with Client(server) as client:
        await two_wallets(client, server)
        pay_to = pay_to_of(server)
        forged = error_of(await register(client, alice_key, "alice", pay_to, signer=Payer()))
        assert (forged["code"], forged["param"]) == ("invalid_input", "signature")
        assert "personal_sign" in forged["message"] and forged["message_to_sign"].startswith("aims-billing-mcp x402")
        assert server.state is not None and server.state.store.query("SELECT * FROM x402_payers") == []
        for_another_wallet = alice_key.register("mallory", pay_to)  # signed for mallory's wallet, sent for alice's
        replayed = error_of(await client.call_tool("register_x402_payer", {
            "agent_id": "alice", "address": alice_key.address, "signature": for_another_wallet}))
        assert replayed["param"] == "signature"
        registered = ok(await register(client, alice_key, "alice", pay_to))
        again = ok(await register(client, alice_key, "alice", pay_to))
    assert registered["payers"] == again["payers"] == [alice_key.address.lower()]


async def test_a_wallet_with_a_registered_payer_refuses_a_payment_signed_by_another_address(
        server: BillingServer) -> None:
    alice_key, stranger = Payer(), Payer()
    async with Client(server) as client:
        await two_wallets(client, server)
        ok(await register(client, alice_key, "alice", pay_to_of(server)))
        alices = await quote(client, "alice")
        refused = error_of(await client.call_tool("verify_x402_receipt", {
            "payment": stranger.pay(alices["payment_required"])}))
        assert (refused["code"], refused["param"]) == ("payer_not_registered", "payment")
        assert balances(server) == {"alice": 0, "mallory": 0} and receipts(server) == 0
        ok(await client.call_tool("verify_x402_receipt", {"payment": alice_key.pay(alices["payment_required"])}))
        assert balances(server) == {"alice": PRICE, "mallory": 0}


async def test_a_registered_payers_intercepted_header_cannot_be_redirected_to_another_wallets_quote(
        server: BillingServer) -> None:
    alice_key = Payer()
    async with Client(server) as client:
        await two_wallets(client, server)
        ok(await register(client, alice_key, "alice", pay_to_of(server)))
        alices, mallorys = await quote(client, "alice"), await quote(client, "mallory")
        payment = alice_key.pay(alices["payment_required"])
        stolen = error_of(await client.call_tool("verify_x402_receipt", {"payment": rename(payment,
                                                                                           mallorys["quote_id"])}))
        assert stolen["code"] == "payer_not_registered", stolen
        assert balances(server) == {"alice": 0, "mallory": 0} and receipts(server) == 0
        ok(await client.call_tool("verify_x402_receipt", {"payment": payment}))
        assert balances(server) == {"alice": PRICE, "mallory": 0}


async def test_a_redeemed_payment_is_spent_for_every_agent_not_only_the_one_it_credited(
        server: BillingServer) -> None:
    """Replay keys are global (network, asset, payer, nonce), not scoped to a wallet: a payment is a payment."""
    async with Client(server) as client:
        await two_wallets(client, server)
        alices, mallorys = await quote(client, "alice"), await quote(client, "mallory")
        payment = Payer().pay(alices["payment_required"])
        ok(await client.call_tool("verify_x402_receipt", {"payment": payment}))
        replay = error_of(await client.call_tool("verify_x402_receipt", {"payment": rename(payment,
                                                                                           mallorys["quote_id"])}))
        assert replay["code"] == "invalid_exact_evm_nonce_already_used"
        assert balances(server) == {"alice": PRICE, "mallory": 0} and receipts(server) == 1


async def test_without_registration_a_payment_header_is_a_bearer_instrument(server: BillingServer) -> None:
    """The limit the README states: the quote id is not signed, so an unregistered payer's header, rewritten to name
    another quote of the same price, pays that quote. Registration (above) is what closes it."""
    async with Client(server) as client:
        await two_wallets(client, server)
        alices, mallorys = await quote(client, "alice"), await quote(client, "mallory")
        payment = Payer().pay(alices["payment_required"])
        ok(await client.call_tool("verify_x402_receipt", {"payment": rename(payment, mallorys["quote_id"])}))
        assert balances(server) == {"alice": 0, "mallory": PRICE}
