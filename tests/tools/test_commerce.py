"""Payment sessions through the MCP tools: an agent buys a LUC pack, paid with a card or a Shared Payment Token;
the pack is delivered once whether success is seen by confirming, by polling, or by the signed webhook."""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client

from aims_billing_mcp.app import BillingServer, build_server
from aims_billing_mcp.sandbox import Sandbox
from tests.conftest import error_of, ok, paid_outside
from tests.support.money_invariant import money_kept  # noqa: F401  (autouse: the money invariant after each test)
from tests.tools.test_wallets import give_tier, wallet

pytestmark = pytest.mark.anyio


async def start(client: Client, server: BillingServer, item: str = "luc_10k") -> str:
    await give_tier(server, "cus_team", "3mo")
    await wallet(client, "shopper")
    created = ok(await client.call_tool("create_payment_session", {"item": item, "agent_id": "shopper",
                                                                   "idempotency_key": f"buy-{item}"}))
    return created["session"]["id"]  # type: ignore[no-any-return]


async def balance(client: Client) -> int:
    return ok(await client.call_tool("get_agent_wallet", {"agent_id": "shopper"}))["balance"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "payment", [{"payment_method": "pm_card_visa"}, {"shared_payment_token": "spt_test_granted_0001"}]
)
async def test_a_paid_pack_is_delivered_once_by_confirm_poll_and_webhook(
    server: BillingServer, sandbox: Sandbox, payment: dict[str, str]
) -> None:
    async with Client(server) as client:
        session = await start(client, server)
        paid = ok(await client.call_tool("confirm_payment_session", {"session_id": session, "idempotency_key": "pay",
                                                                     **payment}))
        assert sandbox.webhooks.drain(timeout=10)  # payment_intent.succeeded reaches the endpoint too
        polled = ok(await client.call_tool("get_payment_session", {"session_id": session}))
        after = await balance(client)
    assert (paid["status"], paid["fulfilled"], paid["amount"], paid["amount_received"]) == ("succeeded", True, 1000,
                                                                                            1000)
    assert polled["fulfilled"] is True
    assert after == 10_000


async def test_a_declined_card_leaves_a_clear_status_and_delivers_nothing(server: BillingServer) -> None:
    async with Client(server) as client:
        session = await start(client, server)
        err = error_of(await client.call_tool("confirm_payment_session", {
            "session_id": session, "payment_method": "pm_card_chargeDeclined", "idempotency_key": "try-1"}))
        polled = ok(await client.call_tool("get_payment_session", {"session_id": session}))
        after = await balance(client)
    assert err["code"] == "card_declined"
    assert polled["status"] == "requires_payment_method" and polled["last_error"] and not polled["fulfilled"]
    assert after == 0


async def test_an_open_session_can_be_cancelled_and_then_not_paid(server: BillingServer) -> None:
    async with Client(server) as client:
        session = await start(client, server, "luc_50k")
        cancelled = ok(await client.call_tool("cancel_payment_session", {"session_id": session,
                                                                         "idempotency_key": "stop"}))
        refused = error_of(await client.call_tool("confirm_payment_session", {
            "session_id": session, "payment_method": "pm_card_visa", "idempotency_key": "late"}))
    assert cancelled["status"] == "canceled"
    assert refused["code"] in ("invalid_state", "stripe_invalid_request")


async def test_an_unknown_item_lists_the_valid_ones(server: BillingServer) -> None:
    async with Client(server) as client:
        err = error_of(await client.call_tool("create_payment_session", {"item": "gold_bars", "agent_id": "x"}))
    assert "luc_10k" in err["message"] and "luc_50k" in err["message"]


async def test_a_declined_token_leaves_the_session_payable_and_a_reused_token_is_refused(
    server: BillingServer,
) -> None:
    async with Client(server) as client:
        session = await start(client, server)
        declined = error_of(await client.call_tool("confirm_payment_session", {
            "session_id": session, "shared_payment_token": "spt_test_declined_1", "idempotency_key": "try-1"}))
        paid = ok(await client.call_tool("confirm_payment_session", {
            "session_id": session, "shared_payment_token": "spt_test_good_1", "idempotency_key": "try-2"}))
        other = ok(await client.call_tool("create_payment_session", {"item": "luc_10k", "agent_id": "shopper",
                                                                     "idempotency_key": "buy-again"}))["session"]
        reused = error_of(await client.call_tool("confirm_payment_session", {
            "session_id": other["id"], "shared_payment_token": "spt_test_good_1", "idempotency_key": "try-3"}))
        after = await balance(client)
    assert declined["code"] == "card_declined"
    assert paid["status"] == "succeeded"
    assert reused["stripe_code"] == "shared_payment_granted_token_used"
    assert after == 10_000


async def test_a_tier_paid_outside_our_tools_starts_from_the_signed_webhook(
    server: BillingServer, sandbox: Sandbox
) -> None:
    from aims_billing_mcp.services.stripe_setup import setup_stripe

    async with Client(server) as client:
        state = server.state
        assert state is not None
        await setup_stripe(state.gateway, state.pricing)
        customer = ok(await client.call_tool("create_customer", {"email": "tier@example.com"}))["customer"]["id"]
        created = ok(await client.call_tool("create_payment_session", {"item": "tier_9mo", "customer": customer,
                                                                       "idempotency_key": "tier"}))["session"]
        # the buyer's own client confirms the PaymentIntent (not confirm_payment_session): only the webhook tells us
        await paid_outside(state.gateway, created["payment_intent"])
        assert sandbox.webhooks.drain(timeout=10)
        await state.prepaid.drain()
        status = ok(await client.call_tool("get_billing_status", {"customer": customer}))
        session = ok(await client.call_tool("get_payment_session", {"session_id": created["id"]}))

    assert (status["tier"], status["status"]) == ("9mo", "trialing")  # 9 months billed, the first 3 free
    assert session["fulfilment"]["status"] == "started" and session["fulfilment"]["prepaid"] == 9 * 1499
    assert session["fulfilment"]["subscription"] == status["subscription"]


async def test_a_tier_paid_but_not_started_before_a_restart_starts_when_the_server_comes_back(
    make_settings: Any, sandbox_app: Any, tmp_path: Any
) -> None:
    from aims_billing_mcp.services.prepaid import prepaid_id
    from aims_billing_mcp.services.stripe_setup import setup_stripe
    from aims_billing_mcp.store import Store
    from aims_billing_mcp.stripe_gateway import StripeRequest
    from tests.conftest import commerce_stack, record_paid

    settings = make_settings()
    store = Store(settings.aims_billing_db)
    async with commerce_stack(settings, sandbox_app, store, buyer_wallet=False) as stack:  # the previous run
        await setup_stripe(stack.gateway, stack.pricing)
        customer = (await stack.gateway.send(StripeRequest("post", "/v1/customers", {}))).data["id"]
        created = await stack.payments.create_session(customer=customer, agent_id=None, item="tier_6mo", amount=None,
                                                      currency=None, description=None, idempotency_key="t",
                                                      dry_run=False)
        assert created.session is not None
        await record_paid(store, stack.payments, str(created.session.payment_intent), stack.gateway)  # then it stopped
    store.close()

    server = build_server(settings, sandbox_app=sandbox_app, retry_delay_scale=0.0)
    async with Client(server) as client:  # the next start resumes it
        assert server.state is not None
        await server.state.prepaid.drain()
        status = ok(await client.call_tool("get_billing_status", {"customer": customer}))

    assert (status["tier"], status["status"]) == ("6mo", "active")
    after = Store(settings.aims_billing_db)
    try:
        assert after.query_one("SELECT status FROM prepaid_subscriptions WHERE id = ?",
                               (prepaid_id(created.session.id),)) == {"status": "started"}
    finally:
        after.close()
