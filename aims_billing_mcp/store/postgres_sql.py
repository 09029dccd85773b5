"""One SQL text for both backends where the dialects agree (issue 15: "the same SQL where the dialects agree,
per-backend SQL where they differ").

An aggregate's operations are written once, in SQLite's placeholder style (`?`); its PostgreSQL store inherits them
and overrides only what really differs. What makes that work is here:
- the PostgreSQL reader and every writer connection hand psycopg the same text with its placeholders (`%s`) instead
  of `?`, and a literal `%` doubled; a text without `?` is passed on unchanged, so statements written for PostgreSQL
  alone (with `%s` or `%(name)s`) keep working;
- a row read in a write job answers by position and by column name, as SQLite's `sqlite3.Row` does;
- `PostgresDialect` holds the clauses SQLite's one writer needs none of (`SqliteDialect` in core.py): the row lock
  a read-decide-write takes, the lease's `SKIP LOCKED`, a transaction-scoped lock on a name that may not exist yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


def array_literal(values: Iterable[Any]) -> str:
    """`values` (str, int or None) as one PostgreSQL array literal, for a `%s::text[]` or `%s::bigint[]` placeholder.

    Why a literal and not the list itself: psycopg works out a list's element type and dumps each element in Python
    (about 6 us an array of three); a trusted ledger batch sends some 30 arrays, and in bench/postgres.py's profile
    that dumping was the largest part of a writer's CPU per transaction. The literal is one str, dumped as is."""
    parts: list[str] = []
    for value in values:
        if value is None:
            parts.append("NULL")
        elif isinstance(value, str):  # inside double quotes only `"` and `\` are special
            parts.append('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"')
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(str(value))
        else:
            raise TypeError(f"an array element must be str, int or None, not {type(value).__name__}")
    return "{" + ",".join(parts) + "}"


def array_columns(rows: Sequence[Sequence[Any]], width: int) -> list[str]:
    """`rows` turned into `width` columns, each as an array literal: the parameters of an `unnest(...)` of several
    arrays (one multi-row statement, whatever the number of rows)."""
    if not rows:
        return ["{}"] * width
    return [array_literal(column) for column in zip(*rows, strict=True)]


class NamedRow(tuple[Any, ...]):
    """A row that answers `row[0]` and `row["column"]` (what the SQLite writer's rows answer)."""

    __slots__ = ()
    _index: dict[str, int]

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


@lru_cache(maxsize=1024)
def _row_class(names: tuple[str, ...]) -> type[NamedRow]:
    return type("Row", (NamedRow,), {"__slots__": (), "_index": {name: i for i, name in enumerate(names)}})


def named_rows(cursor: Any) -> Any:
    """psycopg row factory: the cursor's rows as NamedRow, one class per result shape."""
    description = cursor.description
    if description is None:
        return tuple
    return _row_class(tuple(column.name for column in description))


class PostgresDialect:
    """What PostgreSQL needs where several instances write at once (see SqliteDialect in core.py)."""

    for_update = " FOR UPDATE"  # a row read in a write job and then changed: others wait for this COMMIT
    skip_locked = " FOR UPDATE SKIP LOCKED"  # a lease: another instance's sender skips rows being taken

    @staticmethod
    def lock(tx: Any, *names: str) -> None:
        """Until COMMIT, a second job locking one of `names` waits (for what may not exist yet: a key, a customer's
        row); several names are taken in the order given, in one statement."""
        tx.execute("SELECT pg_advisory_xact_lock(hashtextextended(name, 7)) FROM unnest(%s::text[]) AS name",
                   (array_literal(names),))


class PostgresConnection:
    """A psycopg connection whose `execute`/`executemany` take the store's `?` texts and whose rows answer by name
    too; anything else (transaction(), cursor(), closed, ...) is the connection's own."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        conn.row_factory = named_rows
        self._conn = conn

    def execute(self, sql: str, params: Any = None, **kwargs: Any) -> Any:
        return self._conn.execute(postgres_sql(sql), params, **kwargs)

    def executemany(self, sql: str, params_seq: Iterable[Any], **kwargs: Any) -> Any:
        cursor = self._conn.cursor()  # a psycopg connection has no executemany; its cursors do
        cursor.executemany(postgres_sql(sql), params_seq, **kwargs)
        return cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)
