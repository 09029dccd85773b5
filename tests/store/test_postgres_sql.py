"""The one SQL text both backends run: SQLite's `?` placeholders handed to psycopg as `%s` (store/postgres_sql.py)."""

from __future__ import annotations

import pytest

from aims_billing_mcp.store.postgres_sql import array_columns, array_literal, postgres_sql


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


ODD_TEXTS = ['plain', '', 'a "quoted" word', 'back\\slash', 'comma, and {braces}', 'NULL', ' spaced ', 'line\nbreak',
             'unicode: é ✓', '\\"', '"']


@pytest.mark.parametrize("values", [
    ODD_TEXTS,
    [None, "x", None],
    [],
])
def test_an_array_literal_of_texts_reads_back_as_the_same_texts(postgres_url: str, values: list[str | None]) -> None:
    import psycopg

    with psycopg.connect(postgres_url) as conn:
        (read,) = conn.execute("SELECT %s::text[]", (array_literal(values),)).fetchone() or (None,)

    assert read == values


@pytest.mark.parametrize("values", [[0, -1, 2**62, None], [], [7]])
def test_an_array_literal_of_integers_reads_back_as_bigints(postgres_url: str, values: list[int | None]) -> None:
    import psycopg

    with psycopg.connect(postgres_url) as conn:
        (read,) = conn.execute("SELECT %s::bigint[]", (array_literal(values),)).fetchone() or (None,)

    assert read == values


@pytest.mark.parametrize("odd", [True, 1.5, b"bytes", ["nested"]])
def test_an_array_element_that_is_neither_text_integer_nor_null_is_refused(odd: object) -> None:
    with pytest.raises(TypeError, match="str, int or None"):
        array_literal(["fine", odd])


def test_rows_become_one_array_literal_per_column() -> None:
    assert array_columns([("a", 1), ("b", None)], 2) == ['{"a","b"}', "{1,NULL}"]
    assert array_columns([], 3) == ["{}", "{}", "{}"]
