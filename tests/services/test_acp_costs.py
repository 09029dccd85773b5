"""What one ACP checkout costs (bench/acp.py's budget, issue 12): writer transactions (store.write jobs) and
Stripe calls per completion, counted at those two seams. A completion of LUC packs: its request key claimed and
finished, the checkout claimed, the payment session recorded with its idempotency record and linked to the checkout
in one job, the confirm's outcome recorded with its idempotency record and the order settled in one job (9 jobs
before: the link, both idempotency records and a second settle each had their own). A tier line adds its prepaid
subscription's start: its lease taken in its claim's job, then one job per step (10 before: a take before the
claim, a renewal before each Stripe call, a let-go after the start), and no read of the subscription it has just
created (9 Stripe calls before)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from aims_billing_mcp.services.stripe_setup import setup_stripe
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from aims_billing_mcp.stripe_gateway import StripeRequest
from tests.conftest import Clock, CommerceStack, commerce_stack
from tests.services.test_acp import KEY, checked, pay
from tests.support.money_invariant import money_kept  # noqa: F401  (autouse: the money invariant after each test)

pytestmark = pytest.mark.anyio
HEADERS = {"API-Version": "2026-04-17", "Authorization": f"Bearer {KEY}"}


class Costs:
    """Counts the writer jobs and Stripe calls made through the stack while `counting()` is open."""

    def __init__(self, stack: CommerceStack) -> None:
        self.writes = self.stripe = 0
        self._on = False
        store, gateway = stack.store, stack.gateway
        write, send = store.write, gateway.send

        async def counted_write(fn: Any, *args: Any, **kwargs: Any) -> Any:
            self.writes += self._on
            return await write(fn, *args, **kwargs)

        async def counted_send(request: Any) -> Any:
            self.stripe += self._on
            return await send(request)

        store.write = counted_write  # type: ignore[method-assign]
        gateway.send = counted_send  # type: ignore[method-assign]

    @contextmanager
    def counting(self) -> Iterator[None]:
        self.writes = self.stripe = 0
        self._on = True
        try:
            yield
        finally:
            self._on = False


class Buyer:
    def __init__(self, http: httpx.AsyncClient, costs: Costs) -> None:
        self.http, self.costs = http, costs

    async def post(self, path: str, body: Any, key: str, expect: int) -> dict[str, Any]:
        response = await self.http.post(path, json=body, headers={**HEADERS, "Idempotency-Key": key})
        data: dict[str, Any] = checked(response, path, expect).json()
        return data

    async def checkout(self, items: list[str], agent: str) -> str:
        created = await self.post("/acp/checkout_sessions", {
            "currency": "usd", "line_items": [{"id": item} for item in items], "capabilities": {},
            "metadata": {"agent_id": agent}}, f"create-{agent}", 201)
        assert created["status"] == "ready_for_payment", created
        return str(created["id"])


@pytest.fixture
async def buyer(make_settings: Callable[..., Settings], sandbox_app: Any, store: Store) -> AsyncIterator[Buyer]:
    async with commerce_stack(make_settings(), sandbox_app, store) as stack:
        costs = Costs(stack)
        async with stack.acp_seller(KEY, clock=Clock(), public_url="https://seller.test") as (http, _acp):
            await setup_stripe(stack.gateway, stack.pricing)
            customer = (await stack.gateway.send(StripeRequest("post", "/v1/customers", {}))).data["id"]
            await stack.ledger.create_wallet("subscriber", customer, None, "open-subscriber")
            yield Buyer(http, costs)


@pytest.mark.parametrize(("items", "agent", "writes", "stripe"), [
    # key claimed, checkout claimed, session recorded + linked + its key, confirm recorded + settled + its key, key
    # finished
    (["luc_10k", "luc_10k"], "buyer", 5, 2),
    # ... and the tier's start: claimed (with its lease), credited, subscribed, started; Stripe: the customer and
    # the prices checked, the PaymentIntent created and confirmed, the prices, the credit, the subscription created
    # and given its end (its creation's answer holds its start: no read of it)
    (["tier_3mo"], "subscriber", 9, 8),
])
async def test_a_paid_checkout_completes_within_its_budget_of_writer_transactions_and_stripe_calls(
        buyer: Buyer, items: list[str], agent: str, writes: int, stripe: int) -> None:
    session = await buyer.checkout(items, agent)
    with buyer.costs.counting():
        done = await buyer.post(f"/acp/checkout_sessions/{session}/complete", pay("spt_test_visa"), "pay", 200)
    assert done["status"] == "completed" and done["order"]["status"] == "completed"
    assert (buyer.costs.writes, buyer.costs.stripe) == (writes, stripe)
