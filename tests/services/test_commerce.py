"""Payment sessions at the service level: a real gateway on the in-process sandbox, a real store and ledger. Buying
a LUC pack is fulfilled exactly once however success is seen (confirm, get, webhook event), and bad input is refused
with a clear error before anything is written."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aims_billing_mcp.errors import BillingError, InvalidInput, InvalidState, NotFound, StripeCardDeclined
from aims_billing_mcp.services.commerce import PaymentSessionService
from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from aims_billing_mcp.stripe_gateway import StripeGateway, StripeRequest
from tests.conftest import commerce_stack, paid_outside
from tests.support.money_invariant import money_kept  # noqa: F401  (autouse: the money invariant after each test)

pytestmark = pytest.mark.anyio


class Env:
    def __init__(self, service: PaymentSessionService, ledger: LedgerService, store: Store,
                 gateway: StripeGateway) -> None:
        self.service, self.ledger, self.store, self.gateway = service, ledger, store, gateway

    async def buy(self, key: str = "buy-1", item: str = "luc_10k", agent: str = "buyer") -> str:
        result = await self.service.create_session(customer=None, agent_id=agent, item=item, amount=None,
                                                   currency=None, description=None, idempotency_key=key,
                                                   dry_run=False)
        assert result.session is not None
        return result.session.id

    def balance(self, agent: str = "buyer") -> int:
        return self.ledger.get_wallet(agent).balance

    def credits(self, agent: str = "buyer") -> int:
        row = self.store.query_one("SELECT COUNT(*) AS n FROM agent_transactions t JOIN agent_wallets w "
                                   "ON t.wallet_id = w.id WHERE w.agent_id = ? AND t.kind = 'credit'", (agent,))
        assert row is not None
        return int(row["n"])

    def counts(self) -> tuple[int, int]:
        sessions = self.store.query_one("SELECT COUNT(*) AS n FROM payment_sessions")
        keys = self.store.query_one("SELECT COUNT(*) AS n FROM idempotency_keys")
        assert sessions is not None and keys is not None
        return int(sessions["n"]), int(keys["n"])


@pytest.fixture
async def env(make_settings: Callable[..., Settings], sandbox_app: Any, store: Store) -> AsyncIterator[Env]:
    async with commerce_stack(make_settings(), sandbox_app, store) as stack:
        yield Env(stack.payments, stack.ledger, store, stack.gateway)


async def test_buying_a_luc_pack_credits_the_wallet_exactly_once(env: Env) -> None:
    created = await env.service.create_session(customer=None, agent_id="buyer", item="luc_10k", amount=None,
                                               currency=None, description=None, idempotency_key="buy-1",
                                               dry_run=False)
    assert created.session is not None and not created.replayed
    session = created.session
    assert (session.status, session.amount, session.currency, session.amount_display) == (
        "requires_payment_method", 1000, "usd", "10.00 USD")
    assert session.id.startswith("ps_") and session.payment_intent and session.payment_intent.startswith("pi_")
    assert session.customer == "cus_team" and not session.fulfilled
    pi = (await env.gateway.send(StripeRequest("get", f"/v1/payment_intents/{session.payment_intent}"))).data
    assert pi["metadata"] == {"aims_session": session.id, "aims_item": "luc_10k", "aims_agent": "buyer"}
    assert pi["automatic_payment_methods"] == {"enabled": True, "allow_redirects": "never"}

    paid = await env.service.confirm_session(session.id, payment_method="pm_card_visa", shared_payment_token=None,
                                             idempotency_key="pay-1")
    assert (paid.status, paid.amount_received, paid.fulfilled) == ("succeeded", 1000, True)
    assert paid.fulfilment is not None and paid.fulfilment["luc_credited"] == 10_000
    assert paid.fulfilment["wallet_balance"] == 10_000
    assert env.balance() == 10_000 and env.credits() == 1

    again = await env.service.get_session(session.id)
    assert again.status == "succeeded" and again.fulfilled and env.balance() == 10_000

    events = (await env.gateway.send(StripeRequest("get", "/v1/events",
                                                   {"type": "payment_intent.succeeded"}))).data["data"]
    event = next(e for e in events if e["data"]["object"]["id"] == session.payment_intent)
    for _ in range(2):
        note = await env.store.write(lambda conn: env.service.apply_event(conn, event))
        assert note is not None and "succeeded" in note and "fulfilled" not in note
    assert env.balance() == 10_000 and env.credits() == 1

    replay = await env.service.confirm_session(session.id, payment_method="pm_card_visa", shared_payment_token=None,
                                               idempotency_key="pay-1")
    assert replay.fulfilled and env.credits() == 1
    with pytest.raises(InvalidState, match="already paid"):
        await env.service.confirm_session(session.id, payment_method="pm_card_visa", shared_payment_token=None,
                                          idempotency_key="pay-2")
    repeated = await env.service.create_session(customer=None, agent_id="buyer", item="luc_10k", amount=None,
                                                currency=None, description=None, idempotency_key="buy-1",
                                                dry_run=False)
    assert repeated.replayed and repeated.session is not None
    assert (repeated.session.id, repeated.session.status) == (session.id, "succeeded")


async def test_the_webhook_alone_fulfils_once(env: Env) -> None:
    session_id = await env.buy()
    session = await env.service.get_session(session_id)
    pi = await paid_outside(env.gateway, str(session.payment_intent))
    event = {"id": "evt_built", "type": "payment_intent.succeeded", "data": {"object": pi}}
    first = await env.store.write(lambda conn: env.service.apply_event(conn, event))
    second = await env.store.write(lambda conn: env.service.apply_event(conn, event))
    assert first is not None and first.endswith("fulfilled") and second is not None and "fulfilled" not in second
    polled = await env.service.get_session(session_id)
    assert polled.fulfilled and env.balance() == 10_000 and env.credits() == 1


async def test_a_shared_payment_token_pays(env: Env) -> None:
    session_id = await env.buy(item="luc_50k")
    paid = await env.service.confirm_session(session_id, payment_method=None,
                                             shared_payment_token="spt_test_agent_card", idempotency_key="spt-1")
    assert paid.status == "succeeded" and env.balance() == 50_000


async def test_a_declined_card_leaves_the_session_payable_and_credits_nothing(env: Env) -> None:
    session_id = await env.buy()
    with pytest.raises(StripeCardDeclined, match="declined") as raised:
        await env.service.confirm_session(session_id, payment_method="pm_card_chargeDeclined",
                                          shared_payment_token=None, idempotency_key="pay-1")
    assert session_id in raised.value.message
    session = await env.service.get_session(session_id)
    assert session.status == "requires_payment_method" and not session.fulfilled
    assert session.last_error is not None and "declined" in session.last_error
    assert env.balance() == 0
    events = (await env.gateway.send(StripeRequest("get", "/v1/events",
                                                   {"type": "payment_intent.payment_failed"}))).data["data"]
    note = await env.store.write(lambda conn: env.service.apply_event(conn, events[0]))
    assert note is not None and "requires_payment_method" in note and "declined" in note
    paid = await env.service.confirm_session(session_id, payment_method="pm_card_visa", shared_payment_token=None,
                                             idempotency_key="pay-2")
    assert paid.status == "succeeded" and paid.last_error is None and env.balance() == 10_000


async def test_cancel_an_open_session_but_not_a_paid_one(env: Env) -> None:
    open_id = await env.buy("open")
    canceled = await env.service.cancel_session(open_id, "cancel-1")
    assert canceled.status == "canceled" and not canceled.fulfilled
    assert (await env.service.cancel_session(open_id, "cancel-1")).status == "canceled"
    with pytest.raises(InvalidState, match="canceled"):
        await env.service.confirm_session(open_id, payment_method="pm_card_visa", shared_payment_token=None,
                                          idempotency_key="late")
    paid_id = await env.buy("paid")
    await env.service.confirm_session(paid_id, payment_method="pm_card_visa", shared_payment_token=None,
                                      idempotency_key="pay")
    with pytest.raises(InvalidState, match="already paid"):
        await env.service.cancel_session(paid_id, "cancel-2")
    assert (await env.service.get_session(paid_id)).status == "succeeded" and env.balance() == 10_000


async def test_an_amount_session_and_a_dry_run(env: Env) -> None:
    dry = await env.service.create_session(customer=None, agent_id=None, item=None, amount=2500, currency="USD",
                                           description="consulting", idempotency_key="d", dry_run=True)
    assert dry.dry_run and dry.session is None and dry.request is not None
    assert env.counts() == (0, 0)
    made = await env.service.create_session(customer=None, agent_id=None, item=None, amount=2500, currency="usd",
                                            description="consulting", idempotency_key="a", dry_run=False)
    assert made.session is not None and made.session.item is None
    paid = await env.service.confirm_session(made.session.id, payment_method="pm_card_visa",
                                             shared_payment_token=None, idempotency_key="p")
    assert paid.fulfilled and paid.amount_received == 2500 and env.balance() == 0


@pytest.mark.parametrize(("args", "error", "text"), [
    ({"item": "luc_1m"}, InvalidInput, "valid items are luc_10k"),
    ({}, InvalidInput, "give an item"),
    ({"item": "luc_10k", "amount": 1000, "currency": "usd"}, InvalidInput, "not both"),
    ({"amount": 0, "currency": "usd", "agent_id": None}, InvalidInput, "positive"),
    ({"amount": -5, "currency": "usd", "agent_id": None}, InvalidInput, "positive"),
    ({"amount": 500, "currency": "usd"} | {"currency": "xyz"}, InvalidInput, "ISO 4217"),
    ({"item": "luc_10k", "agent_id": None}, InvalidInput, "pass agent_id"),
    ({"item": "luc_10k", "agent_id": "nobody"}, NotFound, "create_agent_wallet"),
    ({"item": "luc_10k", "customer": "bob"}, InvalidInput, "cus_"),
])
async def test_bad_create_input_is_refused_and_writes_nothing(
    env: Env, args: dict[str, Any], error: type[BillingError], text: str
) -> None:
    call: dict[str, Any] = {"customer": None, "agent_id": "buyer", "item": None, "amount": None, "currency": None,
                            "description": None, "idempotency_key": "k", "dry_run": False} | args
    with pytest.raises(error, match=text):
        await env.service.create_session(**call)
    assert env.counts() == (0, 0)
    pis = (await env.gateway.send(StripeRequest("get", "/v1/payment_intents"))).data["data"]
    assert pis == []


async def test_bad_confirm_and_session_input_is_refused(env: Env) -> None:
    session_id = await env.buy()
    before = env.counts()
    with pytest.raises(InvalidInput, match="exactly one"):
        await env.service.confirm_session(session_id, payment_method="pm_card_visa", shared_payment_token="spt_x",
                                          idempotency_key="k")
    with pytest.raises(InvalidInput, match="exactly one"):
        await env.service.confirm_session(session_id, payment_method=None, shared_payment_token=None,
                                          idempotency_key="k")
    with pytest.raises(NotFound, match="no payment session"):
        await env.service.confirm_session("ps_missing", payment_method="pm_card_visa", shared_payment_token=None,
                                          idempotency_key="k")
    with pytest.raises(NotFound, match="no payment session"):
        await env.service.get_session("ps_missing")
    with pytest.raises(InvalidInput, match="ps_"):
        await env.service.cancel_session("pi_123", "k")
    assert env.counts() == before
    assert (await env.service.get_session(session_id)).status == "requires_payment_method"


async def test_concurrent_polls_and_webhooks_fulfil_once(env: Env) -> None:
    import asyncio

    session_id = await env.buy()
    session = await env.service.get_session(session_id)
    pi = await paid_outside(env.gateway, str(session.payment_intent))
    event = {"id": "evt_race", "type": "payment_intent.succeeded", "data": {"object": pi}}
    await asyncio.gather(*[env.service.get_session(session_id) for _ in range(5)],
                         *[env.store.write(lambda conn: env.service.apply_event(conn, event)) for _ in range(5)])
    assert env.balance() == 10_000 and env.credits() == 1


async def test_a_refused_credit_records_the_payment_and_retries_the_credit_on_the_next_read(env: Env) -> None:
    session = await env.buy()
    await env.store.write(lambda conn: conn.execute("UPDATE agent_wallets SET balance = ? WHERE agent_id = 'buyer'",
                                                    (10**18 - 5,)))  # at the ledger's ceiling: a credit is refused

    paid = await env.service.confirm_session(session, payment_method="pm_card_visa", shared_payment_token=None,
                                             idempotency_key="pay")

    assert (paid.status, paid.fulfilled) == ("succeeded", False)
    assert paid.fulfilment is not None and paid.fulfilment["status"] == "failed"
    await env.store.write(lambda conn: conn.execute("UPDATE agent_wallets SET balance = 0 WHERE agent_id = 'buyer'"))
    again = await env.service.get_session(session)
    assert again.fulfilled and again.fulfilment is not None and again.fulfilment["luc_credited"] == 10_000
    assert env.credits() == 1
