"""The one SQL text both backends run: SQLite's `?` placeholders handed to psycopg as `%s` (store/postgres_sql.py)."""

from __future__ import annotations

import pytest

from aims_billing_mcp.store.postgres_sql import postgres_sql


@pytest.mark.parametrize(("sqlite", "postgres"), [
    ("SELECT a FROM t WHERE id = ?", "SELECT a FROM t WHERE id = %s"),
    ("INSERT INTO t (a, b) VALUES (?, ?)", "INSERT INTO t (a, b) VALUES (%s, %s)"),
    ("SELECT 1 FROM t WHERE a NOT LIKE 'system:%' AND b = ?",
     "SELECT 1 FROM t WHERE a NOT LIKE 'system:%%' AND b = %s"),
    ("SELECT '?' AS q, \"odd?name\" FROM t WHERE a = ?", "SELECT '?' AS q, \"odd?name\" FROM t WHERE a = %s"),
    ("SELECT a FROM t WHERE b LIKE ? ESCAPE '\\' AND c = ?", "SELECT a FROM t WHERE b LIKE %s ESCAPE '\\' AND c = %s"),
])
def test_a_sqlite_statement_reaches_psycopg_with_its_placeholders(sqlite: str, postgres: str) -> None:
    assert postgres_sql(sqlite) == postgres


@pytest.mark.parametrize("written_for_postgres", [
    "SELECT a FROM t WHERE id = %s",
    "UPDATE t SET a = %(a)s WHERE id = %(id)s",
    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 7))",
])
def test_a_statement_without_a_question_mark_is_passed_on_unchanged(written_for_postgres: str) -> None:
    assert postgres_sql(written_for_postgres) == written_for_postgres
