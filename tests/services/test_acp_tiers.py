"""A tier bought over ACP: the order is created `processing` with the tier line unfulfilled, the prepaid
subscription starts in Stripe, and the order becomes `completed` with the line fulfilled, told to the agent
platform as a signed `order_update` after the `order_create`. Every answer and event validates against the
2026-04-17 schemas."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from aims_billing_mcp.services.stripe_setup import setup_stripe
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from aims_billing_mcp.stripe_gateway import StripeRequest
from tests.conftest import Clock, commerce_stack, paid_outside
from tests.services.test_acp import _VALIDATOR, KEY, checked, pay
from tests.services.test_acp_webhooks import SECRET, WEBHOOK_EVENT, Receiver, receiving, until
from tests.support.money_invariant import money_kept  # noqa: F401  (autouse: the money invariant after each test)

pytestmark = pytest.mark.anyio
HEADERS = {"API-Version": "2026-04-17", "Authorization": f"Bearer {KEY}"}


class Seller:
    def __init__(self, http: httpx.AsyncClient, receiver: Receiver, customer: str, store: Store) -> None:
        self.http, self.receiver, self.customer, self.store = http, receiver, customer, store

    async def post(self, path: str, body: Any, key: str, expect: int) -> dict[str, Any]:
        response = await self.http.post(path, json=body, headers={**HEADERS, "Idempotency-Key": key})
        data: dict[str, Any] = checked(response, path, expect).json()
        return data

    async def create(self, items: list[str], agent: str = "subscriber", expect: int = 201) -> dict[str, Any]:
        return await self.post("/acp/checkout_sessions", {"currency": "usd", "line_items": [{"id": i} for i in items],
                                                          "capabilities": {}, "metadata": {"agent_id": agent}},
                               f"create-{agent}-{'-'.join(items)}", expect)


@pytest.fixture
async def stack(make_settings: Callable[..., Settings], sandbox_app: Any, store: Store) -> AsyncIterator[Any]:
    async with commerce_stack(make_settings(), sandbox_app, store) as made:
        yield made


@pytest.fixture
def acp_prepaid(stack: Any) -> Any:
    """The prepaid subscriptions of the seller's stack (an operator's refund goes through them)."""
    return stack.prepaid


@pytest.fixture
async def seller(stack: Any, store: Store) -> AsyncIterator[Seller]:
    async with (receiving() as (url, receiver),
                stack.acp_seller(KEY, clock=Clock(), public_url="https://seller.test", order_webhook_url=url,
                                 order_webhook_secret=SECRET, retry_delay_scale=0.0) as (http, acp)):
        await setup_stripe(stack.gateway, stack.pricing)
        customer = (await stack.gateway.send(StripeRequest("post", "/v1/customers", {}))).data["id"]
        await stack.ledger.create_wallet("subscriber", customer, None, "open-subscriber")
        yield Seller(http, receiver, customer, store)
        assert acp.order_webhooks is not None
        await acp.order_webhooks.drain()


async def test_a_tier_and_a_credit_pack_in_one_checkout_start_the_subscription_and_send_order_update(
        seller: Seller) -> None:
    created = await seller.create(["tier_6mo", "luc_10k"])
    assert created["status"] == "ready_for_payment"
    assert created["totals"][-1]["amount"] == 6 * 1799 + 1000
    categories = {line["item"]["id"]: line["category"] for line in created["line_items"]}
    assert categories == {"tier_6mo": "subscription", "luc_10k": "digital_credits"}

    done = await seller.post(f"/acp/checkout_sessions/{created['id']}/complete", pay("spt_test_visa"), "pay", 200)

    assert done["status"] == "completed" and done["order"]["status"] == "completed"
    lines = {line["product_id"]: (line["status"], line["quantity"]["fulfilled"]) for line in done["order"][
        "line_items"]}
    assert lines == {"tier_6mo": ("fulfilled", 1), "luc_10k": ("fulfilled", 1)}
    assert any("6mo tier subscription sub_" in m["content"] for m in done["messages"])
    await until(lambda: len(seller.receiver.requests) == 2)
    events = sorted((json.loads(body) for _, body in seller.receiver.requests), key=lambda e: e["type"])
    for event in events:
        _VALIDATOR(WEBHOOK_EVENT, format_checker=_VALIDATOR.FORMAT_CHECKER).validate(event)
    assert [(e["type"], e["data"]["status"]) for e in events] == [("order_create", "processing"),
                                                                 ("order_update", "completed")]
    created_lines = {line["product_id"]: line["status"] for line in events[0]["data"]["line_items"]}
    assert created_lines == {"tier_6mo": "processing", "luc_10k": "fulfilled"}
    assert events[1]["data"] == {**done["order"], "type": "order"}
    provision = seller.store.query_one("SELECT tier, status FROM billing_provisions WHERE customer_id = ?",
                                       (seller.customer,))
    assert provision == {"tier": "6mo", "status": "active"}


async def test_two_tiers_in_one_checkout_are_refused(seller: Seller) -> None:
    error = await seller.create(["tier_3mo", "tier_6mo"], expect=400)

    assert (error["code"], error["param"]) == ("quantity_exceeded", "$.line_items[1].id")


async def test_the_same_tier_twice_is_refused(seller: Seller) -> None:
    error = await seller.create(["tier_3mo", "tier_3mo"], expect=400)

    assert error["code"] == "quantity_exceeded" and "one tier subscription per checkout" in error["message"]


async def test_a_customer_who_has_a_tier_gets_a_session_not_ready_for_payment(seller: Seller) -> None:
    first = await seller.create(["tier_3mo"])
    await seller.post(f"/acp/checkout_sessions/{first['id']}/complete", pay("spt_test_visa"), "pay-1", 200)

    second = await seller.create(["tier_9mo"])

    assert second["status"] == "not_ready_for_payment"
    [problem] = second["messages"]
    assert problem["param"] == "$.line_items[0]" and "already has the 3mo tier" in problem["content"]
    refused = await seller.post(f"/acp/checkout_sessions/{second['id']}/complete", pay("spt_test_visa"), "pay-2",
                                400)
    assert refused["code"] == "not_ready_for_payment"


async def test_an_agent_of_a_customer_stripe_does_not_know_cannot_pay_for_a_tier(
        seller: Seller, make_settings: Callable[..., Settings]) -> None:
    # a wallet opened for a customer id Stripe never issued: refused before any charge
    from aims_billing_mcp.services.ledger import LedgerService

    await LedgerService(seller.store, luc_per_usd=1000, agent_limit=lambda _c: None).create_wallet(
        "ghost", "cus_ghost", None, "open-ghost")
    created = await seller.create(["tier_3mo"], agent="ghost")

    refused = await seller.post(f"/acp/checkout_sessions/{created['id']}/complete", pay("spt_test_visa"), "pay", 400)

    assert refused["code"] == "not_ready_for_payment" and "cus_ghost" in refused["message"]
    assert seller.store.query_one("SELECT COUNT(*) AS n FROM payment_sessions") == {"n": 0}


async def test_a_payment_stripe_took_but_we_never_recorded_completes_the_order_even_after_expiry(
        make_settings: Callable[..., Settings], sandbox_app: Any, store: Store) -> None:
    clock = Clock()
    async with (commerce_stack(make_settings(), sandbox_app, store) as stack,
                stack.acp_seller(KEY, clock=clock, public_url="https://seller.test") as (http, _acp)):
        await setup_stripe(stack.gateway, stack.pricing)
        customer = (await stack.gateway.send(StripeRequest("post", "/v1/customers", {}))).data["id"]
        await stack.ledger.create_wallet("subscriber", customer, None, "open-subscriber")
        seller = Seller(http, Receiver(fail=False), customer, store)
        created = await seller.create(["tier_3mo"])
        declined = await seller.post(f"/acp/checkout_sessions/{created['id']}/complete", pay("spt_test_declined"),
                                     "pay-1", 200)
        assert declined["status"] == "ready_for_payment"
        # the buyer's second attempt reaches Stripe and succeeds, and our process dies before recording it
        pi = store.query_one("SELECT payment_intent_id FROM payment_sessions")
        assert pi is not None
        await paid_outside(stack.gateway, pi["payment_intent_id"])
        clock.advance(25 * 3600)  # past the session's 24-hour expiry

        got = checked(await http.get(f"/acp/checkout_sessions/{created['id']}", headers=HEADERS),
                      "/acp/checkout_sessions", 200).json()

        assert got["status"] == "completed" and got["order"]["status"] == "completed"
        started = store.query_one("SELECT status FROM prepaid_subscriptions")
        assert started == {"status": "started"}


async def test_stripe_down_while_checking_the_subscriber_is_a_502_to_retry(seller: Seller, sandbox: Any) -> None:
    created = await seller.create(["tier_3mo"])
    sandbox.faults.inject(status=503, count=1000, path_prefix=f"/v1/customers/{seller.customer}")

    error = await seller.post(f"/acp/checkout_sessions/{created['id']}/complete", pay("spt_test_visa"), "pay", 502)

    assert (error["type"], error["code"]) == ("processing_error", "payment_provider_error")
    sandbox.faults.clear()
    done = await seller.post(f"/acp/checkout_sessions/{created['id']}/complete", pay("spt_test_visa"), "pay", 200)
    assert done["status"] == "completed"  # the 502 was not stored: the same key pays


async def test_a_refused_credit_keeps_the_payment_and_puts_the_order_in_manual_review(seller: Seller) -> None:
    created = await seller.create(["luc_10k"])
    # the wallet is at the ledger's ceiling: the credit will be refused (the ledger's own limit, 10^18)
    await seller.store.write(lambda conn: conn.execute(
        "UPDATE agent_wallets SET balance = ? WHERE agent_id = 'subscriber'", (10**18 - 5,)))

    done = await seller.post(f"/acp/checkout_sessions/{created['id']}/complete", pay("spt_test_visa"), "pay", 200)

    assert done["status"] == "completed" and done["order"]["status"] == "manual_review"
    [line] = done["order"]["line_items"]
    assert (line["status"], line["quantity"]["fulfilled"]) == ("processing", 0)
    assert "refused" in done["messages"][-1]["content"]
    assert seller.store.query_one("SELECT status FROM payment_sessions") == {"status": "succeeded"}


async def test_a_customer_without_an_agent_wallet_buys_a_tier_by_buyer_customer_id(seller: Seller) -> None:
    buyer = {"email": "owner@example.com", "customer_id": seller.customer}
    created = await seller.post("/acp/checkout_sessions", {
        "currency": "usd", "line_items": [{"id": "tier_3mo"}], "capabilities": {}, "buyer": buyer}, "c-buyer", 201)
    assert created["status"] == "ready_for_payment"

    done = await seller.post(f"/acp/checkout_sessions/{created['id']}/complete", pay("spt_test_visa"), "pay", 200)

    assert done["order"]["status"] == "completed"
    assert seller.store.query_one("SELECT customer_id, status FROM prepaid_subscriptions") == {
        "customer_id": seller.customer, "status": "started"}


@pytest.mark.parametrize(("buyer", "param", "words"), [
    (None, "$.buyer.customer_id", "Name the customer tier_3mo subscribes"),
    ({"email": "x@example.com", "customer_id": "cust_123"}, "$.buyer.customer_id", "not a Stripe customer id"),
])
async def test_a_tier_without_a_customer_to_subscribe_is_not_ready(seller: Seller, buyer: dict[str, str] | None,
                                                                   param: str, words: str) -> None:
    body: dict[str, Any] = {"currency": "usd", "line_items": [{"id": "tier_3mo"}], "capabilities": {}}
    if buyer is not None:
        body["buyer"] = buyer

    created = await seller.post("/acp/checkout_sessions", body, f"c-{param}-{words[:5]}", 201)

    assert created["status"] == "not_ready_for_payment"
    [problem] = created["messages"]
    assert problem["param"] == param and words in problem["content"]


async def test_the_buyer_given_at_complete_is_the_one_subscribed(seller: Seller) -> None:
    created = await seller.post("/acp/checkout_sessions", {
        "currency": "usd", "line_items": [{"id": "tier_6mo"}], "capabilities": {},
        "buyer": {"email": "a@example.com", "customer_id": "cus_someoneelse"}}, "c-switch", 201)
    body = {**pay("spt_test_visa"), "buyer": {"email": "owner@example.com", "customer_id": seller.customer}}

    done = await seller.post(f"/acp/checkout_sessions/{created['id']}/complete", body, "pay", 200)

    assert done["order"]["status"] == "completed" and done["buyer"]["customer_id"] == seller.customer
    row = seller.store.query_one("SELECT customer_id FROM prepaid_subscriptions")
    assert row == {"customer_id": seller.customer}


async def test_a_tier_that_cannot_start_goes_to_manual_review_then_a_refund_cancels_the_order(
        seller: Seller, sandbox: Any, acp_prepaid: Any) -> None:
    created = await seller.create(["tier_3mo"])
    sandbox.faults.inject(status=400, count=1, path_prefix="/v1/subscriptions")  # Stripe refuses the subscription

    done = await seller.post(f"/acp/checkout_sessions/{created['id']}/complete", pay("spt_test_visa"), "pay", 200)
    assert done["order"]["status"] == "manual_review"
    refunded = await acp_prepaid.refund(f"pre_{created['id']}")
    got = checked(await seller.http.get(f"/acp/checkout_sessions/{created['id']}", headers=HEADERS),
                  "/acp/checkout_sessions", 200).json()

    assert refunded["status"] == "refunded"
    assert got["order"]["status"] == "canceled"
    [line] = got["order"]["line_items"]
    assert (line["status"], line["quantity"]["current"], line["quantity"]["fulfilled"]) == ("removed", 0, 0)
    assert "was refunded" in got["messages"][-1]["content"]
    [adjustment] = got["order"]["adjustments"]
    assert (adjustment["type"], adjustment["status"], adjustment["amount"], adjustment["id"]) == (
        "refund", "completed", 5997, refunded["refund_id"])
    assert adjustment["line_items"] == [{"id": line["id"], "quantity": 1}]
    assert {"type": "amount_refunded", "display_text": "Refunded", "amount": 5997} in got["order"]["totals"]
    await until(lambda: len(seller.receiver.requests) == 3)
    events = [json.loads(body) for _, body in seller.receiver.requests]
    for event in events:
        _VALIDATOR(WEBHOOK_EVENT, format_checker=_VALIDATOR.FORMAT_CHECKER).validate(event)
    assert sorted((e["type"], e["data"]["status"]) for e in events) == [
        ("order_create", "processing"), ("order_update", "canceled"), ("order_update", "manual_review")]


async def test_a_refunded_tier_beside_refused_credits_keeps_the_order_in_manual_review(
        seller: Seller, sandbox: Any, acp_prepaid: Any) -> None:
    created = await seller.create(["tier_3mo", "luc_10k"])
    await seller.store.write(lambda conn: conn.execute(  # the wallet at the ledger's ceiling: the LUC is refused
        "UPDATE agent_wallets SET balance = ? WHERE agent_id = 'subscriber'", (10**18 - 5,)))
    sandbox.faults.inject(status=400, count=1, path_prefix="/v1/subscriptions")
    await seller.post(f"/acp/checkout_sessions/{created['id']}/complete", pay("spt_test_visa"), "pay", 200)

    await acp_prepaid.refund(f"pre_{created['id']}")

    got = checked(await seller.http.get(f"/acp/checkout_sessions/{created['id']}", headers=HEADERS),
                  "/acp/checkout_sessions", 200).json()
    assert got["order"]["status"] == "manual_review"  # the LUC paid for is neither credited nor refunded yet
    statuses = {line["product_id"]: line["status"] for line in got["order"]["line_items"]}
    assert statuses == {"tier_3mo": "removed", "luc_10k": "processing"}
