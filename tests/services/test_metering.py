"""LUC metering: each event recorded once and durably with its weighted units, allowance and overage; bad input
refused with nothing written; replays answered with the first result; summaries, quotes and concurrency slots."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aims_billing_mcp.errors import IdempotencyConflict, InvalidInput, LimitReached, NotFound
from aims_billing_mcp.services.metering import MeteringService, stripe_identifier
from aims_billing_mcp.services.tiers import Pricing, calendar_month_of, cost_cents, month_bounds
from aims_billing_mcp.store import Store, connect, migrate
from tests.conftest import Clock, migrated_copy

pytestmark = pytest.mark.anyio

PRICING = Pricing.load()
DAY = 86_400


class Customers:
    """Stripe's answer to "does this customer exist?", counting the questions."""

    def __init__(self, *known: str) -> None:
        self.known = set(known)
        self.asked: list[str] = []

    async def __call__(self, customer: str) -> bool:
        self.asked.append(customer)
        await asyncio.sleep(0)
        return customer in self.known


def make_service(store: Store, *, tiers: dict[str, str] | None = None, customers: Customers | None = None,
                 clock: Callable[[], float] = time.time, pricing: Pricing = PRICING) -> MeteringService:
    tiers = tiers or {}
    exists: Callable[[str], Awaitable[bool]] = customers or Customers("cus_a", "cus_b", "cus_3mo", "cus_6mo", "cus_9mo")
    return MeteringService(store, pricing, tier_of=lambda c: pricing.tier(tiers.get(c, "p2p")),
                           period_of=lambda c, t: calendar_month_of(t), customer_exists=exists, clock=clock)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metering(store: Store, clock: Clock) -> MeteringService:
    return make_service(store, tiers={"cus_3mo": "3mo", "cus_6mo": "6mo", "cus_9mo": "9mo"}, clock=clock)


# A period's counted usage as stored: its totals row plus its events not folded into it yet (migration 0022; a `last`
# meter's total holds its value already).
_UNFOLDED_OF_T = ("FROM meter_events AS e WHERE e.id > v.folded_upto AND e.customer_id = t.customer_id AND "
                  "e.period_start = t.period_start AND e.meter = t.meter AND t.last_at IS NULL), 0)")
COUNTED_TOTALS = (
    f"SELECT t.customer_id, t.weighted_units + COALESCE((SELECT SUM(e.weighted_units) {_UNFOLDED_OF_T} AS "
    f"weighted_units, t.events + COALESCE((SELECT COUNT(*) {_UNFOLDED_OF_T} AS events FROM meter_usage_totals AS t, "
    "meter_usage_version AS v"
)


def written(store: Store) -> tuple[int, int]:
    events = store.query_one("SELECT COUNT(*) AS n FROM meter_events")
    totals = store.query_one("SELECT COUNT(*) AS n FROM meter_usage_totals")
    assert events is not None and totals is not None
    return events["n"], totals["n"]


# --- recording ------------------------------------------------------------------------------------------------------


async def test_an_event_answers_its_weighted_units_and_the_period_allowance_after_commit(
        metering: MeteringService, store: Store, clock: Clock) -> None:
    result = await metering.record("cus_6mo", 1000, operation="code", agent_id="agent-1", metadata={"task": "t1"})

    assert result.weighted_units == 1500 and result.multiplier == 1.5 and result.operation == "code"
    assert (result.period_usage, result.allowance, result.remaining) == (1500, 250_000, 248_500)
    assert (result.overage_units, result.period_overage_units, result.cost_cents) == (0, 0, 0)
    assert (result.period_start, result.period_end) == calendar_month_of(int(clock.now))
    assert result.tier == "6mo" and result.currency == "usd" and not result.replayed
    assert result.identifier.startswith("luc_")
    row = store.query_one("SELECT status, weighted_units, attempts FROM meter_events WHERE identifier = ?",
                          (result.identifier,))
    assert row == {"status": "pending", "weighted_units": 1500, "attempts": 0}


@pytest.mark.parametrize(("units", "multiplier", "weighted"), [
    (1, "1.5", 2),  # 1.5 rounds half up
    (3, "1.5", 5),  # 4.5 -> 5
    (7, 2.5, 18),  # 17.5 -> 18
    (1000, 1.001, 1001),
    (333, "2.999", 999),  # 998.667 -> 999
])
async def test_weighted_units_are_raw_times_the_multiplier_rounded_half_up(
        metering: MeteringService, units: int, multiplier: str | float, weighted: int) -> None:
    result = await metering.record("cus_a", units, multiplier=multiplier)
    assert result.weighted_units == weighted and result.operation is None


async def test_an_event_without_operation_or_multiplier_counts_at_one_x(metering: MeteringService) -> None:
    result = await metering.record("cus_a", 42)
    assert (result.multiplier, result.weighted_units) == (1.0, 42)


BAD_INPUTS: list[tuple[str, dict[str, Any], str, str]] = [
    ("zero units", {"units": 0}, "units", "positive"),
    ("negative units", {"units": -5}, "units", "positive"),
    ("fractional units", {"units": 1.5}, "units", "whole number"),
    ("boolean units", {"units": True}, "units", "whole number"),
    ("huge units", {"units": 10**13}, "units", "split"),
    ("unknown operation", {"operation": "dance"}, "operation", "chat (1x), tool_call (1x), code (1.5x)"),
    ("multiplier below 1.0", {"multiplier": 0.5}, "multiplier", "outside 1.0-3.0"),
    ("multiplier above 3.0", {"multiplier": 3.5}, "multiplier", "outside 1.0-3.0"),
    ("multiplier with 4 decimals", {"multiplier": 1.2345}, "multiplier", "3 decimals"),
    ("multiplier not a number", {"multiplier": "fast"}, "multiplier", "within 1.0-3.0"),
    ("operation and multiplier", {"operation": "code", "multiplier": 2}, "multiplier", "not both"),
    ("timestamp 36 days ago", {"timestamp": -36 * DAY}, "timestamp", "past 35 days"),
    ("timestamp 10 minutes ahead", {"timestamp": 600}, "timestamp", "5 minutes ahead"),
    ("timestamp not an integer", {"timestamp": "yesterday"}, "timestamp", "epoch seconds"),
    ("identifier over 100 characters", {"identifier": "x" * 101}, "identifier", "at most 100"),
    ("empty identifier", {"identifier": ""}, "identifier", "non-empty"),
    ("unknown customer", {"customer": "cus_nobody"}, "customer", "does not exist"),
    ("empty customer", {"customer": ""}, "customer", "customer id"),
    ("agent id too long", {"agent_id": "a" * 201}, "agent_id", "at most 200"),
    ("metadata not an object", {"metadata": ["x"]}, "metadata", "object"),
]


@pytest.mark.parametrize(("changes", "param", "says"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
async def test_each_bad_input_is_refused_with_a_clear_error_and_nothing_written(
        metering: MeteringService, store: Store, clock: Clock, changes: dict[str, Any], param: str, says: str) -> None:
    call: dict[str, Any] = {"customer": "cus_a", "units": 100, **changes}
    if isinstance(call.get("timestamp"), int):
        call["timestamp"] += int(clock.now)

    with pytest.raises(InvalidInput if param != "customer" or call["customer"] == "" else NotFound) as caught:
        await metering.record(call.pop("customer"), call.pop("units"), **call)

    assert caught.value.param == param
    assert says in caught.value.message
    assert written(store) == (0, 0)


async def test_a_timestamp_inside_stripes_window_and_the_current_period_is_kept(
        store: Store, clock: Clock) -> None:
    period = (int(clock.now) - 40 * DAY, int(clock.now) + DAY)  # a long period, like a 9mo trial's three months
    service = MeteringService(store, PRICING, tier_of=lambda c: PRICING.p2p, period_of=lambda c, t: period,
                              customer_exists=Customers("cus_a"), clock=clock)
    for offset in (-34 * DAY, -3600, 299):
        result = await service.record("cus_a", 10, timestamp=int(clock.now) + offset)
        assert result.timestamp == int(clock.now) + offset


async def test_a_timestamp_before_the_current_period_is_refused_naming_it(
        metering: MeteringService, store: Store, clock: Clock) -> None:
    start, _ = calendar_month_of(int(clock.now))
    clock.now = start + 3600  # early in this month: last month is within Stripe's 35 days, but it has ended

    with pytest.raises(InvalidInput) as caught:
        await metering.record("cus_a", 100, timestamp=start - 60)

    assert caught.value.param == "timestamp" and "current usage period" in caught.value.message
    assert written(store) == (0, 0)


async def test_the_same_identifier_with_the_same_content_returns_the_first_result_replayed(
        metering: MeteringService, store: Store) -> None:
    first = await metering.record("cus_3mo", 500, operation="research", identifier="evt-1", metadata={"a": 1})
    await metering.record("cus_3mo", 700, operation="chat")

    again = await metering.record("cus_3mo", 500, operation="research", identifier="evt-1", metadata={"a": 1})

    assert again.replayed and again.model_dump(exclude={"replayed"}) == first.model_dump(exclude={"replayed"})
    assert written(store) == (2, 1)
    assert metering.summary("cus_3mo").weighted_units == 1700


@pytest.mark.parametrize(("changes", "names"), [
    ({"units": 501}, "units 500 vs 501"),
    ({"operation": "chat"}, "research vs chat"),
    ({"operation": None, "multiplier": 2.0}, "research vs multiplier 2"),
    ({"metadata": {"a": 2}}, "metadata"),
    ({"agent_id": "other"}, "agent_id None vs other"),
    ({"timestamp": -60}, "timestamp"),
])
async def test_the_same_identifier_with_other_content_is_a_conflict_naming_it(
        metering: MeteringService, store: Store, clock: Clock, changes: dict[str, Any], names: str) -> None:
    await metering.record("cus_3mo", 500, operation="research", identifier="evt-1", metadata={"a": 1})
    call: dict[str, Any] = {"customer": "cus_3mo", "units": 500, "operation": "research", "identifier": "evt-1",
            "metadata": {"a": 1}, **changes}
    if "timestamp" in call:
        call["timestamp"] += int(clock.now)

    with pytest.raises(IdempotencyConflict) as caught:
        await metering.record(call.pop("customer"), call.pop("units"), **call)

    assert "'evt-1'" in caught.value.message and names in caught.value.message
    assert caught.value.param == "identifier"
    assert written(store) == (1, 1)


async def test_the_same_identifier_twice_in_flight_at_once_is_recorded_once(
        metering: MeteringService, store: Store) -> None:
    results = await asyncio.gather(*(metering.record("cus_a", 10, identifier="twin") for _ in range(5)))

    assert sorted(r.replayed for r in results) == [False, True, True, True, True]
    assert written(store) == (1, 1)
    assert metering.summary("cus_a").weighted_units == 10


async def test_the_event_that_crosses_the_allowance_is_split_into_included_and_overage_units(
        metering: MeteringService) -> None:
    below = await metering.record("cus_3mo", 99_000)
    crossing = await metering.record("cus_3mo", 1_500, operation="research")  # 3,000 weighted: 1,000 in, 2,000 over
    beyond = await metering.record("cus_3mo", 10)

    assert (below.remaining, below.overage_units, below.cost_cents) == (1_000, 0, 0)
    assert (crossing.weighted_units, crossing.remaining, crossing.overage_units) == (3_000, 0, 2_000)
    assert crossing.cost_cents == 300  # 2,000 units at 150 cents per 1,000
    assert (beyond.overage_units, beyond.period_overage_units) == (10, 2_010)
    assert beyond.cost_cents == cost_cents(2_010, 150) - cost_cents(2_000, 150) == 2  # 301.5 rounds to 302
    assert beyond.period_overage_cost_cents == 302


async def test_p2p_pays_every_unit_at_its_rate(metering: MeteringService) -> None:
    result = await metering.record("cus_a", 1000, operation="image")

    assert (result.tier, result.allowance, result.remaining) == ("p2p", 0, 0)
    assert result.overage_units == 2500 and result.cost_cents == 500  # 2,500 x 200 / 1,000


SMALL = Pricing.model_validate({**PRICING.model_dump(), "tiers": {
    **{k: v.model_dump() for k, v in PRICING.tiers.items()},
    "3mo": {**PRICING.tiers["3mo"].model_dump(), "tokens_per_month": 5_000, "overage_rate": 137},
}})


@settings(max_examples=int(os.environ.get("METERING_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(st.tuples(st.integers(1, 4_000), st.sampled_from([*PRICING.multipliers, None]),
                                 st.booleans()), min_size=1, max_size=25),
       tier=st.sampled_from(["p2p", "3mo"]))
def test_summary_equals_the_sum_of_events_and_overage_is_never_negative(
        tmp_path_factory: pytest.TempPathFactory, events: list[tuple[int, str | None, bool]], tier: str) -> None:
    store = Store(migrated_copy(tmp_path_factory.mktemp("prop") / "m.db"))
    service = make_service(store, tiers={"cus_a": tier}, pricing=SMALL)

    async def run() -> list[Any]:
        out = []
        for units, operation, together in events:  # some sequential, some concurrent pairs sharing a writer job
            if together:
                out += await asyncio.gather(service.record("cus_a", units, operation=operation),
                                            service.record("cus_a", units, operation=operation))
            else:
                out.append(await service.record("cus_a", units, operation=operation))
        return out

    try:
        results = asyncio.run(run())
        summary = service.summary("cus_a")
        allowance, rate = SMALL.tier(tier).tokens_per_month, SMALL.tier(tier).overage_rate
        total = sum(r.weighted_units for r in results)
        assert summary.weighted_units == total == max(r.period_usage for r in results)
        assert summary.raw_units == sum(r.raw_units for r in results)
        assert summary.overage_units == sum(r.overage_units for r in results) == max(0, total - allowance)
        assert summary.overage_cost_cents == sum(r.cost_cents for r in results) == cost_cents(max(0, total - allowance),
                                                                                           rate)
        assert all(r.overage_units >= 0 and r.cost_cents >= 0 and r.remaining >= 0 for r in results)
        assert all(isinstance(r.cost_cents, int) and isinstance(r.period_overage_cost_cents, int) for r in results)
        assert all(r.overage_units <= r.weighted_units for r in results)
        by_op = {u.operation: u.weighted_units for u in summary.by_operation}
        assert sum(by_op.values()) == total
        row = store.query_one(f"SELECT weighted_units, events FROM ({COUNTED_TOTALS}) WHERE customer_id = 'cus_a'")
        assert row == {"weighted_units": total, "events": len(results)}
        month = service.summary("cus_a", time.strftime("%Y-%m", time.gmtime(results[0].timestamp)))
        assert (month.weighted_units, month.overage_units, month.overage_cost_cents, month.events) == (
            summary.weighted_units, summary.overage_units, summary.overage_cost_cents, summary.events)
    finally:
        store.close()


async def test_64_concurrent_callers_share_commits_and_every_acknowledged_event_is_stored_once(
        metering: MeteringService, store: Store) -> None:
    per_caller = int(os.environ.get("METERING_EVENTS", "1600")) // 64
    acknowledged: list[str] = []

    async def caller(n: int) -> None:
        for i in range(per_caller):
            result = await metering.record(("cus_a", "cus_b", "cus_3mo")[i % 3], 1 + i % 7, identifier=f"c{n}-{i}",
                                           operation=("chat", "code", "image")[n % 3])
            acknowledged.append(result.identifier)

    await asyncio.gather(*(caller(n) for n in range(64)))

    stored = [row["identifier"] for row in store.query("SELECT identifier FROM meter_events")]
    assert len(acknowledged) == len(stored) == 64 * per_caller
    assert sorted(acknowledged) == sorted(stored)
    totals = store.query(f"SELECT customer_id, weighted_units FROM ({COUNTED_TOTALS}) ORDER BY customer_id")
    sums = store.query("SELECT customer_id, SUM(weighted_units) AS weighted_units FROM meter_events "
                       "GROUP BY customer_id ORDER BY customer_id")
    assert totals == sums
    assert store._writer.batches < len(stored) / 8  # shared commits, not one per event


# --- customers ------------------------------------------------------------------------------------------------------


async def test_a_customer_is_verified_once_and_the_answer_is_kept_in_the_database(store: Store) -> None:
    customers = Customers("cus_new")
    service = make_service(store, customers=customers)

    await asyncio.gather(*(service.record("cus_new", 1) for _ in range(10)))
    await service.record("cus_new", 1)
    restarted = make_service(store, customers=customers)
    await restarted.record("cus_new", 1)

    assert customers.asked == ["cus_new"]


async def test_an_unknown_customer_is_asked_about_again_only_after_a_minute(store: Store, clock: Clock) -> None:
    customers = Customers()
    service = make_service(store, customers=customers, clock=clock)
    for _ in range(3):
        with pytest.raises(NotFound):
            await service.record("cus_late", 1)
    customers.known.add("cus_late")
    clock.now += 61

    await service.record("cus_late", 1)

    assert customers.asked == ["cus_late", "cus_late"]


async def test_a_customer_known_from_a_subscription_is_never_asked_about(store: Store) -> None:
    await store.write(lambda conn: conn.execute(
        "INSERT INTO billing_provisions (customer_id, tier, status, updated_at) "
        "VALUES ('cus_sub', '3mo', 'active', 'x')"))
    customers = Customers()
    await make_service(store, customers=customers).record("cus_sub", 5)
    assert customers.asked == []


# --- summary and quote ----------------------------------------------------------------------------------------------


async def test_the_summary_gives_units_by_operation_allowance_overage_and_statuses(
        metering: MeteringService) -> None:
    await metering.record("cus_3mo", 60_000, operation="code")  # 90,000
    await metering.record("cus_3mo", 10_000, operation="chat")  # 10,000
    await metering.record("cus_3mo", 2_000, multiplier=2.5)  # 5,000 custom: all overage

    summary = metering.summary("cus_3mo")

    assert [(u.operation, u.events, u.raw_units, u.weighted_units) for u in summary.by_operation] == [
        ("chat", 1, 10_000, 10_000), ("code", 1, 60_000, 90_000), ("custom", 1, 2_000, 5_000)]
    assert (summary.weighted_units, summary.raw_units, summary.allowance, summary.remaining) == (
        105_000, 72_000, 100_000, 0)
    assert (summary.overage_units, summary.overage_cost_cents, summary.tier) == (5_000, 750, "3mo")
    assert summary.events.model_dump() == {"pending": 3, "sent": 0, "failed": 0}


async def test_a_month_summary_covers_the_events_of_that_utc_month(metering: MeteringService, clock: Clock) -> None:
    start, _ = calendar_month_of(int(clock.now))
    clock.now = start - 60  # the last minute of last month
    await metering.record("cus_a", 100)
    clock.now = start + 3600
    await metering.record("cus_a", 7)

    last = time.gmtime(start - 60)
    previous = metering.summary("cus_a", f"{last.tm_year:04d}-{last.tm_mon:02d}")
    current = metering.summary("cus_a", time.strftime("%Y-%m", time.gmtime(start)))

    assert (previous.weighted_units, previous.overage_cost_cents, previous.period_end) == (100, 20, start)
    assert (current.weighted_units, current.period_start) == (7, start)
    assert metering.summary("cus_nobody", "2020-02").weighted_units == 0


@pytest.mark.parametrize("period", ["2026-13", "26-01", "last month", "2026-1"])
def test_a_summary_for_a_malformed_period_is_refused(metering: MeteringService, period: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        metering.summary("cus_a", period)
    assert caught.value.param == "period" and "YYYY-MM" in caught.value.message


def test_month_bounds_cover_the_whole_utc_month() -> None:
    assert month_bounds("2026-12") == (1796083200, 1798761600)
    assert month_bounds("2024-02")[1] - month_bounds("2024-02")[0] == 29 * DAY


async def test_a_quote_prices_the_margin_now_and_writes_nothing(metering: MeteringService, store: Store) -> None:
    await metering.record("cus_3mo", 99_500)
    before = written(store)

    quote = metering.quote(1_000, operation="code", customer="cus_3mo")  # 1,500 weighted: 500 in, 1,000 over
    anonymous = metering.quote(1_000, operation="code")

    assert (quote.weighted_units, quote.remaining, quote.overage_units, quote.cost_cents) == (1_500, 500, 1_000, 150)
    assert (anonymous.tier, anonymous.overage_units, anonymous.cost_cents) == ("p2p", 1_500, 300)
    assert written(store) == before
    with pytest.raises(InvalidInput):
        metering.quote(0)


# --- slots ----------------------------------------------------------------------------------------------------------


async def test_slots_beyond_the_tier_limit_are_refused_naming_the_limit_not_other_tasks(
        metering: MeteringService) -> None:
    await metering.acquire_slot("cus_3mo", "task-1", 60)
    second = await metering.acquire_slot("cus_3mo", "task-2", 60)

    with pytest.raises(LimitReached) as caught:
        await metering.acquire_slot("cus_3mo", "task-3", 60)

    assert second.in_use == 2 and second.limit == 2
    assert "2 of the 2" in caught.value.message and "task-1" not in str(caught.value.to_dict())
    assert caught.value.details == {"limit": 2, "in_use": 2}


async def test_acquiring_the_same_task_again_with_its_lease_renews_the_expiry(
        metering: MeteringService, clock: Clock) -> None:
    first = await metering.acquire_slot("cus_a", "task-1", 60)
    clock.now += 30

    again = await metering.acquire_slot("cus_a", "task-1", 600, first.lease)

    assert again.replayed and again.acquired_at == first.acquired_at
    assert again.expires_at == int(clock.now) + 600 and again.lease == first.lease


async def test_an_expired_slot_frees_itself(metering: MeteringService, clock: Clock) -> None:
    first = await metering.acquire_slot("cus_a", "task-1", 60)
    with pytest.raises(LimitReached):
        await metering.acquire_slot("cus_a", "task-2", 60)
    clock.now += 60

    slot = await metering.acquire_slot("cus_a", "task-2", 60)

    assert slot.in_use == 1
    release = await metering.release_slot("cus_a", "task-1", first.lease)
    assert not release.released


async def test_released_slots_can_be_taken_again_and_release_is_idempotent(metering: MeteringService) -> None:
    slot = await metering.acquire_slot("cus_a", "task-1", 60)
    released = await metering.release_slot("cus_a", "task-1", slot.lease)
    again = await metering.release_slot("cus_a", "task-1", slot.lease)

    assert (released.released, released.in_use, again.released) == (True, 0, False)
    assert (await metering.acquire_slot("cus_a", "task-2", 60)).in_use == 1


async def test_racing_acquires_never_take_more_slots_than_the_tier_allows(
        metering: MeteringService, store: Store) -> None:
    outcomes = await asyncio.gather(*(metering.acquire_slot("cus_6mo", f"task-{i}", 60) for i in range(20)),
                                    return_exceptions=True)

    assert sum(not isinstance(o, BaseException) for o in outcomes) == 5
    assert all(isinstance(o, LimitReached) for o in outcomes if isinstance(o, BaseException))
    assert store.query_one("SELECT COUNT(*) AS n FROM task_slots") == {"n": 5}


@pytest.mark.parametrize(("task_id", "ttl", "param"), [("", 60, "task_id"), ("t", 0, "ttl_seconds"),
                                                       ("t", 8 * DAY, "ttl_seconds"), ("t", 1.5, "ttl_seconds")])
async def test_a_slot_with_a_bad_task_id_or_ttl_is_refused(
        metering: MeteringService, store: Store, task_id: str, ttl: Any, param: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        await metering.acquire_slot("cus_a", task_id, ttl)
    assert caught.value.param == param
    assert store.query_one("SELECT COUNT(*) AS n FROM task_slots") == {"n": 0}


async def test_a_slot_for_an_unknown_customer_is_refused(metering: MeteringService) -> None:
    with pytest.raises(NotFound):
        await metering.acquire_slot("cus_nobody", "task-1", 60)


# --- status ---------------------------------------------------------------------------------------------------------


async def test_status_counts_the_queue_and_ages_its_oldest_event(metering: MeteringService, clock: Clock) -> None:
    empty = metering.status()
    await metering.record("cus_a", 5)
    await metering.record("cus_b", 5)
    clock.now += 120

    status = metering.status()

    assert (empty.pending, empty.oldest_pending_age_seconds, empty.last_flush_at) == (0, None, None)
    assert (status.pending, status.sent, status.failed) == (2, 0, 0)
    assert status.oldest_pending_age_seconds is not None and status.oldest_pending_age_seconds >= 119


def test_events_recorded_before_identifiers_were_per_customer_keep_the_identifier_they_are_sent_with(
        tmp_path: Any) -> None:
    conn = connect(tmp_path / "old.db")
    migrate(conn, upto=10)
    conn.execute("INSERT INTO meter_events (identifier, customer_id, event_name, raw_units, multiplier_milli, "
                 "weighted_units, timestamp, created_at) VALUES ('evt-1', 'cus_a', 'luc', 5, 1000, 5, 1, 'x')")

    migrate(conn)

    row = conn.execute("SELECT id, identifier, stripe_identifier FROM meter_events").fetchone()
    assert tuple(row) == (1, "evt-1", "evt-1")
    conn.execute("INSERT INTO meter_events (identifier, customer_id, event_name, raw_units, multiplier_milli, "
                 "weighted_units, timestamp, created_at, stripe_identifier) VALUES ('evt-1', 'cus_b', 'e', 5, 1000, 5, "
                 "1, 'x', 'cus_b:evt-1')")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO meter_events (identifier, customer_id, event_name, raw_units, multiplier_milli, "
                     "weighted_units, timestamp, created_at, stripe_identifier) VALUES ('evt-1', 'cus_b', 'e', 5, "
                     "1000, 5, 1, 'x', 'y')")
    assert conn.execute("SELECT MAX(id) FROM meter_events").fetchone()[0] == 2
    conn.close()


@pytest.mark.parametrize(("customer", "identifier", "sent_as"), [
    ("cus_A1", "run-1", "cus_A1:run-1"),
    ("cus_A1", "x" * 100, None),  # over Stripe's 100 characters together: hashed
    ("cus_a:b", "c", None),  # not a plain Stripe id: hashed, so ("cus_a", "b:c") cannot collide with it
])
def test_the_identifier_sent_to_stripe_is_unique_per_customer_and_identifier(
        customer: str, identifier: str, sent_as: str | None) -> None:
    sent = stripe_identifier(customer, identifier)
    assert len(sent) <= 100 and (sent == sent_as if sent_as else sent.startswith("h_"))
    assert sent != stripe_identifier("cus_other", identifier)
