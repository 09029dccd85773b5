"""GET /x402/credits under bad input: every malformed query, oversized or malformed payment header and unknown
wallet is a 4xx naming the reason (never a 500), and writes nothing; live mode without its settings is a 503."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from aims_billing_mcp.app import BillingServer
from tests.conftest import serving_http
from tests.security.test_anonymous_storage import row_counts
from tests.support.x402_worker import Payer, header
from tests.tools.test_wallets import give_tier

pytestmark = pytest.mark.anyio

GOOD = "agent_id=buyer&luc=500"


@pytest.fixture
async def base(server: BillingServer) -> AsyncIterator[str]:
    async with serving_http(server) as url:
        assert server.state is not None
        await give_tier(server, "cus_team", "3mo")
        await server.state.ledger.create_wallet("buyer", "cus_team", None, "w-buyer")
        yield url


@pytest.mark.parametrize(("query", "param", "words"), [
    ("agent_id=buyer&luc=²", "luc", "whole number"),
    ("agent_id=buyer&luc=" + "9" * 900, "luc", "whole number"),  # 5,000 digits: 414 from the HTTP guard
    ("agent_id=buyer&luc=1" + "0" * 9 + "1", "luc", "whole number"),
    ("agent_id=buyer&luc=0", "luc", "greater than 0"),
    ("agent_id=buyer&luc=-5", "luc", "whole number"),
    ("agent_id=buyer&luc=1.5", "luc", "whole number"),
    ("agent_id=buyer&luc=%EF%BC%95", "luc", "whole number"),  # a fullwidth 5
    ("agent_id=buyer&luc=2000000000", "luc", "less than or equal"),
    ("agent_id=buyer", "luc", "required"),
    ("luc=5", "agent_id", "required"),
    ("agent_id=bad%20agent&luc=5", "agent_id", "pattern"),
    ("agent_id=" + "a" * 200 + "&luc=5", "agent_id", "at most"),
    ("agent_id=buyer&luc=5&luc=6", "luc", "more than once"),
    ("agent_id=buyer&luc=5&cost=0", "cost", "not a parameter"),
    ("agent_id=buyer&luc=5&quote_id=" + "q" * 600, "quote_id", "at most"),
])
async def test_a_malformed_query_is_a_400_naming_the_field(
        server: BillingServer, base: str, query: str, param: str, words: str) -> None:
    assert server.state is not None
    before = row_counts(server.state.store)
    async with httpx.AsyncClient(base_url=base) as http:
        answer = await http.get(f"/x402/credits?{query}")
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert (body["error"], body["param"]) == ("invalid_request", param)
    assert words in body["message"] and "/x402/credits?agent_id=" in body["message"]
    assert row_counts(server.state.store) == before


PAYMENTS: dict[str, Callable[[dict[str, object]], list[tuple[str, str]]]] = {
    "huge": lambda required: [("PAYMENT-SIGNATURE", "A" * 20_000)],
    "not base64": lambda required: [("PAYMENT-SIGNATURE", "%%% not base64 %%%")],
    "base64 of no json": lambda required: [("X-PAYMENT", base64.b64encode(b"\x00\xff nope").decode())],
    "version 3": lambda required: [("PAYMENT-SIGNATURE", header({"x402Version": 3}))],
    "a json array": lambda required: [("PAYMENT-SIGNATURE", base64.b64encode(b"[1, 2]").decode())],
    "both headers": lambda required: [("PAYMENT-SIGNATURE", header(Payer().pay(required))),
                                      ("X-PAYMENT", header(Payer().pay(required)))],
}


async def challenge_of(http: httpx.AsyncClient) -> dict[str, object]:
    """The PaymentRequired of an unpaid GET (the 402 challenge a payer answers)."""
    first = await http.get(f"/x402/credits?{GOOD}")
    required: dict[str, object] = json.loads(base64.b64decode(first.headers["payment-required"]))
    return required


@pytest.mark.parametrize("case", sorted(PAYMENTS))
async def test_a_malformed_or_oversized_payment_header_is_a_400_and_credits_nothing(
        server: BillingServer, base: str, case: str) -> None:
    assert server.state is not None
    async with httpx.AsyncClient(base_url=base) as http:
        required = await challenge_of(http)
        before = row_counts(server.state.store)
        answer = await http.get(f"/x402/credits?{GOOD}", headers=httpx.Headers(PAYMENTS[case](required)))
    if case == "huge":  # above the guard's 16 KiB of headers: refused before the route reads it
        assert answer.status_code == 431, answer.text
    else:
        assert answer.status_code == 400, answer.text
        body = answer.json()
        assert body["param"] == "payment" and len(body["message"]) > 30
    assert row_counts(server.state.store) == before


@pytest.mark.parametrize("with_payment", [False, True])
async def test_an_agent_without_a_wallet_is_a_404_with_or_without_a_payment(
        server: BillingServer, base: str, with_payment: bool) -> None:
    assert server.state is not None
    async with httpx.AsyncClient(base_url=base) as http:
        required = await challenge_of(http)
        before = row_counts(server.state.store)
        headers = {"PAYMENT-SIGNATURE": header(Payer().pay(required))} if with_payment else {}
        answer = await http.get("/x402/credits?agent_id=nobody&luc=500", headers=headers)
    assert answer.status_code == 404, answer.text
    assert (answer.json()["error"], answer.json()["param"]) == ("not_found", "agent_id")
    assert "no wallet for agent nobody" in answer.json()["message"]
    assert row_counts(server.state.store) == before
    assert server.state.ledger.get_wallet("buyer").balance == 0


async def test_in_live_mode_without_a_pay_to_the_route_is_a_503_naming_the_setting(
        make_server: Callable[..., BillingServer]) -> None:
    server = make_server(stripe_secret_key="sk_live_" + "x" * 24, aims_billing_allow_live=True,
                         aims_x402_facilitator="http", aims_x402_facilitator_url="https://facilitator.example")
    async with serving_http(server) as url, httpx.AsyncClient(base_url=url) as http:
        answer = await http.get(f"/x402/credits?{GOOD}")
    assert answer.status_code == 503, answer.text
    assert (answer.json()["error"], answer.json()["param"]) == ("configuration_error", "AIMS_X402_PAY_TO")


async def test_stripe_mode_pays_a_challenge_with_a_payment_intent_named_in_the_header(
        make_server: Callable[..., BillingServer]) -> None:
    from aims_billing_mcp.stripe_gateway import StripeRequest

    server = make_server(aims_x402_facilitator="stripe")
    async with serving_http(server) as url, httpx.AsyncClient(base_url=url) as http:
        assert server.state is not None
        await give_tier(server, "cus_team", "3mo")
        await server.state.ledger.create_wallet("buyer", "cus_team", None, "w-buyer")
        odd = await http.get("/x402/credits?agent_id=buyer&luc=5")  # 0.005 USD: not whole cents
        assert (odd.status_code, odd.json()["param"]) == (400, "luc")
        first = await http.get(f"/x402/credits?{GOOD}")
        quote_id = json.loads(base64.b64decode(first.headers["payment-required"]))["accepts"][0]["extra"]["quoteId"]
        pi = (await server.state.gateway.send(StripeRequest("post", "/v1/payment_intents", {
            "amount": 50, "currency": "usd", "metadata": {"quote_id": quote_id}, "payment_method": "pm_card_visa",
            "payment_method_types": ["card"], "confirm": True}))).data
        paid = await http.get(f"/x402/credits?{GOOD}&quote_id={quote_id}", headers={"PAYMENT-SIGNATURE": pi["id"]})
        assert paid.status_code == 200, paid.text
        assert (paid.json()["payment_intent"], paid.json()["luc_credited"]) == (pi["id"], 500)
        assert server.state.ledger.get_wallet("buyer").balance == 500
