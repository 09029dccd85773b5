"""The PostgreSQL schema (issue 15 part 3): the same numbered history as SQLite's, the same tables, columns, keys and
UNIQUE constraints, applied once however many instances migrate at once, and a clear refusal for a database that is
not ours, too old or too new, or not reachable."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from aims_billing_mcp.store import SCHEMA_VERSION, Store
from aims_billing_mcp.store import postgres as pg
from tests.support.pg import Cluster

psycopg = pytest.importorskip("psycopg")


@pytest.fixture
def cluster(pg_cluster: Cluster) -> Cluster:
    return pg_cluster


@pytest.fixture
def database(cluster: Cluster, request: pytest.FixtureRequest) -> str:
    return cluster.create_database(f"t_{abs(hash(request.node.nodeid)) % 10**12}")


def sqlite_shape(path: Path) -> dict[str, Any]:
    store = Store(path)
    try:
        conn = store._reader
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                             "'sqlite_%' ORDER BY name")]
        columns = {t: sorted(r[1] for r in conn.execute(f"PRAGMA table_info({t})")) for t in tables}
        keys = {t: tuple(r[1] for r in sorted((r for r in conn.execute(f"PRAGMA table_info({t})") if r[5]),
                                              key=lambda r: r[5])) for t in tables}
        unique: set[tuple[str, tuple[str, ...]]] = set()
        for t in tables:
            for index in conn.execute(f"PRAGMA index_list({t})"):
                if index[2] and index[3] != "pk":
                    unique.add((t, tuple(r[2] for r in conn.execute(f"PRAGMA index_info({index[1]})"))))
        return {"tables": tables, "columns": columns, "keys": keys, "unique": unique}
    finally:
        store.close()


def postgres_shape(url: str) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY table_name")]
        columns = {t: sorted(r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (t,))) for t in tables}
        indexes = conn.execute(
            "SELECT c.relname, i.indisprimary, array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(n, o) "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o) "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace s ON s.oid = c.relnamespace "
            "WHERE s.nspname = 'public' AND i.indisunique").fetchall()
        keys = {t: () for t in tables}
        unique: set[tuple[str, tuple[str, ...]]] = set()
        for table, primary, cols in indexes:
            if primary:
                keys[table] = tuple(cols)
            else:
                unique.add((table, tuple(cols)))
        return {"tables": tables, "columns": columns, "keys": keys, "unique": unique}


def test_every_migration_applies_on_postgresql_and_mirrors_the_sqlite_schema(database: str, tmp_path: Path) -> None:
    with pg.connect(database) as conn:
        applied = pg.migrate(conn)

    assert applied == list(range(1, SCHEMA_VERSION + 1))
    lite, post = sqlite_shape(tmp_path / "x.db"), postgres_shape(database)
    for part in ("tables", "columns", "keys", "unique"):
        assert post[part] == lite[part], part


def test_money_and_counter_columns_are_64_bit(database: str) -> None:
    with pg.connect(database) as conn:
        pg.migrate(conn)
        narrow = conn.execute("SELECT table_name, column_name FROM information_schema.columns WHERE "
                              "table_schema = 'public' AND data_type IN ('integer', 'smallint', 'real')").fetchall()
    assert narrow == []


def test_instances_migrating_at_once_apply_each_migration_once(database: str) -> None:
    results: list[list[int]] = []
    start = threading.Barrier(3)

    def instance() -> None:
        with pg.connect(database) as conn:
            start.wait()
            results.append(pg.migrate(conn))

    threads = [threading.Thread(target=instance) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(len(r) for r in results) == [0, 0, SCHEMA_VERSION]
    with pg.connect(database) as conn:
        assert conn.execute("SELECT COUNT(*) FROM migrations").fetchone() == (SCHEMA_VERSION,)


def test_a_database_holding_another_products_tables_is_refused_naming_them(database: str) -> None:
    with pg.connect(database) as conn:
        conn.execute("CREATE TABLE orders (id BIGINT PRIMARY KEY)")
        with pytest.raises(pg.PostgresUnavailable, match="not aims-billing-mcp's \\(orders\\)") as refused:
            pg.migrate(conn)
        assert conn.execute("SELECT to_regclass('migrations')").fetchone() == (None,)  # nothing written
    assert refused.value.exit_code == 2


@pytest.mark.parametrize(("version", "says"), [
    (SCHEMA_VERSION - 1, "run `aims-billing-mcp migrate`"),
    (SCHEMA_VERSION + 1, "newer than this code"),
])
def test_serving_refuses_a_schema_older_or_newer_than_the_code(database: str, version: int, says: str) -> None:
    with pg.connect(database) as conn:
        pg.migrate(conn, upto=min(version, SCHEMA_VERSION))
        if version > SCHEMA_VERSION:
            conn.execute("INSERT INTO migrations (id, name) VALUES (%s, 'from the future')", (version,))
        with pytest.raises(pg.PostgresUnavailable, match=says):
            pg.check_schema(conn, database)


def test_the_current_schema_passes_the_check(database: str) -> None:
    with pg.connect(database) as conn:
        pg.migrate(conn)
        assert pg.check_schema(conn, database) == SCHEMA_VERSION


def test_a_wrong_password_is_one_line_naming_the_host_with_the_password_masked(cluster: Cluster) -> None:
    url = cluster.url(password="not-the-password")
    with pytest.raises(pg.PostgresUnavailable) as refused:
        pg.connect(url)
    message = refused.value.message
    assert "\n" not in message and f"127.0.0.1:{cluster.port}" in message and "password" in message
    assert "not-the-password" not in message and cluster.password not in message and "***" in message
    assert refused.value.exit_code == 2


def test_an_unreachable_server_is_one_line_naming_the_host_and_the_fix(cluster: Cluster) -> None:
    with pytest.raises(pg.PostgresUnavailable) as refused:
        pg.connect("postgresql://app:secret-pw@127.0.0.1:1/billing")
    message = refused.value.message
    assert "\n" not in message and "127.0.0.1:1" in message and "secret-pw" not in message
    assert "running" in message and refused.value.exit_code == 1


def test_a_missing_database_names_createdb(cluster: Cluster) -> None:
    with pytest.raises(pg.PostgresUnavailable, match="createdb"):
        pg.connect(cluster.url("no_such_db"))
