"""Marketplace splits (issue 17) across processes: server instances on one database and one Stripe (the sandbox over
loopback HTTP), released at once (tests/support/processes.py). The same x402 plug payment presented by 4 processes
transfers the creator's share once; a refund whose answer was lost, retried by 2 processes while 2 others receive
its refund.created webhook, is recorded (and reversed) once."""

from __future__ import annotations

import functools
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from aims_billing_mcp.errors import BillingError
from aims_billing_mcp.sandbox import Sandbox
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.state import AppState, open_state
from aims_billing_mcp.stripe_gateway import StripeRequest
from tests.conftest import serving_app
from tests.support.processes import run_together

pytestmark = pytest.mark.anyio

WORKER = Path(__file__).parents[1] / "support" / "connect_worker.py"
from tests.support.x402_worker import Payer, header  # noqa: E402


async def _plug_of_new_creator(state: AppState, sandbox: Sandbox) -> str:
    made = await state.connect.create_connected_account(display_name="Maker", email=None, country="US",
                                                        currency=None, idempotency_key=None, dry_run=False)
    assert made.account is not None
    sandbox.complete_account_onboarding(made.account.id)
    product = await state.catalog.create_product(name="SEO audit", description=None, metadata=None,
                                                 idempotency_key=None, dry_run=False)
    assert product.product is not None
    price = await state.catalog.create_price(product=product.product.id, currency="usd", unit_amount=1000,
                                             recurring=None, lookup_key=None, nickname=None, metadata=None,
                                             idempotency_key=None, dry_run=False)
    assert price.price is not None
    await state.connect.create_plug(plug_id="seo-audit", name=None, price=price.price.id, account=made.account.id,
                                    creator_share_bp=7000, platform_fee=None, idempotency_key=None)
    return made.account.id


def _together(commands: list[list[str]]) -> Callable[[], list[str]]:
    return functools.partial(run_together, commands, timeout=180)


def _objects(sandbox: Sandbox, kind: str) -> list[dict[str, Any]]:
    found, _ = sandbox.store.page(kind, {}, limit=100)
    return found


async def test_one_x402_plug_payment_presented_by_four_processes_at_once_transfers_the_creators_share_once(
        make_settings: Callable[..., Settings], sandbox_app: Any, tmp_path: Path) -> None:
    sandbox: Sandbox = sandbox_app.state.sandbox
    async with serving_app(sandbox_app) as url:
        settings = make_settings(stripe_api_base=url)
        async with open_state(settings, retry_delay_scale=0) as state:
            account = await _plug_of_new_creator(state, sandbox)
            await state.gateway.send(StripeRequest("post", "/v1/payment_intents", {  # the platform's balance
                "amount": 10_000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}))
            quote = await state.x402.create_requirements(amount_usd="10.00", description="SEO audit",
                                                         resource="plug:seo-audit")
            payment = header(Payer().pay(quote.payment_required))
        command = [sys.executable, str(WORKER), str(settings.aims_billing_db), url, "x402", quote.quote_id, payment]
        outputs = await anyio.to_thread.run_sync(_together([command] * 4))
        outcomes = Counter(out.split()[0] for out in outputs)
        assert outcomes == {"accepted": 1, "rejected": 3}, outputs
        receipt = next(out.split()[1] for out in outputs if out.startswith("accepted"))
        transfers = [t for t in _objects(sandbox, "transfer") if t["transfer_group"] == f"x402_{receipt}"]
        assert [(t["destination"], t["amount"]) for t in transfers] == [(account, 700)]
        async with open_state(settings, retry_delay_scale=0) as state:
            splits = state.connect.earnings(account, None).splits
            assert [(s.sale, s.status, s.transfer) for s in splits] == [(receipt, "transferred", transfers[0]["id"])]
            assert await state.connect.check_splits() == (1, [])


async def test_a_refund_retried_by_two_processes_while_two_receive_its_webhook_is_recorded_and_reversed_once(
        make_settings: Callable[..., Settings], sandbox_app: Any, tmp_path: Path) -> None:
    sandbox: Sandbox = sandbox_app.state.sandbox
    async with serving_app(sandbox_app) as url:
        settings = make_settings(stripe_api_base=url)
        async with open_state(settings, retry_delay_scale=0) as state:
            account = await _plug_of_new_creator(state, sandbox)
            made = await state.commerce.create_session(
                customer=None, agent_id=None, item="plug:seo-audit", amount=None, currency=None, description=None,
                idempotency_key="buy-1", dry_run=False)
            assert made.session is not None
            sale = made.session.id
            await state.commerce.confirm_session(sale, payment_method="pm_card_visa", shared_payment_token=None,
                                                 idempotency_key="pay-1")
            sandbox.faults.inject(status=500, count=10, mode="after", path_prefix="/v1/refunds")
            with pytest.raises(BillingError):  # Stripe refunded and reversed; every answer was lost
                await state.connect.refund_sale(sale=sale, amount=600, reason=None, idempotency_key="r1")
            sandbox.faults.clear()
        [event] = [e for e in _objects(sandbox, "event") if e["type"] == "refund.created"]
        event_file = tmp_path / "refund_created.json"
        event_file.write_text(json.dumps(event), "utf-8")
        base = [sys.executable, str(WORKER), str(settings.aims_billing_db), url]
        outputs = await anyio.to_thread.run_sync(_together(
            [[*base, "refund", sale, "600", "r1"]] * 2 + [[*base, "webhook", str(event_file)]] * 2))
        refund = event["data"]["object"]["id"]
        assert outputs == [f"refunded {refund}\n"] * 2 + ["ingested\n"] * 2, outputs
        assert (sandbox.count("refund"), sandbox.count("transfer_reversal")) == (1, 1)
        async with open_state(settings, retry_delay_scale=0) as state:
            [split] = state.connect.earnings(account, None).splits
            assert (split.refunded, split.reversed, split.fee_refunded) == (600, 420, 180)
            assert state.store.query_one("SELECT COUNT(*) AS n FROM split_refunds") == {"n": 1}
            assert await state.connect.check_splits() == (1, [])
