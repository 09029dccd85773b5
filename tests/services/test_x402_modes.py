"""The x402 service's other settlement modes: `stripe` (a PaymentIntent reconciled through the gateway, against
the sandbox) and `http` (the SDK's HTTP facilitator client against a facilitator stood up here over loopback HTTP,
which delegates to the local verifier)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from aims_billing_mcp.app import BillingServer
from aims_billing_mcp.cli import main
from aims_billing_mcp.errors import ConfigurationError, InvalidInput, PaymentRejected
from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.services.tiers import Pricing
from aims_billing_mcp.services.x402 import SANDBOX_PAY_TO, X402Service
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from aims_billing_mcp.stripe_gateway import StripeGateway, StripeRequest, build_gateway
from tests.conftest import error_of, serving_app
from tests.services.test_x402 import naming
from tests.support.x402_worker import Payer, header

pytestmark = pytest.mark.anyio
AGENT = "agent-m"


@pytest.fixture
def gateway(make_settings: Callable[..., Settings], sandbox_app: Any) -> StripeGateway:
    return build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)


@pytest.fixture
async def ledger(store: Store) -> LedgerService:
    ledger = LedgerService(store, luc_per_usd=Pricing.load().luc_per_usd, agent_limit=lambda customer: None)
    await ledger.create_wallet(AGENT, "cus_m", None, "open")
    return ledger


async def paid_intent(gateway: StripeGateway, cents: int, quote_id: str, *, confirm: bool = True) -> str:
    params: dict[str, Any] = {"amount": cents, "currency": "usd", "metadata": {"quote_id": quote_id},
                              "payment_method_types": ["card"]}
    if confirm:
        params.update(payment_method="pm_card_visa", confirm=True)
    pi = (await gateway.send(StripeRequest("post", "/v1/payment_intents", params))).data
    assert pi["status"] == ("succeeded" if confirm else "requires_payment_method"), pi["status"]
    return str(pi["id"])


async def test_stripe_mode_reconciles_a_succeeded_payment_intent_once(
        store: Store, ledger: LedgerService, gateway: StripeGateway) -> None:
    service = X402Service(store, ledger, gateway, Pricing.load(), facilitator="stripe")
    quote = await service.create_requirements(luc=2500, agent_id=AGENT, description="2500 LUC", resource="urn:luc")
    assert quote.amount_usd == "2.5"
    pi = await paid_intent(gateway, 250, quote.quote_id)
    receipt = await service.verify_and_settle(pi, quote_id=quote.quote_id)
    assert (receipt.mode, receipt.payment_intent, receipt.luc_credited, receipt.balance_after) == (
        "stripe", pi, 2500, 2500)
    assert receipt.settlement["transaction"] == pi
    other = await service.create_requirements(luc=2500, agent_id=AGENT, description="d", resource="r")
    with pytest.raises(PaymentRejected) as caught:
        await service.verify_and_settle(pi, quote_id=other.quote_id)
    assert caught.value.code == "payment_intent_already_used"
    assert ledger.get_wallet(AGENT).balance == 2500
    assert len(service.receipts()) == 1


@pytest.mark.parametrize(("case", "code"), [
    ("unconfirmed", "invalid_transaction_state"),
    ("other quote", "invalid_payment_requirements"),
    ("other amount", "invalid_exact_evm_payload_authorization_value_mismatch"),
    ("not an id", "invalid_payload"),
    ("unknown id", "invalid_payload"),
])
async def test_stripe_mode_refuses_intents_that_do_not_pay_the_quote(
        store: Store, ledger: LedgerService, gateway: StripeGateway, case: str, code: str) -> None:
    service = X402Service(store, ledger, gateway, Pricing.load(), facilitator="stripe")
    quote = await service.create_requirements(amount_usd="1.00", agent_id=AGENT, description="d", resource="r")
    payment = {
        "unconfirmed": lambda: paid_intent(gateway, 100, quote.quote_id, confirm=False),
        "other quote": lambda: paid_intent(gateway, 100, "q_other"),
        "other amount": lambda: paid_intent(gateway, 99, quote.quote_id),
    }
    pi = await payment[case]() if case in payment else ("x402 please" if case == "not an id" else "pi_missing123")
    with pytest.raises(PaymentRejected) as caught:
        await service.verify_and_settle(pi, quote_id=quote.quote_id)
    assert caught.value.code == code, caught.value.to_dict()
    assert store.query("SELECT * FROM x402_receipts") == []
    assert ledger.get_wallet(AGENT).balance == 0


# --- http mode: a facilitator over real loopback HTTP -----------------------------------------------------------


@pytest.fixture
async def facilitator(store: Store, ledger: LedgerService) -> AsyncIterator[str]:
    """A minimal x402 facilitator (`POST /verify`, `POST /settle`) delegating to the SDK's exact-EVM scheme over our
    offline signer, served by uvicorn on a free loopback port."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from x402.schemas import PaymentPayload, PaymentRequirements

    local = X402Service(store, ledger, None, Pricing.load())

    async def handle(request: Request) -> JSONResponse:
        body = await request.json()
        payload = PaymentPayload.model_validate(body["paymentPayload"])
        requirements = PaymentRequirements.model_validate(body["paymentRequirements"])
        scheme = local._scheme(str(requirements.network))
        if request.url.path == "/verify":
            result: Any = scheme.verify(payload, requirements)
        else:
            result = scheme.settle(payload, requirements)
        return JSONResponse(result.model_dump(by_alias=True, exclude_none=True))

    app = Starlette(routes=[Route("/verify", handle, methods=["POST"]), Route("/settle", handle, methods=["POST"])])
    async with serving_app(app) as base:
        yield base


async def test_http_mode_verifies_and_settles_through_a_remote_facilitator(
        store: Store, ledger: LedgerService, facilitator: str) -> None:
    service = X402Service(store, ledger, None, Pricing.load(), facilitator="http", facilitator_url=facilitator)
    try:
        quote = await service.create_requirements(luc=300, agent_id=AGENT, description="d", resource="r")
        payer = Payer()
        payment = header(payer.pay(quote.payment_required))
        receipt = await service.verify_and_settle(payment, quote_id=quote.quote_id)
        assert (receipt.mode, receipt.luc_credited, receipt.balance_after) == ("http", 300, 300)
        assert receipt.tx_hash and receipt.settlement["success"] is True
        other = await service.create_requirements(luc=300, agent_id=AGENT, description="d", resource="r")
        with pytest.raises(PaymentRejected) as caught:  # replayed for another quote (the quoteId is not signed)
            await service.verify_and_settle(naming(payment, other.quote_id))
        assert caught.value.code == "invalid_exact_evm_nonce_already_used"
        forged = Payer().pay(other.payment_required)
        forged["payload"]["authorization"]["from"] = payer.address  # signed by another key
        with pytest.raises(PaymentRejected) as caught:
            await service.verify_and_settle(forged, quote_id=other.quote_id)
        assert caught.value.code == "invalid_exact_evm_payload_signature"
        assert ledger.get_wallet(AGENT).balance == 300
    finally:
        await service.aclose()


# --- live mode: real money only -----------------------------------------------------------------------------------

PAY_TO = "0x" + "7a" * 20


@pytest.mark.parametrize(("pay_to", "facilitator", "network", "setting"), [
    (None, "http", "base", "AIMS_X402_PAY_TO"),
    (PAY_TO, "local", "base", "AIMS_X402_FACILITATOR"),
    (PAY_TO, "http", "base-sepolia", "AIMS_X402_NETWORK"),
])
async def test_live_mode_refuses_every_x402_call_without_a_pay_to_real_settlement_and_mainnet(
        store: Store, ledger: LedgerService, pay_to: str | None, facilitator: str, network: str,
        setting: str) -> None:
    service = X402Service(store, ledger, None, Pricing.load(), pay_to=pay_to, facilitator=facilitator,
                          facilitator_url="https://facilitator.example", network=network, live=True)
    payer = Payer()
    calls = {
        "create_requirements": lambda: service.create_requirements(luc=5, agent_id=AGENT, description="d",
                                                                   resource="r"),
        "challenge": lambda: service.challenge(agent_id=AGENT, luc=5, resource="r"),
        "verify_and_settle": lambda: service.verify_and_settle(header(payer.pay(
            {"x402Version": 2, "accepts": [{"scheme": "exact", "network": "eip155:8453", "amount": "5000",
                                            "payTo": PAY_TO, "extra": {"quoteId": "q_x"}}]}))),
        "register_payer": lambda: service.register_payer(agent_id=AGENT, address=payer.address,
                                                         signature=payer.register(AGENT, PAY_TO)),
    }
    for name, call in calls.items():
        with pytest.raises(ConfigurationError) as caught:
            await call()
        assert caught.value.param == setting, name
        assert setting in caught.value.message and "live mode" in caught.value.message
    assert store.query("SELECT * FROM x402_quotes") == [] and store.query("SELECT * FROM x402_payers") == []
    assert ledger.get_wallet(AGENT).balance == 0


async def test_live_mode_with_its_settings_quotes_usdc_on_base_to_the_configured_address(
        store: Store, ledger: LedgerService) -> None:
    service = X402Service(store, ledger, None, Pricing.load(), pay_to=PAY_TO, facilitator="http",
                          facilitator_url="https://facilitator.example", network="base", live=True)
    quote = await service.create_requirements(luc=5, agent_id=AGENT, description="d", resource="r")
    assert (quote.network, quote.pay_to) == ("eip155:8453", PAY_TO)
    with pytest.raises(InvalidInput) as caught:
        await service.create_requirements(luc=5, agent_id=AGENT, description="d", resource="r",
                                          network="base-sepolia")
    assert caught.value.param == "network"


async def test_a_live_key_server_refuses_x402_tools_with_the_settings_to_fix(
        make_server: Callable[..., BillingServer]) -> None:
    server = make_server(stripe_secret_key="sk_live_" + "x" * 24, aims_billing_allow_live=True)
    async with Client(server) as client:
        for tool, arguments in (("create_x402_payment_requirements", {"description": "d", "luc": 5,
                                                                      "agent_id": "buyer"}),
                                ("purchase_luc_credits", {"agent_id": "buyer", "luc": 5}),
                                ("verify_x402_receipt", {"payment": "e30="})):
            err = error_of(await client.call_tool(tool, arguments))
            assert (err["code"], err["param"]) == ("configuration_error", "AIMS_X402_PAY_TO"), tool
            assert "AIMS_X402_FACILITATOR=local" in err["message"], tool


@pytest.mark.parametrize(("env", "words"), [
    ({"STRIPE_SECRET_KEY": "sk_live_" + "y" * 24}, ("x402: REFUSED", "AIMS_X402_PAY_TO", "AIMS_X402_FACILITATOR")),
    ({}, ("x402: settles local (offline: no money moves) on base-sepolia", SANDBOX_PAY_TO)),
])
def test_doctor_says_whether_x402_is_refused_in_live_mode(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str],
        words: tuple[str, ...]) -> None:
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "doctor.db"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    main(["doctor"])  # the live key without opt-in fails doctor before any call to Stripe
    out = capsys.readouterr().out
    assert all(word in out for word in words), out
