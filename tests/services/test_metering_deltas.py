"""Usage deltas (migration 0021): a batch appends what it adds to its periods instead of rewriting their totals and
counters; the writer folds the deltas into them later and keeps the totals it wrote in memory. Whatever the moment
(deltas pending, folded once or twice, a batch rolled back, another connection writing, a restart between a batch
and its fold), every acknowledged event is counted exactly once by every answer: the next event's period usage,
the summary, the quote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aims_billing_mcp.services.metering import MeteringService
from aims_billing_mcp.store import Store
from aims_billing_mcp.store import metering as store_metering
from tests.conftest import copy_of
from tests.services.test_metering import make_service

pytestmark = pytest.mark.anyio


def batch(tag: str, count: int, customer: str = "cus_a") -> list[dict[str, Any]]:
    operations = ("chat", "tool_call")  # two operations, both weighted 1.0: weighted units = units
    return [{"customer": customer, "units": 10 + n, "operation": operations[n % 2], "identifier": f"{tag}-{n}"}
            for n in range(count)]


def stored(store: Store, customer: str = "cus_a") -> dict[str, int]:
    """The customer's events as the events table has them (failed ones left out: they are not counted)."""
    row = store.query_one("SELECT COUNT(*) AS events, COALESCE(SUM(weighted_units), 0) AS weighted_units FROM "
                          "meter_events WHERE customer_id = ? AND status != 'failed'", (customer,))
    assert row is not None
    return {"events": int(row["events"]), "weighted_units": int(row["weighted_units"])}


def answers(metering: MeteringService, customer: str = "cus_a") -> dict[str, int]:
    summary = metering.summary(customer)
    quote = metering.quote(1, customer=customer)
    assert quote.period_usage == summary.weighted_units
    assert sum(row.weighted_units for row in summary.by_operation) == summary.weighted_units
    return {"events": summary.events.pending + summary.events.sent, "weighted_units": summary.weighted_units}


def deltas(store: Store) -> int:
    row = store.query_one("SELECT COUNT(*) AS n FROM meter_usage_deltas")
    assert row is not None
    return int(row["n"])


async def fold(store: Store) -> None:
    await store.write(lambda tx: store.metering.fold(tx))


async def test_every_answer_counts_the_deltas_not_folded_yet_and_folding_once_or_twice_changes_none(
        store: Store) -> None:
    metering = make_service(store)
    await metering.record_many(batch("a", 30))
    assert deltas(store) > 0  # nothing folded yet: the counts are in the deltas only
    before = answers(metering)
    assert before == stored(store) and before["events"] == 30

    await fold(store)
    assert deltas(store) == 0
    assert answers(metering) == before
    await fold(store)  # nothing left to fold: nothing counted twice
    assert answers(metering) == before

    next_one = await metering.record("cus_a", 5, identifier="after-fold")
    assert next_one.period_usage == before["weighted_units"] + 5


async def test_the_batch_that_passes_the_fold_threshold_folds_every_delta_and_answers_stay_exact(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_metering, "FOLD_ROWS", 4)
    metering = make_service(store)
    usage = []
    for n in range(5):
        answer = await metering.record_many(batch(f"b{n}", 3))
        usage.append(answer.results[-1].period_usage)

    assert deltas(store) < 4
    assert answers(metering) == stored(store)
    assert usage == [sum(10 + i for i in range(3)) * (n + 1) for n in range(5)]


async def test_a_rolled_back_append_is_forgotten_by_the_writer_and_the_next_event_counts_from_the_database(
        store: Store) -> None:
    metering = make_service(store)
    first = await metering.record("cus_a", 10, identifier="kept")
    events = [metering._event(metering._draft(metering._clock(), "cus_a", 1000, None, None, "undone", None, None,
                                              None), metering._clock(), {})]

    def append_then_fail(tx: Any) -> None:
        metering._apply(tx, events)  # writes the event, its delta and the total it remembers...
        raise RuntimeError("the transaction fails after the append")  # ... then everything is undone

    with pytest.raises(RuntimeError):
        await store.write(append_then_fail)

    after = await metering.record("cus_a", 1, identifier="next")
    assert after.period_usage == first.period_usage + 1  # not 1,011: the undone 1,000 was never counted
    assert answers(metering) == stored(store) == {"events": 2, "weighted_units": 11}


async def test_another_connections_writes_make_the_writer_read_the_totals_again(store: Store) -> None:
    """Two stores on one file stand for two processes: each one's commits are another connection's for the other."""
    other = Store(store.path)
    try:
        one, two = make_service(store), make_service(other)
        await one.record_many(batch("one", 4))  # the first writer now remembers the period's total
        await two.record_many(batch("two", 3))  # the second adds to it, and folds
        await fold(other)
        answer = await one.record("cus_a", 7, identifier="one-more")
        assert answer.period_usage == stored(store)["weighted_units"]
        assert answers(one) == answers(two) == stored(store)
    finally:
        other.close()


async def test_failing_an_event_still_counted_in_a_delta_takes_it_out_exactly_once(store: Store) -> None:
    metering = make_service(store)
    await metering.record_many(batch("f", 6))
    assert deltas(store) > 0
    row = store.query_one("SELECT id FROM meter_events WHERE identifier = 'f-2'")
    assert row is not None

    for _ in range(2):  # the second mark finds it failed already: it changes nothing
        await store.write(lambda tx: store.metering.mark_failed(tx, [(row["id"], "refused")], 1, attempted=True))

    assert answers(metering) == stored(store) == {"events": 5, "weighted_units": sum(10 + n for n in range(6)) - 12}
    after = await metering.record("cus_a", 1, identifier="f-next")
    assert after.period_usage == stored(store)["weighted_units"]


async def test_deltas_left_unfolded_by_a_stop_are_counted_after_a_restart_and_folded_once(
        tmp_path: Path, migrated_db: Path) -> None:
    path = copy_of(migrated_db, tmp_path / "restart.db")
    store = Store(path)
    await make_service(store).record_many(batch("r", 8))
    store.close()  # stopped between the batch and its fold

    store = Store(path)
    try:
        assert deltas(store) > 0
        metering = make_service(store)
        assert answers(metering) == stored(store)
        answer = await metering.record("cus_a", 3, identifier="r-after")
        assert answer.period_usage == stored(store)["weighted_units"]
        await fold(store)
        assert deltas(store) == 0
        assert answers(metering) == stored(store) == {"events": 9, "weighted_units": sum(10 + n for n in range(8)) + 3}
    finally:
        store.close()


async def test_a_batch_holding_an_event_recorded_before_counts_its_new_events_once_and_the_replay_not_at_all(
        store: Store) -> None:
    """The batch is written without looking its identifiers up first; the insert finds the one recorded before, the
    batch's writes are undone and it is decided again, looking first."""
    metering = make_service(store)
    first = await metering.record("cus_a", 10, operation="chat", identifier="seen")
    events = [{"customer": "cus_a", "units": 5, "operation": "chat", "identifier": "new-1"},
              {"customer": "cus_a", "units": 10, "operation": "chat", "identifier": "seen"},  # a replay
              {"customer": "cus_a", "units": 11, "operation": "chat", "identifier": "seen"},  # a conflict
              {"customer": "cus_a", "units": 7, "operation": "chat", "identifier": "new-2"}]

    answer = await metering.record_many(events)

    assert [r.status for r in answer.results] == ["accepted", "replayed", "refused", "accepted"]
    assert [r.period_usage for r in answer.results] == [15, first.period_usage, None, 22]
    assert answers(metering) == stored(store) == {"events": 3, "weighted_units": 22}
