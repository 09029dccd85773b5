"""The throwaway cluster's databases (tests/support/pg.py), emptied in the background between tests: a database given
back reaches a later test empty, and one whose schema its test changed is dropped, never handed out again."""

from __future__ import annotations

import pytest

from tests.support.pg import Cluster

psycopg = pytest.importorskip("psycopg")
AUDIT_ROW = "INSERT INTO audit_log (at, tool, arguments, outcome, duration_ms) VALUES ('t', 'x', '{}', 'ok', 1)"


def test_a_database_given_back_reaches_the_next_test_empty_with_its_identities_restarted(pg_cluster: Cluster) -> None:
    url = pg_cluster.fresh_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(AUDIT_ROW)
    pg_cluster.give_back(url)
    pg_cluster.settle()
    assert pg_cluster.fresh_database() == url  # the one just emptied is the next handed out
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM audit_log").fetchone() == (0,)
        conn.execute(AUDIT_ROW)
        assert conn.execute("SELECT id FROM audit_log").fetchone() == (1,)
    pg_cluster.give_back(url)


@pytest.mark.parametrize("change", [
    "ALTER TABLE agent_wallets ADD COLUMN extra INT",
    "ALTER TABLE agent_wallets ALTER COLUMN balance DROP NOT NULL",
    "ALTER TABLE agent_wallets ALTER COLUMN balance SET DEFAULT 7",
    "CREATE INDEX extra ON agent_wallets (balance)",
    "CREATE VIEW extra AS SELECT 1 AS one",
    "CREATE FUNCTION extra() RETURNS INT LANGUAGE sql AS 'SELECT 1'",
    "INSERT INTO migrations (id, name) VALUES (999, 'extra')",
])
def test_a_database_whose_schema_its_test_changed_is_dropped_not_handed_out_again(pg_cluster: Cluster,
                                                                                  change: str) -> None:
    url = pg_cluster.fresh_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(change)
    pg_cluster.give_back(url)
    pg_cluster.settle()
    handed = pg_cluster.fresh_database()
    pg_cluster.give_back(handed)
    assert handed != url
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        psycopg.connect(url).close()
