"""The store: every table of the design exists, old databases upgrade, and the one writer commits in groups where a
failing job rolls back alone."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from aims_billing_mcp.store import SCHEMA_VERSION, Store, StoreUnavailable, connect
from aims_billing_mcp.store.core import GIL_SWITCH_SECONDS
from tests.conftest import queued_together

pytestmark = pytest.mark.anyio

TABLES = {"billing_provisions", "payment_sessions", "x402_receipts", "agent_wallets", "agent_transactions",
          "meter_events", "webhook_events", "idempotency_keys", "audit_log", "migrations"}


def test_a_new_database_has_every_table_and_the_latest_schema(store: Store) -> None:
    assert set(store.table_names()) >= TABLES
    assert store.schema_version == SCHEMA_VERSION


def test_the_database_runs_in_wal_mode_with_foreign_keys(store: Store) -> None:
    assert store.query_one("PRAGMA journal_mode")["journal_mode"] == "wal"  # type: ignore[index]
    assert store.query_one("PRAGMA foreign_keys")["foreign_keys"] == 1  # type: ignore[index]


def test_opening_an_older_database_upgrades_it(tmp_path: Path) -> None:
    old = Store(tmp_path / "old.db", migrate_upto=1)
    assert old.schema_version == 1
    old.close()

    upgraded = Store(tmp_path / "old.db")

    assert upgraded.schema_version == SCHEMA_VERSION
    assert upgraded.applied_migrations == list(range(2, SCHEMA_VERSION + 1))
    assert upgraded.query_one("SELECT name FROM sqlite_master WHERE name = 'meter_events_pending'")
    upgraded.close()


def under_a_file(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("a file")
    return tmp / "notes.txt" / "billing.db"


def in_an_unwritable_directory(tmp: Path) -> Path:
    if os.geteuid() != 0:
        (tmp / "readonly").mkdir()
        (tmp / "readonly").chmod(0o500)
        return tmp / "readonly" / "billing.db"
    if not Path("/proc/self").is_dir():  # root writes anywhere on a disk: use a pseudo file system
        pytest.skip("needs /proc when running as root")
    return Path("/proc/billing.db")


def a_directory(tmp: Path) -> Path:
    (tmp / "billing.db").mkdir()
    return tmp / "billing.db"


def not_sqlite(tmp: Path) -> Path:
    (tmp / "billing.db").write_text("these are not the pages you are looking for\n" * 100)
    return tmp / "billing.db"


def truncated(tmp: Path) -> Path:
    Store(tmp / "full.db").close()
    (tmp / "billing.db").write_bytes((tmp / "full.db").read_bytes()[:4096])
    return tmp / "billing.db"


# (how to make the bad path, the exit code a command gives for it, words the one line must hold)
BAD_DATABASES: dict[str, tuple[Callable[[Path], Path], int, str]] = {
    "a path under a file": (under_a_file, 2, "is a file, not a directory"),
    "an unwritable directory": (in_an_unwritable_directory, 2, "writable"),
    "a directory": (a_directory, 2, "is a directory"),
    "a file that is not SQLite": (not_sqlite, 2, "is not a SQLite database"),
    "a truncated database": (truncated, 1, "is damaged"),
}


@pytest.mark.parametrize("case", BAD_DATABASES)
def test_a_database_that_cannot_be_opened_is_refused_naming_the_path_and_the_fix(tmp_path: Path, case: str) -> None:
    make, exit_code, words = BAD_DATABASES[case]
    path = make(tmp_path)
    with pytest.raises(StoreUnavailable) as caught:
        Store(path)
    assert caught.value.exit_code == exit_code
    assert f"AIMS_BILLING_DB={path}" in caught.value.message and words in caught.value.message
    assert "\n" not in caught.value.message


def test_opening_a_store_shortens_the_gil_switch_interval_so_the_writer_does_not_queue_behind_the_event_loop(
    tmp_path: Path,
) -> None:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # CPython's default
    try:
        store = Store(tmp_path / "gil.db")
        store.close()
        assert sys.getswitchinterval() <= GIL_SWITCH_SECONDS
        sys.setswitchinterval(0.0001)  # a process that chose a shorter one keeps it
        Store(tmp_path / "gil.db").close()
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    finally:
        sys.setswitchinterval(before)


def test_reopening_a_current_database_applies_nothing(tmp_path: Path) -> None:
    Store(tmp_path / "x.db").close()
    again = Store(tmp_path / "x.db")
    assert again.applied_migrations == []
    again.close()


async def test_a_failing_job_rolls_back_alone_while_its_batch_commits(store: Store) -> None:
    def insert(key: str):  # type: ignore[no-untyped-def]
        return lambda conn: conn.execute(
            "INSERT INTO idempotency_keys (tool, key, request_hash, response, created_at) "
            "VALUES ('t', ?, 'h', '{}', 'now')", (key,))

    results = await asyncio.gather(
        store.write(insert("a")), store.write(insert("a")), store.write(insert("b")), return_exceptions=True
    )

    assert isinstance(results[1], sqlite3.IntegrityError)
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    assert [r["key"] for r in store.query("SELECT key FROM idempotency_keys ORDER BY key")] == ["a", "b"]


async def test_writes_that_queue_up_commit_together_in_one_transaction(store: Store) -> None:
    gate = threading.Event()
    blocker = store.submit(lambda conn: gate.wait(5))  # holds the writer while the others queue up

    def audit(i: int):  # type: ignore[no-untyped-def]
        return lambda conn: conn.execute(
            "INSERT INTO audit_log (at, tool, arguments, outcome, duration_ms) VALUES ('t', ?, '{}', 'ok', 0)",
            (str(i),))

    pending = [asyncio.ensure_future(store.write(audit(i))) for i in range(200)]
    await asyncio.sleep(0)
    batches_before = store._writer.batches
    gate.set()
    await asyncio.gather(*pending)

    assert blocker.result() is True
    assert store.query_one("SELECT COUNT(*) AS n FROM audit_log")["n"] == 200  # type: ignore[index]
    assert store._writer.batches - batches_before <= 2


def _insert_key(conn: sqlite3.Connection, keys: list[str]) -> list[object]:
    """A batch function: one outcome per item, a duplicate key refused on its own."""
    outcomes: list[object] = []
    for key in keys:
        try:
            conn.execute("INSERT INTO idempotency_keys (tool, key, request_hash, response, created_at) "
                         "VALUES ('t', ?, 'h', '{}', 'now')", (key,))
            outcomes.append(key)
        except sqlite3.IntegrityError as exc:
            outcomes.append(exc)
    return outcomes


async def test_items_queued_together_reach_their_batch_function_in_one_call_each_with_its_own_outcome(
    store: Store,
) -> None:
    calls: list[int] = []

    def counted(conn: sqlite3.Connection, keys: list[str]) -> list[object]:
        calls.append(len(keys))
        return _insert_key(conn, keys)

    outcomes = await queued_together(store, (store.write_item(counted, key) for key in ("a", "b", "a", "c")),
                                     return_exceptions=True)

    assert calls == [4]
    assert [o if isinstance(o, str) else type(o).__name__ for o in outcomes] == ["a", "b", "IntegrityError", "c"]


async def test_a_batch_function_that_raises_fails_its_items_and_no_other_job(store: Store) -> None:
    def broken(conn: sqlite3.Connection, keys: list[str]) -> list[object]:
        _insert_key(conn, keys)
        raise RuntimeError("broken")

    outcomes = await asyncio.gather(store.write_item(broken, "x"), store.write_item(_insert_key, "y"),
                                    return_exceptions=True)

    assert isinstance(outcomes[0], RuntimeError) and outcomes[1] == "y"
    assert [r["key"] for r in store.query("SELECT key FROM idempotency_keys")] == ["y"]


async def test_a_batch_function_that_raises_is_called_again_per_item_so_only_the_breaking_item_fails(
    store: Store,
) -> None:
    calls: list[list[str]] = []

    def refuses_poison(conn: sqlite3.Connection, keys: list[str]) -> list[object]:
        calls.append(list(keys))
        _insert_key(conn, keys)
        if "poison" in keys:
            raise RuntimeError("a multi-row write this item breaks")
        return list(keys)

    outcomes = await queued_together(store, (store.write_item(refuses_poison, key) for key in ("a", "poison", "b")),
                                     return_exceptions=True)

    assert outcomes[0] == "a" and isinstance(outcomes[1], RuntimeError) and outcomes[2] == "b"
    assert calls == [["a", "poison", "b"], ["a"], ["poison"], ["b"]]
    assert sorted(r["key"] for r in store.query("SELECT key FROM idempotency_keys")) == ["a", "b"]


@pytest.mark.parametrize(("in_order", "calls"), [(False, [["a", "b"], "plain"]),
                                                 (True, [["a"], "plain", ["b"]])])
async def test_items_of_an_in_order_group_keep_their_place_among_the_other_jobs(
    store: Store, in_order: bool, calls: list[object],
) -> None:
    seen: list[object] = []

    def group(conn: sqlite3.Connection, keys: list[str]) -> list[object]:
        seen.append(list(keys))
        return list(keys)

    def plain(conn: sqlite3.Connection) -> str:
        seen.append("plain")
        return "plain"

    outcomes = await queued_together(store, [store.write_item(group, "a", in_order=in_order), store.write(plain),
                                             store.write_item(group, "b", in_order=in_order)])

    assert outcomes == ["a", "plain", "b"]
    assert seen == calls


async def test_a_write_is_visible_to_a_fresh_connection_once_acknowledged(store: Store) -> None:
    await store.write(lambda conn: conn.execute(
        "INSERT INTO webhook_events (id, type, created, payload, received_at) VALUES ('evt_1', 't', 0, '{}', 'now')"))
    other = connect(store.path)
    assert other.execute("SELECT COUNT(*) FROM webhook_events").fetchone()[0] == 1
    other.close()


def test_negative_wallet_balances_are_refused_by_the_schema(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store.write_sync(lambda conn: conn.execute(
            "INSERT INTO agent_wallets (id, agent_id, customer_id, balance, created_at, updated_at) "
            "VALUES ('w', 'a', 'cus_1', -1, 'now', 'now')"))


async def test_a_deferred_write_commits_on_its_own_without_other_writes(store: Store) -> None:
    future = store.defer(lambda conn: conn.execute(
        "INSERT INTO webhook_events (id, type, created, payload, received_at) VALUES ('evt_d', 't', 0, '{}', 'now')"))
    future.result(timeout=5)  # the writer's idle timer commits it
    assert store.query_one("SELECT id FROM webhook_events") == {"id": "evt_d"}


async def test_deferred_writes_ride_along_with_the_next_batch_and_survive_close(tmp_path: Path) -> None:
    store = Store(tmp_path / "d.db")
    store.defer(lambda conn: conn.execute(
        "INSERT INTO webhook_events (id, type, created, payload, received_at) VALUES ('evt_1', 't', 0, '{}', 'now')"))
    store.close()  # closing flushes what is deferred
    reopened = Store(tmp_path / "d.db")
    assert reopened.query_one("SELECT COUNT(*) AS n FROM webhook_events") == {"n": 1}
    reopened.close()
