"""The tools' idempotency keys (idempotency_keys): claimed, answered, replayed per owner.

`IdempotencyStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteIdempotencyStore` is the SQLite implementation.

A row is written once, with the call's response, in the transaction that acknowledges the call: (tool, owner, key)
is its primary key, so a second writer of the same key is refused by the database, not by a read before the write.

PostgreSQL (`PostgresIdempotencyStore`), where several instances record at once, needs nothing more: `INSERT ... ON
CONFLICT DO NOTHING` on the primary key waits for a concurrent insert of the same key to commit (then inserts
nothing: the first stays, `record` answers False) or to roll back (then inserts: this call is the first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .core import Reader, Tx


@dataclass(frozen=True, slots=True)
class StoredCall:
    """What a key holds: the hash of the arguments it was first used with and the first response (JSON)."""

    request_hash: str
    response: str


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A call's first result, to store under (tool, owner, key)."""

    tool: str
    owner: str
    key: str
    request_hash: str
    response: str  # JSON
    request_id: str | None
    created_at: str  # UTC ISO-8601 (store.utc_now)


class IdempotencyStore(Protocol):
    """The idempotency operations every backend provides."""

    def find(self, tool: str, owner: str, key: str, *, since: str | None = None,
             tx: Tx | None = None) -> StoredCall | None:
        """The call stored under (tool, owner, key), created at or after `since` if given; read in `tx` if given,
        else from committed state; None if there is none."""

    def record(self, tx: Tx, call: CallRecord) -> bool:
        """Store `call`; False (and nothing changed) if (tool, owner, key) is already stored: the first stays."""


class SqliteIdempotencyStore:
    def __init__(self, core: Reader) -> None:
        self._core = core

    def find(self, tool: str, owner: str, key: str, *, since: str | None = None,
             tx: Tx | None = None) -> StoredCall | None:
        if since is None:
            sql = "SELECT request_hash, response FROM idempotency_keys WHERE tool = ? AND owner = ? AND key = ?"
            params: tuple[str, ...] = (tool, owner, key)
        else:
            sql = ("SELECT request_hash, response FROM idempotency_keys WHERE tool = ? AND owner = ? AND key = ? "
                   "AND created_at >= ?")
            params = (tool, owner, key, since)
        if tx is not None:
            found = tx.execute(sql, params).fetchone()
            return None if found is None else StoredCall(found[0], found[1])
        row = self._core.query_one(sql, params)
        return None if row is None else StoredCall(row["request_hash"], row["response"])

    def record(self, tx: Tx, call: CallRecord) -> bool:
        cursor = tx.execute(
            "INSERT INTO idempotency_keys (tool, owner, key, request_hash, response, request_id, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tool, owner, key) DO NOTHING",
            (call.tool, call.owner, call.key, call.request_hash, call.response, call.request_id, call.created_at),
        )
        return bool(cursor.rowcount == 1)


class PostgresIdempotencyStore(SqliteIdempotencyStore):
    """PostgreSQL: the same statements (store/postgres_sql.py)."""
