"""The batch path's shortcuts decide exactly as the full checks do: an event in the common shape (plain str and int
fields, the default meter, no timestamp, multiplier or metadata) skips the model and the per-field checks only when
every one of them would pass it unchanged; anything else is refused with the same field, and the money ceiling,
known once per service, still refuses each event above it."""

from __future__ import annotations

import time
from typing import Any

import pytest

from aims_billing_mcp.services import metering as metering_module
from aims_billing_mcp.services.ceiling import Ceiling
from aims_billing_mcp.services.metering import MeteringService, stripe_identifier
from aims_billing_mcp.services.metering_models import MeterEventBatchResult
from aims_billing_mcp.services.tiers import Pricing, UsagePeriod, calendar_month_of
from aims_billing_mcp.store import Store
from tests.conftest import Clock

pytestmark = pytest.mark.anyio

PRICING = Pricing.load()


def service(store: Store, ceiling: Ceiling | None = None) -> MeteringService:
    async def exists(customer: str) -> bool:
        return customer == "cus_a"

    return MeteringService(store, PRICING, tier_of=lambda c: PRICING.tier("3mo"),
                           period_of=lambda c, t: calendar_month_of(t), customer_exists=exists, ceiling=ceiling)


BASE = {"customer": "cus_a", "units": 1000}
# The customer unknown (its events go through the full checks once verified) or known from an earlier batch (its
# events in the common shape are placed in one step, `_placed`): both decide every event alike.
KNOWN = pytest.mark.parametrize("known", [False, True], ids=["customer-new", "customer-known"])


async def metering_for(store: Store, known: bool, ceiling: Ceiling | None = None) -> MeteringService:
    metering = service(store, ceiling)
    if known:
        await metering.record_many([{**BASE, "identifier": "earlier"}])
    return metering


@pytest.mark.parametrize("change, field", [
    ({"customer": " cus_a"}, "customer"),  # not stripped: refused, not trimmed
    ({"customer": "cus_a "}, "customer"),
    ({"customer": ""}, "customer"),
    ({"customer": "cus_" + "a" * 252}, "customer"),  # 256 characters
    ({"customer": 7}, "customer"),
    ({"customer": ["cus_a"]}, "customer"),  # not even hashable
    ({"units": 0}, "units"),
    ({"units": -1}, "units"),
    ({"units": 10**12 + 1}, "units"),
    ({"units": True}, "units"),  # a bool is not a number of units
    ({"units": 1000.0}, "units"),
    ({"operation": "dance"}, "operation"),
    ({"operation": 5}, "operation"),
    ({"operation": ""}, "operation"),
    ({"identifier": ""}, "identifier"),
    ({"identifier": "x" * 101}, "identifier"),
    ({"identifier": 12}, "identifier"),
    ({"agent_id": ""}, "agent_id"),
    ({"agent_id": "a" * 201}, "agent_id"),
    ({"agent_id": 3}, "agent_id"),
    ({"meter": "no_such_meter"}, "meter"),
    ({"colour": "red"}, "colour"),
])
@KNOWN
async def test_an_event_in_the_common_shape_is_refused_naming_the_field_any_full_check_names(
        store: Store, change: dict[str, Any], field: str, known: bool) -> None:
    metering = await metering_for(store, known)
    answer = await metering.record_many([BASE, {**BASE, **change}])
    del answer.results[0]  # the customer's first event of the batch: placed by the full path
    assert [(r.status, r.error.field if r.error else None) for r in answer.results] == [("refused", field)]
    assert store.query_one("SELECT COUNT(*) AS n FROM meter_events") == {"n": 2 if known else 1}  # not this one


@pytest.mark.parametrize("change, operation, weighted", [
    ({}, None, 1000),
    ({"operation": None, "identifier": None, "agent_id": None, "meter": None}, None, 1000),
    ({"operation": "code"}, "code", 1500),
    ({"operation": " Code "}, "code", 1500),  # operation names are normalised, as by the single tool
    ({"units": 50_000}, None, 50_000),
    ({"identifier": "x" * 100, "agent_id": "a" * 200}, None, 1000),
    ({"meter": "luc_tokens", "operation": "code"}, "code", 1500),  # named: the full path, the same result
    ({"multiplier": 1.5}, None, 1500),
])
@KNOWN
async def test_an_accepted_event_is_stored_as_the_full_checks_store_it(
        store: Store, change: dict[str, Any], operation: str | None, weighted: int, known: bool) -> None:
    metering = await metering_for(store, known)
    before = int(time.time())
    answer = await metering.record_many([{**BASE, "identifier": "first"}, {**BASE, **change}])
    del answer.results[0]  # the customer's first event of the batch: placed by the full path
    assert [(r.status, r.weighted_units) for r in answer.results] == [("accepted", weighted)]
    row = store.query_one("SELECT identifier, operation, weighted_units, agent_id, timestamp, meter FROM meter_events "
                          "ORDER BY id DESC LIMIT 1")
    assert row is not None
    assert (row["operation"], row["weighted_units"], row["meter"]) == (operation, weighted, "luc_tokens")
    assert row["identifier"] == (change.get("identifier") or answer.results[0].identifier)
    assert row["identifier"].startswith("luc_") or change.get("identifier")
    assert row["agent_id"] == change.get("agent_id")
    assert before <= row["timestamp"] <= int(time.time())


@KNOWN
async def test_a_batch_refuses_each_event_whose_units_could_cost_more_than_the_ceiling(
        store: Store, known: bool) -> None:
    # 3mo's overage rate is 150 cents per 1,000 units: 100,000 units could cost 15,000 cents, 1,000 units 150
    metering = await metering_for(store, known, Ceiling(amount=10_000))
    answer = await metering.record_many([{**BASE, "units": 100_000}, BASE, {**BASE, "units": 100_000}])
    assert [(r.status, r.error.code if r.error else None, r.error.field if r.error else None)
            for r in answer.results] == [("refused", "amount_above_ceiling", "units"), ("accepted", None, None),
                                         ("refused", "amount_above_ceiling", "units")]
    single = await metering.record("cus_a", 1000)
    assert single.weighted_units == 1000


async def test_a_ceiling_that_cannot_be_applied_to_the_pricing_currency_refuses_every_event(store: Store) -> None:
    unknown = PRICING.model_copy(update={"currency": "xzz"})  # no minor unit known, no ceiling of its own

    async def exists(customer: str) -> bool:
        return True

    metering = MeteringService(store, unknown, tier_of=lambda c: PRICING.tier("3mo"),
                               period_of=lambda c, t: calendar_month_of(t), customer_exists=exists)
    answer = await metering.record_many([BASE])
    assert [(r.status, r.error.code if r.error else None) for r in answer.results] == [
        ("refused", "amount_above_ceiling")]


async def test_a_batch_answer_is_what_validating_its_values_makes(store: Store) -> None:
    metering = service(store)
    await metering.record_many([{**BASE, "identifier": "first"}])
    answer = await metering.record_many([
        {**BASE, "identifier": "first"},  # replayed
        {**BASE, "identifier": "second", "operation": "code"},  # accepted
        {**BASE, "units": 0},  # refused by its own check
        {**BASE, "identifier": "first", "units": 7},  # refused by the writer: another content
    ])
    validated = MeterEventBatchResult.model_validate(answer.model_dump(exclude_unset=True))
    assert [r.status for r in answer.results] == ["replayed", "accepted", "refused", "refused"]
    assert answer == validated
    assert answer.model_dump_json() == validated.model_dump_json()
    assert [(list(r.__dict__), r.model_fields_set) for r in answer.results] == [
        (list(r.__dict__), r.model_fields_set) for r in validated.results]
    assert (answer.model_fields_set, answer.totals.model_fields_set) == (
        validated.model_fields_set, validated.totals.model_fields_set)


async def test_assigning_a_field_of_one_batch_result_changes_no_other_result(store: Store) -> None:
    answer = await service(store).record_many([{**BASE, "identifier": "a"}, {**BASE, "identifier": "b"}, {"units": 1}])
    first, second, refused = answer.results
    first.weighted_units = 0
    refused.cost_cents = 0
    assert (second.weighted_units, second.model_fields_set) == (1000, set(type(second).model_fields))
    assert refused.model_fields_set == {"index", "status", "identifier", "error", "cost_cents"}


@pytest.mark.parametrize(("customer", "identifier"), [
    ("cus_a", "short"),
    ("cus_a", "x" * 94),  # "cus_a:" + 94 = 100 characters: Stripe's limit, sent as it stands
    ("cus_a", "x" * 95),  # 101: hashed
    ("team-7", "short"),  # not a plain Stripe customer id: hashed
    ("cus_ä", "short"),  # letters, but not ASCII: hashed
], ids=["scoped", "scoped-at-the-limit", "hashed-too-long", "hashed-not-cus", "hashed-not-ascii"])
async def test_an_event_in_the_common_shape_is_sent_to_stripe_under_the_identifier_the_full_path_gives(
        store: Store, customer: str, identifier: str) -> None:
    async def exists(_: str) -> bool:
        return True

    metering = MeteringService(store, PRICING, tier_of=lambda c: PRICING.tier("3mo"),
                               period_of=lambda c, t: calendar_month_of(t), customer_exists=exists)
    await metering.record_many([{"customer": customer, "units": 1, "identifier": "first"}])  # known from now on

    answer = await metering.record_many([{"customer": customer, "units": 5, "identifier": identifier}])

    assert [r.status for r in answer.results] == ["accepted"]
    row = store.query_one("SELECT stripe_identifier FROM meter_events WHERE identifier = ?", (identifier,))
    assert row == {"stripe_identifier": stripe_identifier(customer, identifier)}


class Placements:
    """`period_of` and `tier_of` answering from what the test sets, and `placements` counting the test's changes
    (as the subscription service counts changed provisions)."""

    def __init__(self, tier: str, period: tuple[int, int]) -> None:
        self.tier, self.period, self.version, self.asked = tier, period, 0, 0

    def change(self, *, tier: str | None = None, period: tuple[int, int] | None = None, tell: bool = True) -> None:
        self.tier, self.period = tier or self.tier, period or self.period
        self.version += tell

    def period_of(self, customer: str, t: int) -> tuple[int, int]:
        self.asked += 1
        return self.period if self.period[0] <= t < self.period[1] else calendar_month_of(t)


def reusing(store: Store, placements: Placements, clock: Any) -> MeteringService:
    async def exists(customer: str) -> bool:
        return True

    return MeteringService(store, PRICING, tier_of=lambda c: PRICING.tier(placements.tier),
                           period_of=placements.period_of, customer_exists=exists, clock=clock,
                           placements=lambda: placements.version)


@pytest.mark.parametrize("shape", [{}, {"timestamp": None, "meter": "luc_tokens"}], ids=["common", "full-checks"])
async def test_a_customers_period_and_terms_are_asked_again_once_the_placements_change(
        store: Store, shape: dict[str, Any]) -> None:
    now = int(time.time())
    clock = lambda: float(now)  # noqa: E731
    placements = Placements("3mo", (now - 100, now + 100))
    metering = reusing(store, placements, clock)
    await metering.record_many([{**BASE, "identifier": "a", **shape}])  # the customer is known from here on

    placements.change(tier="9mo", period=(now - 50, now + 50))  # a provision changed, and the service was told
    second = await metering.record_many([{**BASE, "identifier": "b", **shape}])

    row = store.query_one("SELECT tier, period_start FROM meter_events WHERE identifier = 'b'")
    assert row is not None and (row["tier"], row["period_start"]) == ("9mo", now - 50)
    assert second.results[0].period_usage == 1000  # a new period: the first batch's usage is not in it


async def test_a_reused_period_is_asked_again_when_the_time_leaves_it(store: Store) -> None:
    now = int(time.time())
    clock = Clock(now)
    placements = Placements("3mo", (now - 10, now + 10))
    metering = reusing(store, placements, clock)
    await metering.record_many([{**BASE, "identifier": "a"}])
    await metering.record_many([{**BASE, "identifier": "b"}])
    asked = placements.asked  # the second batch reused the first's period: not asked again

    clock.advance(10)  # past the period's end, with nothing changed
    await metering.record_many([{**BASE, "identifier": "c"}])

    assert asked == 1 and placements.asked == 2
    row = store.query_one("SELECT period_start FROM meter_events WHERE identifier = 'c'")
    assert row is not None and row["period_start"] == calendar_month_of(now + 10)[0]


async def test_a_reused_period_is_asked_again_once_the_reuse_expires(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metering_module, "REUSE_SECONDS", 0.0)  # expired as soon as kept
    now = int(time.time())
    placements = Placements("3mo", (now - 10, now + 10))
    metering = reusing(store, placements, Clock(now))

    for identifier in ("a", "b", "c"):
        await metering.record_many([{**BASE, "identifier": identifier}])

    assert placements.asked == 3


async def test_a_reused_period_is_asked_again_from_the_moment_its_answer_says_it_changes(store: Store) -> None:
    """A cancellation taking effect inside a period changes the answer with nothing else changing (no provision
    changed, so the placements number stays): the period answered before it says so in `until`."""
    now = int(time.time())
    clock = Clock(now)
    ends = now + 5  # the subscription ends inside its period: P2P from then on
    subscription, after = UsagePeriod(now - 100, now + 100, until=ends), UsagePeriod(ends, now + 100)

    async def exists(customer: str) -> bool:
        return True

    metering = MeteringService(store, PRICING, tier_of=lambda c: PRICING.tier("3mo"),
                               period_of=lambda c, t: subscription if t < ends else after, customer_exists=exists,
                               clock=clock, placements=lambda: 0)
    await metering.record_many([{**BASE, "identifier": "before"}])
    clock.advance(5)
    await metering.record_many([{**BASE, "identifier": "after"}])

    row = store.query_one("SELECT period_start FROM meter_events WHERE identifier = 'after'")
    assert row is not None and row["period_start"] == ends
