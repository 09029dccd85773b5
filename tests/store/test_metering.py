"""The metering store's contract: what any backend behind `MeteringStore` must do (the `metering` fixture yields
the aggregate store and a way to run a write job; a second backend adds itself to its params)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import pytest

from aims_billing_mcp.store import Tx
from aims_billing_mcp.store.metering import (
    COUNTED,
    DEFAULT_METER,
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
LUC = DEFAULT_METER


@dataclass
class Backend:
    store: MeteringStore
    write: Callable[[Callable[[Tx], Any]], Awaitable[Any]]


@pytest.fixture
def metering(backend: Any) -> Backend:
    """The metering store on each backend (conftest's `backend`) and its store's write."""
    return Backend(backend.metering, backend.write)


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


async def test_appending_an_event_already_stored_fails_whole_and_changes_nothing(metering: Backend) -> None:
    await record(metering, event("e1"))

    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        await record(metering, event("e2"), event("e1"))  # SQLite's INSERT, PostgreSQL's COPY: a UNIQUE violation

    period = metering.store.period_total("cus_A", START)
    assert period is not None and (period.events, period.weighted_units) == (1, 10)
    assert metering.store.status_counts() == {EventStatus.PENDING: 1}


async def test_totals_are_set_to_absolute_values_and_keep_the_terms_of_their_first_write(metering: Backend) -> None:
    first = OperationDelta("cus_A", START, "chat", 1, 5, 5, 0, 0)
    await metering.write(lambda tx: metering.store.append(tx, [event("e1", units=5)], [total(weighted=5)], [first]))
    later = PeriodTotalRow("cus_A", START, END, 2, 12, 12, "6mo", 9999, 1)  # the loaded total plus its delta
    then = OperationDelta("cus_A", START, "code", 1, 7, 7, 0, 0)
    code = event("e2", units=7)._replace(operation="code")
    await metering.write(lambda tx: metering.store.append(tx, [code], [later], [then]))

    loaded = await metering.write(lambda tx: metering.store.load_totals(
        tx, {("cus_A", START, LUC), ("cus_B", START, LUC)}))

    assert loaded == {("cus_A", START, LUC): PeriodTotalRow("cus_A", START, END, 2, 12, 12, "3mo", 1000, 150)}
    assert metering.store.period_total("cus_A", START) == loaded[("cus_A", START, LUC)]
    assert metering.store.period_total("cus_B", START) is None


async def test_operation_deltas_add_up_per_period_and_operation(metering: Backend) -> None:
    delta = OperationDelta("cus_A", START, "chat", 1, 10, 15, 2, 3)  # what each event below adds
    for n in (1, 2):
        row = event(f"e{n}")._replace(raw_units=10, weighted_units=15, overage_units=2, cost_cents=3)
        await metering.write(lambda tx, row=row, n=n: metering.store.append(
            tx, [row], [total(weighted=15 * n, events=n)], [delta]))

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


async def test_meters_keep_their_own_totals_and_a_failed_last_value_gives_back_the_latest_one_still_counted(
        metering: Backend) -> None:
    def gauge(identifier: str, value: int, at: int) -> MeterEventRow:
        return event(identifier, units=value)._replace(timestamp=at, meter="storage", operation=None)

    rows = [gauge("g1", 50, START + 10), gauge("g2", 80, START + 30), gauge("g3", 70, START + 20), event("e1", units=9)]
    totals = [total(weighted=80)._replace(meter="storage", last_at=START + 30, events=3), total(weighted=9)]
    operations = [OperationDelta("cus_A", START, "custom", 3, 0, 0, 0, 0, "storage"),
                  OperationDelta("cus_A", START, "chat", 1, 9, 9, 0, 0)]
    await metering.write(lambda tx: metering.store.append(tx, rows, totals, operations))
    known = ids(metering)

    await metering.write(lambda tx: metering.store.mark_failed(tx, [(known["g2"], "refused")], 99, attempted=True))
    after_one = metering.store.period_total("cus_A", START, "storage")
    await metering.write(lambda tx: metering.store.fail_reported(tx, [("cus_A:g3", "x"), ("cus_A:g1", "x")], 100))
    after_all = metering.store.period_total("cus_A", START, "storage")

    assert after_one is not None and (after_one.events, after_one.weighted_units, after_one.last_at) == (
        2, 70, START + 20)  # g3: the latest by time still counted
    assert after_all is not None and (after_all.events, after_all.weighted_units, after_all.last_at) == (
        0, 0, START)
    luc = metering.store.period_total("cus_A", START)
    assert luc is not None and (luc.events, luc.weighted_units) == (1, 9)  # LUC's total untouched
    assert [(r.operation, r.events) for r in metering.store.usage_by_operation("cus_A", START, "storage")] == [
        ("custom", 0)]


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


# --- PostgreSQL: two instances on one database ------------------------------------------------------------------


async def race(first: Any, second: Any, job: Callable[[Any, Tx], Any]) -> tuple[Any, Any]:
    """Run `job` on both instances so that the second's starts while the first's transaction is still open (it has
    done its reads and writes and waits, uncommitted): the second must wait for the first's commit on the database
    (a lock) and decide from what it committed. Returns both results."""
    holding, go = threading.Event(), threading.Event()

    def held(tx: Tx) -> Any:
        result = job(first, tx)
        holding.set()
        go.wait(30)
        return result

    results: dict[str, Any] = {}

    async def run(name: str, store: Any, fn: Callable[[Tx], Any]) -> None:
        results[name] = await store.write(fn)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(run, "first", first, held)
            await anyio.to_thread.run_sync(holding.wait)
            group.start_soon(run, "second", second, lambda tx: job(second, tx))
            while not first.query_one(  # the second's transaction is blocked on one of the first's locks
                    "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'")["n"]:
                await anyio.sleep(0.002)
            go.set()
    return results["first"], results["second"]


def record_job(identifier: str, units: int = 10) -> Callable[[Any, Tx], str]:
    """What the recording service does in its transaction: a replay is an answer, a new event adds to its totals."""
    def job(store: Any, tx: Tx) -> str:
        metering = store.metering
        if metering.find_events(tx, {("cus_A", identifier)}):
            return "replayed"
        before = metering.load_totals(tx, {("cus_A", START, LUC)}).get(("cus_A", START, LUC))
        events, weighted = (before.events, before.weighted_units) if before else (0, 0)
        metering.append(tx, [event(identifier, units=units)],
                        [total(weighted=weighted + units, events=events + 1)],
                        [OperationDelta("cus_A", START, "chat", 1, units, units, 0, 0)])
        return "recorded"
    return job


@pytest.mark.parametrize(("identifiers", "outcomes", "counted"), [
    (("e1", "e1"), ("recorded", "replayed"), (1, 10)),  # the same event: counted once, the other a replay
    (("e1", "e2"), ("recorded", "recorded"), (2, 20)),  # two events of one period: neither total is lost
])
async def test_two_instances_recording_for_one_customer_at_once_count_each_event_once(
        two_instances: tuple[Any, Any], identifiers: tuple[str, str], outcomes: tuple[str, str],
        counted: tuple[int, int]) -> None:
    first, second = two_instances
    jobs = iter([record_job(identifiers[0]), record_job(identifiers[1])])
    by_store: dict[int, Callable[[Any, Tx], str]] = {}

    def job(store: Any, tx: Tx) -> str:
        return by_store.setdefault(id(store), next(jobs))(store, tx)

    assert await race(first, second, job) == outcomes

    period = second.metering.period_total("cus_A", START)
    assert (period.events, period.weighted_units) == counted
    [chat] = second.metering.usage_by_operation("cus_A", START)
    assert (chat.events, chat.weighted_units) == counted
    assert second.metering.status_counts() == {EventStatus.PENDING: counted[0]}


async def test_two_instances_taking_a_customers_last_slot_at_once_give_it_to_one(
        two_instances: tuple[Any, Any]) -> None:
    def take(store: Any, tx: Tx) -> str:  # what acquire_slot does, for a tier of one concurrent task
        if store.metering.live_slots(tx, "cus_A", 50):
            return "limit reached"
        store.metering.take_slot(tx, "cus_A", SlotRow(f"task_{id(store)}", 50, 100, "h"))
        return "taken"

    assert await race(*two_instances, take) == ("taken", "limit reached")
    assert len(await two_instances[1].write(lambda tx: two_instances[1].metering.live_slots(tx, "cus_A", 50))) == 1


async def test_two_instances_failing_one_event_at_once_take_it_out_of_the_counted_usage_once(
        two_instances: tuple[Any, Any]) -> None:
    first, second = two_instances
    for identifier in ("e1", "e2"):
        await first.write(lambda tx, identifier=identifier: record_job(identifier)(first, tx))
    e1 = first.query_one("SELECT id FROM meter_events WHERE identifier = 'e1'")["id"]  # not leased by either

    def fail(store: Any, tx: Tx) -> None:
        store.metering.mark_failed(tx, [(e1, "too old")], 1, attempted=False)

    await race(first, second, fail)

    period = second.metering.period_total("cus_A", START)
    assert (period.events, period.weighted_units) == (1, 10)
    [chat] = second.metering.usage_by_operation("cus_A", START)
    assert (chat.events, chat.weighted_units) == (1, 10)


async def pending_events(store: Any, *identifiers: str) -> None:
    for identifier in identifiers:
        await store.write(lambda tx, identifier=identifier: record_job(identifier)(store, tx))


async def test_two_instances_flushing_at_once_lease_disjoint_batches(two_instances: tuple[Any, Any]) -> None:
    first, second = two_instances
    await pending_events(first, "e1", "e2", "e3")
    upto = first.metering.newest_pending_id()

    taken = first.metering.next_pending(0, upto, 2)
    rest = second.metering.next_pending(0, upto, 100)

    assert [row.identifier for row in taken] == ["cus_A:e1", "cus_A:e2"]
    assert [row.identifier for row in rest] == ["cus_A:e3"]  # the first's live lease is skipped, not waited for
    assert first.metering.next_pending(0, upto, 100) == taken  # its own batches again (a later flush of its own)


async def test_a_batch_whose_lease_expired_is_taken_over_and_the_late_owner_marks_nothing(
        two_instances: tuple[Any, Any]) -> None:
    paused, other = two_instances  # `paused` leased the batch, then stopped past its lease (SIGSTOP, a long GC)
    await pending_events(paused, "e1", "e2")
    paused.metering.lease_ms = 0  # its lease has run out by the time anyone looks
    upto = paused.metering.newest_pending_id()
    stale = paused.metering.next_pending(0, upto, 100)

    taken = other.metering.next_pending(0, upto, 100)
    assert [row.id for row in taken] == [row.id for row in stale]
    # the paused instance resumes: Stripe took its batch (deduplicated by identifier), its marks are fenced off
    await paused.write(lambda tx: paused.metering.mark_sent(tx, [stale[0].id], "late"))
    await paused.write(lambda tx: paused.metering.mark_failed(tx, [(stale[1].id, "too old")], 1, attempted=False))
    await paused.write(lambda tx: paused.metering.note_attempt(tx, [stale[1].id], "late"))
    assert other.metering.status_counts() == {EventStatus.PENDING: 2}
    period = other.metering.period_total("cus_A", START)
    assert period is not None and period.events == 2

    await other.write(lambda tx: other.metering.mark_sent(tx, [row.id for row in taken], "now"))
    assert other.metering.status_counts() == {EventStatus.SENT: 2}


async def test_an_attempt_that_settled_nothing_frees_the_batch_for_any_instance(
        two_instances: tuple[Any, Any]) -> None:
    first, second = two_instances
    await pending_events(first, "e1")
    upto = first.metering.newest_pending_id()
    [row] = first.metering.next_pending(0, upto, 100)
    assert second.metering.next_pending(0, upto, 100) == []

    await first.write(lambda tx: first.metering.note_attempt(tx, [row.id], "Stripe answered 503"))

    assert [again.id for again in second.metering.next_pending(0, upto, 100)] == [row.id]
