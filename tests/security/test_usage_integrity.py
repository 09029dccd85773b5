"""Usage integrity promises, one test each: a task slot belongs to the agent that took it, and a meter event
identifier belongs to its customer (one customer's identifier never blocks or replays another's)."""

from __future__ import annotations

import pytest

from aims_billing_mcp.errors import LimitReached, Refused
from aims_billing_mcp.services.metering import MeteringService
from aims_billing_mcp.store import Store
from tests.conftest import Clock
from tests.test_metering import make_service

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
