"""The PostgreSQL store core (issue 15 part 4): group commit over several writer threads, a savepoint per job, a
deadlock or serialization failure retried as a whole batch, and clear retryable errors instead of hangs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from aims_billing_mcp.errors import DatabaseBusy
from aims_billing_mcp.store import postgres as pg
from aims_billing_mcp.store.postgres_core import MAX_ATTEMPTS, PostgresCore
from tests.conftest import queued_together
from tests.support.pg import Cluster

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.anyio


@pytest.fixture
def cluster(pg_cluster: Cluster) -> Cluster:
    return pg_cluster


@pytest.fixture
def url(cluster: Cluster, request: pytest.FixtureRequest) -> str:
    database = cluster.migrated_database(f"c_{abs(hash(request.node.nodeid)) % 10**12}")
    with pg.connect(database) as conn:
        conn.execute("CREATE TABLE counters (id INT PRIMARY KEY, n BIGINT NOT NULL)")
        conn.execute("INSERT INTO counters VALUES (1, 0), (2, 0)")
    return database


@pytest.fixture
def core(url: str) -> Iterator[PostgresCore]:
    opened = PostgresCore(url, writers=2, pool_size=2, pool_wait=0.2)
    try:
        yield opened
    finally:
        opened.close()


def test_a_database_at_an_older_schema_is_refused_until_migrated(cluster: Cluster) -> None:
    bare = cluster.create_database("bare_schema")
    with pytest.raises(pg.PostgresUnavailable, match="aims-billing-mcp migrate"):
        PostgresCore(bare)
    migrated = PostgresCore(bare, migrate=True)
    assert migrated.schema_version == pg.SCHEMA_VERSION and migrated.applied_migrations
    migrated.close()


async def test_concurrent_writes_each_get_their_own_outcome_and_a_failing_job_undoes_only_itself(
    core: PostgresCore,
) -> None:
    def add(conn: Any) -> int:
        row = conn.execute("UPDATE counters SET n = n + 1 WHERE id = 1 RETURNING n").fetchone()
        return int(row[0])

    def add_then_fail(conn: Any) -> None:
        conn.execute("UPDATE counters SET n = n + 1000 WHERE id = 1")
        raise ValueError("refused after writing")

    outcomes = await asyncio.gather(*(core.write(add) for _ in range(50)), core.write(add_then_fail),
                                    return_exceptions=True)

    assert sorted(o for o in outcomes if isinstance(o, int)) == list(range(1, 51))
    assert isinstance(outcomes[-1], ValueError)
    assert core.query_one("SELECT n FROM counters WHERE id = 1") == {"n": 50}


async def test_items_of_one_batch_function_share_one_call(core: PostgresCore) -> None:
    calls: list[int] = []

    def insert(conn: Any, keys: list[str]) -> list[object]:
        calls.append(len(keys))
        return [conn.execute("INSERT INTO idempotency_keys (tool, owner, key, request_hash, response, created_at) "
                             "VALUES ('t', '', %s, 'h', '{}', 'now') RETURNING key", (k,)).fetchone()[0]
                for k in keys]

    keys = await asyncio.gather(*(core.write_item(insert, f"k{i}") for i in range(20)))

    assert keys == [f"k{i}" for i in range(20)] and sum(calls) == 20 and len(calls) < 20


async def test_a_batch_function_that_raises_is_called_again_per_item_so_only_the_breaking_item_fails(
    core: PostgresCore,
) -> None:
    calls: list[list[str]] = []

    def refuses_poison(conn: Any, keys: list[str]) -> list[object]:
        calls.append(list(keys))
        for k in keys:
            conn.execute("INSERT INTO idempotency_keys (tool, owner, key, request_hash, response, created_at) "
                         "VALUES ('t', '', %s, 'h', '{}', 'now')", (k,))
        if "poison" in keys:
            raise RuntimeError("a multi-row write this item breaks")
        return list(keys)

    keys = [f"k{i}" for i in range(10)] + ["poison"] + [f"k{i}" for i in range(10, 20)]
    outcomes = await asyncio.gather(*(core.write_item(refuses_poison, k) for k in keys), return_exceptions=True)

    assert [o if isinstance(o, str) else type(o).__name__ for o in outcomes] == [
        "RuntimeError" if k == "poison" else k for k in keys]
    assert ["poison"] in calls  # the batch holding it was undone, then each of its items ran alone
    stored = core.query("SELECT key FROM idempotency_keys ORDER BY key")
    assert sorted(row["key"] for row in stored) == sorted(k for k in keys if k != "poison")


async def test_a_statement_timeout_in_a_batch_function_fails_its_item_not_the_other_jobs_of_the_transaction(
    url: str,
) -> None:
    core = PostgresCore(url, writers=1, pool_size=2)  # one writer: all three jobs in one transaction

    def plain(conn: Any) -> str:
        conn.execute("UPDATE counters SET n = n + 1 WHERE id = 1")
        return "plain"

    def sleeps_when_told(conn: Any, items: list[str]) -> list[object]:
        if "slow" in items:
            conn.execute("SET LOCAL statement_timeout = 50")
            conn.execute("SELECT pg_sleep(1)")  # QueryCanceled: an OperationalError, the connection still fine
        return list(items)

    try:
        outcomes = await queued_together(core, [core.write(plain), core.write_item(sleeps_when_told, "fast"),
                                                core.write_item(sleeps_when_told, "slow")],
                                         settle=0.05, return_exceptions=True)
        counted = core.query_one("SELECT n FROM counters WHERE id = 1")
    finally:
        core.close()

    assert outcomes[:2] == ["plain", "fast"]
    assert isinstance(outcomes[2], psycopg.errors.QueryCanceled)
    assert counted == {"n": 1}


async def test_a_deadlock_aborts_the_batch_which_is_run_again_and_succeeds(core: PostgresCore, url: str) -> None:
    job_holds_row_1, other_holds_row_2 = threading.Event(), threading.Event()
    attempts: list[int] = []

    def cross(conn: Any) -> str:
        attempts.append(1)
        assert other_holds_row_2.wait(10)
        conn.execute("SET LOCAL deadlock_timeout = '50ms'")  # this side notices the deadlock first: the victim
        conn.execute("UPDATE counters SET n = n + 1 WHERE id = 1")
        job_holds_row_1.set()
        conn.execute("UPDATE counters SET n = n + 1 WHERE id = 2")
        return "done"

    def other_instance() -> None:
        with psycopg.connect(url) as other:  # a transaction elsewhere locking the rows in the other order
            other.execute("SET deadlock_timeout = '10s'")
            other.execute("UPDATE counters SET n = n + 10 WHERE id = 2")
            other_holds_row_2.set()
            assert job_holds_row_1.wait(10)
            other.execute("UPDATE counters SET n = n + 10 WHERE id = 1")
            other.commit()

    thread = threading.Thread(target=other_instance)
    thread.start()
    result = await core.write(cross)
    await asyncio.to_thread(thread.join)

    assert result == "done" and len(attempts) >= 2 and core.retries == len(attempts) - 1  # a loaded box may retry twice
    assert core.query("SELECT id, n FROM counters ORDER BY id") == [{"id": 1, "n": 11}, {"id": 2, "n": 11}]


async def test_conflicts_that_keep_recurring_end_in_a_retryable_database_busy_error(core: PostgresCore) -> None:
    def always_conflicts(conn: Any) -> None:
        conn.execute("UPDATE counters SET n = n + 1 WHERE id = 1")
        raise psycopg.errors.SerializationFailure("could not serialize access")

    with pytest.raises(DatabaseBusy, match="same idempotency key") as busy:
        await core.write(always_conflicts)

    assert busy.value.retryable and core.retries == MAX_ATTEMPTS
    assert core.query_one("SELECT n FROM counters WHERE id = 1") == {"n": 0}


def test_an_exhausted_read_pool_answers_database_busy_instead_of_hanging(core: PostgresCore) -> None:
    # both pooled connections taken
    with core._pool.connection(), core._pool.connection(), pytest.raises(DatabaseBusy, match=r"busy for 0\.2 s"):
        core.query("SELECT 1")
    assert core.query("SELECT 1 AS one") == [{"one": 1}]
