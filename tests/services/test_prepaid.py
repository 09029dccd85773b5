"""Tiers sold as items: a payment session for `tier_*` prepays the tier's whole commitment, and fulfilment starts the
subscription in Stripe once: the payment becomes a credit on the customer's Stripe balance, the subscription
(send_invoice, cancel_at = commitment end, the tier's free months as a trial) draws its invoices from it, and the
provision gives the tier's entitlements. Real gateway on the in-process sandbox, real store."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from aims_billing_mcp.errors import ConfigurationError, InvalidInput, InvalidState, NotFound
from aims_billing_mcp.sandbox import Sandbox
from aims_billing_mcp.services.fulfilment import Fulfilment, Seller
from aims_billing_mcp.services.prepaid import PrepaidSubscriptions, prepaid_id
from aims_billing_mcp.services.stripe_setup import setup_stripe
from aims_billing_mcp.services.tiers import add_months
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.state import build_state
from aims_billing_mcp.store import Store, utc_iso
from aims_billing_mcp.stripe_gateway import StripeRequest
from tests.conftest import CommerceStack, commerce_stack, paid_outside, record_paid
from tests.support.money_invariant import money_kept  # noqa: F401  (autouse: the money invariant after each test)

pytestmark = pytest.mark.anyio
PRICES = {"3mo": 1999, "6mo": 1799, "9mo": 1499}


@dataclass
class Env:
    stack: CommerceStack
    sandbox: Sandbox
    customer: str

    async def stripe(self, method: str, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return (await self.stack.gateway.send(StripeRequest(method, path, params or {}))).data

    async def buy(self, item: str = "tier_3mo", *, key: str = "buy-tier", pay: bool = True) -> Any:
        created = await self.stack.payments.create_session(
            customer=None, agent_id="subscriber", item=item, amount=None, currency=None, description=None,
            idempotency_key=key, dry_run=False)
        assert created.session is not None
        if not pay:
            return created.session
        return await self.stack.payments.confirm_session(created.session.id, payment_method="pm_card_visa",
                                                         shared_payment_token=None, idempotency_key=f"pay-{key}")

    async def paid_not_started(self, key: str = "buy-tier") -> Any:
        """A tier session paid and fulfilled (its subscription recorded to start) that nobody has started yet."""
        session = await self.buy(key=key, pay=False)
        await self.record_paid(session)
        return session

    async def record_paid(self, session: Any) -> None:
        await record_paid(self.stack.store, self.stack.payments, session.payment_intent, self.stack.gateway)

    async def subscriptions(self) -> list[dict[str, Any]]:
        return list((await self.stripe("get", "/v1/subscriptions", {"customer": self.customer, "status": "all"}))[
            "data"])

    async def balance_transactions(self) -> list[dict[str, Any]]:
        return list((await self.stripe("get", f"/v1/customers/{self.customer}/balance_transactions"))["data"])


@pytest.fixture
async def env(make_settings: Callable[..., Settings], sandbox_app: Any, sandbox: Sandbox,
              store: Store) -> AsyncIterator[Env]:
    async with commerce_stack(make_settings(), sandbox_app, store) as stack:
        await setup_stripe(stack.gateway, stack.pricing)
        customer = (await stack.gateway.send(StripeRequest("post", "/v1/customers",
                                                           {"email": "owner@example.com"}))).data["id"]
        await stack.ledger.create_wallet("subscriber", customer, None, "open-subscriber")
        yield Env(stack, sandbox, customer)


@pytest.mark.parametrize(("item", "tier", "months_billed", "months_delivered"), [
    ("tier_3mo", "3mo", 3, 3), ("tier_6mo", "6mo", 6, 6), ("tier_9mo", "9mo", 9, 12)])
async def test_buying_a_tier_prepays_the_commitment_and_starts_the_subscription(
        env: Env, item: str, tier: str, months_billed: int, months_delivered: int) -> None:
    paid = await env.buy(item)

    prepaid = PRICES[tier] * months_billed
    assert (paid.status, paid.amount, paid.amount_received, paid.fulfilled) == ("succeeded", prepaid, prepaid, True)
    assert paid.fulfilment["kind"] == "subscription" and paid.fulfilment["status"] == "started"
    assert (paid.fulfilment["tier"], paid.fulfilment["prepaid"]) == (tier, prepaid)
    [sub] = await env.subscriptions()
    assert paid.fulfilment["subscription"] == sub["id"]
    assert (sub["collection_method"], sub["metadata"]["aims_tier"]) == ("send_invoice", tier)
    assert sub["cancel_at"] == add_months(sub["start_date"], months_delivered)
    assert sub["status"] == ("trialing" if months_delivered > months_billed else "active")
    customer = await env.stripe("get", f"/v1/customers/{env.customer}")
    first_month = 0 if months_delivered > months_billed else PRICES[tier]
    assert customer["balance"] == -(prepaid - first_month)  # the first invoice was paid from the credit
    status = env.stack.subscriptions.entitled_tier(env.customer)
    assert status.id == tier


async def test_the_prepaid_credit_pays_every_month_of_the_commitment_then_it_ends(env: Env) -> None:
    paid = await env.buy("tier_3mo")
    assert paid.fulfilment["status"] == "started"

    for _ in range(4):
        env.sandbox.advance(days=31)

    [sub] = await env.subscriptions()
    invoices = (await env.stripe("get", "/v1/invoices", {"customer": env.customer, "limit": 100}))["data"]
    billed = [inv for inv in invoices if inv["total"] > 0]
    assert len(billed) == 3 and all(inv["status"] == "paid" and inv["amount_paid"] == 0 for inv in billed)
    assert (await env.stripe("get", f"/v1/customers/{env.customer}"))["balance"] == 0
    assert sub["status"] == "canceled" and sub["ended_at"] == sub["cancel_at"]


async def test_overage_in_the_last_month_beyond_the_credit_is_invoiced_not_charged(env: Env) -> None:
    await env.buy("tier_3mo")
    [sub] = await env.subscriptions()
    while (period_end := sub["items"]["data"][0]["current_period_end"]) < sub["cancel_at"]:
        env.sandbox.advance(hours=(period_end + 60 - env.sandbox.now()) / 3600)  # into the next period
        [sub] = await env.subscriptions()
    # the third and last month: 150,000 units against a 100,000 allowance, 50,000 over at $1.50 per 1,000
    await env.stripe("post", "/v1/billing/meter_events", {
        "event_name": "aims_luc_units", "payload": {"stripe_customer_id": env.customer, "value": "150000"},
        "timestamp": env.sandbox.now(), "identifier": "last-month"})

    env.sandbox.advance(hours=(sub["cancel_at"] + 60 - env.sandbox.now()) / 3600)

    [ended] = await env.subscriptions()
    assert ended["status"] == "canceled"
    invoices = (await env.stripe("get", "/v1/invoices", {"customer": env.customer, "limit": 100}))["data"]
    final = max(invoices, key=lambda invoice: invoice["created"])
    assert (final["total"], final["amount_due"], final["status"]) == (7500, 7500, "open")  # the credit is spent
    assert final["collection_method"] == "send_invoice" and final["amount_paid"] == 0


async def test_confirming_twice_starts_one_subscription_and_credits_once(env: Env) -> None:
    session = await env.buy(pay=False)
    await env.stack.payments.confirm_session(session.id, payment_method="pm_card_visa", shared_payment_token=None,
                                             idempotency_key="pay-1")

    with pytest.raises(InvalidState, match="already paid"):
        await env.stack.payments.confirm_session(session.id, payment_method="pm_card_visa",
                                                 shared_payment_token=None, idempotency_key="pay-2")
    again = await env.stack.payments.get_session(session.id)

    assert again.fulfilment is not None and again.fulfilment["status"] == "started"
    assert len(await env.subscriptions()) == 1
    assert [t["type"] for t in await env.balance_transactions()].count("adjustment") == 1


def adjustments(transactions: list[dict[str, Any]]) -> int:
    return sum(1 for txn in transactions if txn["type"] == "adjustment")


async def test_two_tiers_paid_at_once_for_one_customer_start_one_and_refuse_the_other_uncredited(env: Env) -> None:
    sessions = [await env.buy(item, key=item, pay=False) for item in ("tier_3mo", "tier_6mo")]  # both created unpaid
    for session in sessions:  # both paid (e.g. by the buyers' own clients) before either is started
        await env.record_paid(session)
    other = PrepaidSubscriptions(env.stack.store, env.stack.gateway, env.stack.subscriptions, env.stack.pricing,
                                 fulfilment=env.stack.fulfilment)

    async with anyio.create_task_group() as tg:  # two workers (processes), one row each
        tg.start_soon(env.stack.prepaid.start, prepaid_id(sessions[0].id))
        tg.start_soon(other.start, prepaid_id(sessions[1].id))

    assert len(await env.subscriptions()) == 1 and adjustments(await env.balance_transactions()) == 1
    rows = [env.stack.prepaid.find(prepaid_id(session.id)) for session in sessions]
    assert sorted(row["status"] for row in rows if row) == ["refused", "started"]
    [refused] = [row for row in rows if row and row["status"] == "refused"]
    assert "nothing was credited: refund the payment" in refused["last_error"]
    assert await env.stack.prepaid.retry(include_failed=True) == []  # a refused one restarts only when named


async def test_a_second_tier_is_refused_at_confirm_before_anything_is_charged(env: Env) -> None:
    first = await env.buy("tier_3mo", key="a", pay=False)
    second = await env.buy("tier_6mo", key="b", pay=False)
    await env.stack.payments.confirm_session(first.id, payment_method="pm_card_visa", shared_payment_token=None,
                                             idempotency_key="pay-a")

    with pytest.raises(InvalidState, match="already has the 3mo tier"):
        await env.stack.payments.confirm_session(second.id, payment_method="pm_card_visa",
                                                 shared_payment_token=None, idempotency_key="pay-b")

    pi = await env.stripe("get", f"/v1/payment_intents/{second.payment_intent}")
    assert pi["status"] == "requires_payment_method" and pi["amount_received"] == 0


async def test_a_credited_start_retried_after_the_customer_subscribed_otherwise_does_not_subscribe_twice(
        env: Env) -> None:
    env.sandbox.faults.inject(status=400, count=1, path_prefix="/v1/subscriptions")
    paid = await env.buy()  # left failed after its credit
    # meanwhile the customer subscribes to 6mo by checkout, and its webhook is applied
    price, _ = await env.stack.subscriptions.prices_for(env.stack.pricing.tier("6mo"))
    sub = await env.stripe("post", "/v1/subscriptions", {
        "customer": env.customer, "items": [{"price": price}], "collection_method": "send_invoice",
        "days_until_due": 30, "metadata": {"aims_tier": "6mo"}})
    await env.stack.store.write(lambda conn: env.stack.subscriptions.apply_event(conn, {
        "id": "evt_checkout", "type": "customer.subscription.created", "created": sub["created"],
        "data": {"object": sub}}))
    env.stack.subscriptions.forget(env.customer)

    [row] = await env.stack.prepaid.retry(include_failed=True)

    assert row["status"] == "refused" and "already has the 6mo tier" in row["last_error"]
    assert "stays on the customer's Stripe balance" in row["last_error"]
    assert len(await env.subscriptions()) == 1
    view = await env.stack.payments.get_session(paid.id)
    assert view.fulfilment is not None and view.fulfilment["status"] == "refused"


async def test_a_lost_credit_answer_retried_after_stripe_forgot_the_key_finds_the_credit(env: Env) -> None:
    path = f"/v1/customers/{env.customer}/balance_transactions"
    env.sandbox.faults.inject(status=500, count=3, mode="after", path_prefix=path)  # applied, answers lost
    paid = await env.buy()
    assert paid.fulfilment["status"] == "claimed"
    env.sandbox.expire_idempotency_keys()  # the retry comes after Stripe's 24 hours

    await env.stack.prepaid.drain()

    row = env.stack.prepaid.find(prepaid_id(paid.id))
    assert row is not None and row["status"] == "started"
    assert adjustments(await env.balance_transactions()) == 1
    assert len(await env.subscriptions()) == 1


async def test_a_lost_subscription_answer_retried_after_stripe_forgot_the_key_finds_the_subscription(
        env: Env) -> None:
    env.sandbox.faults.inject(status=500, count=3, mode="after", path_prefix="/v1/subscriptions")
    paid = await env.buy()
    assert paid.fulfilment["status"] == "credited"
    env.sandbox.expire_idempotency_keys()

    await env.stack.prepaid.drain()

    assert env.stack.prepaid.find(prepaid_id(paid.id))["status"] == "started"  # type: ignore[index]
    assert len(await env.subscriptions()) == 1


async def test_a_late_start_still_delivers_the_whole_commitment(env: Env) -> None:
    env.sandbox.faults.inject(status=400, count=1, path_prefix="/v1/subscriptions")
    await env.buy("tier_9mo")  # left failed after its credit
    env.sandbox.advance(days=10)  # the operator fixes it ten days later (our clock agrees with Stripe's, as live)
    worker = PrepaidSubscriptions(env.stack.store, env.stack.gateway, env.stack.subscriptions, env.stack.pricing,
                                  fulfilment=env.stack.fulfilment, clock=env.sandbox.now)

    [row] = await worker.retry(include_failed=True)

    [sub] = await env.subscriptions()
    assert row["status"] == "started" and sub["start_date"] >= env.sandbox.now() - 5
    assert sub["cancel_at"] == add_months(sub["start_date"], 12) == row["ends_at"]
    assert sub["trial_end"] == add_months(sub["start_date"], 3)  # 3 free months, then 9 billed up to the end


async def test_two_workers_retrying_a_credited_row_at_once_create_one_subscription(env: Env) -> None:
    session = await env.paid_not_started()
    row_id = prepaid_id(session.id)
    env.sandbox.faults.inject(status=503, count=3, path_prefix="/v1/subscriptions")
    left = await env.stack.prepaid.start(row_id)  # one attempt: credited, then Stripe down
    assert (left["status"], left["attempts"]) == ("credited", 1)
    other = PrepaidSubscriptions(env.stack.store, env.stack.gateway, env.stack.subscriptions, env.stack.pricing,
                                 fulfilment=env.stack.fulfilment,
                                 clock=lambda: time.time() + 1)  # another process, its clock a second ahead

    async with anyio.create_task_group() as tg:
        tg.start_soon(env.stack.prepaid.start, row_id)
        tg.start_soon(other.start, row_id)

    assert env.stack.prepaid.find(row_id)["status"] == "started"  # type: ignore[index]
    assert len(await env.subscriptions()) == 1


class Stalled:
    """A gateway in front of the real one that holds chosen requests until told, to order two workers' steps."""

    def __init__(self, inner: Any, hold: Callable[[Any], Any]) -> None:
        self.inner, self.hold = inner, hold

    async def send(self, request: Any) -> Any:
        await self.hold(request)
        return await self.inner.send(request)


async def test_two_workers_re_leasing_a_day_old_credited_row_send_one_creation_request(env: Env) -> None:
    session = await env.paid_not_started()
    row_id = prepaid_id(session.id)
    env.sandbox.faults.inject(status=400, count=1, path_prefix="/v1/subscriptions")
    assert (await env.stack.prepaid.start(row_id))["status"] == "failed"  # credited, then refused
    two_days_ago = time.time() - 2 * 86400  # and left so: its creation request's key is long forgotten
    await env.stack.store.write(lambda conn: conn.execute(
        "UPDATE prepaid_subscriptions SET status = 'credited', starts_at = ?, updated_at = ? WHERE id = ?",
        (int(two_days_ago), utc_iso(two_days_ago), row_id)))
    a_sent, b_done = anyio.Event(), anyio.Event()

    async def hold_a(request: Any) -> None:  # A leases and sends its creation, then waits for B to finish
        if (request.method, request.path) == ("post", "/v1/subscriptions"):
            a_sent.set()
            await b_done.wait()

    async def hold_b(request: Any) -> None:  # B looks for an earlier subscription only once A has sent
        if (request.method, request.path) == ("get", "/v1/subscriptions"):
            await a_sent.wait()

    stack = env.stack
    a = PrepaidSubscriptions(stack.store, Stalled(stack.gateway, hold_a), stack.subscriptions,  # type: ignore[arg-type]
                             stack.pricing, fulfilment=stack.fulfilment)
    b = PrepaidSubscriptions(stack.store, Stalled(stack.gateway, hold_b), stack.subscriptions,  # type: ignore[arg-type]
                             stack.pricing, fulfilment=stack.fulfilment, clock=lambda: time.time() + 5)

    async def run_b() -> None:
        try:
            await b.start(row_id)
        finally:
            b_done.set()

    async def run_a() -> None:
        try:
            await a.start(row_id)
        finally:
            a_sent.set()  # A sent, or left the row to B, whose lease it could not take

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_b)
        tg.start_soon(run_a)

    assert len(await env.subscriptions()) == 1


async def test_an_outage_while_ending_the_subscription_is_outlasted_never_left_without_an_end(env: Env) -> None:
    env.sandbox.faults.inject(status=503, count=3 * 7, path_prefix="/v1/subscriptions/")  # read and update of it

    paid = await env.buy()
    assert paid.fulfilment["status"] == "subscribed"
    await env.stack.prepaid.drain()

    [sub] = await env.subscriptions()
    row = env.stack.prepaid.find(prepaid_id(paid.id))
    assert row is not None and row["status"] == "started" and sub["cancel_at"] == row["ends_at"]


async def test_a_slow_worker_cannot_rewind_a_started_subscription(env: Env) -> None:
    session = await env.paid_not_started()
    row_id = prepaid_id(session.id)
    stale = env.stack.prepaid.find(row_id)  # another worker read it pending ...
    assert stale is not None
    told: list[str] = []
    told_of = Fulfilment()
    told_of.register("payment_session", Seller(on_subscription=lambda _conn, row: told.append(row["status"])))  # type: ignore[func-returns-value]
    other = PrepaidSubscriptions(env.stack.store, env.stack.gateway, env.stack.subscriptions, env.stack.pricing,
                                 fulfilment=told_of)
    await env.stack.prepaid.start(row_id)  # ... while this one started it

    after = await other._start(stale, "its-own-token")  # the other one goes on from what it read

    assert after["status"] == "started" and told == []
    assert len(await env.subscriptions()) == 1 and adjustments(await env.balance_transactions()) == 1


async def test_concurrent_starts_from_two_workers_start_one_subscription(env: Env) -> None:
    session = await env.paid_not_started()
    row_id = prepaid_id(session.id)
    assert env.stack.prepaid.find(row_id)["status"] == "pending"  # type: ignore[index]
    # a second worker (another process: its own locks) over the same store and Stripe account
    other = PrepaidSubscriptions(env.stack.store, env.stack.gateway, env.stack.subscriptions, env.stack.pricing,
                                 fulfilment=env.stack.fulfilment)

    async with anyio.create_task_group() as tg:
        for worker in (env.stack.prepaid, other, env.stack.prepaid, other):
            tg.start_soon(worker.start, row_id)

    assert env.stack.prepaid.find(row_id)["status"] == "started"  # type: ignore[index]
    assert len(await env.subscriptions()) == 1
    assert [t["type"] for t in await env.balance_transactions()].count("adjustment") == 1


async def test_a_lost_answer_from_stripe_is_retried_with_the_same_key_and_creates_nothing_twice(env: Env) -> None:
    env.sandbox.faults.inject(status=500, count=1, mode="after", path_prefix="/v1/subscriptions")

    paid = await env.buy()

    assert paid.fulfilment["status"] == "started"
    assert len(await env.subscriptions()) == 1


async def test_after_the_credit_an_outage_is_outlasted_not_given_up(env: Env) -> None:
    env.sandbox.faults.inject(status=503, count=3 * 7, path_prefix="/v1/subscriptions")  # 7 attempts, each retried

    paid = await env.buy()
    await env.stack.prepaid.drain()

    row = env.stack.prepaid.find(prepaid_id(paid.id))
    assert row is not None and row["status"] == "started" and row["attempts"] == 7
    assert len(await env.subscriptions()) == 1 and adjustments(await env.balance_transactions()) == 1


@pytest.mark.parametrize("mode", ["before", "after"])  # after: Stripe made the credit and the answers were lost
async def test_an_outage_at_the_credit_is_outlasted_and_credits_once(env: Env, mode: str) -> None:
    path = f"/v1/customers/{env.customer}/balance_transactions"
    env.sandbox.faults.inject(status=503, count=3 * 7, mode=mode, path_prefix=path)  # type: ignore[arg-type]

    paid = await env.buy()
    await env.stack.prepaid.drain()

    row = env.stack.prepaid.find(prepaid_id(paid.id))
    assert row is not None and row["status"] == "started" and row["attempts"] >= 5
    assert adjustments(await env.balance_transactions()) == 1


async def test_a_refused_subscription_after_the_credit_fails_then_an_operator_retry_resumes_without_crediting_again(
        env: Env) -> None:
    env.sandbox.faults.inject(status=400, count=1, path_prefix="/v1/subscriptions")  # not retryable

    paid = await env.buy()
    failed = env.stack.prepaid.find(prepaid_id(paid.id))
    assert failed is not None and failed["status"] == "failed" and failed["balance_transaction_id"]
    view = await env.stack.payments.get_session(paid.id)
    assert view.fulfilment is not None and view.fulfilment["status"] == "failed"

    [done] = await env.stack.prepaid.retry(include_failed=True)

    assert done["status"] == "started" and len(await env.subscriptions()) == 1
    assert adjustments(await env.balance_transactions()) == 1
    view = await env.stack.payments.get_session(paid.id)
    assert view.fulfilment is not None and view.fulfilment["subscription"] == done["subscription_id"]


async def test_a_customer_with_a_tier_cannot_buy_another(env: Env) -> None:
    await env.buy("tier_3mo")

    with pytest.raises(InvalidState, match="already has the 3mo tier") as refused:
        await env.buy("tier_6mo", key="second")
    assert refused.value.param == "item"


async def test_a_second_purchase_paid_before_the_first_started_is_refused_at_purchase(env: Env) -> None:
    await env.paid_not_started()

    with pytest.raises(InvalidState, match="already has the 3mo tier"):
        await env.buy("tier_9mo", key="second")


@pytest.mark.parametrize(("arguments", "error", "param"), [
    ({"agent_id": None, "customer": None}, InvalidInput, "customer"),
    ({"agent_id": None, "customer": "cus_doesnotexist"}, NotFound, "customer"),
])
async def test_a_tier_needs_a_customer_stripe_knows(env: Env, arguments: dict[str, Any], error: type[Exception],
                                                    param: str) -> None:
    with pytest.raises(error) as refused:
        await env.stack.payments.create_session(item="tier_3mo", amount=None, currency=None, description=None,
                                                idempotency_key="k", dry_run=False, **arguments)
    assert getattr(refused.value, "param", None) == param


async def test_a_wallet_of_an_unknown_customer_cannot_buy_a_tier(env: Env) -> None:
    await env.stack.ledger.create_wallet("ghost-agent", "cus_ghost", None, "open-ghost")

    with pytest.raises(NotFound, match="Stripe has no customer cus_ghost") as refused:
        await env.stack.payments.create_session(customer=None, agent_id="ghost-agent", item="tier_3mo", amount=None,
                                                currency=None, description=None, idempotency_key="k", dry_run=False)
    assert refused.value.param == "agent_id"


async def test_without_tier_prices_a_tier_is_refused_before_anything_is_charged(
        make_settings: Callable[..., Settings], sandbox_app: Any, store: Store) -> None:
    async with commerce_stack(make_settings(), sandbox_app, store) as stack:  # setup-stripe never ran
        customer = (await stack.gateway.send(StripeRequest("post", "/v1/customers", {}))).data["id"]
        await stack.ledger.create_wallet("subscriber", customer, None, "open")

        with pytest.raises(ConfigurationError, match="setup-stripe"):
            await stack.payments.create_session(customer=None, agent_id="subscriber", item="tier_6mo", amount=None,
                                                currency=None, description=None, idempotency_key="k", dry_run=False)

        assert store.query_one("SELECT COUNT(*) AS n FROM payment_sessions") == {"n": 0}


async def test_prices_gone_after_the_payment_fail_the_start_before_any_credit(env: Env) -> None:
    session = await env.buy(pay=False)
    price, _ = await env.stack.subscriptions.prices_for(env.stack.pricing.tier("3mo"))
    await env.stripe("post", f"/v1/prices/{price}", {"active": False})  # archived between create and pay

    paid = await env.stack.payments.confirm_session(session.id, payment_method="pm_card_visa",
                                                    shared_payment_token=None, idempotency_key="pay")

    assert paid.fulfilment is not None and paid.fulfilment["status"] == "failed"
    assert "setup-stripe" in paid.fulfilment["last_error"]
    row = env.stack.prepaid.find(prepaid_id(paid.id))
    assert row is not None and row["balance_transaction_id"] is None  # nothing was credited


@pytest.mark.parametrize(("changes", "message"), [
    ({"unit_price": 100}, "prepaid costs 10794"),
    ({"tier": "p2p"}, "not a paid tier"),
    ({"tier": None}, "needs a tier"),
    ({"luc": 5}, "no luc"),
])
def test_the_pricing_file_refuses_a_tier_item_priced_or_named_wrong(tmp_path: Any, changes: dict[str, Any],
                                                                     message: str) -> None:
    from importlib import resources

    from aims_billing_mcp.services.tiers import Pricing

    text = (resources.files("aims_billing_mcp") / "pricing.toml").read_text("utf-8")
    item = {"title": "'6-month'", "fulfil": "'subscribe'", "tier": "'6mo'", **{
        k: ("'" + v + "'" if isinstance(v, str) else v) for k, v in changes.items() if v is not None}}
    if changes.get("tier", "x") is None:
        item.pop("tier")
    body = "\n".join(f"{k} = {v}" for k, v in item.items())
    path = tmp_path / "pricing.toml"
    path.write_text(text + f"\n[items.tier_extra]\n{body}\n", "utf-8")

    with pytest.raises(ValueError, match=message):
        Pricing.load(path)


async def test_the_commitment_runs_on_stripes_clock_when_it_is_ahead_of_ours(env: Env) -> None:
    env.sandbox.advance(days=40)  # the sandbox's clock is now 40 days ahead of the wall clock

    paid = await env.buy("tier_3mo")

    assert paid.fulfilment["status"] == "started"
    [sub] = await env.subscriptions()
    assert sub["start_date"] >= env.sandbox.now() - 5 and sub["cancel_at"] == add_months(sub["start_date"], 3)


async def test_a_refused_tier_is_refunded_in_full_with_nothing_left_credited(env: Env) -> None:
    sessions = [await env.buy(item, key=item, pay=False) for item in ("tier_3mo", "tier_6mo")]
    for session in sessions:
        await env.record_paid(session)
    for session in sessions:
        await env.stack.prepaid.start(prepaid_id(session.id))
    [refused] = [s for s in sessions if env.stack.prepaid.find(prepaid_id(s.id))["status"] == "refused"]  # type: ignore[index]

    done = await env.stack.prepaid.refund(prepaid_id(refused.id))
    again = await env.stack.prepaid.refund(prepaid_id(refused.id))  # an operator running it twice

    assert done["status"] == "refunded" and again["refund_id"] == done["refund_id"]
    refunds = (await env.stripe("get", "/v1/refunds", {"payment_intent": refused.payment_intent}))["data"]
    assert [(r["amount"], r["status"]) for r in refunds] == [(refused.amount, "succeeded")]
    view = await env.stack.payments.get_session(refused.id)
    assert view.fulfilment is not None and view.fulfilment["status"] == "refunded"
    assert view.fulfilment["refund"] == done["refund_id"]


async def test_a_tier_failed_after_its_credit_is_refunded_with_the_credit_reversed(env: Env) -> None:
    env.sandbox.faults.inject(status=400, count=1, path_prefix="/v1/subscriptions")
    paid = await env.buy()  # credited, then the subscription refused
    row_id = prepaid_id(paid.id)
    assert env.stack.prepaid.find(row_id)["status"] == "failed"  # type: ignore[index]

    done = await env.stack.prepaid.refund(row_id)

    assert done["status"] == "refunded"
    assert (await env.stripe("get", f"/v1/customers/{env.customer}"))["balance"] == 0  # credit, then its reversal
    pi = await env.stripe("get", f"/v1/payment_intents/{paid.payment_intent}")
    refunds = (await env.stripe("get", "/v1/refunds", {"payment_intent": pi["id"]}))["data"]
    assert sum(r["amount"] for r in refunds) == paid.amount
    assert env.stack.prepaid.live_tier(env.customer) is None


@pytest.mark.parametrize("state", ["started", "unknown"])
async def test_only_a_refused_or_failed_tier_is_refunded(env: Env, state: str) -> None:
    paid = await env.buy()
    row_id = prepaid_id(paid.id) if state == "started" else "pre_ps_nothing"

    with pytest.raises((InvalidState, NotFound)) as refused:
        await env.stack.prepaid.refund(row_id)

    assert refused.value.param == "prepaid_id"  # type: ignore[union-attr]
    assert (await env.stripe("get", "/v1/refunds", {}))["data"] == []


async def test_a_tier_being_refunded_cannot_be_started_by_a_retry(env: Env) -> None:
    env.sandbox.faults.inject(status=400, count=1, path_prefix="/v1/subscriptions")
    paid = await env.buy()
    row_id = prepaid_id(paid.id)
    await env.stack.store.write(lambda conn: conn.execute(  # an operator's refund claimed it, then was interrupted
        "UPDATE prepaid_subscriptions SET status = 'refunding' WHERE id = ?", (row_id,)))

    assert await env.stack.prepaid.retry(include_failed=True, only=[row_id]) == []
    done = await env.stack.prepaid.refund(row_id)  # running the refund again finishes it

    assert done["status"] == "refunded" and await env.subscriptions() == []
    assert (await env.stripe("get", f"/v1/customers/{env.customer}"))["balance"] == 0


async def test_a_credit_whose_answer_was_lost_is_found_and_reversed_when_refunding(env: Env) -> None:
    paid = await env.paid_not_started()
    row_id = prepaid_id(paid.id)
    path = f"/v1/customers/{env.customer}/balance_transactions"
    env.sandbox.faults.inject(status=500, count=3, mode="after", path_prefix=path)  # credit made, answers lost
    assert (await env.stack.prepaid.start(row_id))["status"] == "claimed"
    await env.stack.store.write(lambda conn: conn.execute(  # then it failed for good before recording the credit
        "UPDATE prepaid_subscriptions SET status = 'failed' WHERE id = ?", (row_id,)))
    assert env.stack.prepaid.find(row_id)["balance_transaction_id"] is None  # type: ignore[index]

    done = await env.stack.prepaid.refund(row_id)

    assert (done["status"], done["refunded_amount"]) == ("refunded", paid.amount)
    assert (await env.stripe("get", f"/v1/customers/{env.customer}"))["balance"] == 0


async def test_a_credit_partly_used_by_other_invoices_is_reversed_and_refunded_for_what_is_left(env: Env) -> None:
    env.sandbox.faults.inject(status=400, count=1, path_prefix="/v1/subscriptions")
    paid = await env.buy()  # credited 5997, then the subscription refused
    await env.stripe("post", "/v1/invoiceitems", {"customer": env.customer, "amount": 2000, "currency": "usd",
                                                  "description": "another purchase"})
    invoice = await env.stripe("post", "/v1/invoices", {"customer": env.customer})
    await env.stripe("post", f"/v1/invoices/{invoice['id']}/finalize")  # draws 2000 from the credit

    done = await env.stack.prepaid.refund(prepaid_id(paid.id))

    assert (done["status"], done["refunded_amount"]) == ("refunded", paid.amount - 2000)
    assert (await env.stripe("get", f"/v1/customers/{env.customer}"))["balance"] == 0  # owes nothing, holds nothing
    refunds = (await env.stripe("get", "/v1/refunds", {"payment_intent": paid.payment_intent}))["data"]
    assert [r["amount"] for r in refunds] == [paid.amount - 2000]


async def test_a_refund_stripe_fails_leaves_the_tier_refunding_for_a_later_run(env: Env) -> None:
    env.sandbox.faults.inject(status=400, count=1, path_prefix="/v1/subscriptions")
    session = await env.buy(pay=False)
    await env.stack.payments.confirm_session(session.id, payment_method="pm_card_refundFail",
                                             shared_payment_token=None, idempotency_key="pay-refund-fail")
    row_id = prepaid_id(session.id)

    first = await env.stack.prepaid.refund(row_id)
    second = await env.stack.prepaid.refund(row_id)

    assert (first["status"], second["status"]) == ("refunding", "refunding")
    assert "failed (declined)" in second["last_error"] and second["refunded_amount"] is None
    refunds = (await env.stripe("get", "/v1/refunds", {"payment_intent": session.payment_intent}))["data"]
    assert [r["status"] for r in refunds] == ["failed", "failed"]  # each run tried anew
    view = await env.stack.payments.get_session(session.id)
    assert view.fulfilment is not None and view.fulfilment["status"] == "failed"  # not told refunded


async def test_a_failed_tier_holding_a_subscription_is_refunded_once_that_subscription_is_canceled(env: Env) -> None:
    env.sandbox.faults.inject(status=400, count=1, path_prefix="/v1/subscriptions/")  # refused after creating it
    paid = await env.buy()
    row_id = prepaid_id(paid.id)
    row = env.stack.prepaid.find(row_id)
    assert row is not None and row["status"] == "failed" and row["subscription_id"]
    assert env.stack.prepaid.live_tier(env.customer) == "3mo"  # it still holds the customer's tier

    with pytest.raises(InvalidState, match="cancel it first"):
        await env.stack.prepaid.refund(row_id)
    await env.stack.subscriptions.cancel_subscription(customer=None, subscription=row["subscription_id"],
                                                      immediately=True, idempotency_key="end", dry_run=False)
    done = await env.stack.prepaid.refund(row_id)

    assert env.stack.prepaid.live_tier(env.customer) is None
    assert (done["status"], done["refunded_amount"]) == ("refunded", paid.amount - 1999)  # its first month was used
    assert (await env.stripe("get", f"/v1/customers/{env.customer}"))["balance"] == 0


async def test_a_kick_costs_nothing_when_this_process_enqueued_nothing_and_start_up_finds_every_open_row(
        env: Env) -> None:
    session = await env.buy(pay=False)
    pi = await paid_outside(env.stack.gateway, session.payment_intent)
    # another process records the payment: its own services enqueue the subscription to start
    stack = env.stack
    other = build_state(stack.state.settings, store=stack.store, gateway=stack.gateway)  # the other process's graph
    await stack.store.write(lambda tx: other.commerce.apply_payment_intent(tx, pi))
    row_id = prepaid_id(session.id)

    assert stack.prepaid.kick() == []  # nothing enqueued here since the last kick: not even a query
    assert stack.prepaid.resume() == [row_id]  # start-up looks at the table itself
    await stack.prepaid.drain()
    row = stack.prepaid.find(row_id)
    assert row is not None and row.status == "started"


async def test_a_kick_before_another_jobs_commit_loses_nothing_the_next_kick_starts_it(env: Env) -> None:
    session = await env.buy(pay=False)
    pi = await paid_outside(env.stack.gateway, session.payment_intent)
    enqueued, release = threading.Event(), threading.Event()

    def job(tx: Any) -> None:  # records the payment (enqueues its subscription), then holds its COMMIT back
        env.stack.payments.apply_payment_intent(tx, pi)
        enqueued.set()
        release.wait(10)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(env.stack.store.write, job)
            await anyio.to_thread.run_sync(enqueued.wait, 10)
            early = env.stack.prepaid.kick()  # another caller's kick: the row is not committed yet
            release.set()
        later = env.stack.prepaid.kick()  # the recording caller's kick, after its COMMIT
        await env.stack.prepaid.drain()

    assert early == [] and later == [prepaid_id(session.id)]
    row = env.stack.prepaid.find(prepaid_id(session.id))
    assert row is not None and row.status == "started"
    assert env.stack.prepaid.kick() == []  # seen once committed: no longer looked for

