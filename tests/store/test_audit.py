"""The audit store's contract (store/audit.py): rows appended in order, read newest first through filters, pruned
by age only.

The `audit` fixture yields the aggregate store of each backend (SQLite and PostgreSQL); `write` runs a job in that
backend's writer transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from aims_billing_mcp.store import PostgresStore, Store, Tx
from aims_billing_mcp.store.audit import AuditEntry, AuditFilter, AuditStore

Write = Callable[[Callable[[Tx], Any]], Any]

ENTRIES = [
    AuditEntry("2027-01-15T08:00:00.000Z", "create_customer", "local", '{"email":"a@example.com"}', "ok", None, 1.5,
               "req_1"),
    AuditEntry("2027-01-16T08:00:00.000Z", "create_checkout_session", "http:agent", '{"customer":"cus_A1"}', "error",
               "invalid_input", 2.0, None),
    AuditEntry("2027-01-17T08:00:00.000Z", "list_invoices", None, '{"customer_id":"cus_A1x"}', "ok", None, 0.25, None),
    AuditEntry("2027-01-18T08:00:00.000Z", "create_checkout_session", "local", '{"customer":"cus_B%"}', "ok", None,
               3.0, "req_2,req_3"),
]


@pytest.fixture
def audit(backend: Store) -> AuditStore:
    return backend.audit


@pytest.fixture
def appended(audit: AuditStore, write: Write) -> AuditStore:
    write(lambda tx: audit.append(tx, ENTRIES[:2]))
    write(lambda tx: audit.append(tx, ENTRIES[2:]))
    return audit


def test_appended_rows_read_back_newest_first_with_growing_ids(appended: AuditStore) -> None:
    rows = appended.report(AuditFilter(limit=10))
    assert [(r.at, r.tool, r.caller, r.arguments, r.outcome, r.error_code, r.duration_ms, r.request_id)
            for r in rows] == [(e.at, e.tool, e.caller, e.arguments, e.outcome, e.error_code, e.duration_ms,
                                e.request_id) for e in reversed(ENTRIES)]
    ids = [r.id for r in rows]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 4


@pytest.mark.parametrize(("wanted", "ats"), [
    (AuditFilter(tool="create_checkout_session"), ["2027-01-18", "2027-01-16"]),
    (AuditFilter(customer="cus_A1"), ["2027-01-16"]),  # a whole value: not cus_A1x
    (AuditFilter(customer="cus_B%"), ["2027-01-18"]),  # a LIKE wildcard matches only itself
    (AuditFilter(customer="cus_%"), []),
    (AuditFilter(since=datetime(2027, 1, 17, tzinfo=UTC)), ["2027-01-18", "2027-01-17"]),
    (AuditFilter(errors_only=True), ["2027-01-16"]),
    (AuditFilter(limit=1), ["2027-01-18"]),
    (AuditFilter(tool="create_checkout_session", errors_only=False, since=datetime(2027, 1, 17, tzinfo=UTC)),
     ["2027-01-18"]),
])
def test_the_report_keeps_rows_matching_every_filter_given(
        appended: AuditStore, wanted: AuditFilter, ats: list[str]) -> None:
    assert [r.at[:10] for r in appended.report(wanted)] == ats


def test_prune_deletes_only_rows_older_than_the_cutoff(appended: AuditStore, write: Write) -> None:
    assert write(lambda tx: appended.prune(tx, datetime(2027, 1, 17, tzinfo=UTC))) == 2
    assert [r.tool for r in appended.report(AuditFilter())] == ["create_checkout_session", "list_invoices"]
    assert write(lambda tx: appended.prune(tx, datetime(2027, 1, 17, tzinfo=UTC))) == 0


def test_a_large_batch_is_appended_whole_and_in_order(audit: AuditStore, write: Write) -> None:
    entries = [AuditEntry(f"2027-02-01T00:00:00.{i % 1000:03d}Z", f"tool_{i}", None, "{}", "ok", None, 0.5, None)
               for i in range(2500)]  # more rows than one PostgreSQL statement takes

    write(lambda tx: audit.append(tx, entries))

    rows = audit.report(AuditFilter(limit=3000))
    assert [r.tool for r in rows] == [f"tool_{i}" for i in reversed(range(2500))]


@pytest.mark.anyio
async def test_rows_appended_by_two_instances_at_once_all_land_with_distinct_ids(postgres_url: str) -> None:
    instances = [PostgresStore(postgres_url, writers=2, pool_size=2) for _ in range(2)]
    try:
        async with anyio.create_task_group() as tg:
            for n, store in enumerate(instances):
                for batch in range(5):
                    batch_entries = [AuditEntry(f"2027-02-01T00:00:0{n}.{batch:03d}Z", f"tool_{n}_{batch}_{i}", None,
                                                "{}", "ok", None, 0.5, None) for i in range(20)]
                    tg.start_soon(store.write, lambda tx, s=store, e=batch_entries: s.audit.append(tx, e))
        rows = instances[1].audit.report(AuditFilter(limit=1000))
    finally:
        for store in instances:
            store.close()

    assert len(rows) == len({r.id for r in rows}) == 200
    assert {r.tool for r in rows} == {f"tool_{n}_{b}_{i}" for n in range(2) for b in range(5) for i in range(20)}
    for n in range(2):
        for b in range(5):  # a batch's rows keep their order
            batch_rows = sorted((r for r in rows if r.tool.startswith(f"tool_{n}_{b}_")), key=lambda r: r.id)
            assert [r.tool for r in batch_rows] == [f"tool_{n}_{b}_{i}" for i in range(20)]
