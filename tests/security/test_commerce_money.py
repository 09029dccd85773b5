"""Security promises of agent commerce's money paths (issue 12, A-E and item 2 for payment sessions and ACP).

Races are interleaved deterministically: a sandbox fault `gate` holds one request at a chosen point (before Stripe
runs it, or after it ran with its answer held back) until the test lets it go. A "crash" is the task of a call
canceled while its answer is held: Stripe charged, nothing of it was recorded. After every test the money
invariant (tests/support/money_invariant.py) checks each succeeded PaymentIntent was delivered or refunded in full."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from starlette.applications import Starlette

from aims_billing_mcp.acp_http import acp_routes
from aims_billing_mcp.errors import InvalidState, StripeInvalidRequest
from aims_billing_mcp.sandbox import Sandbox
from aims_billing_mcp.services.acp import AcpService
from aims_billing_mcp.services.commerce_models import PaymentSession
from aims_billing_mcp.services.prepaid import PrepaidSubscriptions, prepaid_id
from aims_billing_mcp.services.stripe_setup import setup_stripe
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from aims_billing_mcp.stripe_gateway import StripeRequest
from tests.services.test_acp import checked, pay
from tests.support.money_invariant import money_kept  # noqa: F401  (autouse: the money invariant after each test)

from ..conftest import Clock, CommerceStack, commerce_stack, paid_outside
from ..test_acp_mcp import META, acp_client, body, result, seller  # noqa: F401  (seller: a fixture)

pytestmark = pytest.mark.anyio
KEY, OTHER_KEY = "acp_key_platform_1", "acp_key_platform_2"
HEADERS = {"API-Version": "2026-04-17", "Content-Type": "application/json"}


class Gate:
    """Holds the request it is armed on until `release()`; `reached` is set when the request arrives."""

    def __init__(self) -> None:
        self.reached, self.go = anyio.Event(), anyio.Event()

    async def __call__(self) -> None:
        self.reached.set()
        await self.go.wait()

    def release(self) -> None:
        self.go.set()


def hold(sandbox: Sandbox, path_prefix: str, mode: str = "after") -> Gate:
    gate = Gate()
    sandbox.faults.inject(status=None, path_prefix=path_prefix, mode=mode, gate=gate)  # type: ignore[arg-type]
    return gate


class Seller:
    def __init__(self, stack: CommerceStack, http: httpx.AsyncClient, acp: AcpService, sandbox: Sandbox) -> None:
        self.stack, self.http, self.acp, self.sandbox = stack, http, acp, sandbox
        self.keys = 0
        self.clock = Clock()

    async def post(self, path: str, payload: Any, *, key: str | None = None, token: str = KEY,
                   expect: int | None = None) -> dict[str, Any]:
        self.keys += 1
        headers = {**HEADERS, "Authorization": f"Bearer {token}", "Idempotency-Key": key or f"k-{self.keys}"}
        response = await self.http.post(path, content=json.dumps(payload), headers=headers)
        data: dict[str, Any] = checked(response, path, expect).json()
        data["_status"] = response.status_code
        return data

    async def create(self, items: list[str], agent: str = "buyer", **extra: Any) -> str:
        made = await self.post("/acp/checkout_sessions", {"currency": "usd", "line_items": [{"id": i} for i in items],
                                                          "capabilities": {}, "metadata": {"agent_id": agent},
                                                          **extra}, expect=201)
        return str(made["id"])

    async def complete(self, sid: str, spt: str = "spt_test_visa", **kw: Any) -> dict[str, Any]:
        return await self.post(f"/acp/checkout_sessions/{sid}/complete", pay(spt), **kw)

    async def cancel(self, sid: str, **kw: Any) -> dict[str, Any]:
        return await self.post(f"/acp/checkout_sessions/{sid}/cancel", {}, **kw)

    async def update(self, sid: str, items: list[str], **kw: Any) -> dict[str, Any]:
        return await self.post(f"/acp/checkout_sessions/{sid}", {"line_items": [{"id": i} for i in items]}, **kw)

    async def get(self, sid: str) -> dict[str, Any]:
        response = await self.http.get(f"/acp/checkout_sessions/{sid}",
                                       headers={**HEADERS, "Authorization": f"Bearer {KEY}"})
        data: dict[str, Any] = checked(response, "get", 200).json()
        return data

    async def stripe(self, method: str, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return (await self.stack.gateway.send(StripeRequest(method, path, params or {}))).data

    async def charges(self) -> list[tuple[int, int]]:
        """(amount_received, refunded) of every succeeded PaymentIntent."""
        out = []
        for pi in (await self.stripe("get", "/v1/payment_intents", {"limit": 100}))["data"]:
            if pi["status"] == "succeeded":
                refunds = (await self.stripe("get", "/v1/refunds", {"payment_intent": pi["id"]}))["data"]
                out.append((pi["amount_received"], sum(r["amount"] for r in refunds if r["status"] == "succeeded")))
        return out

    def luc(self, agent: str = "buyer") -> int:
        return self.stack.ledger.get_wallet(agent).balance

    async def canceled_then_paid(self) -> tuple[str, PaymentSession]:
        """The state the old cancel/complete race left: a checkout canceled before its payment was linked, then its
        PaymentIntent paid outside our tools. Its id and payment session; nothing on our side has seen the success."""
        sid = await self.create(["luc_10k"])
        await self.complete(sid, "spt_test_declined", expect=200)  # a payment session and PaymentIntent exist
        row = self.stack.store.query_one("SELECT payment_session_id FROM acp_checkout_sessions WHERE id = ?", (sid,))
        assert row is not None
        await self.stack.store.write(lambda conn: conn.execute(
            "UPDATE acp_checkout_sessions SET status = 'canceled' WHERE id = ?", (sid,)))
        session = await self.stack.payments.get_session(row["payment_session_id"])
        await paid_outside(self.stack.gateway, str(session.payment_intent))
        return sid, session


@pytest.fixture
async def shop(make_settings: Callable[..., Settings], sandbox_app: Any, sandbox: Sandbox,
               store: Store) -> AsyncIterator[Seller]:
    async with commerce_stack(make_settings(), sandbox_app, store) as stack:
        await setup_stripe(stack.gateway, stack.pricing)
        customer = (await stack.gateway.send(StripeRequest("post", "/v1/customers", {"email": "o@example.com"}))
                    ).data["id"]
        await stack.ledger.create_wallet("subscriber", customer, None, "open-subscriber")
        clock = Clock()
        acp = stack.seller({KEY, OTHER_KEY}, clock=clock, public_url="https://seller.test")
        app = Starlette(routes=acp_routes(lambda: SimpleNamespace(acp=acp)))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://seller.test") as http:
            seller = Seller(stack, http, acp, sandbox)
            seller.clock = clock
            yield seller
            await acp.drain()


async def concurrently(first: Callable[[], Awaitable[dict[str, Any]]], gate: Gate,
                       then: Callable[[], Awaitable[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start `first`, wait until it is held at `gate`, run `then`, release the gate, and return both answers."""
    answers: dict[str, dict[str, Any]] = {}

    async def run_first() -> None:
        answers["first"] = await first()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_first)
            await gate.reached.wait()
            answers["then"] = await then()
            gate.release()
    return answers["first"], answers["then"]


# --- A: cancel racing complete ------------------------------------------------------------------------------------


@pytest.mark.parametrize("items", [["luc_10k"], ["tier_3mo"]], ids=["credits", "tier"])
@pytest.mark.parametrize("held", ["/v1/payment_intents", "/v1/payment_intents/pi_"],
                         ids=["creating-the-payment-intent", "charged-answer-held"])
async def test_a_cancel_while_complete_is_charging_is_refused_and_the_charge_is_delivered(
        shop: Seller, items: list[str], held: str) -> None:
    agent = "subscriber" if items == ["tier_3mo"] else "buyer"
    sid = await shop.create(items, agent=agent)
    gate = hold(shop.sandbox, held)  # the first request under `held` runs, its answer held back

    completed, canceled = await concurrently(lambda: shop.complete(sid), gate, lambda: shop.cancel(sid))

    assert canceled["_status"] == 409 and canceled["code"] == "payment_in_progress"
    assert completed["status"] == "completed"
    await shop.stack.prepaid.drain()
    assert (await shop.get(sid))["status"] == "completed"
    [(received, refunded)] = await shop.charges()
    assert refunded == 0 and received == shop.stack.pricing.items[items[0]].unit_price


async def test_a_cancel_before_complete_charges_nothing(shop: Seller) -> None:
    sid = await shop.create(["luc_10k"])
    assert (await shop.cancel(sid, expect=200))["status"] == "canceled"
    refused = await shop.complete(sid, expect=405)
    assert refused["code"] == "session_not_completable" and await shop.charges() == []


async def test_a_payment_that_succeeds_for_a_canceled_checkout_is_refunded_in_full(shop: Seller) -> None:
    """The state the old race left (canceled before the payment was linked, then paid): the money goes back."""
    sid, session = await shop.canceled_then_paid()

    await shop.stack.payments.get_session(session.id)  # the success is seen
    await shop.acp.drain()

    assert await shop.charges() == [(1000, 1000)] and shop.luc() == 0
    assert (await shop.get(sid))["status"] == "canceled"


# --- B: the amount charged is the amount of the cart delivered ------------------------------------------------------


@pytest.mark.parametrize(("then", "luc", "price"), [
    (["luc_50k"] * 100, 5_000_000, 450_000), (["tier_3mo"], 0, 5997)], ids=["credits", "tier"])
async def test_a_cart_changed_after_a_declined_complete_is_charged_its_own_total(
        shop: Seller, then: list[str], luc: int, price: int) -> None:
    agent = "subscriber" if then == ["tier_3mo"] else "buyer"
    sid = await shop.create(["luc_10k"], agent=agent)
    declined = await shop.complete(sid, "spt_test_declined", expect=200)
    assert declined["status"] == "ready_for_payment"

    await shop.update(sid, then, expect=200)
    done = await shop.complete(sid, expect=200)

    assert done["status"] == "completed"
    assert [line["item"]["id"] for line in done["line_items"]] == [then[0]]
    assert await shop.charges() == [(price, 0)] and shop.luc(agent) == luc
    await shop.stack.prepaid.drain()


async def test_an_update_while_complete_is_charging_is_refused_and_the_paid_cart_is_delivered(shop: Seller) -> None:
    sid = await shop.create(["luc_10k"])
    gate = hold(shop.sandbox, "/v1/payment_intents/pi_", mode="before")

    completed, updated = await concurrently(lambda: shop.complete(sid), gate,
                                            lambda: shop.update(sid, ["luc_50k"] * 100))

    assert updated["_status"] == 409 and updated["code"] == "payment_in_progress"
    assert completed["status"] == "completed" and [line["quantity"] for line in completed["line_items"]] == [1]
    assert await shop.charges() == [(1000, 0)] and shop.luc() == 10_000


async def test_a_cart_changed_after_a_decline_over_the_mcp_binding_is_charged_its_own_total(
        seller: tuple[str, Any]) -> None:  # noqa: F811
    base, server = seller
    async with acp_client(base) as client:
        created = await result(client, "create_checkout_session", {"meta": {**META, "idempotency_key": "c1"},
                                                                   "payload": body(["luc_10k"])})
        sid = created["id"]
        declined = await result(client, "complete_checkout_session", {
            "meta": {**META, "idempotency_key": "p1"}, "id": sid, "payload": pay("spt_test_declined")})
        assert declined["status"] == "ready_for_payment"
        await result(client, "update_checkout_session", {"meta": {**META, "idempotency_key": "u1"}, "id": sid,
                                                         "payload": {"line_items": [{"id": "luc_50k"}] * 100}})
        done = await result(client, "complete_checkout_session", {
            "meta": {**META, "idempotency_key": "p2"}, "id": sid, "payload": pay("spt_test_visa")})
    assert done["status"] == "completed" and done["totals"][-1]["amount"] == 450_000
    assert server.state.ledger.get_wallet("buyer").balance == 5_000_000
    pis = (await server.state.gateway.send(StripeRequest("get", "/v1/payment_intents", {"limit": 10}))).data["data"]
    assert sorted((pi["status"], pi["amount"]) for pi in pis) == [("canceled", 1000), ("succeeded", 450_000)]


# --- C: refund-prepaid twice at once ----------------------------------------------------------------------------


async def test_two_refund_runs_at_once_never_record_zero_and_the_record_matches_stripe(shop: Seller) -> None:
    shop.sandbox.faults.inject(status=400, count=1, path_prefix="/v1/subscriptions")  # credited, then refused
    created = await shop.stack.payments.create_session(
        customer=None, agent_id="subscriber", item="tier_3mo", amount=None, currency=None, description=None,
        idempotency_key="tier", dry_run=False)
    assert created.session is not None
    paid = await shop.stack.payments.confirm_session(created.session.id, payment_method="pm_card_visa",
                                                     shared_payment_token=None, idempotency_key="pay")
    row_id = prepaid_id(paid.id)
    assert shop.stack.prepaid.find(row_id)["status"] == "failed"  # type: ignore[index]
    # a second operator process: its own service on the same database
    other = PrepaidSubscriptions(shop.stack.store, shop.stack.gateway, shop.stack.subscriptions, shop.stack.pricing,
                                 fulfilment=shop.stack.fulfilment, retry_delay_scale=0)
    gate = hold(shop.sandbox, "/v1/refunds", mode="before")
    second: dict[str, Any] = {}

    async def run_second() -> dict[str, Any]:
        try:
            second["row"] = await other.refund(row_id)
        except InvalidState as exc:
            second["refused"] = exc.message
        return second

    first, _ = await concurrently(lambda: shop.stack.prepaid.refund(row_id), gate, run_second)

    refunds = (await shop.stripe("get", "/v1/refunds", {"payment_intent": paid.payment_intent}))["data"]
    assert [r["amount"] for r in refunds] == [paid.amount]
    assert "being refunded by another run" in second["refused"]
    assert first["status"] == "refunded" and first["refunded_amount"] == paid.amount
    assert shop.stack.prepaid.find(row_id)["refunded_amount"] == paid.amount  # type: ignore[index]
    assert (await other.refund(row_id))["refunded_amount"] == paid.amount  # a later run: the record stands


# --- D: retries get the first result ------------------------------------------------------------------------------


async def _session(shop: Seller, key: str = "s1") -> str:
    created = await shop.stack.payments.create_session(
        customer=None, agent_id="buyer", item="luc_10k", amount=None, currency=None, description=None,
        idempotency_key=key, dry_run=False)
    assert created.session is not None
    return created.session.id


async def _confirm(shop: Seller, sid: str, key: str, token: str = "spt_test_visa") -> dict[str, Any]:
    done = await shop.stack.payments.confirm_session(sid, payment_method=None, shared_payment_token=token,
                                                     idempotency_key=key)
    return done.model_dump()


async def test_a_confirm_retried_while_the_first_runs_gets_the_first_result(shop: Seller) -> None:
    sid = await _session(shop)
    gate = hold(shop.sandbox, "/v1/payment_intents/pi_")  # charged, the answer held

    async def poll_then_retry() -> dict[str, Any]:
        await shop.stack.payments.get_session(sid)  # the success recorded meanwhile (as a webhook would)
        async with anyio.create_task_group() as tg:  # the retry waits for the first, behind the gate
            retry: dict[str, Any] = {}

            async def go() -> None:
                retry.update(await _confirm(shop, sid, "pay-1"))

            tg.start_soon(go)
            await anyio.sleep(0.05)
            gate.release()
        return retry

    first, retry = await concurrently(lambda: _confirm(shop, sid, "pay-1"), gate, poll_then_retry)

    assert first["status"] == retry["status"] == "succeeded" and first["id"] == retry["id"]
    assert shop.luc() == 10_000 and await shop.charges() == [(1000, 0)]


async def _dies_at(gate: Gate, call: Callable[[], Awaitable[Any]]) -> None:
    """Run `call` until it reaches `gate`, then kill it there (a crash at that point), and open the gate."""
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await gate.reached.wait()
            tg.cancel_scope.cancel()
    gate.release()


async def _crashed_confirm(shop: Seller, sid: str, key: str) -> None:
    """A confirm Stripe charged whose answer never came back: the call dies with nothing recorded."""
    await _dies_at(hold(shop.sandbox, "/v1/payment_intents/pi_"), lambda: _confirm(shop, sid, key))


async def test_a_confirm_retried_after_a_crash_the_webhook_recorded_gets_the_first_result(shop: Seller) -> None:
    sid = await _session(shop)
    await _crashed_confirm(shop, sid, "pay-1")
    await shop.stack.payments.get_session(sid)  # the webhook (or a poll) recorded the success

    retry = await _confirm(shop, sid, "pay-1")

    assert retry["status"] == "succeeded" and retry["fulfilled"] and shop.luc() == 10_000
    with pytest.raises(InvalidState, match="already paid"):  # another request is no retry
        await _confirm(shop, sid, "pay-2")


@pytest.mark.parametrize(("token", "code"), [("spt_test_expired_1", "expired"), ("spt_used", "used")])
async def test_an_expired_or_used_token_records_last_error(shop: Seller, token: str, code: str) -> None:
    if code == "used":
        token = "spt_test_visa_once"
        await _confirm(shop, await _session(shop, "other"), "first-use", token)
    sid = await _session(shop)

    with pytest.raises(StripeInvalidRequest, match=code):
        await _confirm(shop, sid, "pay-1", token)

    session = await shop.stack.payments.get_session(sid)
    assert session.last_error is not None and code in session.last_error and session.status != "succeeded"


# --- E: answers that lag Stripe ---------------------------------------------------------------------------------


async def test_after_a_crash_a_confirm_with_a_new_key_records_the_success_before_answering(shop: Seller) -> None:
    sid = await _session(shop)
    await _crashed_confirm(shop, sid, "pay-1")

    answer = await _confirm(shop, sid, "pay-2", "spt_test_visa_2")

    assert answer["status"] == "succeeded" and answer["fulfilled"] and shop.luc() == 10_000
    assert await shop.charges() == [(1000, 0)]


async def test_after_a_crash_an_acp_complete_with_a_new_key_records_the_order(shop: Seller) -> None:
    sid = await shop.create(["luc_10k"])
    await _dies_at(hold(shop.sandbox, "/v1/payment_intents/pi_"), lambda: shop.complete(sid, key="first"))

    again = await shop.complete(sid, key="second")

    assert (again["_status"], again.get("code")) == (405, "session_not_completable")
    assert "completed" in again["message"]
    assert (await shop.get(sid))["status"] == "completed" and shop.luc() == 10_000


async def test_a_hold_left_by_a_complete_that_died_before_charging_is_taken_over_after_two_minutes(
        shop: Seller) -> None:
    sid = await shop.create(["luc_10k"])
    await _dies_at(hold(shop.sandbox, "/v1/payment_intents", mode="before"),  # before any PaymentIntent exists
                   lambda: shop.complete(sid, key="first"))

    assert (await shop.complete(sid, "spt_test_visa_2", expect=409))["code"] == "payment_in_progress"
    shop.clock.advance(121)
    done = await shop.complete(sid, "spt_test_visa_3", expect=200)

    assert done["status"] == "completed" and shop.luc() == 10_000 and await shop.charges() == [(1000, 0)]


async def test_start_up_records_a_payment_a_crash_left_unrecorded(shop: Seller) -> None:
    sid = await _session(shop)
    await _crashed_confirm(shop, sid, "pay-1")
    assert shop.stack.store.query_one("SELECT status FROM payment_sessions WHERE id = ?", (sid,))["status"] \
        != "succeeded"  # type: ignore[index]

    reconciled = await shop.stack.payments.reconcile()

    assert [(s.id, s.status, s.fulfilled) for s in reconciled] == [(sid, "succeeded", True)]
    assert shop.luc() == 10_000 and await shop.stack.payments.reconcile() == []


async def test_the_server_reconciles_unrecorded_payments_when_it_starts(
        make_server: Callable[..., Any], make_settings: Callable[..., Settings], sandbox_app: Any) -> None:
    settings = make_settings()
    crashed = Store(settings.aims_billing_db)
    try:
        async with commerce_stack(settings, sandbox_app, crashed) as stack:
            shop = Seller(stack, None, None, sandbox_app.state.sandbox)  # type: ignore[arg-type]
            sid = await _session(shop)
            await _crashed_confirm(shop, sid, "pay-1")
    finally:
        crashed.close()

    async with Client(make_server()) as client:
        with anyio.fail_after(20):
            while True:
                got = await client.call_tool("get_agent_wallet", {"agent_id": "buyer"})
                if got.structured_content and got.structured_content["balance"] == 10_000:
                    break
                await anyio.sleep(0.02)


# --- item 2: keys belong to their owner -----------------------------------------------------------------------


async def test_payment_session_keys_belong_to_their_owner(shop: Seller) -> None:
    await shop.stack.ledger.create_wallet("mallory", "cus_mallory", None, "open-mallory")
    squatted = await shop.stack.payments.create_session(
        customer=None, agent_id="mallory", item="luc_50k", amount=None, currency=None, description=None,
        idempotency_key="task-1", dry_run=False)
    mine = await shop.stack.payments.create_session(
        customer=None, agent_id="buyer", item="luc_10k", amount=None, currency=None, description=None,
        idempotency_key="task-1", dry_run=False)
    assert squatted.session is not None and mine.session is not None
    assert not mine.replayed and mine.session.id != squatted.session.id and mine.session.agent_id == "buyer"

    await _confirm(shop, squatted.session.id, "pay")
    done = await _confirm(shop, mine.session.id, "pay", "spt_test_visa_2")  # the same key on another session

    assert done["id"] == mine.session.id and done["status"] == "succeeded" and shop.luc() == 10_000


async def test_acp_idempotency_keys_belong_to_their_api_key(shop: Seller) -> None:
    mine = await shop.post("/acp/checkout_sessions", {"currency": "usd", "line_items": [{"id": "luc_10k"}],
                                                      "capabilities": {}, "metadata": {"agent_id": "buyer"}},
                           key="same", expect=201)
    theirs = await shop.post("/acp/checkout_sessions", {"currency": "usd", "line_items": [{"id": "luc_50k"}],
                                                        "capabilities": {}, "metadata": {"agent_id": "buyer"}},
                             key="same", token=OTHER_KEY, expect=201)
    assert mine["id"] != theirs["id"]

    done = await shop.post(f"/acp/checkout_sessions/{mine['id']}/complete", pay("spt_test_visa"), key="pay",
                           expect=200)
    other = await shop.post(f"/acp/checkout_sessions/{theirs['id']}/complete", pay("spt_test_visa_2"), key="pay",
                            token=OTHER_KEY, expect=200)
    assert done["status"] == other["status"] == "completed" and shop.luc() == 10_000 + 50_000


async def test_another_platforms_complete_with_the_same_idempotency_key_is_not_a_replay_of_ours(
        shop: Seller) -> None:
    sid = await shop.create(["luc_10k"])
    assert (await shop.complete(sid, "spt_test_declined", key="pay", expect=200))["status"] == "ready_for_payment"

    done = await shop.complete(sid, "spt_test_visa", key="pay", token=OTHER_KEY, expect=200)

    assert done["status"] == "completed" and shop.luc() == 10_000


# --- the same races without a gate, many at once ------------------------------------------------------------------


async def test_cancel_and_complete_at_once_on_many_checkouts_each_end_delivered_or_unpaid(shop: Seller) -> None:
    ids = [await shop.create(["luc_10k"]) for _ in range(12)]

    async def both(sid: str) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(shop.complete, sid, f"spt_test_visa_{sid}")
            tg.start_soon(shop.cancel, sid)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for sid in ids:
                tg.start_soon(both, sid)

    statuses = [(await shop.get(sid))["status"] for sid in ids]
    assert set(statuses) <= {"completed", "canceled"}
    assert await shop.charges() == [(1000, 0)] * statuses.count("completed")
    assert shop.luc() == 10_000 * statuses.count("completed")


async def test_many_concurrent_retries_of_one_confirm_and_polls_all_get_its_result(shop: Seller) -> None:
    sid = await _session(shop)
    answers: list[dict[str, Any]] = []

    async def confirm() -> None:
        answers.append(await _confirm(shop, sid, "pay-1"))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(24):
                tg.start_soon(confirm if i % 4 else shop.stack.payments.get_session, *(() if i % 4 else (sid,)))

    assert len(answers) == 18 and {(a["id"], a["status"], a["fulfilled"]) for a in answers} == {
        (sid, "succeeded", True)}
    assert shop.luc() == 10_000 and await shop.charges() == [(1000, 0)]
