"""The metering store's contract: what any backend behind `MeteringStore` must do (the `metering` fixture yields
the aggregate store and a way to run a write job; a second backend adds itself to its params)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aims_billing_mcp.store import Store, Tx
from aims_billing_mcp.store.metering import (
    COUNTED,
    TRANSITIONS,
    EventStatus,
    FlushRow,
    MeterEventRow,
    MeteringStore,
    OperationDelta,
    PeriodTotalRow,
    SlotRow,
    sources,
)

pytestmark = pytest.mark.anyio

START, END = 1_764_547_200, 1_767_225_600  # a month


@dataclass
class Backend:
    store: MeteringStore
    write: Callable[[Callable[[Tx], Any]], Awaitable[Any]]


@pytest.fixture(params=["sqlite"])
def metering(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    core = Store(tmp_path / "metering.db")
    try:
        yield Backend(core.metering, core.write)
    finally:
        core.close()


def event(identifier: str, customer: str = "cus_A", units: int = 10, *, tier: str = "3mo",
          start: int = START) -> MeterEventRow:
    return MeterEventRow(identifier, customer, "chat", 1000, units, units, None, start + 60, None, tier, start,
                         start + (END - START), units, 1000, 150, 0, 0, "luc_tokens", "2026-12-01T00:00:00.000Z",
                         f"{customer}:{identifier}")


def total(customer: str = "cus_A", weighted: int = 10, events: int = 1, *, tier: str | None = "3mo",
          start: int = START) -> PeriodTotalRow:
    return PeriodTotalRow(customer, start, start + (END - START), events, weighted, weighted, tier,
                          None if tier is None else 1000, None if tier is None else 150)


async def record(backend: Backend, *events: MeterEventRow) -> None:
    rows = list(events)
    totals = [total(customer=customer, weighted=sum(e.weighted_units for e in rows if e.customer_id == customer),
                    events=sum(e.customer_id == customer for e in rows))
              for customer in dict.fromkeys(e.customer_id for e in rows)]
    operations = [OperationDelta(e.customer_id, e.period_start, "chat", 1, e.raw_units, e.weighted_units, 0, 0)
                  for e in rows]
    await backend.write(lambda tx: backend.store.append(tx, rows, totals, operations))


def ids(backend: Backend) -> dict[str, int]:
    return {row.identifier.split(":", 1)[1]: row.id for row in backend.store.next_pending(0, 10**9, 100)}


# --- recording --------------------------------------------------------------------------------------------------


async def test_appended_events_are_found_by_customer_and_identifier_and_never_by_another_customers(
        metering: Backend) -> None:
    await record(metering, event("e1"), event("e1", "cus_B", 7))

    found = await metering.write(lambda tx: metering.store.find_events(tx, {("cus_A", "e1"), ("cus_C", "e1")}))

    assert found == {("cus_A", "e1"): event("e1")}


async def test_totals_are_set_to_absolute_values_and_keep_the_terms_of_their_first_write(metering: Backend) -> None:
    await metering.write(lambda tx: metering.store.append(tx, [], [total(weighted=5)], []))
    later = PeriodTotalRow("cus_A", START, END, 2, 12, 12, "6mo", 9999, 1)
    await metering.write(lambda tx: metering.store.append(tx, [], [later], []))

    loaded = await metering.write(lambda tx: metering.store.load_totals(tx, {("cus_A", START), ("cus_B", START)}))

    assert loaded == {("cus_A", START): PeriodTotalRow("cus_A", START, END, 2, 12, 12, "3mo", 1000, 150)}
    assert metering.store.period_total("cus_A", START) == loaded[("cus_A", START)]
    assert metering.store.period_total("cus_B", START) is None


async def test_operation_deltas_add_up_per_period_and_operation(metering: Backend) -> None:
    delta = OperationDelta("cus_A", START, "chat", 1, 10, 15, 2, 3)
    await metering.write(lambda tx: metering.store.append(tx, [], [], [delta]))
    await metering.write(lambda tx: metering.store.append(tx, [], [], [delta]))

    [row] = metering.store.usage_by_operation("cus_A", START)

    assert (row.operation, row.events, row.raw_units, row.weighted_units, row.overage_units, row.cost_cents) == (
        "chat", 2, 20, 30, 4, 6)


async def test_a_customer_is_known_once_remembered(metering: Backend) -> None:
    assert not metering.store.is_known_customer("cus_A")
    await metering.write(lambda tx: metering.store.remember_customer(tx, "cus_A", 1))
    await metering.write(lambda tx: metering.store.remember_customer(tx, "cus_A", 2))  # idempotent
    assert metering.store.is_known_customer("cus_A")


# --- the delivery state machine ---------------------------------------------------------------------------------


def test_every_status_has_its_transitions_and_failed_is_final() -> None:
    assert set(TRANSITIONS) == set(EventStatus)
    assert TRANSITIONS[EventStatus.FAILED] == frozenset()
    assert {EventStatus.PENDING, EventStatus.SENT} == COUNTED
    assert [status.value for status in EventStatus] == ["pending", "sent", "failed"]  # the stored strings


@pytest.mark.parametrize(("source", "target"), [(EventStatus.FAILED, EventStatus.SENT),
                                                (EventStatus.SENT, EventStatus.PENDING),
                                                (EventStatus.FAILED, EventStatus.PENDING)])
def test_an_update_along_an_edge_the_table_lacks_cannot_be_declared(source: EventStatus, target: EventStatus) -> None:
    with pytest.raises(ValueError, match="cannot go from"):
        sources(target, source)


async def test_events_stripe_took_become_sent_once_and_leave_the_pending_queue(metering: Backend) -> None:
    await record(metering, event("e1"), event("e2"))
    known = ids(metering)
    assert metering.store.newest_pending_id() == known["e2"]

    await metering.write(lambda tx: metering.store.mark_sent(tx, [known["e1"]], "2026-12-01T00:00:01.000Z"))

    assert [row.id for row in metering.store.next_pending(0, 10**9, 100)] == [known["e2"]]
    assert metering.store.status_counts() == {EventStatus.SENT: 1, EventStatus.PENDING: 1}
    assert metering.store.pending_count() == 1


async def test_a_failed_event_leaves_its_counted_usage_once_and_is_never_sent_later(metering: Backend) -> None:
    await record(metering, event("e1", units=10), event("e2", units=4))
    known = ids(metering)
    failure = [(known["e1"], "refused by Stripe: no such customer")]

    await metering.write(lambda tx: metering.store.mark_failed(tx, failure, 99, attempted=True))
    await metering.write(lambda tx: metering.store.mark_failed(tx, failure, 100, attempted=True))  # repeat: nothing
    await metering.write(lambda tx: metering.store.mark_sent(tx, [known["e1"]], "later"))  # final: stays failed

    period = metering.store.period_total("cus_A", START)
    assert period is not None and (period.events, period.weighted_units) == (1, 4)
    [chat] = metering.store.usage_by_operation("cus_A", START)
    assert (chat.events, chat.weighted_units) == (1, 4)
    assert metering.store.status_counts() == {EventStatus.FAILED: 1, EventStatus.PENDING: 1}
    assert [(f.reason, f.events, f.last_at) for f in metering.store.recent_failures(500, 10)] == [
        ("refused by Stripe: no such customer", 1, 99)]
    assert metering.store.unsettled_counts("cus_A", START) == {EventStatus.FAILED: 1, EventStatus.PENDING: 1}


async def test_stripe_reported_events_fail_from_sent_by_the_identifier_stripe_knows_and_a_repeat_changes_nothing(
        metering: Backend) -> None:
    await record(metering, event("e1", units=10), event("e2", units=4), event("e3", units=1))
    known = ids(metering)
    await metering.write(lambda tx: metering.store.mark_sent(tx, [known["e1"], known["e2"]], "now"))
    report = [("cus_A:e1", "meter_event_customer_not_found: no customer"), ("cus_A:unknown", "x")]

    changed = await metering.write(lambda tx: metering.store.fail_reported(tx, report, 50))
    again = await metering.write(lambda tx: metering.store.fail_reported(tx, report, 51))

    assert (changed, again) == (1, 0)
    assert metering.store.status_counts() == {EventStatus.FAILED: 1, EventStatus.SENT: 1, EventStatus.PENDING: 1}
    period = metering.store.period_total("cus_A", START)
    assert period is not None and (period.events, period.weighted_units) == (2, 5)
    assert [f.reason for f in metering.store.recent_failures(500, 10)] == [
        "meter_event_customer_not_found: no customer"]


async def test_a_month_counts_failed_events_without_pricing_them(metering: Backend) -> None:
    await record(metering, event("e1", units=10), event("e2", units=4))
    known = ids(metering)
    await metering.write(lambda tx: metering.store.mark_failed(tx, [(known["e2"], "too old")], 1, attempted=False))

    [chat] = metering.store.month_usage("cus_A", START, END, "custom")

    assert (chat.events, chat.weighted_units, chat.pending, chat.failed) == (2, 10, 1, 1)
    terms = metering.store.event_terms(chat.last_id)
    assert terms is not None and (terms.tier, terms.allowance, terms.overage_rate) == ("3mo", 1000, 150)


# --- slots, flushes, P2P periods --------------------------------------------------------------------------------


async def test_live_slots_drop_the_expired_and_free_slot_says_whether_one_was_held(metering: Backend) -> None:
    def job(tx: Tx) -> tuple[list[str], bool, bool]:
        metering.store.take_slot(tx, "cus_A", SlotRow("old", 0, 10, "h1"))
        metering.store.take_slot(tx, "cus_A", SlotRow("new", 0, 100, "h2"))
        metering.store.renew_slot(tx, "cus_A", "new", 200)
        live = [slot.task_id for slot in metering.store.live_slots(tx, "cus_A", 50)]
        return live, metering.store.free_slot(tx, "cus_A", "new"), metering.store.free_slot(tx, "cus_A", "old")

    assert await metering.write(job) == (["new"], True, False)


async def test_only_the_last_flushes_are_kept(metering: Backend) -> None:
    for n in range(5):
        flush = FlushRow(n, n + 1, n, 0, 0, "v2", None)
        await metering.write(lambda tx, flush=flush: metering.store.record_flush(tx, flush, 3))
    last = metering.store.last_flush()
    assert last is not None and last.sent == 4


async def test_an_ended_p2p_period_is_open_until_invoiced(metering: Backend) -> None:
    await metering.write(lambda tx: metering.store.append(tx, [], [total(tier="p2p"), total("cus_B")], []))
    [open_period] = metering.store.open_p2p_periods(END, limit=100)
    assert (open_period.customer_id, open_period.invoice_id) == ("cus_A", None)
    assert metering.store.open_p2p_periods(END - 1, limit=100) == []  # not ended yet

    await metering.write(lambda tx: metering.store.set_period_invoice(tx, "cus_A", START, "in_1"))
    assert [p.invoice_id for p in metering.store.open_p2p_periods(END, limit=100)] == ["in_1"]
    await metering.write(lambda tx: metering.store.mark_period_invoiced(tx, "cus_A", START, "in_1", END))
    assert metering.store.open_p2p_periods(END, limit=100) == []
