"""Metering on PostgreSQL with two instances sharing one database (issue 15): the recording service and the meter
flusher of each instance, against the sandbox through the real gateway. The same identifiers recorded on both are
counted once, and each event is sent to Stripe by one flusher once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aims_billing_mcp.services.meter_flusher import V2_STREAM, MeterFlusher
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.stripe_gateway import StripeGateway, StripeRequest, StripeResult, build_gateway
from tests.services.test_meter_flusher import PRICING, create_customer, create_meter, service_for, stripe_total
from tests.support.processes import rest_of
from tests.support.zygote import spawn

pytestmark = pytest.mark.anyio


@pytest.fixture
def gateway(make_settings: Callable[..., Settings], sandbox_app: Any) -> StripeGateway:
    return build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)


@pytest.fixture
def instances(open_postgres_store: Callable[..., Any]) -> tuple[Any, Any]:
    """Two "servers" on one database, two writer threads each and a pool of 4."""
    return open_postgres_store(writers=2, pool_size=4), open_postgres_store(writers=2, pool_size=4)


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


WORKER = Path(__file__).parents[1] / "support" / "metering_worker.py"


def test_three_recorders_on_one_database_with_the_same_identifiers_keep_each_acknowledged_event_once_across_kills(
        postgres_url: str) -> None:
    """Three processes (three servers) record the same identifiers at once; each is SIGKILLed at its own moment
    mid-load. Every acknowledged event is stored once, and every period total equals the sum of its events."""
    workers = [spawn([sys.executable, str(WORKER), postgres_url, "0"], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True) for _ in range(3)]
    acknowledged: set[str] = set()
    answers = 0  # acknowledgements in all, replays included
    try:
        for worker, lines in zip(workers, (300, 900, 1500), strict=True):  # killed one after another, mid-load
            assert worker.stdout is not None
            deadline = time.monotonic() + 60
            while lines and time.monotonic() < deadline:
                line = worker.stdout.readline()
                if not line:
                    break
                acknowledged.add(line.strip())
                lines -= 1
                answers += 1
            os.kill(worker.pid, signal.SIGKILL)
            rest, err = rest_of(worker)
            assert worker.returncode == -signal.SIGKILL and lines == 0, err  # none died of its own (a conflict)
            tail = rest.splitlines()[:-1]  # the last line may be cut
            acknowledged.update(line.strip() for line in tail)
            answers += len(tail)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate(timeout=30)

    with psycopg.connect(postgres_url) as conn:
        stored = [row[0] for row in conn.execute("SELECT identifier FROM meter_events")]
        assert acknowledged <= set(stored) and len(stored) == len(set(stored))
        assert answers > len(acknowledged)  # the same identifiers were answered by several processes
        totals = conn.execute("SELECT customer_id, period_start, weighted_units, raw_units, events "
                              "FROM meter_usage_totals ORDER BY 1, 2").fetchall()
        sums = conn.execute("SELECT customer_id, period_start, SUM(weighted_units)::bigint, SUM(raw_units)::bigint, "
                            "COUNT(*) FROM meter_events GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
        assert totals == sums
        by_operation = conn.execute(
            "SELECT customer_id, period_start, SUM(weighted_units)::bigint, SUM(events)::bigint "
            "FROM meter_usage_by_operation GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
        assert by_operation == [(c, p, w, n) for c, p, w, _, n in sums]
