"""The audit log: one row per tool call or authenticated HTTP request, bounded, pruned by age.

`AuditStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteAuditStore` is the SQLite implementation.

Rows are appended, read newest first, and deleted only by age (`prune`); they are never updated.

PostgreSQL (`PostgresAuditStore`): ids come from an identity column, so rows appended by several instances at once
all land, each with its own id (ids grow in each instance's order; across instances they interleave in commit
order, near enough for a log). A batch is one multi-row INSERT. Pruning from several instances at once is safe:
a row deleted by one is skipped by the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from .core import Reader, Tx, utc_iso


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit row as appended (its arguments already redacted and bounded: `redact.audit_arguments`)."""

    at: str  # UTC ISO-8601 with milliseconds (store.utc_now)
    tool: str
    caller: str | None
    arguments: str  # JSON
    outcome: str  # "ok" or "error"
    error_code: str | None
    duration_ms: float
    request_id: str | None  # Stripe request ids, comma-separated


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One audit row as read back: the entry and its sequence number."""

    id: int
    at: str
    tool: str
    caller: str | None
    arguments: str
    outcome: str
    error_code: str | None
    duration_ms: float
    request_id: str | None


@dataclass(frozen=True)
class AuditFilter:
    tool: str | None = None
    customer: str | None = None  # a value anywhere in the arguments (customer, customer_id, ...)
    since: datetime | None = None
    errors_only: bool = False
    limit: int = 50


class AuditStore(Protocol):
    """The audit operations every backend provides."""

    def append(self, tx: Tx, entries: Iterable[AuditEntry]) -> None:
        """Append the entries, in order; ids grow with each."""

    def report(self, wanted: AuditFilter) -> list[AuditRow]:
        """The latest `wanted.limit` rows matching every filter given, newest (highest id) first. `customer` matches
        a row whose arguments hold it as a whole JSON string value; LIKE wildcards in it match only themselves."""

    def prune(self, tx: Tx, older_than: datetime) -> int:
        """Delete the rows written before `older_than`; return how many."""


def _stamp(moment: datetime) -> str:
    """The format rows are written in (`store.utc_now`), so times compare as text."""
    return utc_iso(moment.timestamp())


def _like_literal(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


_AUDIT_COLUMNS = "at, tool, caller, arguments, outcome, error_code, duration_ms, request_id"
_AUDIT_CHUNK = 1000  # rows per INSERT (8 parameters each: far below PostgreSQL's 65535)


class SqliteAuditStore:
    def __init__(self, core: Reader) -> None:
        self._core = core

    def append(self, tx: Tx, entries: Iterable[AuditEntry]) -> None:
        tx.executemany(
            f"INSERT INTO audit_log ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(e.at, e.tool, e.caller, e.arguments, e.outcome, e.error_code, e.duration_ms, e.request_id)
             for e in entries])

    def report(self, wanted: AuditFilter) -> list[AuditRow]:
        clauses: list[str] = []
        params: list[Any] = []
        if wanted.tool:
            clauses.append("tool = ?")
            params.append(wanted.tool)
        if wanted.customer:
            clauses.append("arguments LIKE ? ESCAPE '\\'")
            params.append(f'%"{_like_literal(wanted.customer)}"%')
        if wanted.since:
            clauses.append("at >= ?")
            params.append(_stamp(wanted.since))
        if wanted.errors_only:
            clauses.append("outcome = 'error'")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(wanted.limit)
        return [AuditRow(**row) for row in self._core.query(
            f"SELECT id, {_AUDIT_COLUMNS} FROM audit_log {where} ORDER BY id DESC LIMIT ?", params)]

    def prune(self, tx: Tx, older_than: datetime) -> int:
        return int(tx.execute("DELETE FROM audit_log WHERE at < ?", (_stamp(older_than),)).rowcount)


class PostgresAuditStore(SqliteAuditStore):
    """PostgreSQL: the same statements (store/postgres_sql.py), but a batch is appended by multi-row INSERTs
    (psycopg's executemany sends one statement per row)."""

    def append(self, tx: Any, entries: Iterable[AuditEntry]) -> None:
        rows = [(e.at, e.tool, e.caller, e.arguments, e.outcome, e.error_code, e.duration_ms, e.request_id)
                for e in entries]
        for start in range(0, len(rows), _AUDIT_CHUNK):
            chunk = rows[start:start + _AUDIT_CHUNK]
            # psycopg's own placeholders: a text of any row count, not one more to translate and cache
            values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s)"] * len(chunk))
            tx.execute(f"INSERT INTO audit_log ({_AUDIT_COLUMNS}) VALUES {values}",
                       [value for row in chunk for value in row])
