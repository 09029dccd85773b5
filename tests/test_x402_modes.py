"""The x402 service's other settlement modes: `stripe` (a PaymentIntent reconciled through the gateway, against
the sandbox) and `http` (the SDK's HTTP facilitator client against a facilitator stood up here over loopback HTTP,
which delegates to the local verifier)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from aims_billing_mcp.errors import PaymentRejected
from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.services.tiers import Pricing
from aims_billing_mcp.services.x402 import X402Service
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from aims_billing_mcp.stripe_gateway import StripeGateway, StripeRequest, build_gateway

from .conftest import serving_app
from .test_x402 import naming

sys.path.insert(0, str(Path(__file__).parent))
from x402_worker import Payer, header

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
