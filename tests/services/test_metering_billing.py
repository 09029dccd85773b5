"""The usage an agent is told it owes is the usage Stripe bills: end to end on the sandbox (record, flush, let the
sandbox's clock run renewals, trials and cancellations, compare each invoice's usage line with the local summary and
with the sum of the costs the events answered).

The server's clock is the sandbox's (as live, where our clock and Stripe's agree), and Stripe's webhooks are applied
when a test says so, so a late webhook is a step of the test, not a race."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aims_billing_mcp.errors import InvalidInput, InvalidState
from aims_billing_mcp.sandbox import Sandbox, create_app
from aims_billing_mcp.services import subscriptions as subscriptions_module
from aims_billing_mcp.services.meter_flusher import MeterFlusher
from aims_billing_mcp.services.metering import MeteringService
from aims_billing_mcp.services.metering_models import MeterEventResult
from aims_billing_mcp.services.stripe_setup import setup_stripe
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from aims_billing_mcp.stripe_gateway import StripeRequest
from tests.conftest import CommerceStack, commerce_stack, migrated_copy

pytestmark = pytest.mark.anyio

DAY = 86_400


@dataclass
class Billing:
    stack: CommerceStack
    sandbox: Sandbox
    metering: MeteringService
    flusher: MeterFlusher
    events: list[dict[str, Any]] = field(default_factory=list)  # sandbox events not yet delivered
    answers: dict[str, list[MeterEventResult]] = field(default_factory=dict)

    async def stripe(self, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        return (await self.stack.gateway.send(StripeRequest(method, path, params or {}))).data

    async def deliver(self) -> None:
        """Stripe's webhooks arrive now, in order."""
        pending, self.events[:] = list(self.events), []
        for event in pending:
            applied = await self.stack.store.write(lambda conn, e=event: self.stack.subscriptions.apply_event(conn, e))
            self.stack.subscriptions.forget(applied.customer_id)

    async def subscribe(self, tier: str) -> str:
        customer = (await self.stripe("post", "/v1/customers", {"email": f"{tier}@example.com"}))["id"]
        if tier != "p2p":
            checkout = await self.stack.subscriptions.create_subscription_checkout(
                tier=tier, customer=customer, customer_email=None, success_url=None, cancel_url=None,
                idempotency_key=None, dry_run=False)
            self.sandbox.complete_checkout_session(checkout.checkout_session.id)
            await self.deliver()
        return str(customer)

    async def record(self, customer: str, units: int, **options: Any) -> MeterEventResult:
        answer = await self.metering.record(customer, units, **options)
        self.answers.setdefault(customer, []).append(answer)
        return answer

    def advance(self, days: float = 0, hours: float = 0) -> None:
        self.sandbox.advance(days=days, hours=hours)

    async def period(self, customer: str) -> tuple[int, int]:
        [sub] = (await self.stripe("get", "/v1/subscriptions", {"customer": customer, "status": "all"}))["data"]
        item = sub["items"]["data"][0]
        return int(item["current_period_start"]), int(item["current_period_end"])

    async def usage_lines(self, customer: str, meter: str = "luc_tokens") -> list[tuple[int, int, int, int]]:
        """Every line Stripe invoiced the customer for one meter's usage: (period start, period end, quantity,
        amount): its metered price's lines, and P2P's invoice item lines."""
        invoices = (await self.stripe("get", "/v1/invoices", {"customer": customer, "limit": 100}))["data"]
        event_name = self.metering._pricing.meters[meter].event_name
        stripe_meter = next(m["id"] for m in (await self.stripe("get", "/v1/billing/meters", {"limit": 100}))["data"]
                            if m["event_name"] == event_name)
        lines = []
        for invoice in invoices:
            for line in invoice["lines"]["data"]:
                price = line["pricing"]["price_details"]["price"] if line.get("pricing") else None
                recurring = (await self.stripe("get", f"/v1/prices/{price}"))["recurring"] if price else None
                metered = (recurring is not None and recurring["usage_type"] == "metered"
                           and recurring["meter"] == stripe_meter)
                if metered and invoice["billing_reason"] != "subscription_create":
                    lines.append((line["period"]["start"], line["period"]["end"], line["quantity"], line["amount"]))
            if (invoice.get("metadata") or {}).get("aims_meter", "luc_tokens") != meter:
                continue
            for line in invoice["lines"]["data"]:
                if line["parent"] and line["parent"]["type"] == "invoice_item_details":
                    lines.append((line["period"]["start"], line["period"]["end"], line["quantity"], line["amount"]))
        return sorted(lines)

    def answered(self, customer: str) -> int:
        return sum(answer.cost_cents for answer in self.answers.get(customer, []) if not answer.replayed)


@asynccontextmanager
async def billing_on(settings: Settings, sandbox_app: Any, store: Store) -> AsyncIterator[Billing]:
    """Our metering and subscriptions on the sandbox, on the sandbox's clock, with webhooks delivered by hand."""
    sandbox: Sandbox = sandbox_app.state.sandbox
    async with commerce_stack(settings, sandbox_app, store, buyer_wallet=False) as stack:
        await setup_stripe(stack.gateway, stack.pricing)
        subs = stack.subscriptions
        metering = MeteringService(store, stack.pricing, tier_of=subs.entitled_tier, period_of=subs.usage_period,
                                   customer_exists=subs.customer_exists, clock=sandbox.now,
                                   placements=subs.placement_version)
        flusher = MeterFlusher(store, stack.gateway, clock=sandbox.now, retry_delay_scale=0)
        env = Billing(stack, sandbox, metering, flusher)
        sandbox.add_event_listener(env.events.append)
        yield env


@pytest.fixture
async def billing(make_settings: Callable[..., Settings], sandbox_app: Any, store: Store) -> AsyncIterator[Billing]:
    async with billing_on(make_settings(), sandbox_app, store) as env:
        yield env


async def test_usage_backdated_before_a_new_subscription_is_refused_and_the_invoice_bills_what_was_answered(
        billing: Billing) -> None:
    customer = await billing.subscribe("3mo")  # 100,000 included, then 150 cents per 1,000
    start, end = await billing.period(customer)

    with pytest.raises(InvalidInput) as caught:
        await billing.record(customer, 150_000, timestamp=start - 120)  # 2 minutes before the subscription
    await billing.record(customer, 150_000, identifier="now")
    summary = billing.metering.summary(customer)
    await billing.flusher.flush_once()
    billing.advance(days=32)
    await billing.deliver()

    assert caught.value.param == "timestamp"
    assert (summary.period_start, summary.weighted_units, summary.overage_cost_cents) == (start, 150_000, 7500)
    assert await billing.usage_lines(customer) == [(start, end, 150_000, 7500)]
    assert billing.answered(customer) == 7500


async def test_after_a_renewal_usage_stamped_in_the_invoiced_period_is_refused(billing: Billing) -> None:
    customer = await billing.subscribe("3mo")
    start, end = await billing.period(customer)
    await billing.record(customer, 10_000)
    await billing.flusher.flush_once()
    billing.advance(days=32)
    await billing.deliver()

    with pytest.raises(InvalidInput) as caught:
        await billing.record(customer, 150_000, timestamp=end - 60)

    assert caught.value.param == "timestamp" and "current usage period" in caught.value.message
    assert billing.metering.summary(customer).weighted_units == 0
    assert await billing.usage_lines(customer) == [(start, end, 10_000, 0)]


async def test_usage_between_a_periods_end_and_the_renewal_webhook_counts_in_the_new_period(
        billing: Billing) -> None:
    customer = await billing.subscribe("3mo")
    start, end = await billing.period(customer)
    first = await billing.record(customer, 90_000)
    await billing.flusher.flush_once()
    billing.advance(hours=(end + 3600 - billing.sandbox.now()) / 3600)  # renewed by Stripe; its webhook not here

    second = await billing.record(customer, 90_000)
    await billing.deliver()
    summary = billing.metering.summary(customer)
    await billing.flusher.flush_once()
    _, next_end = await billing.period(customer)
    billing.advance(hours=(next_end + 60 - billing.sandbox.now()) / 3600)
    await billing.deliver()

    assert (first.period_start, second.period_start, second.period_usage, second.cost_cents) == (start, end, 90_000, 0)
    assert (summary.period_start, summary.weighted_units, summary.overage_cost_cents) == (end, 90_000, 0)
    assert await billing.usage_lines(customer) == [(start, end, 90_000, 0), (end, next_end, 90_000, 0)]


async def test_an_immediate_cancel_invoices_the_periods_usage_as_answered_then_usage_is_p2p(
        billing: Billing) -> None:
    customer = await billing.subscribe("3mo")
    start, _ = await billing.period(customer)
    await billing.record(customer, 150_000)  # 50,000 over: 7,500 cents
    summary = billing.metering.summary(customer)
    await billing.flusher.flush_once()
    billing.advance(days=2)

    await billing.stack.subscriptions.cancel_subscription(customer=customer, subscription=None, immediately=True,
                                                          idempotency_key=None, dry_run=False)
    await billing.deliver()
    ended = billing.sandbox.now()
    after = await billing.record(customer, 1_000)

    assert summary.overage_cost_cents == billing.answered(customer) - after.cost_cents == 7500
    [(line_start, line_end, quantity, amount)] = await billing.usage_lines(customer)
    assert (line_start, quantity, amount) == (start, 150_000, 7500) and ended - 5 <= line_end <= ended
    assert (after.tier, after.period_start, after.cost_cents) == ("p2p", line_end, 200)


async def test_the_9mo_free_months_bill_no_usage_and_answer_none_then_overage_is_billed(billing: Billing) -> None:
    customer = await billing.subscribe("9mo")  # a 3-month trial, then 500,000 included, then 100 cents per 1,000
    trial_start, trial_end = await billing.period(customer)
    free = await billing.record(customer, 600_000)
    free_summary = billing.metering.summary(customer)
    await billing.flusher.flush_once()
    billing.advance(hours=(trial_end + 60 - billing.sandbox.now()) / 3600)
    await billing.deliver()

    paid = await billing.record(customer, 600_000)
    paid_summary = billing.metering.summary(customer)
    await billing.flusher.flush_once()
    _, paid_end = await billing.period(customer)
    billing.advance(hours=(paid_end + 60 - billing.sandbox.now()) / 3600)
    await billing.deliver()

    assert (free.period_start, free.period_end, free.cost_cents, free.overage_rate) == (trial_start, trial_end, 0, 0)
    assert (free_summary.weighted_units, free_summary.overage_cost_cents) == (600_000, 0)
    assert (paid.period_start, paid.cost_cents, paid_summary.overage_cost_cents) == (trial_end, 10_000, 10_000)
    assert await billing.usage_lines(customer) == [(trial_end, paid_end, 600_000, 10_000)]


async def test_a_tier_changes_between_periods_so_each_period_is_billed_at_the_terms_it_began_with(
        billing: Billing) -> None:
    customer = await billing.subscribe("3mo")
    start, _ = await billing.period(customer)
    await billing.record(customer, 200_000)  # 3mo: 100,000 over at 150 = 15,000 cents

    with pytest.raises(InvalidState) as refused:  # a second live subscription would bill the same usage again
        await billing.stack.subscriptions.create_subscription_checkout(
            tier="6mo", customer=customer, customer_email=None, success_url=None, cancel_url=None,
            idempotency_key=None, dry_run=False)
    await billing.flusher.flush_once()
    billing.advance(days=2)
    await billing.stack.subscriptions.cancel_subscription(customer=customer, subscription=None, immediately=True,
                                                          idempotency_key=None, dry_run=False)
    await billing.deliver()
    checkout = await billing.stack.subscriptions.create_subscription_checkout(
        tier="6mo", customer=customer, customer_email=None, success_url=None, cancel_url=None,
        idempotency_key=None, dry_run=False)
    billing.sandbox.complete_checkout_session(checkout.checkout_session.id)
    await billing.deliver()
    subs = (await billing.stripe("get", "/v1/subscriptions", {"customer": customer, "status": "active"}))["data"]
    six_start, six_end = subs[0]["items"]["data"][0]["current_period_start"], subs[0]["items"]["data"][0][
        "current_period_end"]
    six = await billing.record(customer, 300_000)  # 6mo: 50,000 over at 120 = 6,000 cents
    summary = billing.metering.summary(customer)
    await billing.flusher.flush_once()
    billing.advance(hours=(six_end + 60 - billing.sandbox.now()) / 3600)
    await billing.deliver()

    assert refused.value.param == "customer" and "3mo" in refused.value.message
    assert (six.tier, six.period_start, six.cost_cents, summary.overage_cost_cents) == ("6mo", six_start, 6000, 6000)
    lines = await billing.usage_lines(customer)
    assert [(q, amount) for _, _, q, amount in lines] == [(200_000, 15_000), (300_000, 6000)]
    assert lines[0][0] == start and lines[1][:2] == (six_start, six_end)
    assert billing.answered(customer) == 21_000


async def test_p2p_usage_is_invoiced_once_its_month_ends_for_exactly_what_was_answered(billing: Billing) -> None:
    customer = await billing.subscribe("p2p")
    answers = [await billing.record(customer, units, operation="code") for units in (4_001, 2_999, 3_333)]
    summary = billing.metering.summary(customer)
    early = await billing.flusher.flush_once()  # the month has not ended: nothing to invoice yet
    billing.advance(hours=(summary.period_end + 60 - billing.sandbox.now()) / 3600)

    report = await billing.flusher.flush_once()
    again = await billing.flusher.flush_once()

    assert [a.tier for a in answers] == ["p2p"] * 3 and summary.weighted_units == 15_501  # each x 1.5, half up
    assert summary.overage_cost_cents == sum(a.cost_cents for a in answers) == 3100  # at 200 cents per 1,000
    assert (early.invoiced, report.invoiced, again.invoiced) == (0, 1, 0)
    assert [amount for *_, amount in await billing.usage_lines(customer)] == [3100]
    [invoice] = (await billing.stripe("get", "/v1/invoices", {"customer": customer}))["data"]
    assert (invoice["status"], invoice["collection_method"], invoice["amount_due"]) == ("open", "send_invoice", 3100)


async def test_p2p_usage_in_the_second_a_subscription_starts_is_billed_once(billing: Billing) -> None:
    customer = await billing.subscribe("p2p")
    p2p = await billing.record(customer, 100_005)  # P2P: 20,001 cents, on the month's own invoice
    checkout = await billing.stack.subscriptions.create_subscription_checkout(
        tier="3mo", customer=customer, customer_email=None, success_url=None, cancel_url=None,
        idempotency_key=None, dry_run=False)
    billing.sandbox.complete_checkout_session(checkout.checkout_session.id)  # same second: its period holds p2p's time
    await billing.flusher.flush_once()
    billing.advance(days=100)
    await billing.deliver()
    await billing.flusher.flush_once()

    lines = await billing.usage_lines(customer)
    assert p2p.cost_cents == 20_001 and sum(amount for *_, amount in lines) == 20_001
    assert all(quantity == 0 for _, _, quantity, amount in lines if amount != 20_001)  # the meter never had it


# --- the property: whatever happens, what was answered is what is invoiced -----------------------------------------

STEP = st.one_of(
    st.tuples(st.just("record"), st.integers(1, 400_000), st.sampled_from(["chat", "code", "agent_swarm"]),
              st.sampled_from([0, 0, 0, 120, 3 * DAY])),  # seconds backdated: refused before the current period
    st.tuples(st.just("advance"), st.integers(1, 45 * 24)),  # hours; Stripe renews, ends trials and subscriptions
    st.tuples(st.just("deliver")),  # Stripe's webhooks arrive (until then our provision is stale)
    st.tuples(st.just("cancel"), st.booleans()),  # immediately (usage so far invoiced), or at the period's end
    st.tuples(st.just("subscribe"), st.sampled_from(["3mo", "6mo", "9mo"])),  # refused while a tier is live
)


async def play(env: Billing, first_tier: str, steps: list[tuple[Any, ...]]) -> tuple[int, int]:
    """Run a customer's life; returns (sum of the costs the events answered, sum of the usage Stripe invoiced)."""
    customer = await env.subscribe(first_tier)
    for step in steps:
        kind = step[0]
        if kind == "record":
            _, units, operation, backdated = step
            try:
                await env.record(customer, units, operation=operation,
                                 timestamp=env.sandbox.now() - backdated if backdated else None)
            except InvalidInput as refused:
                assert refused.param == "timestamp"
        elif kind == "advance":
            await env.flusher.flush_once()  # the flusher runs often: usage reaches Stripe before a period closes
            env.advance(hours=step[1])
        elif kind == "deliver":
            await env.deliver()
        elif kind == "cancel":
            await env.deliver()
            if env.stack.subscriptions.entitled_tier(customer).id != "p2p":
                if step[1]:  # as the cancel_subscription tool does: usage reaches Stripe, its second passes
                    await env.flusher.flush_once()
                    env.advance(hours=1 / 3600)
                await env.stack.subscriptions.cancel_subscription(
                    customer=customer, subscription=None, immediately=step[1], idempotency_key=None, dry_run=False)
                env.advance(hours=1)
        elif kind == "subscribe":
            await env.deliver()
            try:
                checkout = await env.stack.subscriptions.create_subscription_checkout(
                    tier=step[1], customer=customer, customer_email=None, success_url=None, cancel_url=None,
                    idempotency_key=f"subscribe-{env.sandbox.now()}", dry_run=False)
            except InvalidState:
                continue
            env.sandbox.complete_checkout_session(checkout.checkout_session.id)
            await env.deliver()
            env.advance(hours=1)
    await env.flusher.flush_once()
    env.advance(days=100)  # every period with usage has ended (a 9mo trial is three months) and been invoiced
    await env.deliver()
    await env.flusher.flush_once()  # P2P months are invoiced once they end
    invoiced = sum(amount for *_, amount in await env.usage_lines(customer))
    return env.answered(customer), invoiced


@settings(max_examples=int(os.environ.get("AIMS_METERING_PROPERTY_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(first_tier=st.sampled_from(["p2p", "3mo", "6mo", "9mo"]), steps=st.lists(STEP, max_size=12))
def test_whatever_the_usage_tier_changes_renewals_and_cancellations_the_answered_costs_are_what_is_invoiced(
        first_tier: str, steps: list[tuple[Any, ...]]) -> None:
    async def scenario() -> tuple[int, int]:
        with tempfile.TemporaryDirectory() as folder:
            app = create_app(db_path=":memory:")
            store = Store(migrated_copy(os.path.join(folder, "billing.db")))
            try:
                settings = Settings(_env_file=None, aims_billing_db=os.path.join(folder, "billing.db"))  # type: ignore[call-arg]
                async with billing_on(settings, app, store) as env:
                    return await play(env, first_tier, steps)
            finally:
                store.close()
                app.state.sandbox.close()

    answered, invoiced = asyncio.run(scenario())
    assert answered == invoiced


async def test_a_provision_another_instance_changed_changes_the_placement_version_once_read_again(
        billing: Billing, monkeypatch: pytest.MonkeyPatch) -> None:
    """Metering reuses a customer's period and terms while the placement version stays: a change another instance
    made (no `forget` here) must move it when the cached provision is read again."""
    monkeypatch.setattr(subscriptions_module, "PROVISION_CACHE_SECONDS", 0.0)  # every read reads the row again
    customer = await billing.subscribe("3mo")
    subscriptions = billing.stack.subscriptions
    subscriptions.provision(customer)
    version = subscriptions.placement_version()
    subscriptions.provision(customer)  # read again, unchanged
    assert subscriptions.placement_version() == version

    await billing.stack.store.write(lambda tx: tx.execute(
        "UPDATE billing_provisions SET tier = '9mo' WHERE customer_id = ?", (customer,)))
    subscriptions.provision(customer)

    assert subscriptions.placement_version() == version + 1


async def test_a_period_a_cancellation_ends_early_says_from_when_its_answer_changes(billing: Billing) -> None:
    customer = await billing.subscribe("3mo")
    start, end = await billing.period(customer)
    cancel_at = start + 10 * DAY
    await billing.stack.store.write(lambda tx: tx.execute(
        "UPDATE billing_provisions SET cancel_at = ? WHERE customer_id = ?", (cancel_at, customer)))
    subscriptions = billing.stack.subscriptions
    subscriptions.forget(customer)

    before, after = (subscriptions.usage_period(customer, t) for t in (cancel_at - 1, cancel_at))

    assert (before.start, before.end, before.until) == (start, end, cancel_at)
    assert after.start == cancel_at and after.tier is not None and after.tier.id == "p2p"
