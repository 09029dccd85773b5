"""One SQL text for both backends where the dialects agree (issue 15: "the same SQL where the dialects agree,
per-backend SQL where they differ").

An aggregate's operations are written once, in SQLite's placeholder style (`?`); its PostgreSQL store inherits them
and overrides only what really differs (row locks, conflict clauses, how a broken UNIQUE key is reported). What makes
that work is here: the PostgreSQL reader and every writer connection hand psycopg the same text with its placeholders
(`%s`) instead of `?`, and a literal `%` doubled. A text without `?` is passed on unchanged, so statements written for
PostgreSQL alone (with `%s` or `%(name)s`) keep working.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=4096)
def postgres_sql(sql: str) -> str:
    """`sql` with each `?` outside a quoted literal or identifier as `%s`, and every `%` as `%%` (psycopg reads
    `%` anywhere as the start of a placeholder); unchanged when it has no `?`."""
    if "?" not in sql:
        return sql
    out: list[str] = []
    quote = ""
    for char in sql:
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "?":
            out.append("%s")
            continue
        out.append("%%" if char == "%" else char)
    return "".join(out)


class PostgresConnection:
    """A psycopg connection whose `execute`/`executemany` take the store's `?` texts; anything else (transaction(),
    cursor(), closed, ...) is the connection's own."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Any = None, **kwargs: Any) -> Any:
        return self._conn.execute(postgres_sql(sql), params, **kwargs)

    def executemany(self, sql: str, params_seq: Iterable[Any], **kwargs: Any) -> Any:
        cursor = self._conn.cursor()  # a psycopg connection has no executemany; its cursors do
        cursor.executemany(postgres_sql(sql), params_seq, **kwargs)
        return cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)
