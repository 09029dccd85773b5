"""Prepaid (pay-as-you-go) subscriptions and their outbox.

`PrepaidStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqlitePrepaidStore` is the SQLite implementation.

A row is the outbox entry of one paid source (payment session or ACP checkout): written in the transaction that
records the payment, then moved step by step by the worker (services/prepaid.py). Every move is a guarded UPDATE
from the status it expects, so two workers cannot both advance a row, nor a slow one rewind it: `PrepaidStatus`
and `TRANSITIONS` below are the machine. Across instances a worker also leases the row it works (`take`: one
worker until the lease ends, under a fresh token) and renews that lease at the start of every job that records a
step (and before a Stripe call, unless it did a quarter lease ago or less): a worker paused past its lease finds the
row taken over and records nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, Protocol

from .core import Reader, SqliteDialect, Tx
from .postgres_sql import PostgresDialect


class PrepaidStatus(StrEnum):
    """How far a prepaid subscription's start has come (the values are the stored strings)."""

    PENDING = "pending"  # paid, nothing done in Stripe yet
    CLAIMED = "claimed"  # this row may hold the customer's tier: the balance credit is next
    CREDITED = "credited"  # the payment is credit on the customer's Stripe balance
    SUBSCRIBED = "subscribed"  # the subscription exists; its end (cancel_at) is next
    STARTED = "started"  # done: recorded as the customer's provision
    FAILED = "failed"  # refused by Stripe: for an operator (start-subscriptions --failed, or refund-prepaid)
    REFUSED = "refused"  # the customer already had a tier: for an operator
    REFUNDING = "refunding"  # a refund-prepaid run holds it (or left its refund pending)
    REFUNDED = "refunded"  # the money went back


S = PrepaidStatus
IN_PROGRESS = (S.CLAIMED, S.CREDITED, S.SUBSCRIBED)
OPEN = (S.PENDING, *IN_PROGRESS)  # still to be started: the outbox's pending work
REFUNDABLE = (S.FAILED, S.REFUSED, S.REFUNDING)
# Where each status may go (staying is not a move). failed and refused go back to where they stopped when an
# operator retries them (start-subscriptions --failed), or to refunding (refund-prepaid).
TRANSITIONS: dict[PrepaidStatus, frozenset[PrepaidStatus]] = {
    S.PENDING: frozenset({S.CLAIMED, S.FAILED, S.REFUSED}),
    S.CLAIMED: frozenset({S.CREDITED, S.FAILED}),
    S.CREDITED: frozenset({S.SUBSCRIBED, S.FAILED, S.REFUSED}),
    S.SUBSCRIBED: frozenset({S.STARTED, S.FAILED}),
    S.STARTED: frozenset(),
    S.FAILED: frozenset({S.PENDING, S.CREDITED, S.SUBSCRIBED, S.REFUNDING}),
    S.REFUSED: frozenset({S.PENDING, S.CREDITED, S.SUBSCRIBED, S.REFUNDING}),
    S.REFUNDING: frozenset({S.REFUNDED}),
    S.REFUNDED: frozenset(),
}


def may_move(before: PrepaidStatus, after: PrepaidStatus) -> bool:
    """Whether the machine lets a row go from `before` to `after` (staying where it is always may)."""
    return before == after or after in TRANSITIONS[before]


@dataclass(frozen=True, slots=True)
class PrepaidRow:
    """One prepaid subscription as stored. Times: `starts_at`/`ends_at` epoch seconds (Stripe's), `created_at`/
    `updated_at` ISO-8601, `refund_claimed_at` epoch seconds of the refund run holding it."""

    id: str
    source: str  # payment_session or acp
    source_id: str
    customer_id: str
    tier: str
    amount: int
    currency: str
    payment_intent_id: str | None
    status: PrepaidStatus
    starts_at: int | None
    ends_at: int | None
    balance_transaction_id: str | None
    subscription_id: str | None
    refund_id: str | None
    refunded_amount: int | None
    attempts: int
    last_error: str | None
    created_at: str
    updated_at: str
    refund_claimed_at: float | None

    def __getitem__(self, name: str) -> Any:
        """Read a column by name: for callers not yet moved to attributes (services/acp.py's hook)."""
        return getattr(self, name)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PrepaidRow:
        """A row from its columns by name."""
        return _row(values[name] for name in COLUMNS)


COLUMNS = tuple(f.name for f in fields(PrepaidRow))
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM prepaid_subscriptions"


def _row(found: Any) -> PrepaidRow:
    """A row from its values in COLUMNS order (a sqlite3.Row, or a reader's dict's values)."""
    values = dict(zip(COLUMNS, found, strict=True))
    values["status"] = PrepaidStatus(values["status"])
    return PrepaidRow(**values)


@dataclass(frozen=True, slots=True)
class Holder:
    """What holds a customer's paid tier, seen from one row: another prepaid row in progress (or failed while its
    subscription lives), and the customer's provision (whose tier the service judges live or not)."""

    other_id: str | None
    other_tier: str | None
    provision: dict[str, Any] | None  # tier, status, subscription_id of billing_provisions, if any


class PrepaidStore(Protocol):
    """The prepaid operations every backend provides."""

    def enqueue(self, tx: Tx, *, row_id: str, source: str, source_id: str, customer: str, tier: str, amount: int,
                currency: str, payment_intent: str | None, at: str) -> PrepaidRow:
        """Record the subscription to start (status pending) unless its source already has one (UNIQUE source_id:
        then nothing changes); returns the source's row as it is."""
        ...

    def read(self, tx: Tx, row_id: str) -> PrepaidRow:
        """The row inside a write transaction (it must exist: KeyError otherwise)."""
        ...

    def find(self, row_id: str) -> PrepaidRow | None:
        """The committed row, or None."""
        ...

    def pending(self) -> list[PrepaidRow]:
        """The outbox's pending work: every OPEN row, oldest first."""
        ...

    def rows(self, customer: str | None = None) -> list[PrepaidRow]:
        """Every row (or one customer's), oldest first: the operator's report."""
        ...

    def open_tier(self, customer: str) -> str | None:
        """The tier of a row of the customer's that is OPEN, or failed while its subscription may still live."""
        ...

    def holder(self, tx: Tx, row: PrepaidRow) -> Holder:
        """Inside a write transaction: what else holds `row`'s customer's tier (see Holder)."""
        ...

    def advance(self, tx: Tx, row_id: str, expected: tuple[PrepaidStatus, ...], status: PrepaidStatus, at: str,
                **values: Any) -> tuple[PrepaidRow, bool]:
        """Move the row from one of `expected` to `status` (recording the named column `values`), compare-and-set:
        False (and the row as another worker left it) when it was elsewhere. ValueError for a move TRANSITIONS
        does not allow, or a value that is not a column."""
        ...

    def lease(self, tx: Tx, row_id: str, starts_at: int, expected: int | None, at: str) -> tuple[PrepaidRow, bool]:
        """A credited row's new `starts_at` if it still is `expected` (compare-and-set); True while it is credited."""
        ...

    def take(self, tx: Tx, row_id: str, token: str, now: float, until: float) -> bool:
        """Lease an open row to one worker until `until` (epoch seconds) under `token`: True when the row was free,
        its lease had ended by `now`, or `token` already held it (renewed); False while another worker holds it, or
        once the row is no longer open. Called at the start of a job, it fences the job's writes: the UPDATE holds
        the row until COMMIT, so no other worker takes it over in between."""
        ...

    def let_go(self, tx: Tx, row_id: str, token: str) -> None:
        """End the lease `token` holds (a lease another worker has taken over stays)."""
        ...

    def retry_later(self, tx: Tx, row_id: str, attempts: int, error: str, at: str) -> PrepaidRow:
        """Record a failed attempt (count and reason); the row stays where it is for the next attempt."""
        ...

    def fail(self, tx: Tx, row_id: str, status: PrepaidStatus, error: str, at: str) -> PrepaidRow:
        """Give the row up: `status` (failed or refused) with the reason."""
        ...

    def complete(self, tx: Tx, row_id: str, expected: PrepaidStatus, status: PrepaidStatus, ends_at: int,
                 at: str) -> tuple[PrepaidRow, bool]:
        """Mark the row done (`status`, its commitment end, no error) if it still is `expected`."""
        ...

    def reopen(self, tx: Tx, only: tuple[str, ...] = ()) -> None:
        """Put failed rows (or, when `only` names them, those failed or refused ones) back where they stopped
        (subscribed, credited or pending), attempts reset."""
        ...

    def hold_for_refund(self, tx: Tx, row_id: str, held_at: float, at: str) -> PrepaidRow:
        """Status refunding, held by a refund run since `held_at` (epoch seconds)."""
        ...

    def release_refund(self, tx: Tx, row_id: str, held_at: float | None = None) -> None:
        """Let a refund run's hold go (a new run may start at once); with `held_at`, only the hold taken then (a run
        that outlived its lease never lets go of the hold a newer run has taken)."""
        ...

    def record_refund(self, tx: Tx, row_id: str, status: PrepaidStatus, refund_id: str | None,
                      refunded_amount: int | None, note: str | None, at: str) -> PrepaidRow:
        """A refund run's outcome: `status`, the refund and note (each kept if None), the amount; hold let go."""
        ...


class SqlitePrepaidStore:
    dialect: type[SqliteDialect | PostgresDialect] = SqliteDialect

    def __init__(self, core: Reader) -> None:
        self._core = core

    def enqueue(self, tx: Tx, *, row_id: str, source: str, source_id: str, customer: str, tier: str, amount: int,
                currency: str, payment_intent: str | None, at: str) -> PrepaidRow:
        tx.execute(
            "INSERT INTO prepaid_subscriptions (id, source, source_id, customer_id, tier, amount, currency, "
            "payment_intent_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (source_id) DO NOTHING",
            (row_id, source, source_id, customer, tier, amount, currency, payment_intent, at, at))
        return self.read(tx, row_id)

    def read(self, tx: Tx, row_id: str) -> PrepaidRow:
        found = tx.execute(f"{_SELECT} WHERE id = ?{self.dialect.for_update}", (row_id,)).fetchone()
        if found is None:
            raise KeyError(row_id)
        return _row(found)

    def find(self, row_id: str) -> PrepaidRow | None:
        found = self._core.query_one(f"{_SELECT} WHERE id = ?", (row_id,))
        return None if found is None else _row(found.values())

    def pending(self) -> list[PrepaidRow]:
        return [_row(found.values()) for found in self._core.query(
            f"{_SELECT} WHERE status IN ({_marks(OPEN)}) ORDER BY created_at", OPEN)]

    def rows(self, customer: str | None = None) -> list[PrepaidRow]:
        where, params = ("WHERE customer_id = ?", (customer,)) if customer else ("", ())
        return [_row(found.values()) for found in self._core.query(f"{_SELECT} {where} ORDER BY created_at", params)]

    def open_tier(self, customer: str) -> str | None:
        found = self._core.query_one(
            f"SELECT tier FROM prepaid_subscriptions p WHERE customer_id = ? AND (status IN ({_marks(OPEN)}) OR "
            f"{HOLDS_LIVE_SUBSCRIPTION})", (customer, *OPEN, *_ENDED))
        return None if found is None else str(found["tier"])

    def holder(self, tx: Tx, row: PrepaidRow) -> Holder:
        self.dialect.lock(tx, f"provision:{row.customer_id}")  # the webhooks store's lock before a provision write
        other = tx.execute(
            f"SELECT id, tier FROM prepaid_subscriptions p WHERE customer_id = ? AND id != ? AND (status IN "
            f"({_marks(IN_PROGRESS)}) OR {HOLDS_LIVE_SUBSCRIPTION})",
            (row.customer_id, row.id, *IN_PROGRESS, *_ENDED)).fetchone()
        provision = tx.execute("SELECT tier, status, subscription_id FROM billing_provisions WHERE customer_id = ?",
                               (row.customer_id,)).fetchone()
        return Holder(other["id"] if other else None, other["tier"] if other else None,
                      dict(provision) if provision is not None else None)

    def advance(self, tx: Tx, row_id: str, expected: tuple[PrepaidStatus, ...], status: PrepaidStatus, at: str,
                **values: Any) -> tuple[PrepaidRow, bool]:
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise ValueError(f"not prepaid_subscriptions columns: {sorted(unknown)}")
        _check_moves(expected, status)
        sets = "".join(f", {column} = ?" for column in values)
        cursor = tx.execute(f"UPDATE prepaid_subscriptions SET status = ?, updated_at = ?{sets} WHERE id = ? "
                            f"AND status IN ({_marks(expected)})", (status, at, *values.values(), row_id, *expected))
        return self.read(tx, row_id), bool(cursor.rowcount == 1)

    def take(self, tx: Tx, row_id: str, token: str, now: float, until: float) -> bool:
        cursor = tx.execute(f"UPDATE prepaid_subscriptions SET lease_token = ?, leased_until = ? WHERE id = ? AND "
                            f"status IN ({_marks(OPEN)}) AND (leased_until IS NULL OR leased_until <= ? OR "
                            "lease_token = ?)", (token, until, row_id, *OPEN, now, token))
        return bool(cursor.rowcount == 1)

    def let_go(self, tx: Tx, row_id: str, token: str) -> None:
        tx.execute("UPDATE prepaid_subscriptions SET lease_token = NULL, leased_until = NULL WHERE id = ? AND "
                   "lease_token = ?", (row_id, token))

    def lease(self, tx: Tx, row_id: str, starts_at: int, expected: int | None, at: str) -> tuple[PrepaidRow, bool]:
        tx.execute("UPDATE prepaid_subscriptions SET starts_at = ?, updated_at = ? WHERE id = ? AND status = ? "
                   "AND starts_at IS NOT DISTINCT FROM ?", (starts_at, at, row_id, S.CREDITED, expected))
        current = self.read(tx, row_id)
        return current, current.status is S.CREDITED

    def retry_later(self, tx: Tx, row_id: str, attempts: int, error: str, at: str) -> PrepaidRow:
        tx.execute("UPDATE prepaid_subscriptions SET attempts = ?, last_error = ?, updated_at = ? WHERE id = ?",
                   (attempts, error, at, row_id))
        return self.read(tx, row_id)

    def fail(self, tx: Tx, row_id: str, status: PrepaidStatus, error: str, at: str) -> PrepaidRow:
        tx.execute("UPDATE prepaid_subscriptions SET status = ?, last_error = ?, updated_at = ? WHERE id = ?",
                   (status, error, at, row_id))
        return self.read(tx, row_id)

    def complete(self, tx: Tx, row_id: str, expected: PrepaidStatus, status: PrepaidStatus, ends_at: int,
                 at: str) -> tuple[PrepaidRow, bool]:
        _check_moves((expected,), status)
        cursor = tx.execute("UPDATE prepaid_subscriptions SET status = ?, ends_at = ?, last_error = NULL, "
                            "updated_at = ? WHERE id = ? AND status = ?", (status, ends_at, at, row_id, expected))
        return self.read(tx, row_id), bool(cursor.rowcount == 1)

    def reopen(self, tx: Tx, only: tuple[str, ...] = ()) -> None:
        if only:
            which, params = f"status IN (?, ?) AND id IN ({_marks(only)})", (S.FAILED, S.REFUSED, *only)
        else:
            which, params = "status = ?", (S.FAILED,)
        tx.execute("UPDATE prepaid_subscriptions SET status = CASE WHEN subscription_id IS NOT NULL THEN ? "
                   f"WHEN balance_transaction_id IS NOT NULL THEN ? ELSE ? END, attempts = 0 WHERE {which}",
                   (S.SUBSCRIBED, S.CREDITED, S.PENDING, *params))

    def hold_for_refund(self, tx: Tx, row_id: str, held_at: float, at: str) -> PrepaidRow:
        tx.execute("UPDATE prepaid_subscriptions SET status = ?, refund_claimed_at = ?, updated_at = ? WHERE id = ?",
                   (S.REFUNDING, held_at, at, row_id))
        return self.read(tx, row_id)

    def release_refund(self, tx: Tx, row_id: str, held_at: float | None = None) -> None:
        fence, held = (" AND refund_claimed_at = ?", (held_at,)) if held_at is not None else ("", ())
        tx.execute(f"UPDATE prepaid_subscriptions SET refund_claimed_at = NULL WHERE id = ?{fence}", (row_id, *held))

    def record_refund(self, tx: Tx, row_id: str, status: PrepaidStatus, refund_id: str | None,
                      refunded_amount: int | None, note: str | None, at: str) -> PrepaidRow:
        tx.execute(
            "UPDATE prepaid_subscriptions SET status = ?, refund_id = COALESCE(?, refund_id), refunded_amount = ?, "
            "last_error = COALESCE(?, last_error), updated_at = ?, refund_claimed_at = NULL WHERE id = ?",
            (status, refund_id, refunded_amount, note, at, row_id))
        return self.read(tx, row_id)


# A row that failed after creating its subscription still holds the customer's tier, until that subscription is
# known to have ended (its provision says so: a webhook, or cancel_subscription's own record).
HOLDS_LIVE_SUBSCRIPTION = (
    "(p.status = ? AND p.subscription_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM billing_provisions b "
    "WHERE b.customer_id = p.customer_id AND b.subscription_id = p.subscription_id AND b.status IN (?, ?)))")
_ENDED = (S.FAILED, "canceled", "incomplete_expired")  # the parameters of HOLDS_LIVE_SUBSCRIPTION


def _check_moves(froms: tuple[PrepaidStatus, ...], to: PrepaidStatus) -> None:
    """A guarded move the machine does not allow is a programming error, refused before any write."""
    wrong = [str(before) for before in froms if not may_move(before, to)]
    if wrong:
        raise ValueError(f"a prepaid subscription cannot go from {', '.join(wrong)} to {to} (see TRANSITIONS)")


def _marks(values: tuple[Any, ...]) -> str:
    return ", ".join("?" * len(values))


class PostgresPrepaidStore(SqlitePrepaidStore):
    """PostgreSQL: the same statements (store/postgres_sql.py), for several instances working one outbox.

    Why this is enough for once-per-row across instances: every move is a guarded UPDATE from the status it expects
    (compare-and-set: at READ COMMITTED the second writer waits for the first's row lock, re-reads the row and finds
    it moved, so it moves nothing); a row read inside a write job is read `FOR UPDATE`, so a job's read-decide-write
    (claim, record an error, take a refund hold whose lease has expired) sees what any other instance committed and
    holds the row until its own commit; the creation request's lease (`starts_at`) is compare-and-set too, and is
    part of the Stripe idempotency key, so instances racing on a row send the very same request. `holder` (is the
    customer's tier held elsewhere?) runs under the customer's provision lock, the transaction-scoped advisory lock
    the webhooks store takes before it writes a provision: two instances claiming two rows of one customer take turns,
    and the second sees the first's claim (a row lock cannot guard a row that is not there yet)."""

    dialect = PostgresDialect
