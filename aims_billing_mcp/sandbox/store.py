"""SQLite storage for sandbox objects, idempotency records and the running balance.

One table holds every object as JSON, ordered by insertion (``seq``) so lists come newest first.
The fields the API filters on are copied into an indexed ``attrs`` table, so a filtered list or a
lookup by ``lookup_key`` stays O(log n). The balance is kept as running totals rather than being
recomputed from payments. All access goes through one connection guarded by a lock, because the
app is called both from the event loop thread and from test-client threads; each API request runs
in one transaction (:meth:`Store.transaction`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

BUSY_TIMEOUT_MS = 15000

# Which fields of which object types are filterable (and so indexed).
INDEXED: Mapping[str, tuple[str, ...]] = {
    "product": ("active",),
    "price": ("active", "product", "type", "currency", "lookup_key"),
    "customer": ("email",),
    "customer_balance_transaction": ("customer", "invoice"),
    "payment_link": ("active",),
    "checkout.session": ("customer", "status", "payment_intent", "payment_link"),
    "item": ("_parent",),
    "invoice": ("customer", "status", "_subscription"),
    "invoiceitem": ("customer", "invoice"),
    "payment_intent": ("customer", "latest_charge"),
    "refund": ("payment_intent", "charge"),
    "subscription": ("customer", "status", "_prices"),
    "event": ("type",),
    "billing.meter": ("status", "event_name"),
    "transfer": ("destination", "transfer_group"),
    "transfer_reversal": ("_parent",),
    "application_fee": ("charge",),
    "fee_refund": ("_parent",),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_type_seq ON objects(type, seq);
CREATE TABLE IF NOT EXISTS attrs (
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attrs_lookup ON attrs(type, name, value);
CREATE INDEX IF NOT EXISTS attrs_id ON attrs(id);
CREATE TABLE IF NOT EXISTS idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL,
    body TEXT NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE TABLE IF NOT EXISTS sandbox_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meter_events (
    identifier TEXT PRIMARY KEY,
    meter TEXT NOT NULL,
    event_name TEXT NOT NULL,
    customer TEXT NOT NULL,
    value INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS meter_events_usage ON meter_events(meter, customer, timestamp);
CREATE TABLE IF NOT EXISTS meter_event_sessions (
    token TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS balance (
    currency TEXT PRIMARY KEY,
    available INTEGER NOT NULL,
    card INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS account_balance (
    account TEXT NOT NULL,
    currency TEXT NOT NULL,
    available INTEGER NOT NULL,
    PRIMARY KEY (account, currency)
);
"""


@dataclass(frozen=True)
class IdempotencyRecord:
    """The first executed response for one Idempotency-Key."""

    method: str
    path: str
    fingerprint: str
    status: int
    body: str


def _attr_value(value: Any) -> str:
    """How a field is written in ``attrs``: booleans as Stripe spells them, null as ``""``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


Filter = Mapping[str, "str | Sequence[str]"]


class Store:
    """Objects, idempotency keys and balance in one SQLite database (``:memory:`` or a file)."""

    def __init__(self, db_path: str = ":memory:") -> None:
        self._conn = sqlite3.connect(
            db_path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
        )
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if db_path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("BEGIN IMMEDIATE")  # two processes may create the schema at once
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        self._depth = 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the lock and run the block in one transaction (nested calls join the outer one)."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            # IMMEDIATE: take the write lock up front, so a second process (a CLI on the same file)
            # waits for it (busy timeout) instead of failing on a read-to-write upgrade.
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._depth = 0

    # -- objects -------------------------------------------------------------------------------

    def _write_attrs(self, obj: Mapping[str, Any]) -> None:
        fields = INDEXED.get(obj["object"], ())
        if not fields:
            return
        rows: list[tuple[str, str, str, str]] = []
        for f in fields:
            value = obj.get(f)
            values = value if isinstance(value, list) else [value]  # a list field: one row per element
            rows.extend((obj["id"], obj["object"], f, _attr_value(v)) for v in values)
        self._conn.executemany("INSERT INTO attrs (id, type, name, value) VALUES (?, ?, ?, ?)", rows)

    def insert(self, obj: Mapping[str, Any]) -> None:
        """Store a new object (it must carry ``id`` and ``object``)."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO objects (id, type, data) VALUES (?, ?, ?)",
                (obj["id"], obj["object"], json.dumps(obj)),
            )
            self._write_attrs(obj)

    def update(self, obj: Mapping[str, Any]) -> None:
        """Replace a stored object, keeping its list position."""
        with self._lock:
            self._conn.execute("UPDATE objects SET data = ? WHERE id = ?", (json.dumps(obj), obj["id"]))
            if obj["object"] in INDEXED:
                self._conn.execute("DELETE FROM attrs WHERE id = ?", (obj["id"],))
                self._write_attrs(obj)

    def delete(self, obj_id: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM objects WHERE id = ?", (obj_id,))
            self._conn.execute("DELETE FROM attrs WHERE id = ?", (obj_id,))

    def get(self, obj_id: str, obj_type: str | None = None) -> dict[str, Any] | None:
        """The stored object, or None (also when it exists with another ``object`` type)."""
        with self._lock:
            row = self._conn.execute("SELECT type, data FROM objects WHERE id = ?", (obj_id,)).fetchone()
        if row is None or (obj_type is not None and row[0] != obj_type):
            return None
        data: dict[str, Any] = json.loads(row[1])
        return data

    def count(self, obj_type: str) -> int:
        with self._lock:
            row = self._conn.execute("SELECT COUNT(*) FROM objects WHERE type = ?", (obj_type,)).fetchone()
        return int(row[0])

    def seq_of(self, obj_id: str, obj_type: str) -> int | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT seq FROM objects WHERE id = ? AND type = ?", (obj_id, obj_type)
            ).fetchone()
        return None if row is None else int(row[0])

    def page(
        self,
        obj_type: str,
        filters: Filter,
        *,
        limit: int,
        after_seq: int | None = None,
        before_seq: int | None = None,
        oldest_first: bool = False,
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of objects of ``obj_type`` matching ``filters``, plus whether more follow.

        ``after_seq``/``before_seq`` are the list cursors (``starting_after``/``ending_before``)
        translated to positions; the order is newest first unless ``oldest_first``.
        """
        where = ["o.type = ?"]
        args: list[Any] = [obj_type]
        for name, value in filters.items():
            values = [value] if isinstance(value, str) else list(value)
            marks = ", ".join("?" for _ in values)
            if name == "id":
                where.append(f"o.id IN ({marks})")
                args.extend(values)
            else:
                where.append(
                    "o.id IN (SELECT a.id FROM attrs a WHERE a.type = ? AND a.name = ? "
                    f"AND a.value IN ({marks}))"
                )
                args.extend([obj_type, name, *values])
        newest_first = not oldest_first
        reverse = False
        if after_seq is not None:
            where.append("o.seq < ?" if newest_first else "o.seq > ?")
            args.append(after_seq)
        elif before_seq is not None:
            where.append("o.seq > ?" if newest_first else "o.seq < ?")
            args.append(before_seq)
            reverse = True  # walk away from the cursor, then flip back into list order
        descending = newest_first != reverse
        sql = (
            f"SELECT o.data FROM objects o WHERE {' AND '.join(where)} "
            f"ORDER BY o.seq {'DESC' if descending else 'ASC'} LIMIT ?"
        )
        args.append(limit + 1)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        has_more = len(rows) > limit
        data = [json.loads(r[0]) for r in rows[:limit]]
        if reverse:
            data.reverse()
        return data, has_more

    def find_one(self, obj_type: str, name: str, value: str) -> dict[str, Any] | None:
        """The newest object whose indexed field ``name`` equals ``value``."""
        found, _ = self.page(obj_type, {name: value}, limit=1)
        return found[0] if found else None

    # -- idempotency ---------------------------------------------------------------------------

    def idempotency_get(self, scope: str, key: str) -> IdempotencyRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT method, path, fingerprint, status, body FROM idempotency WHERE scope = ? AND key = ?",
                (scope, key),
            ).fetchone()
        return None if row is None else IdempotencyRecord(row[0], row[1], row[2], int(row[3]), row[4])

    def idempotency_forget(self) -> int:
        """Drop every stored key, as Stripe does with each one 24 hours after its first use."""
        with self._lock:
            return int(self._conn.execute("DELETE FROM idempotency").rowcount)

    def idempotency_put(self, scope: str, key: str, record: IdempotencyRecord, created: int) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (scope, key, record.method, record.path, record.fingerprint, record.status, record.body,
                 created),
            )

    # -- balance -------------------------------------------------------------------------------

    def balance_add(self, currency: str, amount: int) -> None:
        """Add a succeeded card payment to the available balance."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO balance (currency, available, card) VALUES (?, ?, ?) "
                "ON CONFLICT(currency) DO UPDATE SET available = available + excluded.available, "
                "card = card + excluded.card",
                (currency, amount, amount),
            )

    def balance_adjust(self, currency: str, amount: int) -> None:
        """Move the platform's available balance without a card payment (transfers, reversals, fees)."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO balance (currency, available, card) VALUES (?, ?, 0) "
                "ON CONFLICT(currency) DO UPDATE SET available = available + excluded.available",
                (currency, amount),
            )

    def account_balance_add(self, account: str, currency: str, amount: int) -> None:
        """Move a connected account's available balance."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO account_balance (account, currency, available) VALUES (?, ?, ?) "
                "ON CONFLICT(account, currency) DO UPDATE SET available = available + excluded.available",
                (account, currency, amount),
            )

    def account_balance_rows(self, account: str) -> list[tuple[str, int]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT currency, available FROM account_balance WHERE account = ? ORDER BY currency", (account,)
            ).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    def balance_rows(self) -> list[tuple[str, int, int]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT currency, available, card FROM balance ORDER BY currency"
            ).fetchall()
        return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]

    # -- sandbox state (clock offset, ...) shared by every process on the file ------------------

    def state_get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM sandbox_state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def state_set(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO sandbox_state (key, value) VALUES (?, ?)", (key, value))

    # -- meter events ------------------------------------------------------------------------------

    def meter_event_seen(self, identifier: str) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM meter_events WHERE identifier = ?", (identifier,)).fetchone()
        return row is not None

    def meter_event_add(self, identifier: str, meter: str, event_name: str, customer: str, value: int,
                        timestamp: int, created: int) -> bool:
        """Record one meter event; False (and nothing counted) when the identifier is known."""
        with self._lock:
            cursor = self._conn.execute(
                "INSERT OR IGNORE INTO meter_events VALUES (?, ?, ?, ?, ?, ?, ?)",
                (identifier, meter, event_name, customer, value, timestamp, created),
            )
        return cursor.rowcount == 1

    def meter_usage(self, meter: str, customer: str, start: int, end: int, formula: str) -> int:
        """The meter's aggregate for ``customer`` over ``[start, end)``: sum, count or last value."""
        where = "meter = ? AND customer = ? AND timestamp >= ? AND timestamp < ?"
        args = (meter, customer, start, end)
        with self._lock:
            if formula == "count":
                row = self._conn.execute(f"SELECT COUNT(*) FROM meter_events WHERE {where}", args).fetchone()
            elif formula == "last":
                row = self._conn.execute(
                    f"SELECT value FROM meter_events WHERE {where} ORDER BY timestamp DESC, rowid DESC LIMIT 1",
                    args,
                ).fetchone()
            else:
                row = self._conn.execute(f"SELECT SUM(value) FROM meter_events WHERE {where}", args).fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    # -- v2 meter event sessions -------------------------------------------------------------------

    def session_add(self, token: str, session_id: str, expires_at: int) -> None:
        with self._lock:
            self._conn.execute("INSERT INTO meter_event_sessions VALUES (?, ?, ?)", (token, session_id, expires_at))

    def session_expiry(self, token: str) -> int | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT expires_at FROM meter_event_sessions WHERE token = ?", (token,)
            ).fetchone()
        return None if row is None else int(row[0])
