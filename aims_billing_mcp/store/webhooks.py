"""Received Stripe webhook events and what they provisioned (tiers, subscriptions, customers).

`WebhooksStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteWebhooksStore` is the SQLite implementation; `PostgresWebhooksStore` inherits its
statements.

Two state machines live here:
- `EventState`, a received event's processing: stored as the `webhook_events.processed` flag (0/1), hence an
  `IntEnum`. An event is recorded in the transaction that applies it, so today every stored row is `PROCESSED`
  (a note in `error` says when it was stored but not applied); `RECEIVED` is the state of a row a backend stores
  before applying it.
- `SubscriptionStatus`, a provision's status: Stripe's subscription statuses plus `none`. Subscription events carry
  Stripe's status as it is (any status; the newest event wins, see services/subscriptions.py); `STATUS_TRANSITIONS`
  lists the moves our own code makes from invoice events (a failed payment makes a live subscription past due; a
  paid invoice makes an unpaid one active).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, Protocol, TypedDict

from .core import Reader, SqliteDialect, Tx, broken_unique_key, in_lists, insert_rows, utc_now
from .postgres_sql import PostgresDialect


class EventState(IntEnum):
    """A stored webhook event's processing state (the `processed` column)."""

    RECEIVED = 0
    PROCESSED = 1


EVENT_TRANSITIONS: dict[EventState, frozenset[EventState]] = {
    EventState.RECEIVED: frozenset({EventState.PROCESSED}),
    EventState.PROCESSED: frozenset(),
}


class SubscriptionStatus(StrEnum):
    """A provision's status: Stripe's subscription status, or `none` before any subscription."""

    NONE = "none"
    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    UNPAID = "unpaid"
    PAUSED = "paused"
    CANCELED = "canceled"


_S = SubscriptionStatus
LIVE: frozenset[str] = frozenset({_S.ACTIVE, _S.TRIALING, _S.PAST_DUE})
"""The statuses that entitle a customer to their subscription's tier."""

STATUS_TRANSITIONS: dict[SubscriptionStatus, frozenset[SubscriptionStatus]] = {
    _S.NONE: frozenset(),
    _S.INCOMPLETE: frozenset({_S.ACTIVE}),
    _S.INCOMPLETE_EXPIRED: frozenset(),
    _S.TRIALING: frozenset({_S.PAST_DUE}),
    _S.ACTIVE: frozenset({_S.PAST_DUE}),
    _S.PAST_DUE: frozenset({_S.PAST_DUE, _S.ACTIVE}),  # a repeated failure re-records the event that failed
    _S.UNPAID: frozenset({_S.ACTIVE}),
    _S.PAUSED: frozenset(),
    _S.CANCELED: frozenset(),
}
"""The status changes invoice events make (`invoice.payment_failed` -> past_due, `invoice.paid` -> active)."""
_STATUSES = {status.value: status for status in SubscriptionStatus}


def can_move(status: str, target: SubscriptionStatus) -> bool:
    """Whether STATUS_TRANSITIONS lets a provision in `status` (as stored: Stripe's word) move to `target`."""
    known = _STATUSES.get(status)
    return known is not None and target in STATUS_TRANSITIONS[known]


PROVISION_COLUMNS = (
    "customer_id, tier, status, subscription_id, price_id, current_period_start, current_period_end, ended_at, "
    "commitment_end, cancel_at, cancel_at_period_end, last_event_id, last_event_type, last_event_created, updated_at"
)


@dataclass(frozen=True, slots=True)
class Provision:
    """A customer's provision: their subscription's tier and status as the newest applied event left them."""

    customer_id: str
    tier: str
    status: str  # a SubscriptionStatus value (Stripe's vocabulary: kept as sent should Stripe add one)
    subscription_id: str | None
    price_id: str | None
    current_period_start: int | None
    current_period_end: int | None
    ended_at: int | None
    commitment_end: int | None
    cancel_at: int | None
    cancel_at_period_end: bool
    last_event_id: str | None
    last_event_type: str | None
    last_event_created: int | None
    updated_at: str


def blank_provision(customer: str, updated_at: str) -> Provision:
    """A provision before any event applied to it: the table's defaults (the P2P tier, no subscription)."""
    return Provision(customer, "p2p", _S.NONE, None, None, None, None, None, None, None, False, None, None, None,
                     updated_at)


class ProvisionUpdate(TypedDict, total=False):
    """The provision columns an applied event sets (the others keep their value)."""

    tier: str
    status: str
    subscription_id: str
    price_id: str | None
    current_period_start: int | None
    current_period_end: int | None
    ended_at: int | None
    commitment_end: int | None
    cancel_at: int | None
    cancel_at_period_end: bool


@dataclass(frozen=True, slots=True)
class EventRef:
    """The event a provision change comes from (left on the provision as its last event)."""

    id: str
    type: str
    created: int


@dataclass(frozen=True, slots=True)
class EventRecord:
    """An event to store with what applying it found: the customer it concerned and, when it was not applied,
    why (the `error` column)."""

    event: EventRef
    payload: str
    customer_id: str | None
    note: str | None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A stored webhook event, without its payload."""

    id: str
    type: str
    created: int
    customer_id: str | None
    state: EventState
    note: str | None  # why it was stored but not applied (the `error` column)
    received_at: str


class DuplicateEvent(Exception):
    """The event id is already stored: the event was received before."""

    def __init__(self, event_id: str) -> None:
        super().__init__(f"webhook event {event_id} was already received")
        self.event_id = event_id


class WebhooksStore(Protocol):
    """The webhooks operations every backend provides."""

    def record_event(self, tx: Tx, event: EventRef, payload: str, *, customer_id: str | None,
                     note: str | None) -> None:
        """Store the event as processed, in the transaction that applied it; raises DuplicateEvent (writing
        nothing) if its id is already stored, so the job's savepoint undoes the application with it."""

    def list_events(self, limit: int = 20) -> list[StoredEvent]:
        """The most recently received events, newest first."""

    def provision_for(self, customer: str) -> Provision | None:
        """The customer's provision as last committed, or None."""

    def by_subscription(self, subscription_id: str) -> Provision | None:
        """The provision holding this subscription (subscription ids are unique across provisions), or None."""

    def load_provision(self, tx: Tx, customer: str) -> Provision | None:
        """The customer's provision as seen inside the job's transaction (its own earlier writes included)."""

    def apply(self, tx: Tx, customer: str, update: ProvisionUpdate, event: EventRef) -> None:
        """Create the customer's provision or set the columns in `update` (the others unchanged), and record
        `event` as its last applied event."""

    # a batch of events: one read of what is stored, one multi-row write per table (see WebhookEventService)
    def received(self, tx: Tx, event_ids: Sequence[str]) -> set[str]:
        """Which of these event ids are already stored."""

    def load_provisions(self, tx: Tx, customers: Collection[str]) -> dict[str, Provision]:
        """These customers' provisions (the ones that exist), each guarded like `load_provision`'s."""

    def subscription_owners(self, tx: Tx, subscription_ids: Sequence[str]) -> dict[str, str]:
        """The customer whose provision holds each of these subscriptions (a subscription id is UNIQUE across
        provisions), for the ones some provision holds."""

    def save_provisions(self, tx: Tx, provisions: Sequence[Provision]) -> None:
        """Create or overwrite these provisions, every column as given."""

    def record_events(self, tx: Tx, records: Sequence[EventRecord]) -> None:
        """Store the events as processed, like `record_event`: an id already stored raises DuplicateEvent."""


def _provision(row: Any) -> Provision:
    return Provision(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], bool(row[10]),
                     row[11], row[12], row[13], row[14])


class SqliteWebhooksStore:
    dialect: type[SqliteDialect | PostgresDialect] = SqliteDialect

    def __init__(self, core: Reader) -> None:
        self._core = core

    def record_event(self, tx: Tx, event: EventRef, payload: str, *, customer_id: str | None,
                     note: str | None) -> None:
        self.record_events(tx, [EventRecord(event, payload, customer_id, note)])

    def list_events(self, limit: int = 20) -> list[StoredEvent]:
        rows = self._core.query(
            "SELECT id, type, created, customer_id, processed, error, received_at FROM webhook_events "
            "ORDER BY received_at DESC, created DESC, id DESC LIMIT ?", (limit,))
        return [StoredEvent(row["id"], row["type"], row["created"], row["customer_id"], EventState(row["processed"]),
                            row["error"], row["received_at"]) for row in rows]

    def provision_for(self, customer: str) -> Provision | None:
        row = self._core.query_one(
            f"SELECT {PROVISION_COLUMNS} FROM billing_provisions WHERE customer_id = ?", (customer,))
        return _provision(list(row.values())) if row is not None else None

    def by_subscription(self, subscription_id: str) -> Provision | None:
        row = self._core.query_one(
            f"SELECT {PROVISION_COLUMNS} FROM billing_provisions WHERE subscription_id = ?", (subscription_id,))
        return _provision(list(row.values())) if row is not None else None

    def load_provision(self, tx: Tx, customer: str) -> Provision | None:
        return self.load_provisions(tx, (customer,)).get(customer)

    def apply(self, tx: Tx, customer: str, update: ProvisionUpdate, event: EventRef) -> None:
        values: dict[str, Any] = {**update, "last_event_id": event.id, "last_event_type": event.type,
                                  "last_event_created": event.created, "updated_at": utc_now()}
        if "cancel_at_period_end" in values:
            values["cancel_at_period_end"] = int(values["cancel_at_period_end"])
        columns = ", ".join(values)
        updates = ", ".join(f"{column} = excluded.{column}" for column in values)
        tx.execute(
            f"INSERT INTO billing_provisions (customer_id, {columns}) VALUES (?{', ?' * len(values)}) "
            f"ON CONFLICT (customer_id) DO UPDATE SET {updates}",
            (customer, *values.values()),
        )

    def received(self, tx: Tx, event_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for marks, ids in in_lists(event_ids):
            found.update(row[0] for row in tx.execute(f"SELECT id FROM webhook_events WHERE id IN ({marks})", ids))
        return found

    def load_provisions(self, tx: Tx, customers: Collection[str]) -> dict[str, Provision]:
        if not customers:
            return {}
        ordered = sorted(customers)  # two batches take their locks in one order (a batch and a single job's
        # lock may still meet in opposite orders: PostgreSQL then aborts one transaction, which is run again)
        # a provision that does not exist yet has no row to lock: the lock is on the customer
        self.dialect.lock(tx, *(f"provision:{customer}" for customer in ordered))
        loaded: dict[str, Provision] = {}
        for marks, chunk in in_lists(ordered):
            for row in tx.execute(f"SELECT {PROVISION_COLUMNS} FROM billing_provisions WHERE customer_id IN "
                                  f"({marks})", chunk):
                loaded[row[0]] = _provision(row)
        return loaded

    def subscription_owners(self, tx: Tx, subscription_ids: Sequence[str]) -> dict[str, str]:
        owners: dict[str, str] = {}
        for marks, chunk in in_lists(subscription_ids):
            owners.update((row[0], row[1]) for row in tx.execute(
                f"SELECT subscription_id, customer_id FROM billing_provisions WHERE subscription_id IN ({marks})",
                chunk))
        return owners

    def save_provisions(self, tx: Tx, provisions: Sequence[Provision]) -> None:
        insert_rows(tx, _PROVISION_UPSERT, [
            (row.customer_id, row.tier, row.status, row.subscription_id, row.price_id, row.current_period_start,
             row.current_period_end, row.ended_at, row.commitment_end, row.cancel_at, int(row.cancel_at_period_end),
             row.last_event_id, row.last_event_type, row.last_event_created, row.updated_at) for row in provisions])

    def record_events(self, tx: Tx, records: Sequence[EventRecord]) -> None:
        now = utc_now()
        try:
            insert_rows(tx, _EVENT_INSERT, [
                (record.event.id, record.event.type, record.event.created, record.payload, now, EventState.PROCESSED,
                 now, record.customer_id, record.note) for record in records])
        except Exception as exc:
            if broken_unique_key(exc) not in ("webhook_events.id", "webhook_events_pkey"):
                raise
            raise DuplicateEvent(", ".join(record.event.id for record in records)) from exc


_PROVISION_UPSERT = (
    f"INSERT INTO billing_provisions ({PROVISION_COLUMNS}) VALUES ({', '.join('?' * 15)}) ON CONFLICT (customer_id) "
    "DO UPDATE SET " + ", ".join(f"{column} = excluded.{column}" for column in PROVISION_COLUMNS.split(", ")[1:]))
_EVENT_INSERT = ("INSERT INTO webhook_events (id, type, created, payload, received_at, processed, processed_at, "
                 "customer_id, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


class PostgresWebhooksStore(SqliteWebhooksStore):
    """PostgreSQL: the same statements (store/postgres_sql.py), and one difference: a provision's
    read-decide-write runs under a transaction-scoped advisory lock on the customer, so two instances applying
    events of one customer at once take turns (a row lock cannot guard a provision that does not exist yet)."""

    dialect = PostgresDialect
