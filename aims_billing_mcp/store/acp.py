"""Agentic Commerce Protocol checkout sessions, orders and their request keys.

`AcpStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteAcpStore` is the SQLite implementation; `PostgresAcpStore` the PostgreSQL one, for
several instances sharing one database (its docstring says which lock guards which race).

The two outboxes (order events to send, payments to refund) are worked by leases, on both backends: a sender takes
rows (`lease_order_events`, `lease_refunds`) until a time under a fresh token, and records an outcome only under
that token, in the same UPDATE. On PostgreSQL the take is `FOR UPDATE SKIP LOCKED` (another instance's sender skips
rows being taken instead of waiting); an instance killed holding a lease is taken over once it ends, and one paused
past its lease that resumes finds its token gone and records nothing (the token is the fence). Leases rather than
an advisory-lock leader: every instance sends, and nothing waits on one leader's health.

Tables: `acp_checkout_sessions` (one row a checkout session; its order lives in the row's `state` JSON once
completed), `acp_payments` (each payment session made for a checkout, with the cart it was made for, and the
refund of one the checkout could not take), `acp_idempotency` (ACP §6's Idempotency-Key record per caller
identity and endpoint) and `acp_order_events` (the order webhooks' outbox).

The state machines (values are the strings stored; `TRANSITIONS` beside each enum lists where a state may go):
- `CheckoutStatus`: open (`not_ready_for_payment` <-> `ready_for_payment`), held by a completion (`in_progress`),
  finished (`completed`, `canceled`; `expired` is never stored: an open session past `expires_at` reads as it).
- `OrderStatus`: the order of a completed checkout (`processing` while its tier subscription starts).
- `KeyState`: an ACP request key, `in_flight` while its first request runs, then `done` (or released: deleted).
- `RefundStatus`: a payment the checkout could not take, `due` then `succeeded`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from .core import Reader, SqliteDialect, Tx
from .postgres_sql import PostgresDialect


class CheckoutStatus(StrEnum):
    NOT_READY_FOR_PAYMENT = "not_ready_for_payment"
    READY_FOR_PAYMENT = "ready_for_payment"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELED = "canceled"
    EXPIRED = "expired"  # derived on read (past expires_at), never stored


OPEN = frozenset({CheckoutStatus.NOT_READY_FOR_PAYMENT, CheckoutStatus.READY_FOR_PAYMENT})
FINISHED = frozenset({CheckoutStatus.COMPLETED, CheckoutStatus.CANCELED, CheckoutStatus.EXPIRED})
_ANY_OPEN = OPEN | {CheckoutStatus.IN_PROGRESS}

TRANSITIONS: dict[CheckoutStatus, frozenset[CheckoutStatus]] = {
    # readiness follows the cart and the buyer; a completion claims; a payment recorded by a GET or a webhook may
    # move an open session too (its outcome: processing, canceled, failed, or succeeded: completed)
    CheckoutStatus.NOT_READY_FOR_PAYMENT: frozenset({
        CheckoutStatus.NOT_READY_FOR_PAYMENT, CheckoutStatus.READY_FOR_PAYMENT, CheckoutStatus.IN_PROGRESS,
        CheckoutStatus.COMPLETED, CheckoutStatus.CANCELED, CheckoutStatus.EXPIRED}),
    CheckoutStatus.READY_FOR_PAYMENT: frozenset({
        CheckoutStatus.NOT_READY_FOR_PAYMENT, CheckoutStatus.READY_FOR_PAYMENT, CheckoutStatus.IN_PROGRESS,
        CheckoutStatus.COMPLETED, CheckoutStatus.CANCELED, CheckoutStatus.EXPIRED}),
    # the completion's payment: declined or failed (payable again), still processing, canceled, or paid; a stale
    # claim is taken over (in_progress again)
    CheckoutStatus.IN_PROGRESS: frozenset({
        CheckoutStatus.READY_FOR_PAYMENT, CheckoutStatus.IN_PROGRESS, CheckoutStatus.COMPLETED,
        CheckoutStatus.CANCELED, CheckoutStatus.EXPIRED}),
    CheckoutStatus.COMPLETED: frozenset(),
    CheckoutStatus.CANCELED: frozenset(),
    CheckoutStatus.EXPIRED: frozenset(),
}
# the statuses a completion may claim (a stale in_progress claim is taken over by its completing_since)
CLAIMABLE = tuple(sorted(s for s in OPEN if CheckoutStatus.IN_PROGRESS in TRANSITIONS[s]))


class OrderStatus(StrEnum):
    PROCESSING = "processing"  # its tier subscription is starting
    COMPLETED = "completed"
    MANUAL_REVIEW = "manual_review"  # the LUC credit was refused, or the subscription failed for good
    CANCELED = "canceled"  # its only line, a tier, was refunded


ORDER_TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.PROCESSING: frozenset({OrderStatus.COMPLETED, OrderStatus.MANUAL_REVIEW, OrderStatus.CANCELED}),
    # an operator's retry may still start (or refund) a subscription that failed
    OrderStatus.MANUAL_REVIEW: frozenset({OrderStatus.MANUAL_REVIEW, OrderStatus.COMPLETED, OrderStatus.CANCELED}),
    OrderStatus.COMPLETED: frozenset({OrderStatus.COMPLETED}),
    OrderStatus.CANCELED: frozenset({OrderStatus.CANCELED}),
}


class KeyState(StrEnum):
    IN_FLIGHT = "in_flight"
    DONE = "done"


KEY_TRANSITIONS: dict[KeyState, frozenset[KeyState]] = {
    KeyState.IN_FLIGHT: frozenset({KeyState.DONE}),  # or released (deleted): a 409, a 5xx or a crash
    KeyState.DONE: frozenset(),  # until it is older than the retention, then claimed afresh
}


class RefundStatus(StrEnum):
    DUE = "due"
    SUCCEEDED = "succeeded"


REFUND_TRANSITIONS: dict[RefundStatus, frozenset[RefundStatus]] = {
    RefundStatus.DUE: frozenset({RefundStatus.SUCCEEDED}),
    RefundStatus.SUCCEEDED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class CheckoutRow:
    """One checkout session as stored (`state` is its JSON: lines, buyer, messages, the order once completed)."""

    id: str
    status: CheckoutStatus
    currency: str
    agent_id: str | None
    state: str
    payment_session_id: str | None
    order_id: str | None
    created_at: str
    updated_at: str
    expires_at: float
    completing_since: float | None


@dataclass(frozen=True, slots=True)
class PaymentRow:
    """A payment session made for a checkout, with the cart (`lines` JSON: lines and subscriber) it was made for."""

    payment_session_id: str
    checkout_session_id: str
    lines: str
    amount: int
    currency: str


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A live ACP request key: the hash of its first body and, once done, the answer stored for it."""

    request_hash: str
    state: KeyState
    status: int | None
    response: str | None


@dataclass(frozen=True, slots=True)
class RefundTarget:
    refund_status: RefundStatus | None
    payment_intent_id: str | None


@dataclass(frozen=True, slots=True)
class OrderEventRow:
    """An order webhook event in the outbox, with its delivery record."""

    id: str
    type: str
    order_id: str
    checkout_session_id: str
    payload: str
    attempts: int
    delivered: bool
    gave_up: bool
    last_status: int | None
    last_error: str | None
    created_at: str
    delivered_at: str | None


class AcpStore(Protocol):
    """The acp operations every backend provides."""

    # checkout sessions
    def create_session(self, tx: Tx, row: CheckoutRow) -> None:
        """Insert the session; a session with this id already there is kept as it is (a retried create)."""

    def session(self, session_id: str) -> CheckoutRow | None:
        """The session as committed, or None."""

    def session_in(self, tx: Tx, session_id: str) -> CheckoutRow | None:
        """The session as this transaction sees it, or None."""

    def session_paid_by(self, tx: Tx, payment_session_id: str) -> CheckoutRow | None:
        """The session whose linked payment session is this one, as this transaction sees it, or None."""

    def save_state(self, tx: Tx, session_id: str, state: str, status: CheckoutStatus | None, updated_at: str, *,
                   only_open: bool) -> bool:
        """Replace the state (and the status, when given); with `only_open`, only while the session is open and
        not held by a completion. True if the row changed."""

    def set_status(self, tx: Tx, session_id: str, status: CheckoutStatus, state: str, updated_at: str) -> None:
        """Set the status and state, and drop any completion's hold (completing_since)."""

    def claim(self, tx: Tx, session_id: str, claim: float, seen: float | None, updated_at: str) -> bool:
        """Open (not held), or held by the hold `seen` (a stale one) -> in_progress held by `claim`; True if so."""

    def release(self, tx: Tx, session_id: str, claim: float, state: str | None, updated_at: str) -> None:
        """in_progress held by `claim` -> ready_for_payment, not held (state replaced when given); else nothing."""

    def complete(self, tx: Tx, session_id: str, order_id: str, state: str, updated_at: str,
                 payment_session_id: str) -> None:
        """-> completed with its order, linked to the payment session that paid it, not held."""

    # payments made for checkouts
    def link_payment(self, tx: Tx, payment: PaymentRow, claim: float, created_at: str) -> bool:
        """Record the payment (kept if already recorded) and link it to its checkout if the completion holding it
        is still `claim`, marking the payment session confirming (start-up reconciliation); False (nothing linked
        or marked) if the hold is gone."""

    def payment_carts(self, checkout_session_id: str) -> dict[str, str]:
        """Each payment session made for the checkout -> the cart (`lines` JSON) it was made for."""

    def payment_in(self, tx: Tx, payment_session_id: str) -> PaymentRow | None:
        """The recorded payment for this payment session, as this transaction sees it, or None."""

    def mark_refund_due(self, tx: Tx, payment: PaymentRow, created_at: str, *, record: bool) -> None:
        """The payment cannot be delivered: record it first when `record`, then mark it refund due (once: a
        refund already due or made stays as it is)."""

    def refunds_due(self) -> list[str]:
        """The payment sessions whose refund is due and not made yet."""

    def refund_target(self, payment_session_id: str) -> RefundTarget | None:
        """The refund status and the PaymentIntent to refund, or None if the payment is not a checkout's."""

    def lease_refunds(self, tx: Tx, token: str, now: float, until: float, *,
                      payment_session_ids: Sequence[str] = (), limit: int = 100) -> list[str]:
        """Take refunds due (all, or those of `payment_session_ids`) that no sender holds (never leased, or its
        lease ended by `now`) until `until` under `token`: the payment sessions taken. One sender across
        instances makes a refund; another takes it over only once the lease has ended."""

    def record_refund(self, tx: Tx, payment_session_id: str, *, succeeded: bool, refund_id: str | None,
                      error: str | None, lease: str | None = None) -> bool:
        """Record a refund attempt: `succeeded` -> refund succeeded; the refund id kept once known. With `lease`
        (the token it was taken under), only while that lease still holds it (a sender paused past its lease
        records nothing once another took it over). The lease ends with the attempt: a refund still due may be
        taken again at once. True if recorded."""

    # ACP request keys (per caller identity and endpoint: the scope)
    def claim_key(self, tx: Tx, scope: str, key: str, request_hash: str, now: float, *, expired_before: float,
                  abandoned_before: float) -> KeyRecord | None:
        """The live record of (scope, key) if there is one (created at or after `expired_before`, and if in
        flight, at or after `abandoned_before`); else the key is claimed in flight for this request: None."""

    def finish_key(self, tx: Tx, scope: str, key: str, status: int, response: str) -> None:
        """in_flight -> done, with the answer replayed for the key from now on."""

    def release_key(self, tx: Tx, scope: str, key: str) -> None:
        """Forget the key if it is still in flight (the request's answer is not stored)."""

    # wallets (the ledger's table, read for who a tier line subscribes)
    def wallet_customer(self, agent_id: str) -> str | None:
        """The customer whose wallet the agent holds, as committed, or None."""

    def wallet_customer_in(self, tx: Tx, agent_id: str) -> str | None:
        """The customer whose wallet the agent holds, as this transaction sees it, or None."""

    # order webhooks' outbox
    def add_order_event(self, tx: Tx, event_id: str, event_type: str, order_id: str, checkout_session_id: str,
                        payload: str, created_at: str) -> None:
        """Record an event to send, pending."""

    def pending_order_events(self) -> list[str]:
        """The events neither delivered nor given up, oldest first."""

    def order_event(self, event_id: str) -> OrderEventRow | None:
        """The event and its delivery record, or None."""

    def lease_order_events(self, tx: Tx, token: str, now: float, until: float, *, event_ids: Sequence[str] = (),
                           limit: int = 100) -> list[str]:
        """Take pending events (all, or those of `event_ids`) that no sender holds (never leased, or its lease
        ended by `now`) until `until` under `token`: the events taken, oldest first. One sender across instances
        sends an event; another takes it over only once the lease has ended."""

    def record_delivery(self, tx: Tx, event_id: str, *, attempts: int, status: int | None, error: str | None,
                        delivered: bool, gave_up: bool, at: str, lease: str | None = None) -> bool:
        """Record the outcome of a delivery attempt (delivered_at set only when delivered). With `lease` (the token
        it was taken under), only while that lease still holds it (a sender paused past its lease records nothing
        once another took the event over). True if recorded."""


_SESSION = ("SELECT id, status, currency, agent_id, state, payment_session_id, order_id, created_at, updated_at, "
            "expires_at, completing_since FROM acp_checkout_sessions WHERE ")
_NOT_OPEN_GUARD = (" AND status NOT IN " + "(" + ", ".join(
    f"'{s}'" for s in sorted(FINISHED | {CheckoutStatus.IN_PROGRESS})) + ")")  # constants, not input
_CLAIMABLE_MARKS = ", ".join("?" for _ in CLAIMABLE)


def _session(row: Any) -> CheckoutRow | None:
    if row is None:
        return None
    return CheckoutRow(row["id"], CheckoutStatus(row["status"]), row["currency"], row["agent_id"], row["state"],
                       row["payment_session_id"], row["order_id"], row["created_at"], row["updated_at"],
                       row["expires_at"], row["completing_since"])


def _payment(row: Any) -> PaymentRow | None:
    if row is None:
        return None
    return PaymentRow(row["payment_session_id"], row["checkout_session_id"], row["lines"], int(row["amount"]),
                      row["currency"])


class SqliteAcpStore:
    dialect: type[SqliteDialect | PostgresDialect] = SqliteDialect

    def __init__(self, core: Reader) -> None:
        self._core = core

    # --- checkout sessions ----------------------------------------------------------------------------------------

    def create_session(self, tx: Tx, row: CheckoutRow) -> None:
        tx.execute("INSERT INTO acp_checkout_sessions (id, status, currency, agent_id, state, created_at, "
                   "updated_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                   (row.id, row.status, row.currency, row.agent_id, row.state, row.created_at, row.updated_at,
                    row.expires_at))

    def session(self, session_id: str) -> CheckoutRow | None:
        return _session(self._core.query_one(_SESSION + "id = ?", (session_id,)))

    def session_in(self, tx: Tx, session_id: str) -> CheckoutRow | None:
        return _session(tx.execute(_SESSION + "id = ?" + self.dialect.for_update, (session_id,)).fetchone())

    def session_paid_by(self, tx: Tx, payment_session_id: str) -> CheckoutRow | None:
        return _session(tx.execute(_SESSION + "payment_session_id = ?" + self.dialect.for_update,
                                   (payment_session_id,)).fetchone())

    def save_state(self, tx: Tx, session_id: str, state: str, status: CheckoutStatus | None, updated_at: str, *,
                   only_open: bool) -> bool:
        # open, and not held by a completion (the cart being paid for never changes under it)
        guard = _NOT_OPEN_GUARD if only_open else ""
        if status is None:
            cursor = tx.execute(f"UPDATE acp_checkout_sessions SET state = ?, updated_at = ? WHERE id = ?{guard}",
                                (state, updated_at, session_id))
        else:
            cursor = tx.execute(f"UPDATE acp_checkout_sessions SET state = ?, status = ?, updated_at = ? "
                                f"WHERE id = ?{guard}", (state, status, updated_at, session_id))
        return bool(cursor.rowcount == 1)

    def set_status(self, tx: Tx, session_id: str, status: CheckoutStatus, state: str, updated_at: str) -> None:
        tx.execute("UPDATE acp_checkout_sessions SET status = ?, state = ?, completing_since = NULL, "
                   "updated_at = ? WHERE id = ?", (status, state, updated_at, session_id))

    def claim(self, tx: Tx, session_id: str, claim: float, seen: float | None, updated_at: str) -> bool:
        cursor = tx.execute(
            "UPDATE acp_checkout_sessions SET status = ?, completing_since = ?, updated_at = ? "
            f"WHERE id = ? AND ((status IN ({_CLAIMABLE_MARKS}) AND completing_since IS NULL) OR (status = ? AND "
            "completing_since = ?))",
            (CheckoutStatus.IN_PROGRESS, claim, updated_at, session_id, *CLAIMABLE, CheckoutStatus.IN_PROGRESS,
             seen))
        return bool(cursor.rowcount == 1)

    def release(self, tx: Tx, session_id: str, claim: float, state: str | None, updated_at: str) -> None:
        tx.execute("UPDATE acp_checkout_sessions SET status = ?, completing_since = NULL, "
                   "state = COALESCE(?, state), updated_at = ? WHERE id = ? AND status = ? AND completing_since = ?",
                   (CheckoutStatus.READY_FOR_PAYMENT, state, updated_at, session_id, CheckoutStatus.IN_PROGRESS,
                    claim))

    def complete(self, tx: Tx, session_id: str, order_id: str, state: str, updated_at: str,
                 payment_session_id: str) -> None:
        tx.execute("UPDATE acp_checkout_sessions SET status = ?, order_id = ?, state = ?, updated_at = ?, "
                   "payment_session_id = ?, completing_since = NULL WHERE id = ?",
                   (CheckoutStatus.COMPLETED, order_id, state, updated_at, payment_session_id, session_id))

    # --- payments made for checkouts ------------------------------------------------------------------------------

    def link_payment(self, tx: Tx, payment: PaymentRow, claim: float, created_at: str) -> bool:
        tx.execute("INSERT INTO acp_payments (payment_session_id, checkout_session_id, lines, amount, currency, "
                   "created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (payment_session_id) DO NOTHING",
                   (payment.payment_session_id, payment.checkout_session_id, payment.lines, payment.amount,
                    payment.currency, created_at))
        cursor = tx.execute("UPDATE acp_checkout_sessions SET payment_session_id = ? WHERE id = ? AND status = ? "
                            "AND completing_since = ?", (payment.payment_session_id, payment.checkout_session_id,
                                                         CheckoutStatus.IN_PROGRESS, claim))
        if cursor.rowcount != 1:
            return False
        # about to be confirmed: marked for start-up reconciliation here, saving the confirm its own commit
        tx.execute("UPDATE payment_sessions SET confirming_since = ? WHERE id = ?",
                   (created_at, payment.payment_session_id))
        return True

    def payment_carts(self, checkout_session_id: str) -> dict[str, str]:
        rows = self._core.query("SELECT payment_session_id, lines FROM acp_payments WHERE checkout_session_id = ?",
                                (checkout_session_id,))
        return {row["payment_session_id"]: row["lines"] for row in rows}

    def payment_in(self, tx: Tx, payment_session_id: str) -> PaymentRow | None:
        return _payment(tx.execute("SELECT payment_session_id, checkout_session_id, lines, amount, currency FROM "
                                   "acp_payments WHERE payment_session_id = ?", (payment_session_id,)).fetchone())

    def mark_refund_due(self, tx: Tx, payment: PaymentRow, created_at: str, *, record: bool) -> None:
        if record:  # another instance may have recorded it since this job read it: the first row is kept
            tx.execute("INSERT INTO acp_payments (payment_session_id, checkout_session_id, lines, amount, currency, "
                       "created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (payment_session_id) DO NOTHING",
                       (payment.payment_session_id, payment.checkout_session_id, payment.lines, payment.amount,
                        payment.currency, created_at))
        tx.execute("UPDATE acp_payments SET refund_status = ? WHERE payment_session_id = ? AND refund_status "
                   "IS NULL", (RefundStatus.DUE, payment.payment_session_id))

    def refunds_due(self) -> list[str]:
        rows = self._core.query("SELECT payment_session_id FROM acp_payments WHERE refund_status = ?",
                                (RefundStatus.DUE,))
        return [str(row["payment_session_id"]) for row in rows]

    def refund_target(self, payment_session_id: str) -> RefundTarget | None:
        found = self._core.query_one(
            "SELECT a.refund_status, s.payment_intent_id FROM acp_payments a JOIN payment_sessions s ON s.id = "
            "a.payment_session_id WHERE a.payment_session_id = ?", (payment_session_id,))
        if found is None:
            return None
        status = found["refund_status"]
        return RefundTarget(None if status is None else RefundStatus(status), found["payment_intent_id"])

    def lease_refunds(self, tx: Tx, token: str, now: float, until: float, *,
                      payment_session_ids: Sequence[str] = (), limit: int = 100) -> list[str]:
        only = f" AND payment_session_id IN ({', '.join('?' for _ in payment_session_ids)})" \
            if payment_session_ids else ""
        taken = tx.execute(
            "UPDATE acp_payments SET refund_lease_token = ?, refund_leased_until = ? WHERE payment_session_id IN "
            "(SELECT payment_session_id FROM acp_payments WHERE refund_status = ? AND (refund_leased_until IS NULL "
            f"OR refund_leased_until <= ?){only} ORDER BY created_at, payment_session_id LIMIT ?"
            f"{self.dialect.skip_locked}) RETURNING payment_session_id, created_at",
            (token, until, RefundStatus.DUE, now, *payment_session_ids, limit)).fetchall()
        return [str(row[0]) for row in sorted(taken, key=lambda row: (row[1], row[0]))]

    def record_refund(self, tx: Tx, payment_session_id: str, *, succeeded: bool, refund_id: str | None,
                      error: str | None, lease: str | None = None) -> bool:
        fence, token = (" AND refund_lease_token = ?", (lease,)) if lease is not None else ("", ())
        cursor = tx.execute("UPDATE acp_payments SET refund_status = CASE WHEN ? THEN ? ELSE refund_status END, "
                            "refund_id = COALESCE(?, refund_id), last_error = ?, refund_leased_until = NULL "
                            f"WHERE payment_session_id = ?{fence}",
                            (succeeded, RefundStatus.SUCCEEDED, refund_id, error, payment_session_id, *token))
        return bool(cursor.rowcount == 1)

    # --- ACP request keys -----------------------------------------------------------------------------------------

    def claim_key(self, tx: Tx, scope: str, key: str, request_hash: str, now: float, *, expired_before: float,
                  abandoned_before: float) -> KeyRecord | None:
        # the key may not exist yet: a lock on its name makes a second claimer wait for this COMMIT, then see it
        self.dialect.lock(tx, f"acp-key:{scope}\x1f{key}")
        row = tx.execute("SELECT request_hash, state, status, response, created_at FROM acp_idempotency "
                         "WHERE scope = ? AND key = ?", (scope, key)).fetchone()
        if row is not None:
            expired = row["created_at"] < expired_before
            abandoned = row["state"] == KeyState.IN_FLIGHT and row["created_at"] < abandoned_before
            if not (expired or abandoned):
                return KeyRecord(row["request_hash"], KeyState(row["state"]), row["status"], row["response"])
        tx.execute("INSERT INTO acp_idempotency (scope, key, request_hash, state, status, response, created_at) "
                   "VALUES (?, ?, ?, ?, NULL, NULL, ?) ON CONFLICT (scope, key) DO UPDATE SET "
                   "request_hash = excluded.request_hash, state = excluded.state, status = NULL, response = NULL, "
                   "created_at = excluded.created_at", (scope, key, request_hash, KeyState.IN_FLIGHT, now))
        return None

    def finish_key(self, tx: Tx, scope: str, key: str, status: int, response: str) -> None:
        tx.execute("UPDATE acp_idempotency SET state = ?, status = ?, response = ? WHERE scope = ? AND key = ?",
                   (KeyState.DONE, status, response, scope, key))

    def release_key(self, tx: Tx, scope: str, key: str) -> None:
        tx.execute("DELETE FROM acp_idempotency WHERE scope = ? AND key = ? AND state = ?",
                   (scope, key, KeyState.IN_FLIGHT))

    # --- wallets --------------------------------------------------------------------------------------------------

    def wallet_customer(self, agent_id: str) -> str | None:
        wallet = self._core.query_one("SELECT customer_id FROM agent_wallets WHERE agent_id = ?", (agent_id,))
        return None if wallet is None else str(wallet["customer_id"])

    def wallet_customer_in(self, tx: Tx, agent_id: str) -> str | None:
        wallet = tx.execute("SELECT customer_id FROM agent_wallets WHERE agent_id = ?", (agent_id,)).fetchone()
        return None if wallet is None else str(wallet["customer_id"])

    # --- order webhooks' outbox -----------------------------------------------------------------------------------

    def add_order_event(self, tx: Tx, event_id: str, event_type: str, order_id: str, checkout_session_id: str,
                        payload: str, created_at: str) -> None:
        tx.execute("INSERT INTO acp_order_events (id, type, order_id, checkout_session_id, payload, created_at) "
                   "VALUES (?, ?, ?, ?, ?, ?)", (event_id, event_type, order_id, checkout_session_id, payload,
                                                 created_at))

    def pending_order_events(self) -> list[str]:
        rows = self._core.query("SELECT id FROM acp_order_events WHERE delivered = 0 AND gave_up = 0 "
                                "ORDER BY created_at, id")
        return [str(row["id"]) for row in rows]

    def order_event(self, event_id: str) -> OrderEventRow | None:
        row = self._core.query_one("SELECT id, type, order_id, checkout_session_id, payload, attempts, delivered, "
                                   "gave_up, last_status, last_error, created_at, delivered_at FROM "
                                   "acp_order_events WHERE id = ?", (event_id,))
        if row is None:
            return None
        return OrderEventRow(row["id"], row["type"], row["order_id"], row["checkout_session_id"], row["payload"],
                             int(row["attempts"]), bool(row["delivered"]), bool(row["gave_up"]), row["last_status"],
                             row["last_error"], row["created_at"], row["delivered_at"])

    def lease_order_events(self, tx: Tx, token: str, now: float, until: float, *, event_ids: Sequence[str] = (),
                           limit: int = 100) -> list[str]:
        only = f" AND id IN ({', '.join('?' for _ in event_ids)})" if event_ids else ""
        taken = tx.execute(
            "UPDATE acp_order_events SET lease_token = ?, leased_until = ? WHERE id IN (SELECT id FROM "
            "acp_order_events WHERE delivered = 0 AND gave_up = 0 AND (leased_until IS NULL OR leased_until <= ?)"
            f"{only} ORDER BY created_at, id LIMIT ?{self.dialect.skip_locked}) RETURNING id, created_at",
            (token, until, now, *event_ids, limit)).fetchall()
        return [str(row[0]) for row in sorted(taken, key=lambda row: (row[1], row[0]))]

    def record_delivery(self, tx: Tx, event_id: str, *, attempts: int, status: int | None, error: str | None,
                        delivered: bool, gave_up: bool, at: str, lease: str | None = None) -> bool:
        fence, token = (" AND lease_token = ?", (lease,)) if lease is not None else ("", ())
        cursor = tx.execute("UPDATE acp_order_events SET attempts = ?, last_status = ?, last_error = ?, "
                            f"delivered = ?, gave_up = ?, delivered_at = ? WHERE id = ?{fence}",
                            (attempts, status, error, int(delivered), int(gave_up), at if delivered else None,
                             event_id, *token))
        return bool(cursor.rowcount == 1)


class PostgresAcpStore(SqliteAcpStore):
    """PostgreSQL: the same statements (store/postgres_sql.py), for several instances sharing one database.

    - A session read inside a write job (`session_in`, `session_paid_by`) is `SELECT ... FOR UPDATE`: the job's
      read-decide-write (cancel unless a completion holds it, settle a payment, record an order's outcome) runs with
      the row locked, so another instance's claim, cancel or settlement waits for its COMMIT and then decides on
      what it left. The guarded writes (`claim`, `release`, `save_state(only_open=True)`) are single UPDATEs whose
      WHERE is the guard: under READ COMMITTED a concurrent UPDATE re-checks it on the row as committed, so of two
      instances claiming one session at once one gets it and the other gets False, as with SQLite's one writer.
    - An ACP request key may not exist yet, so `claim_key` takes a transaction-scoped advisory lock on (scope, key)
      before reading it: a second instance claiming the same key at once waits for the first COMMIT and then sees
      the key in flight (or done, and replays its answer), exactly as the SQLite store answers.
    - A payment recorded twice at once (two instances settling one payment) keeps the first row (ON CONFLICT DO
      NOTHING), and the refund mark is a guarded UPDATE (`refund_status IS NULL`): marked once.
    - Outbox rows are leased with `FOR UPDATE SKIP LOCKED` and their outcomes fenced by the lease token (module
      docstring): an order event or a refund taken by one instance is not sent by another.
    """

    dialect = PostgresDialect
