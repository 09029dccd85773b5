"""The meter flusher against the sandbox through the real gateway: pending events reach Stripe's meter once, even
across a crash between Stripe's acceptance and our mark, 500s and 429s, expired sessions and a v2 outage; events
Stripe can no longer take are marked failed with the reason."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from aims_billing_mcp.errors import StripeInvalidRequest
from aims_billing_mcp.services.meter_flusher import TOO_OLD, V2_SESSION, V2_STREAM, MeterFlusher
from aims_billing_mcp.services.metering import MeteringService
from aims_billing_mcp.services.tiers import Pricing, calendar_month_of
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from aims_billing_mcp.stripe_gateway import StripeGateway, StripeRequest, StripeResult, build_gateway
from tests.conftest import Clock

pytestmark = pytest.mark.anyio

PRICING = Pricing.load()
DAY = 86_400


@pytest.fixture
def gateway(make_settings: Callable[..., Settings], sandbox_app: Any) -> StripeGateway:
    return build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)


@pytest.fixture
def store(make_settings: Callable[..., Settings]) -> Any:
    s = Store(make_settings().aims_billing_db)
    yield s
    s.close()


async def create_meter(gateway: StripeGateway) -> str:
    meter = await gateway.send(StripeRequest("post", "/v1/billing/meters", {
        "display_name": "LUC units", "event_name": PRICING.meter_event_name,
        "default_aggregation": {"formula": "sum"}}))
    return str(meter.data["id"])


async def create_customer(gateway: StripeGateway, name: str) -> str:
    return str((await gateway.send(StripeRequest("post", "/v1/customers", {"name": name}))).data["id"])


def service_for(store: Store, gateway: StripeGateway, *, clock: Callable[[], float] = time.time,
                trust_everyone: bool = False) -> MeteringService:
    async def exists(customer: str) -> bool:
        if trust_everyone:
            return True
        try:
            await gateway.send(StripeRequest("get", f"/v1/customers/{customer}"))
        except StripeInvalidRequest:
            return False
        return True

    return MeteringService(store, PRICING, tier_of=lambda c: PRICING.tiers["3mo"],  # metered: sent to the meter
                           period_of=lambda c, t: calendar_month_of(t), customer_exists=exists, clock=clock)


async def stripe_total(gateway: StripeGateway, meter: str, customer: str) -> int:
    """The meter's sum for the customer over the last and next day, as Stripe's event summaries report it."""
    now = int(time.time()) // 60 * 60
    page = await gateway.send(StripeRequest("get", f"/v1/billing/meters/{meter}/event_summaries", {
        "customer": customer, "start_time": now - 40 * DAY, "end_time": now + DAY}))
    return int(sum(summary["aggregated_value"] for summary in page.data["data"]))


def local_total(store: Store, customer: str, status: str = "sent") -> int:
    row = store.query_one("SELECT COALESCE(SUM(weighted_units), 0) AS n FROM meter_events WHERE customer_id = ? "
                          "AND status = ?", (customer, status))
    assert row is not None
    return int(row["n"])


def statuses(store: Store) -> dict[str, int]:
    return {row["status"]: row["n"] for row in store.query(
        "SELECT status, COUNT(*) AS n FROM meter_events GROUP BY status")}


async def record_many(metering: MeteringService, customers: list[str], n: int) -> None:
    await asyncio.gather(*(metering.record(customers[i % len(customers)], 1 + i % 13,
                                           operation=list(PRICING.multipliers)[i % len(PRICING.multipliers)])
                           for i in range(n)))


async def test_pending_events_reach_the_meter_in_batches_and_are_marked_sent(
        gateway: StripeGateway, store: Store, sandbox: Any) -> None:
    meter = await create_meter(gateway)
    customers = [await create_customer(gateway, "A"), await create_customer(gateway, "B")]
    metering = service_for(store, gateway)
    await record_many(metering, customers, 250)
    flusher = MeterFlusher(store, gateway, retry_delay_scale=0)

    report = await flusher.flush_once()

    assert (report.sent, report.failed, report.pending, report.batches, report.transport) == (250, 0, 0, 3, "v2")
    assert statuses(store) == {"sent": 250}
    assert store.query_one("SELECT MIN(attempts) AS lo, MAX(attempts) AS hi FROM meter_events") == {"lo": 1, "hi": 1}
    for customer in customers:
        assert await stripe_total(gateway, meter, customer) == local_total(store, customer) > 0
    streams = [r for r in sandbox.request_log if r.path == V2_STREAM]
    assert len(streams) == 3 and sum(r.path == V2_SESSION for r in sandbox.request_log) == 1
    assert (await flusher.flush_once()).batches == 0
    status = metering.status()
    assert (status.pending, status.sent, status.last_flush) == (0, 250, "sent 250, failed 0, 0 pending after via v2")


async def test_max_events_limits_one_flush_oldest_first(gateway: StripeGateway, store: Store) -> None:
    await create_meter(gateway)
    customer = await create_customer(gateway, "A")
    metering = service_for(store, gateway)
    first = [(await metering.record(customer, 1)).identifier for _ in range(5)]
    await record_many(metering, [customer], 20)

    report = await MeterFlusher(store, gateway, batch_size=2, retry_delay_scale=0).flush_once(max_events=5)

    assert (report.sent, report.pending, report.batches) == (5, 20, 3)
    sent = [row["identifier"] for row in store.query("SELECT identifier FROM meter_events WHERE status = 'sent'")]
    assert sorted(sent) == sorted(first)


class CrashAfterAcceptance:
    """The real gateway, with a process death after Stripe accepted the `after`-th stream batch: the flusher never
    hears back (the test cancels it there), so those events are accepted by Stripe but not marked here."""

    def __init__(self, gateway: StripeGateway, after: int) -> None:
        self.gateway, self.left = gateway, after
        self.accepted = asyncio.Event()

    async def send(self, request: StripeRequest) -> StripeResult:
        result = await self.gateway.send(request)
        if request.path == V2_STREAM:
            self.left -= 1
            if self.left == 0:
                self.accepted.set()
                await asyncio.Event().wait()  # dead
        return result


@pytest.mark.parametrize("crash_at_batch", [1, 2, 3])
async def test_a_flusher_that_dies_between_acceptance_and_mark_resends_and_stripe_counts_once(
        gateway: StripeGateway, store: Store, crash_at_batch: int) -> None:
    meter = await create_meter(gateway)
    customers = [await create_customer(gateway, "A"), await create_customer(gateway, "B")]
    metering = service_for(store, gateway)
    await record_many(metering, customers, 260)
    crashing = CrashAfterAcceptance(gateway, crash_at_batch)
    flush = asyncio.ensure_future(MeterFlusher(store, crashing, retry_delay_scale=0).flush_once())
    await asyncio.wait_for(crashing.accepted.wait(), 10)
    flush.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flush
    assert statuses(store)["pending"] == 260 - 100 * (crash_at_batch - 1)  # the accepted batch is still pending

    report = await MeterFlusher(store, gateway, retry_delay_scale=0).flush_once()  # after the restart

    assert report.sent == 260 - 100 * (crash_at_batch - 1) and statuses(store) == {"sent": 260}
    for customer in customers:
        assert await stripe_total(gateway, meter, customer) == local_total(store, customer)
    assert sum(local_total(store, c) for c in customers) == sum(
        r["weighted_units"] for r in store.query("SELECT weighted_units FROM meter_events"))


@pytest.mark.parametrize(("status", "count"), [(500, 1), (500, 5), (429, 3), (429, 7), (503, 9)])
async def test_500s_and_429s_during_a_flush_are_retried_and_the_events_delivered_once(
        gateway: StripeGateway, store: Store, sandbox: Any, status: int, count: int) -> None:
    meter = await create_meter(gateway)
    customer = await create_customer(gateway, "A")
    metering = service_for(store, gateway)
    await record_many(metering, [customer], 150)
    sandbox.faults.inject(status=status, count=count, path_prefix=V2_STREAM)

    report = await MeterFlusher(store, gateway, retry_delay_scale=0).flush_once()

    assert (report.sent, report.error, report.transport) == (150, None, "v2")
    assert sum(r.path == V2_STREAM and r.status == status for r in sandbox.request_log) == count
    assert await stripe_total(gateway, meter, customer) == local_total(store, customer)


async def test_a_flush_that_runs_out_of_retries_stops_and_keeps_the_events_pending(
        gateway: StripeGateway, store: Store, sandbox: Any) -> None:
    meter = await create_meter(gateway)
    customer = await create_customer(gateway, "A")
    metering = service_for(store, gateway)
    await record_many(metering, [customer], 30)
    sandbox.faults.inject(status=500, count=1000, path_prefix=V2_STREAM)
    flusher = MeterFlusher(store, gateway, retries=2, retry_delay_scale=0)

    stopped = await flusher.flush_once()
    sandbox.faults.clear()
    resumed = await flusher.flush_once()

    assert (stopped.sent, stopped.pending) == (0, 30) and stopped.error and "after retries" in stopped.error
    assert store.query_one("SELECT MIN(attempts) AS n FROM meter_events") == {"n": 2}
    assert (resumed.sent, resumed.pending) == (30, 0)
    assert await stripe_total(gateway, meter, customer) == local_total(store, customer)


async def test_events_older_than_35_days_are_marked_failed_with_the_reason(
        gateway: StripeGateway, store: Store) -> None:
    meter = await create_meter(gateway)
    customer = await create_customer(gateway, "A")
    then = Clock(time.time() - 35 * DAY - 120)  # recorded when it was fresh, never flushed since
    await service_for(store, gateway, clock=then).record(customer, 40, identifier="old")
    metering = service_for(store, gateway)
    await metering.record(customer, 2, identifier="new")

    report = await MeterFlusher(store, gateway, retry_delay_scale=0).flush_once()

    assert (report.sent, report.failed) == (1, 1)
    old = store.query_one("SELECT status, last_error, failed_at FROM meter_events WHERE identifier = 'old'")
    assert old is not None and (old["status"], old["last_error"]) == ("failed", TOO_OLD) and old["failed_at"]
    assert await stripe_total(gateway, meter, customer) == 2
    status = metering.status()
    assert status.failed == 1 and [(f.reason, f.events) for f in status.recent_failures] == [(TOO_OLD, 1)]


async def test_the_session_is_renewed_before_its_15_minutes_run_out(
        gateway: StripeGateway, store: Store, sandbox: Any) -> None:
    await create_meter(gateway)
    customer = await create_customer(gateway, "A")
    metering = service_for(store, gateway)
    clock = Clock()
    flusher = MeterFlusher(store, gateway, clock=clock, retry_delay_scale=0)
    sessions = []
    for minutes in (0, 10, 4, 1):  # 0: new; 10: same; 14: renewed (a minute early); 15: same
        clock.now += minutes * 60
        await metering.record(customer, 1)
        await flusher.flush_once()
        sessions.append(sum(r.path == V2_SESSION for r in sandbox.request_log))
    assert sessions == [1, 1, 2, 2]


async def test_a_session_stripe_says_expired_is_replaced_and_the_batch_resent(
        gateway: StripeGateway, store: Store, sandbox: Any) -> None:
    meter = await create_meter(gateway)
    customer = await create_customer(gateway, "A")
    metering = service_for(store, gateway)
    flusher = MeterFlusher(store, gateway, retry_delay_scale=0)
    await metering.record(customer, 3)
    await flusher.flush_once()
    sandbox.advance(hours=1)  # Stripe's clock moved on: the token we hold has expired there
    await metering.record(customer, 4)

    report = await flusher.flush_once()

    assert (report.sent, report.transport) == (1, "v2")
    assert [r.status for r in sandbox.request_log if r.path == V2_STREAM][-2:] == [401, 200]
    assert await stripe_total(gateway, meter, customer) == 7


async def test_when_v2_refuses_the_request_as_a_whole_the_batch_goes_through_v1(
        gateway: StripeGateway, store: Store, sandbox: Any) -> None:
    meter = await create_meter(gateway)
    customer = await create_customer(gateway, "A")
    metering = service_for(store, gateway)
    await record_many(metering, [customer], 12)
    sandbox.faults.inject(status=400, count=1, path_prefix=V2_STREAM)
    flusher = MeterFlusher(store, gateway, retry_delay_scale=0)

    report = await flusher.flush_once()
    await metering.record(customer, 5)
    later = await flusher.flush_once()  # v2 rests for a while after such a failure

    assert (report.sent, report.transport, later.transport) == (12, "v1", "v1")
    assert sum(r.path == "/v1/billing/meter_events" for r in sandbox.request_log) == 13
    assert await stripe_total(gateway, meter, customer) == local_total(store, customer)


async def test_an_event_stripe_refuses_for_good_is_marked_failed_and_the_rest_are_sent(
        gateway: StripeGateway, store: Store, sandbox: Any) -> None:
    meter = await create_meter(gateway)
    customer = await create_customer(gateway, "A")
    metering = service_for(store, gateway, trust_everyone=True)  # cus_ghost slipped past the local check
    await metering.record(customer, 8)
    await metering.record("cus_ghost", 9, identifier="ghost")
    await metering.record(customer, 10)
    sandbox.faults.inject(status=400, count=1, path_prefix=V2_STREAM)  # per-event answers come from v1

    report = await MeterFlusher(store, gateway, retry_delay_scale=0).flush_once()

    assert (report.sent, report.failed) == (2, 1)
    ghost = store.query_one("SELECT status, last_error FROM meter_events WHERE identifier = 'ghost'")
    assert ghost is not None and ghost["status"] == "failed" and "cus_ghost" in ghost["last_error"]
    assert await stripe_total(gateway, meter, customer) == 18


async def test_without_a_billing_meter_nothing_is_sent_and_the_status_says_to_run_setup(
        gateway: StripeGateway, store: Store, sandbox: Any) -> None:
    customer = await create_customer(gateway, "A")
    metering = service_for(store, gateway)
    await metering.record(customer, 8)
    flusher = MeterFlusher(store, gateway, retry_delay_scale=0)

    report = await flusher.flush_once()
    await create_meter(gateway)
    after_setup = await flusher.flush_once()

    assert report.sent == 0 and report.error and "setup-stripe" in report.error
    assert not any(r.path == V2_STREAM for r in sandbox.request_log[:-1])
    assert after_setup.sent == 1
    assert metering.status().last_flush == "sent 1, failed 0, 0 pending after via v2"


async def test_run_flushes_in_the_background_until_cancelled(gateway: StripeGateway, store: Store) -> None:
    meter = await create_meter(gateway)
    customer = await create_customer(gateway, "A")
    metering = service_for(store, gateway)
    runner = asyncio.ensure_future(MeterFlusher(store, gateway, retry_delay_scale=0).run(0.01))
    try:
        await record_many(metering, [customer], 40)
        async with asyncio.timeout(10):
            while metering.status().pending:
                await asyncio.sleep(0.01)
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    assert await stripe_total(gateway, meter, customer) == local_total(store, customer)


@pytest.mark.slow
async def test_a_long_burst_with_faults_reaches_stripe_exactly(
        gateway: StripeGateway, store: Store, sandbox: Any) -> None:
    meter = await create_meter(gateway)
    customers = [await create_customer(gateway, str(i)) for i in range(5)]
    metering = service_for(store, gateway)
    await record_many(metering, customers, int(os.environ.get("METERING_FLUSH_EVENTS", "20000")))
    for status in (500, 429, 503):
        sandbox.faults.inject(status=status, count=4, path_prefix=V2_STREAM)
    flusher = MeterFlusher(store, gateway, retry_delay_scale=0)
    while (await flusher.flush_once()).pending:
        pass
    for customer in customers:
        assert await stripe_total(gateway, meter, customer) == local_total(store, customer)


async def test_an_event_stripe_never_takes_leaves_the_periods_usage_and_cost(
        gateway: StripeGateway, store: Store) -> None:
    meter = await create_meter(gateway)
    customer = await create_customer(gateway, "A")
    now = int(time.time())
    period = (now - 40 * DAY, now + DAY)  # one long period (a trial's is three months) holding both events

    def service(clock: Callable[[], float]) -> MeteringService:
        async def exists(_: str) -> bool:
            return True

        return MeteringService(store, PRICING, tier_of=lambda c: PRICING.tiers["3mo"], period_of=lambda c, t: period,
                               customer_exists=exists, clock=clock)

    await service(Clock(now - 35 * DAY - 120)).record(customer, 150_000, identifier="old")  # never flushed in time
    metering = service(Clock(now))
    await metering.record(customer, 120_000, identifier="new")
    before = metering.summary(customer)

    report = await MeterFlusher(store, gateway, retry_delay_scale=0).flush_once()

    after = metering.summary(customer)
    assert (report.sent, report.failed) == (1, 1)
    assert (before.weighted_units, before.overage_cost_cents) == (270_000, 25_500)  # 3mo: 100,000 free, then 150
    assert (after.weighted_units, after.overage_cost_cents, after.events.failed) == (120_000, 3000, 1)
    assert [(op.operation, op.weighted_units) for op in after.by_operation] == [("custom", 120_000)]
    assert await stripe_total(gateway, meter, customer) == 120_000
    assert metering.quote(1000, customer=customer).period_usage == 120_000
    old_month = metering.summary(customer, time.strftime("%Y-%m", time.gmtime(now - 35 * DAY - 120)))
    assert (old_month.weighted_units, old_month.overage_cost_cents, old_month.events.failed) == (0, 0, 1)
