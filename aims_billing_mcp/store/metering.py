"""Meter events, the running usage totals per period and operation, task slots and the flusher's batches to Stripe.

`MeteringStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteMeteringStore` is the SQLite implementation.

Rows on the recording path (`MeterEventRow`, `PeriodTotalRow`, `OperationDelta`) are named tuples in the order of
their statement's parameters: typed for the service, one tuple per row as before the seam, and handed to
`executemany` as plain tuples (sqlite3 binds a tuple subclass through the sequence protocol, which made the event
insert about a tenth dearer: measured with bench/metering.py's rows).

A meter event's delivery to Stripe is a state machine (`EventStatus`, `TRANSITIONS`): pending -> sent (Stripe took
it) or failed (Stripe can no longer take it: too old, refused by v1); sent -> failed (Stripe's asynchronous
validation refused it afterwards: `v1.billing.meter.error_report_triggered`). Failed is final. An event leaves its
period's counted usage in the transaction that marks it failed, exactly once (counted states: pending and sent).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, Protocol

from .core import StoreCore, Tx


class EventStatus(StrEnum):
    """Where a meter event stands with Stripe (the `meter_events.status` column)."""

    PENDING = "pending"  # recorded, not yet taken by Stripe
    SENT = "sent"  # taken by Stripe (P2P usage: billed on its period's own invoice)
    FAILED = "failed"  # Stripe can no longer take it, or refused it; `last_error` says why


TRANSITIONS: dict[EventStatus, frozenset[EventStatus]] = {
    EventStatus.PENDING: frozenset({EventStatus.SENT, EventStatus.FAILED}),
    EventStatus.SENT: frozenset({EventStatus.FAILED}),  # Stripe's error report, after its asynchronous validation
    EventStatus.FAILED: frozenset(),
}
COUNTED = frozenset({EventStatus.PENDING, EventStatus.SENT})  # in their period's totals; failed ones are not


def sources(target: EventStatus, *wanted: EventStatus) -> tuple[EventStatus, ...]:
    """The states an update may move to `target` from: `wanted`, each checked against TRANSITIONS (so a statement
    that would move an event along an edge the table does not have cannot be written)."""
    for state in wanted:
        if target not in TRANSITIONS[state]:
            raise ValueError(f"a meter event cannot go from {state} to {target}")
    return wanted


# --- rows -------------------------------------------------------------------------------------------------------


class MeterEventRow(NamedTuple):
    """A meter event as stored: what it was told (the numbers its answer was computed from) and how it is sent."""

    identifier: str
    customer_id: str
    operation: str | None
    multiplier_milli: int
    raw_units: int
    weighted_units: int
    agent_id: str | None
    timestamp: int
    metadata: str | None
    tier: str
    period_start: int
    period_end: int
    period_units_after: int
    allowance: int
    overage_rate: int
    overage_units: int
    cost_cents: int
    event_name: str
    created_at: str
    stripe_identifier: str


class PeriodTotalRow(NamedTuple):
    """A usage period's running total (`meter_usage_totals`) and the terms it was opened with (None: not yet)."""

    customer_id: str
    period_start: int
    period_end: int
    events: int
    raw_units: int
    weighted_units: int
    tier: str | None
    allowance: int | None
    overage_rate: int | None


class OperationDelta(NamedTuple):
    """What a batch adds to one period's counters for one operation (`custom` for explicit multipliers)."""

    customer_id: str
    period_start: int
    operation: str
    events: int
    raw_units: int
    weighted_units: int
    overage_units: int
    cost_cents: int


@dataclass(frozen=True, slots=True)
class OperationUsageRow:
    """A period's usage of one operation; `pending`/`failed` count events (month summaries only)."""

    operation: str
    events: int
    raw_units: int
    weighted_units: int
    overage_units: int
    cost_cents: int
    pending: int = 0
    failed: int = 0
    last_id: int = 0


@dataclass(frozen=True, slots=True)
class PeriodTerms:
    tier: str | None
    allowance: int | None
    overage_rate: int | None


@dataclass(frozen=True, slots=True)
class SlotRow:
    task_id: str
    acquired_at: int
    expires_at: int
    lease_hash: str | None


@dataclass(frozen=True, slots=True)
class FlushRow:
    """One flush as operators see it (`meter_flushes`)."""

    started_at: int
    finished_at: int
    sent: int
    failed: int
    pending_after: int
    transport: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class FailureRow:
    reason: str
    events: int
    last_at: int | None


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A pending event as the flusher sends it."""

    id: int
    identifier: str  # the identifier Stripe knows it by (stripe_identifier)
    customer_id: str
    event_name: str
    weighted_units: int
    timestamp: int
    tier: str


@dataclass(frozen=True, slots=True)
class OpenP2PPeriod:
    """An ended P2P usage period not invoiced yet."""

    customer_id: str
    period_start: int
    period_end: int
    weighted_units: int
    allowance: int | None
    overage_rate: int | None
    invoice_id: str | None


# --- the seam ---------------------------------------------------------------------------------------------------


class MeteringStore(Protocol):
    """The metering operations every backend provides."""

    # recording (in the writer's transaction)
    def find_events(self, tx: Tx, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], MeterEventRow]:
        """The stored events of these (customer, identifier) pairs; an identifier is its customer's own."""
        ...

    def load_totals(self, tx: Tx, keys: set[tuple[str, int]]) -> dict[tuple[str, int], PeriodTotalRow]:
        """The running totals of these (customer, period start) pairs that exist, read in the transaction."""
        ...

    def append(self, tx: Tx, events: Sequence[MeterEventRow], totals: Sequence[PeriodTotalRow],
               operations: Sequence[OperationDelta]) -> None:
        """Insert new events (pending, no attempt yet; IntegrityError if a (identifier, customer) exists), set
        each total to its absolute values (a period keeps the terms of its first write), add each delta."""
        ...

    def remember_customer(self, tx: Tx, customer: str, verified_at: int) -> None:
        """Keep a customer Stripe confirmed exists (idempotent)."""
        ...

    # reads
    def is_known_customer(self, customer: str) -> bool:
        """True if the customer was verified before or holds a subscription provision."""
        ...

    def period_total(self, customer: str, period_start: int) -> PeriodTotalRow | None:
        """One period's running total, or None before its first event."""
        ...

    def usage_by_operation(self, customer: str, period_start: int) -> list[OperationUsageRow]:
        """A period's counters per operation, ordered by operation (failed events taken out)."""
        ...

    def unsettled_counts(self, customer: str, period_start: int) -> dict[EventStatus, int]:
        """How many of a period's events are pending and failed (missing: none)."""
        ...

    def month_usage(self, customer: str, start: int, end: int, custom: str) -> list[OperationUsageRow]:
        """The events stamped in [start, end) per operation (`custom` for none): failed ones counted in `events`
        and `failed`, not in units or cost; `last_id` the newest event of each."""
        ...

    def event_terms(self, event_id: int) -> PeriodTerms | None:
        """The terms an event was recorded under."""
        ...

    def status_counts(self) -> dict[EventStatus, int]:
        """Events per status (missing: none)."""
        ...

    def oldest_pending_created_at(self) -> str | None:
        """When the oldest pending event was recorded (ISO-8601), or None."""
        ...

    def last_flush(self) -> FlushRow | None:
        """The most recent flush recorded."""
        ...

    def recent_failures(self, window: int, limit: int) -> list[FailureRow]:
        """The reasons of the last `window` failed events, most frequent first (at most `limit`)."""
        ...

    # task slots (in the writer's transaction)
    def live_slots(self, tx: Tx, customer: str, now: int) -> list[SlotRow]:
        """The customer's slots still held at `now`, first to expire first; expired ones are deleted."""
        ...

    def take_slot(self, tx: Tx, customer: str, slot: SlotRow) -> None:
        """Add a slot (IntegrityError if the task holds one)."""
        ...

    def renew_slot(self, tx: Tx, customer: str, task_id: str, expires_at: int) -> None:
        """Move a held slot's expiry."""
        ...

    def free_slot(self, tx: Tx, customer: str, task_id: str) -> bool:
        """Delete the task's slot; False if it held none."""
        ...

    # the flusher
    def newest_pending_id(self) -> int:
        """The id of the newest pending event (0: none); a flush sends up to it."""
        ...

    def next_pending(self, after_id: int, upto_id: int, limit: int) -> list[PendingEvent]:
        """Pending events with after_id < id <= upto_id, oldest first. (A backend shared by several instances
        would lease them here, so each is sent by one flusher at a time.)"""
        ...

    def pending_count(self) -> int:
        """How many events wait for Stripe."""
        ...

    def mark_sent(self, tx: Tx, event_ids: Sequence[int], sent_at: str) -> None:
        """Pending events Stripe took become sent (one attempt more); others are left as they are."""
        ...

    def mark_failed(self, tx: Tx, failures: Sequence[tuple[int, str]], failed_at: int, *, attempted: bool) -> None:
        """Pending events become failed with their reason (one attempt more if `attempted`) and leave their
        period's counted usage in the same transaction; others are left as they are."""
        ...

    def note_attempt(self, tx: Tx, event_ids: Sequence[int], error: str | None) -> None:
        """Count an attempt that settled nothing, and why."""
        ...

    def fail_reported(self, tx: Tx, reports: Sequence[tuple[str, str]], failed_at: int) -> int:
        """Events Stripe reported invalid, by the identifier Stripe knows them by: pending or sent ones become
        failed with the reason and leave their counted usage; answers how many changed (a repeat changes none)."""
        ...

    def record_flush(self, tx: Tx, flush: FlushRow, keep: int) -> None:
        """Record a flush and keep only the last `keep`."""
        ...

    # P2P invoices
    def open_p2p_periods(self, now: int, limit: int) -> list[OpenP2PPeriod]:
        """Ended P2P periods not invoiced yet, the earliest end first."""
        ...

    def period_has_pending(self, customer: str, period_start: int) -> bool:
        """True while any event of the period waits for Stripe (it may yet fail, so the period is not invoiced)."""
        ...

    def set_period_invoice(self, tx: Tx, customer: str, period_start: int, invoice_id: str) -> None:
        """Remember the invoice created for a P2P period (before it is finalized)."""
        ...

    def mark_period_invoiced(self, tx: Tx, customer: str, period_start: int, invoice_id: str | None,
                             at: int) -> None:
        """A P2P period is invoiced (invoice None: nothing was owed)."""
        ...


# --- SQLite -----------------------------------------------------------------------------------------------------

_PENDING, _SENT, _FAILED = EventStatus.PENDING, EventStatus.SENT, EventStatus.FAILED
_TO_SENT = sources(_SENT, _PENDING)
_TO_FAILED = sources(_FAILED, _PENDING)  # the flusher's: it only sends (and refuses) pending events
_REPORTED = sources(_FAILED, _PENDING, _SENT)  # Stripe's error report may name an event the flusher marked sent

_EVENT_COLUMNS = ", ".join(MeterEventRow._fields)
_EVENT_INSERT = (  # the state written into the text, not bound: no second tuple per event on the hot path
    f"INSERT INTO meter_events ({_EVENT_COLUMNS}, status, attempts) "
    f"VALUES ({', '.join('?' * len(MeterEventRow._fields))}, '{EventStatus.PENDING.value}', 0)"
)
_TOTAL_UPSERT = (  # absolute values, read and computed in the same transaction; the terms are the period's first
    "INSERT INTO meter_usage_totals (customer_id, period_start, period_end, events, raw_units, weighted_units, tier, "
    "allowance, overage_rate) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (customer_id, period_start) DO UPDATE SET "
    "events = excluded.events, raw_units = excluded.raw_units, weighted_units = excluded.weighted_units, "
    "tier = COALESCE(meter_usage_totals.tier, excluded.tier), "
    "allowance = COALESCE(meter_usage_totals.allowance, excluded.allowance), "
    "overage_rate = COALESCE(meter_usage_totals.overage_rate, excluded.overage_rate)"
)
_OPERATION_ADD = (  # increments: nothing to read first
    "INSERT INTO meter_usage_by_operation (customer_id, period_start, operation, events, raw_units, weighted_units, "
    "overage_units, cost_cents) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (customer_id, period_start, operation) DO UPDATE SET events = events + excluded.events, "
    "raw_units = raw_units + excluded.raw_units, weighted_units = weighted_units + excluded.weighted_units, "
    "overage_units = overage_units + excluded.overage_units, cost_cents = cost_cents + excluded.cost_cents"
)
_P2P = "p2p"  # literal in SQL: the partial index meter_usage_totals_p2p_open names it so


def _marks(values: Sized) -> str:
    return ",".join("?" * len(values))


class SqliteMeteringStore:
    def __init__(self, core: StoreCore) -> None:
        self._core = core

    # --- recording -------------------------------------------------------------------------------------------

    def find_events(self, tx: Tx, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], MeterEventRow]:
        found: dict[tuple[str, str], MeterEventRow] = {}
        if not pairs:
            return found
        identifiers = list({identifier for _, identifier in pairs})
        for row in tx.execute(  # identifiers are the customer's own: another customer's same id is not a replay
                f"SELECT {_EVENT_COLUMNS} FROM meter_events WHERE identifier IN ({_marks(identifiers)})", identifiers):
            key = (row[1], row[0])
            if key in pairs:
                found[key] = MeterEventRow._make(row)
        return found

    def load_totals(self, tx: Tx, keys: set[tuple[str, int]]) -> dict[tuple[str, int], PeriodTotalRow]:
        totals: dict[tuple[str, int], PeriodTotalRow] = {}
        if not keys:
            return totals
        customers = list({customer for customer, _ in keys})
        starts = list({start for _, start in keys})
        for row in tx.execute(  # customer IN (...) AND start IN (...): a superset the primary key finds directly
                "SELECT customer_id, period_start, period_end, events, raw_units, weighted_units, tier, allowance, "
                f"overage_rate FROM meter_usage_totals WHERE customer_id IN ({_marks(customers)}) AND period_start "
                f"IN ({_marks(starts)})", (*customers, *starts)):
            if (row[0], row[1]) in keys:
                totals[(row[0], row[1])] = PeriodTotalRow._make(row)
        return totals

    def append(self, tx: Tx, events: Sequence[MeterEventRow], totals: Sequence[PeriodTotalRow],
               operations: Sequence[OperationDelta]) -> None:
        if events:  # exact tuples: sqlite3 binds a tuple subclass through the slower sequence protocol
            tx.executemany(_EVENT_INSERT, map(tuple, events))
        if totals:
            tx.executemany(_TOTAL_UPSERT, map(tuple, totals))
        if operations:
            tx.executemany(_OPERATION_ADD, map(tuple, operations))

    def remember_customer(self, tx: Tx, customer: str, verified_at: int) -> None:
        tx.execute("INSERT OR IGNORE INTO meter_customers (customer_id, verified_at) VALUES (?, ?)",
                   (customer, verified_at))

    # --- reads -----------------------------------------------------------------------------------------------

    def is_known_customer(self, customer: str) -> bool:
        return self._core.query_one(
            "SELECT 1 FROM meter_customers WHERE customer_id = ? UNION ALL "
            "SELECT 1 FROM billing_provisions WHERE customer_id = ? LIMIT 1", (customer, customer)) is not None

    def period_total(self, customer: str, period_start: int) -> PeriodTotalRow | None:
        row = self._core.query_one(
            "SELECT customer_id, period_start, period_end, events, raw_units, weighted_units, tier, allowance, "
            "overage_rate FROM meter_usage_totals WHERE customer_id = ? AND period_start = ?", (customer, period_start))
        return None if row is None else PeriodTotalRow(**row)

    def usage_by_operation(self, customer: str, period_start: int) -> list[OperationUsageRow]:
        return [OperationUsageRow(**row) for row in self._core.query(
            "SELECT operation, events, raw_units, weighted_units, overage_units, cost_cents FROM "
            "meter_usage_by_operation WHERE customer_id = ? AND period_start = ? ORDER BY operation",
            (customer, period_start))]

    def unsettled_counts(self, customer: str, period_start: int) -> dict[EventStatus, int]:
        rows = self._core.query(  # pending and failed events are few; sent = the rest
            "SELECT status, COUNT(*) AS n FROM meter_events WHERE status IN (?, ?) "
            "AND customer_id = ? AND period_start = ? GROUP BY status", (_PENDING, _FAILED, customer, period_start))
        return {EventStatus(row["status"]): row["n"] for row in rows}

    def month_usage(self, customer: str, start: int, end: int, custom: str) -> list[OperationUsageRow]:
        return [OperationUsageRow(**row) for row in self._core.query(
            "SELECT COALESCE(operation, ?) AS operation, COUNT(*) AS events, "  # failed ones counted, not priced
            "SUM(IIF(status = ?, 0, raw_units)) AS raw_units, "
            "SUM(IIF(status = ?, 0, weighted_units)) AS weighted_units, "
            "SUM(IIF(status = ?, 0, overage_units)) AS overage_units, "
            "SUM(IIF(status = ?, 0, cost_cents)) AS cost_cents, SUM(status = ?) AS pending, "
            "SUM(status = ?) AS failed, "
            "MAX(id) AS last_id FROM meter_events WHERE timestamp >= ? AND timestamp < ? AND customer_id = ? "
            "GROUP BY 1 ORDER BY 1",
            (custom, _FAILED, _FAILED, _FAILED, _FAILED, _PENDING, _FAILED, start, end, customer))]

    def event_terms(self, event_id: int) -> PeriodTerms | None:
        row = self._core.query_one("SELECT tier, allowance, overage_rate FROM meter_events WHERE id = ?", (event_id,))
        return None if row is None else PeriodTerms(**row)

    def status_counts(self) -> dict[EventStatus, int]:
        return {EventStatus(row["status"]): row["n"] for row in self._core.query(
            "SELECT status, COUNT(*) AS n FROM meter_events GROUP BY status")}

    def oldest_pending_created_at(self) -> str | None:
        row = self._core.query_one(
            "SELECT created_at FROM meter_events WHERE status = ? ORDER BY id LIMIT 1", (_PENDING,))
        return None if row is None else str(row["created_at"])

    def last_flush(self) -> FlushRow | None:
        row = self._core.query_one(
            "SELECT started_at, finished_at, sent, failed, pending_after, transport, error FROM meter_flushes "
            "ORDER BY id DESC LIMIT 1")
        return None if row is None else FlushRow(**row)

    def recent_failures(self, window: int, limit: int) -> list[FailureRow]:
        return [FailureRow(**row) for row in self._core.query(
            "SELECT COALESCE(last_error, 'unknown') AS reason, COUNT(*) AS events, MAX(failed_at) AS last_at FROM "
            "(SELECT last_error, failed_at FROM meter_events WHERE status = ? ORDER BY id DESC LIMIT ?) "
            "GROUP BY 1 ORDER BY 2 DESC, 3 DESC LIMIT ?", (_FAILED, window, limit))]

    # --- task slots ------------------------------------------------------------------------------------------

    def live_slots(self, tx: Tx, customer: str, now: int) -> list[SlotRow]:
        tx.execute("DELETE FROM task_slots WHERE customer_id = ? AND expires_at <= ?", (customer, now))
        return [SlotRow(*row) for row in tx.execute(
            "SELECT task_id, acquired_at, expires_at, lease_hash FROM task_slots WHERE customer_id = ? "
            "ORDER BY expires_at, task_id", (customer,))]

    def take_slot(self, tx: Tx, customer: str, slot: SlotRow) -> None:
        tx.execute("INSERT INTO task_slots (customer_id, task_id, acquired_at, expires_at, lease_hash) "
                   "VALUES (?, ?, ?, ?, ?)", (customer, slot.task_id, slot.acquired_at, slot.expires_at,
                                              slot.lease_hash))

    def renew_slot(self, tx: Tx, customer: str, task_id: str, expires_at: int) -> None:
        tx.execute("UPDATE task_slots SET expires_at = ? WHERE customer_id = ? AND task_id = ?",
                   (expires_at, customer, task_id))

    def free_slot(self, tx: Tx, customer: str, task_id: str) -> bool:
        return tx.execute("DELETE FROM task_slots WHERE customer_id = ? AND task_id = ?",
                          (customer, task_id)).rowcount > 0

    # --- the flusher -----------------------------------------------------------------------------------------

    def newest_pending_id(self) -> int:
        row = self._core.query_one("SELECT MAX(id) AS id FROM meter_events WHERE status = ?", (_PENDING,))
        return int((row["id"] if row else None) or 0)

    def next_pending(self, after_id: int, upto_id: int, limit: int) -> list[PendingEvent]:
        return [PendingEvent(**row) for row in self._core.query(
            "SELECT id, stripe_identifier AS identifier, customer_id, event_name, weighted_units, timestamp, tier "
            "FROM meter_events WHERE status = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
            (_PENDING, after_id, upto_id, limit))]

    def pending_count(self) -> int:
        row = self._core.query_one("SELECT COUNT(*) AS n FROM meter_events WHERE status = ?", (_PENDING,))
        return int(row["n"]) if row else 0

    def mark_sent(self, tx: Tx, event_ids: Sequence[int], sent_at: str) -> None:
        if event_ids:
            tx.execute(
                "UPDATE meter_events SET status = ?, attempts = attempts + 1, sent_at = ?, last_error = NULL "
                f"WHERE status IN ({_marks(_TO_SENT)}) AND id IN ({_marks(event_ids)})",
                (_SENT, sent_at, *_TO_SENT, *event_ids))

    def mark_failed(self, tx: Tx, failures: Sequence[tuple[int, str]], failed_at: int, *, attempted: bool) -> None:
        if not failures:
            return
        _uncount(tx, [event_id for event_id, _ in failures], _TO_FAILED)
        tx.executemany(
            f"UPDATE meter_events SET status = ?, attempts = attempts + ?, last_error = ?, failed_at = ? "
            f"WHERE id = ? AND status IN ({_marks(_TO_FAILED)})",
            [(_FAILED, int(attempted), reason, failed_at, event_id, *_TO_FAILED) for event_id, reason in failures])

    def note_attempt(self, tx: Tx, event_ids: Sequence[int], error: str | None) -> None:
        if event_ids:
            tx.executemany("UPDATE meter_events SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                           [(error, event_id) for event_id in event_ids])

    def fail_reported(self, tx: Tx, reports: Sequence[tuple[str, str]], failed_at: int) -> int:
        reasons = dict(reports)
        if not reasons:
            return 0
        ids: dict[int, str] = {}
        for stripe_id, event_id in _by_stripe_identifier(tx, list(reasons)):
            ids[event_id] = reasons[stripe_id]
        if not ids:
            return 0
        _uncount(tx, list(ids), _REPORTED)
        changed = 0
        for event_id, reason in ids.items():
            changed += tx.execute(
                f"UPDATE meter_events SET status = ?, last_error = ?, failed_at = ? "
                f"WHERE id = ? AND status IN ({_marks(_REPORTED)})",
                (_FAILED, reason, failed_at, event_id, *_REPORTED)).rowcount
        return changed

    def record_flush(self, tx: Tx, flush: FlushRow, keep: int) -> None:
        cursor = tx.execute(
            "INSERT INTO meter_flushes (started_at, finished_at, sent, failed, pending_after, transport, error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (flush.started_at, flush.finished_at, flush.sent, flush.failed,
                                              flush.pending_after, flush.transport, flush.error))
        tx.execute("DELETE FROM meter_flushes WHERE id <= ?", ((cursor.lastrowid or 0) - keep,))

    # --- P2P invoices ----------------------------------------------------------------------------------------

    def open_p2p_periods(self, now: int, limit: int) -> list[OpenP2PPeriod]:
        return [OpenP2PPeriod(**row) for row in self._core.query(
            "SELECT customer_id, period_start, period_end, weighted_units, allowance, overage_rate, invoice_id FROM "
            f"meter_usage_totals WHERE tier = '{_P2P}' AND invoiced_at IS NULL AND period_end <= ? "
            "ORDER BY period_end LIMIT ?", (now, limit))]

    def period_has_pending(self, customer: str, period_start: int) -> bool:
        return self._core.query_one(
            "SELECT 1 AS n FROM meter_events WHERE status = ? AND customer_id = ? AND period_start = ? LIMIT 1",
            (_PENDING, customer, period_start)) is not None

    def set_period_invoice(self, tx: Tx, customer: str, period_start: int, invoice_id: str) -> None:
        tx.execute("UPDATE meter_usage_totals SET invoice_id = ? WHERE customer_id = ? AND period_start = ?",
                   (invoice_id, customer, period_start))

    def mark_period_invoiced(self, tx: Tx, customer: str, period_start: int, invoice_id: str | None,
                             at: int) -> None:
        tx.execute("UPDATE meter_usage_totals SET invoice_id = ?, invoiced_at = ? WHERE customer_id = ? "
                   "AND period_start = ?", (invoice_id, at, customer, period_start))


def _by_stripe_identifier(tx: Tx, stripe_ids: list[str]) -> Iterable[tuple[str, int]]:
    """(stripe identifier, event id) of the events Stripe knows by these identifiers. `<customer>:<identifier>`
    (see services/metering.stripe_identifier) is found through the UNIQUE (identifier, customer_id) index, an
    event recorded before identifiers were per customer by its identifier; a hashed one (`h_...`, rare) has no
    index to use and is looked for among the events still counted."""
    for stripe_id in stripe_ids:
        customer, colon, identifier = stripe_id.partition(":")
        row = None
        if colon and customer.startswith("cus_"):
            row = tx.execute("SELECT id FROM meter_events WHERE identifier = ? AND customer_id = ? "
                             "AND stripe_identifier = ?", (identifier, customer, stripe_id)).fetchone()
        if row is None:
            row = tx.execute("SELECT id FROM meter_events WHERE identifier = ? AND stripe_identifier = ?",
                             (stripe_id, stripe_id)).fetchone()
        if row is None and stripe_id.startswith("h_"):
            row = tx.execute(f"SELECT id FROM meter_events WHERE stripe_identifier = ? AND status IN "
                             f"({_marks(COUNTED)})", (stripe_id, *COUNTED)).fetchone()
        if row is not None:
            yield stripe_id, int(row[0])


def _uncount(tx: Tx, event_ids: list[int], counted: Sequence[EventStatus]) -> None:
    """Take events Stripe will never bill out of their period's counted usage (each still in a counted state: it is
    taken out once, in the transaction that marks it failed), so the summary, later answers and quotes price what
    Stripe invoices."""
    assert set(counted) <= COUNTED
    rows = tx.execute(
        "SELECT customer_id, period_start, COALESCE(operation, 'custom') AS operation, raw_units, weighted_units FROM "
        f"meter_events WHERE status IN ({_marks(counted)}) AND id IN ({_marks(event_ids)})",
        (*counted, *event_ids)).fetchall()
    tx.executemany(
        "UPDATE meter_usage_totals SET events = events - 1, raw_units = raw_units - ?, weighted_units = weighted_units "
        "- ? WHERE customer_id = ? AND period_start = ?",
        [(row["raw_units"], row["weighted_units"], row["customer_id"], row["period_start"]) for row in rows])
    tx.executemany(
        "UPDATE meter_usage_by_operation SET events = events - 1, raw_units = raw_units - ?, weighted_units = "
        "weighted_units - ? WHERE customer_id = ? AND period_start = ? AND operation = ?",
        [(row["raw_units"], row["weighted_units"], row["customer_id"], row["period_start"], row["operation"])
         for row in rows])


__all__ = [
    "COUNTED", "TRANSITIONS", "EventStatus", "FailureRow", "FlushRow", "MeterEventRow", "MeteringStore",
    "OpenP2PPeriod", "OperationDelta", "OperationUsageRow", "PendingEvent", "PeriodTerms", "PeriodTotalRow",
    "SlotRow", "SqliteMeteringStore", "sources",
]
