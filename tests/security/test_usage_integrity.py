"""Usage integrity promises, one test each: a task slot belongs to the agent that took it, and a meter event
identifier belongs to its customer (one customer's identifier never blocks or replays another's)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from aims_billing_mcp.errors import LimitReached, Refused
from aims_billing_mcp.services.meter_flusher import MeterFlusher
from aims_billing_mcp.services.metering import MeteringService
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from aims_billing_mcp.stripe_gateway import build_gateway
from tests.conftest import Clock
from tests.services.test_meter_flusher import create_customer, create_meter, service_for, stripe_total
from tests.services.test_metering import make_service

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metering(store: Store, clock: Clock) -> MeteringService:
    return make_service(store, tiers={"cus_a": "3mo", "cus_b": "3mo"}, clock=clock)


async def test_another_agent_cannot_release_a_slot_it_did_not_take(metering: MeteringService, store: Store) -> None:
    mine = await metering.acquire_slot("cus_a", "task-1", 600)

    for lease in ("lease_guess", "x"):
        with pytest.raises(Refused) as caught:
            await metering.release_slot("cus_a", "task-1", lease)
        assert caught.value.param == "lease"

    assert store.query_one("SELECT COUNT(*) AS n FROM task_slots") == {"n": 1}
    assert (await metering.release_slot("cus_a", "task-1", mine.lease)).released


async def test_another_agent_cannot_take_over_or_renew_a_held_task_id(metering: MeteringService, clock: Clock) -> None:
    mine = await metering.acquire_slot("cus_a", "task-1", 60)

    with pytest.raises(Refused) as caught:
        await metering.acquire_slot("cus_a", "task-1", 600)
    with pytest.raises(Refused):
        await metering.acquire_slot("cus_a", "task-1", 600, "lease_someone_elses")

    assert caught.value.param == "lease"
    clock.advance(30)
    renewed = await metering.acquire_slot("cus_a", "task-1", 600, mine.lease)
    assert renewed.expires_at == int(clock.now) + 600


async def test_a_refusal_at_the_limit_does_not_reveal_other_tasks_ids(metering: MeteringService) -> None:
    await metering.acquire_slot("cus_a", "secret-task-1", 60)
    await metering.acquire_slot("cus_a", "secret-task-2", 60)

    with pytest.raises(LimitReached) as caught:
        await metering.acquire_slot("cus_a", "task-3", 60)

    assert "secret-task" not in str(caught.value.to_dict())


async def test_the_database_keeps_only_a_hash_of_a_slot_lease(metering: MeteringService, store: Store) -> None:
    slot = await metering.acquire_slot("cus_a", "task-1", 60)

    row = store.query_one("SELECT * FROM task_slots")
    assert row is not None and slot.lease not in str(dict(row)) and row["lease_hash"]


async def test_one_customers_meter_identifier_never_blocks_or_replays_anothers(
        metering: MeteringService, store: Store) -> None:
    mallory = await metering.record("cus_b", 7, identifier="task-1")  # squats alice's future identifier

    alice = await metering.record("cus_a", 500, identifier="task-1")
    alice_again = await metering.record("cus_a", 500, identifier="task-1")
    batch = await asyncio.gather(metering.record("cus_a", 3, identifier="same-turn"),
                                 metering.record("cus_b", 4, identifier="same-turn"))

    assert (alice.replayed, alice.customer, alice.period_usage) == (False, "cus_a", 500)
    assert (alice_again.replayed, mallory.period_usage) == (True, 7)
    assert [(r.customer, r.replayed, r.weighted_units) for r in batch] == [("cus_a", False, 3), ("cus_b", False, 4)]
    assert metering.summary("cus_a").weighted_units == 503 and metering.summary("cus_b").weighted_units == 11


async def test_two_customers_events_with_one_identifier_both_reach_stripe(
        make_settings: Callable[..., Settings], sandbox_app: Any, store: Store) -> None:
    gateway = build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)
    meter = await create_meter(gateway)
    alice, mallory = await create_customer(gateway, "alice"), await create_customer(gateway, "mallory")
    service = service_for(store, gateway)
    await service.record(mallory, 7, identifier="task-1")
    await service.record(alice, 500, identifier="task-1")

    report = await MeterFlusher(store, gateway, retry_delay_scale=0).flush_once()

    assert (report.sent, report.failed) == (2, 0)
    assert (await stripe_total(gateway, meter, alice), await stripe_total(gateway, meter, mallory)) == (500, 7)
    await gateway.close()
