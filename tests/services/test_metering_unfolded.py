"""Unfolded events (migration 0022): a batch writes its events and nothing else for its periods' totals and
counters; every read adds the events not folded yet, and the writer folds them later (from the sums it kept in
memory, or from the events) and keeps the totals it wrote in memory. Whatever the moment (events unfolded, folded
once or twice, a batch or a fold rolled back, another connection writing, a restart between a batch and its fold),
every acknowledged event is counted exactly once by every answer: the next event's period usage, the summary, the
quote."""

from __future__ import annotations

import sqlite3
import time
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


def unfolded(store: Store) -> int:
    row = store.query_one("SELECT COUNT(*) AS n FROM meter_events WHERE id > (SELECT folded_upto FROM "
                          "meter_usage_version)")
    assert row is not None
    return int(row["n"])


async def fold(store: Store) -> None:
    await store.write(lambda tx: store.metering.fold(tx))


async def test_every_answer_counts_the_events_not_folded_yet_and_folding_once_or_twice_changes_none(
        store: Store) -> None:
    metering = make_service(store)
    await metering.record_many(batch("a", 30))
    assert unfolded(store) == 30  # nothing folded yet: the counts are in the events only
    before = answers(metering)
    assert before == stored(store) and before["events"] == 30

    await fold(store)
    assert unfolded(store) == 0
    assert answers(metering) == before
    await fold(store)  # nothing left to fold: nothing counted twice
    assert answers(metering) == before

    next_one = await metering.record("cus_a", 5, identifier="after-fold")
    assert next_one.period_usage == before["weighted_units"] + 5


async def test_the_batch_that_passes_the_fold_threshold_folds_every_event_and_answers_stay_exact(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_metering, "FOLD_ROWS", 4)
    metering = make_service(store)
    usage = []
    for n in range(5):
        answer = await metering.record_many(batch(f"b{n}", 3))
        usage.append(answer.results[-1].period_usage)

    assert unfolded(store) < 4
    assert answers(metering) == stored(store)
    assert usage == [sum(10 + i for i in range(3)) * (n + 1) for n in range(5)]


async def test_a_rolled_back_append_is_forgotten_by_the_writer_and_the_next_event_counts_from_the_database(
        store: Store) -> None:
    metering = make_service(store)
    first = await metering.record("cus_a", 10, identifier="kept")
    events = [metering._event(metering._draft(metering._clock(), "cus_a", 1000, None, None, "undone", None, None,
                                              None), metering._clock(), {})]

    def append_then_fail(tx: Any) -> None:
        metering._apply(tx, events)  # writes the event and remembers its total and its operation's sums...
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


async def test_failing_an_event_not_folded_yet_takes_it_out_exactly_once(store: Store) -> None:
    metering = make_service(store)
    await metering.record_many(batch("f", 6))
    assert unfolded(store) > 0
    row = store.query_one("SELECT id FROM meter_events WHERE identifier = 'f-2'")
    assert row is not None

    for _ in range(2):  # the second mark finds it failed already: it changes nothing
        await store.write(lambda tx: store.metering.mark_failed(tx, [(row["id"], "refused")], 1, attempted=True))

    assert answers(metering) == stored(store) == {"events": 5, "weighted_units": sum(10 + n for n in range(6)) - 12}
    after = await metering.record("cus_a", 1, identifier="f-next")
    assert after.period_usage == stored(store)["weighted_units"]


async def test_events_left_unfolded_by_a_stop_are_counted_after_a_restart_and_folded_once(
        tmp_path: Path, migrated_db: Path) -> None:
    path = copy_of(migrated_db, tmp_path / "restart.db")
    store = Store(path)
    await make_service(store).record_many(batch("r", 8))
    store.close()  # stopped between the batch and its fold

    store = Store(path)
    try:
        assert unfolded(store) > 0
        metering = make_service(store)
        assert answers(metering) == stored(store)
        answer = await metering.record("cus_a", 3, identifier="r-after")
        assert answer.period_usage == stored(store)["weighted_units"]
        await fold(store)
        assert unfolded(store) == 0
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


def mixed(tag: str, now: int) -> list[dict[str, Any]]:
    """Events of every kind a fold sums: two customers, named operations and an explicit multiplier (`custom`), a
    sum, a count and a `last` meter (whose events are counted when written, never folded)."""
    items: list[dict[str, Any]] = []
    for n in range(12):
        customer = ("cus_a", "cus_b")[n % 2]
        item: dict[str, Any] = {"customer": customer, "units": 10 + n, "identifier": f"{tag}-{n}"}
        if n % 4 == 0:
            item["multiplier"] = 1.5
        elif n % 4 == 1:
            item["operation"] = "chat"
        elif n % 4 == 2:  # compute seconds, or one API call (a count meter's event is one)
            item.update({"meter": "compute_seconds"} if n % 8 == 2 else {"meter": "api_calls", "units": 1})
        else:
            item.update(meter="storage_gb_hours", timestamp=now - 100 + n)
        items.append(item)
    return items


def rows(store: Store) -> dict[str, list[dict[str, Any]]]:
    return {"totals": store.query("SELECT * FROM meter_usage_totals ORDER BY customer_id, period_start, meter"),
            "counters": store.query("SELECT * FROM meter_usage_by_operation ORDER BY customer_id, period_start, "
                                    "meter, operation")}


async def test_the_sums_kept_in_memory_and_the_sums_read_back_from_the_events_fold_into_the_same_rows(
        tmp_path: Path, migrated_db: Path) -> None:
    now = int(time.time())
    kept, read_back = (copy_of(migrated_db, tmp_path / name) for name in ("kept.db", "read-back.db"))
    for path, restart in ((kept, False), (read_back, True)):
        store = Store(path)
        for n in range(3):
            await make_service(store).record_many(mixed(f"m{n}", now))
        if restart:  # a new writer knows nothing of what the events add: it reads it back from them
            store.close()
            store = Store(path)
        assert unfolded(store) == 36
        await fold(store)
        store.close()

    first, second = Store(kept), Store(read_back)
    try:
        assert rows(first) == rows(second)
        assert unfolded(first) == unfolded(second) == 0
        counted = first.query_one(
            "SELECT SUM(events) AS events, SUM(IIF(meter = 'storage_gb_hours', 0, weighted_units)) AS weighted "
            "FROM meter_usage_by_operation")
        summed = first.query_one("SELECT SUM(weighted_units) AS weighted FROM meter_events "
                                 "WHERE meter != 'storage_gb_hours'")
        assert counted is not None and summed is not None
        assert (counted["events"], counted["weighted"]) == (36, summed["weighted"])
    finally:
        first.close()
        second.close()


async def test_a_fold_undone_by_its_savepoint_is_forgotten_and_the_next_fold_still_counts_every_event(
        store: Store) -> None:
    metering = make_service(store)
    await metering.record_many(batch("u", 5))

    def fold_then_fail(tx: Any) -> None:
        store.metering.fold(tx)  # the writer now holds no sums to fold...
        raise RuntimeError("the job fails after the fold")  # ... but its savepoint puts the events back unfolded

    with pytest.raises(RuntimeError):
        await store.write(fold_then_fail)
    assert unfolded(store) == 5
    await fold(store)

    assert unfolded(store) == 0
    assert answers(metering) == stored(store) == {"events": 5, "weighted_units": sum(10 + n for n in range(5))}


async def test_a_last_meters_value_is_never_added_to_by_its_unfolded_events(store: Store) -> None:
    metering = make_service(store)
    now = int(time.time())
    await metering.record_many([{"customer": "cus_a", "units": units, "meter": "storage_gb_hours",
                                 "identifier": f"g{n}", "timestamp": now - 10 + n}
                                for n, units in enumerate((5_000, 9_000, 3_000))])
    before = metering.summary("cus_a", meter="storage_gb_hours")

    await fold(store)
    after = metering.summary("cus_a", meter="storage_gb_hours")

    assert before.weighted_units == after.weighted_units == 3_000  # the latest value, not 17,000
    assert [row.events for row in before.by_operation] == [row.events for row in after.by_operation] == [3]


async def test_deltas_left_by_migration_0021_are_folded_by_0022_and_counted_once(
        tmp_path: Path, migrated_db: Path) -> None:
    source = Store(copy_of(migrated_db, tmp_path / "source.db"))
    await make_service(source).record_many(batch("d", 4))
    source.close()
    Store(tmp_path / "old.db", migrate_upto=21).close()
    with sqlite3.connect(tmp_path / "old.db") as conn:  # as 0021's writer left them: the counts in delta rows
        conn.execute("ATTACH DATABASE ? AS source", (str(tmp_path / "source.db"),))
        conn.execute("INSERT INTO meter_events SELECT * FROM source.meter_events")
        conn.execute("INSERT INTO meter_usage_totals SELECT * FROM source.meter_usage_totals")
        conn.execute("UPDATE meter_usage_totals SET events = 0, raw_units = 0, weighted_units = 0")
        conn.execute("INSERT INTO meter_usage_deltas SELECT customer_id, period_start, meter, "
                     "COALESCE(operation, 'custom'), COUNT(*), SUM(raw_units), SUM(weighted_units), "
                     "SUM(overage_units), SUM(cost_cents) FROM meter_events GROUP BY 1, 2, 3, 4")

    upgraded = Store(tmp_path / "old.db")
    try:
        assert unfolded(upgraded) == 0
        assert answers(make_service(upgraded)) == stored(upgraded) == {
            "events": 4, "weighted_units": sum(10 + n for n in range(4))}
    finally:
        upgraded.close()


async def test_failing_an_event_in_a_job_that_is_undone_leaves_every_count_as_it_was(store: Store) -> None:
    metering = make_service(store)
    await metering.record_many(batch("x", 4))
    await fold(store)  # nothing left unfolded: the job's own fold moves nothing on
    row = store.query_one("SELECT id, period_start FROM meter_events WHERE identifier = 'x-1'")
    assert row is not None
    key = ("cus_a", row["period_start"], "luc_tokens")

    def fail_read_then_undo(tx: Any) -> None:
        store.metering.mark_failed(tx, [(row["id"], "refused")], 1, attempted=True)
        store.metering.load_totals(tx, {key})  # the writer now holds the total without x-1...
        raise RuntimeError("the job fails")  # ... and its savepoint gives x-1 back

    with pytest.raises(RuntimeError):
        await store.write(fail_read_then_undo)
    after = await metering.record("cus_a", 1, identifier="next")

    assert after.period_usage == stored(store)["weighted_units"] == sum(10 + n for n in range(4)) + 1
