"""Agent-commerce payment sessions and their fulfilment (the ACP order-webhook outbox lives in store/acp.py).

`CommerceStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteCommerceStore` is the SQLite implementation.

The state machine here is a payment session's (`SessionStatus`: its PaymentIntent's status as Stripe reports it,
plus our own `amount_mismatch`; succeeded and canceled are final).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from .core import Reader, SqliteDialect, Tx, dumps
from .postgres_sql import PostgresDialect


class SessionStatus(StrEnum):
    """A payment session's status: its PaymentIntent's (the values are Stripe's strings, as stored)."""

    REQUIRES_PAYMENT_METHOD = "requires_payment_method"
    REQUIRES_CONFIRMATION = "requires_confirmation"
    REQUIRES_ACTION = "requires_action"
    PROCESSING = "processing"
    REQUIRES_CAPTURE = "requires_capture"
    SUCCEEDED = "succeeded"
    CANCELED = "canceled"
    AMOUNT_MISMATCH = "amount_mismatch"  # ours: succeeded for less (or another currency) than asked: not fulfilled


TERMINAL = (SessionStatus.SUCCEEDED, SessionStatus.CANCELED)
SETTLED = (*TERMINAL, SessionStatus.AMOUNT_MISMATCH)  # nothing left to re-read after a crash
# The session follows its PaymentIntent wherever Stripe moves it, until it ends: a late (stale) snapshot never
# moves a succeeded or canceled session. An amount mismatch stays open (a later confirm may pay again).
TRANSITIONS: dict[SessionStatus, frozenset[SessionStatus]] = {
    status: frozenset() if status in TERMINAL else frozenset(SessionStatus) - {status} for status in SessionStatus
}


def session_status(value: str, default: SessionStatus) -> SessionStatus:
    """A status Stripe reported, or `default` when it is not one this API version knows."""
    try:
        return SessionStatus(value)
    except ValueError:
        return default


@dataclass(frozen=True, slots=True)
class PaymentSessionRow:
    """One payment session as stored (`fulfilment` parsed from its JSON)."""

    id: str
    customer_id: str | None
    agent_id: str | None
    item_id: str | None
    amount: int
    currency: str
    description: str | None
    status: SessionStatus
    payment_intent_id: str | None
    idempotency_key: str | None
    amount_received: int
    last_error: str | None
    fulfilled_at: str | None
    fulfilment: dict[str, Any] | None
    confirming_since: str | None
    created_at: str
    updated_at: str

    def __getitem__(self, name: str) -> Any:
        """Read a column by name: for callers not yet moved to attributes (services/acp.py's fulfiler)."""
        return getattr(self, name)


_SESSION_COLUMNS = ("id, customer_id, agent_id, item_id, amount, currency, description, status, payment_intent_id, "
                    "idempotency_key, amount_received, last_error, fulfilled_at, fulfilment, confirming_since, "
                    "created_at, updated_at")
_SELECT_SESSION = f"SELECT {_SESSION_COLUMNS} FROM payment_sessions"


def _session(found: Any) -> PaymentSessionRow:
    (id_, customer, agent, item, amount, currency, description, status, pi, key, received, last_error, fulfilled_at,
     fulfilment, confirming, created, updated) = found
    return PaymentSessionRow(id_, customer, agent, item, amount, currency, description, SessionStatus(status), pi, key,
                             received, last_error, fulfilled_at, json.loads(fulfilment) if fulfilment else None,
                             confirming, created, updated)


class CommerceStore(Protocol):
    """The commerce operations every backend provides."""

    # payment sessions
    def create(self, tx: Tx, *, session_id: str, customer: str | None, agent_id: str | None, item: str | None,
               amount: int, currency: str, description: str | None, status: SessionStatus, payment_intent: str,
               idempotency_key: str, amount_received: int, at: str) -> PaymentSessionRow:
        """Record a session unless one with its id exists (then nothing changes); returns the session as it is.
        Its payment_intent and idempotency_key are UNIQUE (the backend's IntegrityError for another session's: see
        `broken_unique_key`)."""
        ...

    def read(self, tx: Tx, session_id: str) -> PaymentSessionRow:
        """The session inside a write transaction (it must exist: KeyError otherwise)."""
        ...

    def by_payment_intent(self, tx: Tx, payment_intent: str) -> PaymentSessionRow | None:
        """Inside a write transaction: the one session of a PaymentIntent, or None."""
        ...

    def find(self, session_id: str) -> PaymentSessionRow | None:
        """The committed session, or None."""
        ...

    def record_status(self, tx: Tx, session_id: str, status: SessionStatus, amount_received: int,
                      last_error: str | None, at: str) -> None:
        """What the PaymentIntent says now; a settled status (SETTLED) also clears the confirm-sent mark."""
        ...

    def claim_fulfilment(self, tx: Tx, session_id: str, at: str) -> bool:
        """Stamp fulfilled_at if it is unset: True for exactly one caller per session (until it is unset again)."""
        ...

    def record_fulfilment(self, tx: Tx, session_id: str, fulfilment: dict[str, Any], fulfilled_at: str | None) -> None:
        """What fulfilment did; fulfilled_at None unsets the claim (a refused credit stays to be done)."""
        ...

    def update_fulfilment(self, tx: Tx, session_id: str, fulfilment: dict[str, Any], at: str) -> None:
        """A later word on the fulfilment (how far a prepaid subscription's start has come)."""
        ...

    def mark_payable(self, tx: Tx, session_id: str, last_error: str, at: str) -> None:
        """A refused or declined confirm: requires_payment_method with the reason, mark cleared; never a final
        (succeeded, canceled) session."""
        ...

    def mark_confirming(self, tx: Tx, session_id: str, at: str) -> None:
        """A confirm is being sent: the mark start-up's reconcile looks for."""
        ...

    def confirming(self, session_id: str) -> bool:
        """Whether the session carries the confirm-sent mark."""
        ...

    def unsettled_confirms(self) -> list[str]:
        """Sessions marked as confirming and not final, oldest mark first (reconcile them)."""
        ...

    def wallet_customer(self, agent_id: str) -> str | None:
        """The customer owning an agent's wallet, or None when the agent has no wallet."""
        ...

class SqliteCommerceStore:
    dialect: type[SqliteDialect | PostgresDialect] = SqliteDialect

    def __init__(self, core: Reader) -> None:
        self._core = core

    # payment sessions
    def create(self, tx: Tx, *, session_id: str, customer: str | None, agent_id: str | None, item: str | None,
               amount: int, currency: str, description: str | None, status: SessionStatus, payment_intent: str,
               idempotency_key: str, amount_received: int, at: str) -> PaymentSessionRow:
        tx.execute(
            "INSERT INTO payment_sessions (id, customer_id, agent_id, item_id, amount, currency, description, "
            "status, payment_intent_id, idempotency_key, amount_received, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (session_id, customer, agent_id, item, amount, currency, description, status, payment_intent,
             idempotency_key, amount_received, at, at))
        return self.read(tx, session_id)

    def read(self, tx: Tx, session_id: str) -> PaymentSessionRow:
        found = tx.execute(f"{_SELECT_SESSION} WHERE id = ?{self.dialect.for_update}", (session_id,)).fetchone()
        if found is None:
            raise KeyError(session_id)
        return _session(found)

    def by_payment_intent(self, tx: Tx, payment_intent: str) -> PaymentSessionRow | None:
        found = tx.execute(f"{_SELECT_SESSION} WHERE payment_intent_id = ?{self.dialect.for_update}",
                           (payment_intent,)).fetchone()
        return None if found is None else _session(found)

    def find(self, session_id: str) -> PaymentSessionRow | None:
        found = self._core.query_one(f"{_SELECT_SESSION} WHERE id = ?", (session_id,))
        return None if found is None else _session(found.values())

    def record_status(self, tx: Tx, session_id: str, status: SessionStatus, amount_received: int,
                      last_error: str | None, at: str) -> None:
        tx.execute("UPDATE payment_sessions SET status = ?, amount_received = ?, last_error = ?, updated_at = ?, "
                   "confirming_since = CASE WHEN ? THEN NULL ELSE confirming_since END WHERE id = ?",
                   (status, amount_received, last_error, at, status in SETTLED, session_id))

    def claim_fulfilment(self, tx: Tx, session_id: str, at: str) -> bool:
        claimed = tx.execute("UPDATE payment_sessions SET fulfilled_at = ? WHERE id = ? AND fulfilled_at IS NULL",
                             (at, session_id))
        return bool(claimed.rowcount == 1)

    def record_fulfilment(self, tx: Tx, session_id: str, fulfilment: dict[str, Any], fulfilled_at: str | None) -> None:
        tx.execute("UPDATE payment_sessions SET fulfilment = ?, fulfilled_at = ? WHERE id = ?",
                   (dumps(fulfilment), fulfilled_at, session_id))

    def update_fulfilment(self, tx: Tx, session_id: str, fulfilment: dict[str, Any], at: str) -> None:
        tx.execute("UPDATE payment_sessions SET fulfilment = ?, updated_at = ? WHERE id = ?",
                   (dumps(fulfilment), at, session_id))

    def mark_payable(self, tx: Tx, session_id: str, last_error: str, at: str) -> None:
        tx.execute("UPDATE payment_sessions SET status = ?, last_error = ?, updated_at = ?, confirming_since = NULL "
                   "WHERE id = ? AND status NOT IN (?, ?)",
                   (SessionStatus.REQUIRES_PAYMENT_METHOD, last_error, at, session_id, *TERMINAL))

    def mark_confirming(self, tx: Tx, session_id: str, at: str) -> None:
        tx.execute("UPDATE payment_sessions SET confirming_since = ? WHERE id = ?", (at, session_id))

    def confirming(self, session_id: str) -> bool:
        row = self._core.query_one("SELECT confirming_since FROM payment_sessions WHERE id = ?", (session_id,))
        return row is not None and row["confirming_since"] is not None

    def unsettled_confirms(self) -> list[str]:
        rows = self._core.query("SELECT id FROM payment_sessions WHERE confirming_since IS NOT NULL AND status "
                                "NOT IN (?, ?) ORDER BY confirming_since", TERMINAL)
        return [str(row["id"]) for row in rows]

    def wallet_customer(self, agent_id: str) -> str | None:
        row = self._core.query_one("SELECT customer_id FROM agent_wallets WHERE agent_id = ?", (agent_id,))
        return None if row is None else str(row["customer_id"])



class PostgresCommerceStore(SqliteCommerceStore):
    """PostgreSQL: the same statements (store/postgres_sql.py), for several instances writing at once.

    A session read inside a write job (`read`, `by_payment_intent`) is read `FOR UPDATE`: the job then decides from
    it (a late snapshot never moves an ended session; fulfil once) and writes, so two instances applying the same
    PaymentIntent (its webhook on one, a confirm or GET on another) take turns on the row, and the second decides
    from what the first committed. The fulfilment claim is a guarded UPDATE (`fulfilled_at IS NULL`): at READ
    COMMITTED the second claimer waits for the first's row lock and then finds the claim taken."""

    dialect = PostgresDialect
