"""Metering on PostgreSQL with two instances sharing one database (issue 15): the recording service and the meter
flusher of each instance, against the sandbox through the real gateway. The same identifiers recorded on both are
counted once, and each event is sent to Stripe by one flusher once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from aims_billing_mcp.services.meter_flusher import V2_STREAM, MeterFlusher
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import PostgresStore
from aims_billing_mcp.stripe_gateway import StripeGateway, StripeRequest, StripeResult, build_gateway
from tests.test_metering_flusher import PRICING, create_customer, create_meter, service_for, stripe_total

pytestmark = pytest.mark.anyio


@pytest.fixture
def gateway(make_settings: Callable[..., Settings], sandbox_app: Any) -> StripeGateway:
    return build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)


@pytest.fixture
def instances(postgres_url: str) -> Iterator[tuple[Any, Any]]:
    first = PostgresStore(postgres_url, writers=2, pool_size=4)
    second = PostgresStore(postgres_url, writers=2, pool_size=4)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


class Sent:
    """The real gateway, noting the identifier of every event a v2 stream request carries (what Stripe was sent,
    before its own identifier dedupe hides a duplicate)."""

    def __init__(self, gateway: StripeGateway, log: Counter[str]) -> None:
        self.gateway, self.log = gateway, log

    async def send(self, request: StripeRequest) -> StripeResult:
        if request.path == V2_STREAM:
            self.log.update(event["identifier"] for event in request.params["events"])
        return await self.gateway.send(request)


async def test_the_same_events_recorded_and_flushed_on_two_instances_are_counted_and_sent_once(
        gateway: StripeGateway, instances: tuple[Any, Any]) -> None:
    meter = await create_meter(gateway)
    customers = [await create_customer(gateway, "A"), await create_customer(gateway, "B")]
    services = [service_for(store, gateway) for store in instances]
    operations = list(PRICING.multipliers)

    answers = await asyncio.gather(*(
        service.record(customers[i % 2], 1 + i % 13, operation=operations[i % len(operations)], identifier=f"job-{i}")
        for i in range(240) for service in services))

    assert sorted(answer.replayed for answer in answers) == [False] * 240 + [True] * 240
    first, second = instances
    assert first.metering.status_counts() == {"pending": 240}
    recorded = {row["customer_id"]: int(row["units"]) for row in first.query(
        "SELECT customer_id, SUM(weighted_units)::bigint AS units FROM meter_events GROUP BY customer_id")}
    for customer in customers:  # the running totals agree with the events: no total lost between the instances
        period = services[1].summary(customer)
        assert period.weighted_units == recorded[customer] > 0

    sent: Counter[str] = Counter()
    flushers = [MeterFlusher(store, Sent(gateway, sent), retry_delay_scale=0, batch_size=50)  # type: ignore[arg-type]
                for store in instances]
    reports = await asyncio.gather(*(flusher.flush_once() for flusher in flushers))

    assert sum(report.sent for report in reports) == 240 and all(report.sent for report in reports)
    assert len(sent) == 240 and set(sent.values()) == {1}  # each event sent once, by one of the two
    assert second.metering.status_counts() == {"sent": 240}
    for customer in customers:
        assert await stripe_total(gateway, meter, customer) == recorded[customer]
