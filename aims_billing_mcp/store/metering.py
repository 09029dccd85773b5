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

Meters (migration 0018): every event carries its meter, and the running totals and operation counters are keyed by
(customer, period start, meter); rows from before meters are `luc_tokens` (DEFAULT_METER). A `last` meter's total
is its latest value (`last_at` its timestamp), not a sum: failing one of its events recounts the total from the
latest event still counted (`_relast`) instead of subtracting.

Unfolded events (SQLite, migrations 0021 and 0022; bench/ingest.py (c)). A batch does not read and rewrite its
periods' totals and operation counters row by row (an upsert per customer of the batch each, plus a read: as dear as
the event insert itself), nor write anything beside its events for them: its events are what is not folded yet.
`meter_usage_version.folded_upto` is the newest event id whose usage is in the totals and counters rows; a period's
counted usage is its rows plus its events above that id (every acknowledged event in exactly one of them), and every
read adds those (a range of the primary key, which the fold keeps short). A period seen for the first time gets its
totals row (its terms, counts 0) in the batch's transaction. Once FOLD_ROWS events have gathered, the writer folds
them: what they add per (customer, period, meter, operation), which it kept in memory as the batches went by (or,
after it forgot, one GROUP BY of the range), goes into the counters and the totals in one upsert and one UPDATE,
and `folded_upto` moves to the newest event, in the same transaction: what leaves the range arrives in the rows or
neither does. (0021 appended those sums as a delta row per batch and key: a second insert as large as a sixth of the
events' own, gone with 0022.) A `last` meter's total is a value, not a sum: it is written directly as before and its
events are never added. Before an event leaves the counted usage (failing it), the events are folded, so the
decrement finds every total in its row.
The writer remembers the totals it read and wrote (folded row plus unfolded events) and what its unfolded events add,
and trusts both while the database is as it left it: `meter_usage_version`, which each append and each fold moves on
in its own transaction (a transaction or savepoint that rolls back leaves the old number), and SQLite's
`data_version` (it changes when another connection, another process say, commits). Anything else makes it forget
and read again.
Duplicates are found by the event INSERT itself (`ON CONFLICT DO NOTHING`, the rows it inserted counted), not by a
lookup of every identifier first (`detects_existing`): on the rare batch holding an event recorded before, append
deletes what it inserted and raises EventsExist before writing anything else, and the service decides the batch
again, looking first (find_events).

PostgreSQL (`PostgresMeteringStore`, issue 15): several instances write at once, each with several writer threads,
at READ COMMITTED, so each read-decide-write takes what it needs from the database:
- Recording: `find_events` first takes a transaction-scoped advisory lock per customer of the batch (`meter:<cus>`,
  sorted, one statement), then reads in a new statement; `load_totals` reads the totals `FOR UPDATE`. The same
  (customer, identifier) from two instances is therefore decided by the second only after the first committed (a
  replay, not a UNIQUE violation undoing its whole batch), and a period's absolute total is never computed from a
  stale read (the advisory lock covers a period with no row yet; the row lock orders it against the flusher's
  decrements). Events go in by `COPY` (a multi-row `INSERT` of 1,000 events took ten times longer: its 20,000
  parameters), totals and operation counters as one upsert each from arrays (`INSERT ... SELECT FROM unnest(...)
  ON CONFLICT`), in key order (operation counters add: `x = x + excluded.x`). A duplicate event fails the COPY with
  a UNIQUE violation, as the INSERT would; the lock above keeps that from happening.
- Task slots: `live_slots`, the start of every slot decision, takes the customer's advisory lock (`slots:<cus>`), so
  two instances cannot both take the last slot.
- Failing events: the status `UPDATE ... RETURNING` is the claim (it re-checks the status after a concurrent commit),
  and only the events it returned leave the counted usage, so an event failed by two instances at once leaves once.
- The flusher (one per instance): `next_pending` leases its batch in one autocommitted statement (`UPDATE ... WHERE
  id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`: `lease_owner` = this instance, `lease_until` = the database
  clock + LEASE_MS; migration 0016), skipping events another instance holds a live lease on. No transaction stays
  open over the Stripe call. An instance killed holding a lease is taken over once it expires; the fence is in the
  marks: `mark_sent`, the flusher's `mark_failed` and `note_attempt` change only events leased by this instance or
  by none, in the transaction that marks them, so an instance paused past its lease and resumed marks nothing another
  instance took over (its late send is a duplicate Stripe drops by identifier). `note_attempt` gives the lease up.
  Stripe's error reports (`fail_reported`) are not the flusher's: they apply whoever leases the event.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from .core import StoreCore, Tx, insert_rows
from .postgres_sql import PostgresDialect, array_columns, array_literal


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
DEFAULT_METER = "luc_tokens"  # the meter of rows written before meters (the migration's column default)


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
    meter: str = DEFAULT_METER


class PeriodTotalRow(NamedTuple):
    """A usage period's running total of one meter (`meter_usage_totals`) and the terms it was opened with (None:
    not yet). A `last` meter's total is its latest value, `last_at` that value's timestamp (None for other meters:
    failing an event subtracts it from a total without one, and recomputes the latest value of one with it)."""

    customer_id: str
    period_start: int
    period_end: int
    events: int
    raw_units: int
    weighted_units: int
    tier: str | None
    allowance: int | None
    overage_rate: int | None
    meter: str = DEFAULT_METER
    last_at: int | None = None


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
    meter: str = DEFAULT_METER


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
    meter: str = DEFAULT_METER


# --- the seam ---------------------------------------------------------------------------------------------------


class EventsExist(sqlite3.IntegrityError):
    """`append` found events already stored (a replay or a conflict) and wrote nothing: look them up and decide."""


class MeteringStore(Protocol):
    """The metering operations every backend provides."""

    #: True: `append` itself refuses events already stored, raising EventsExist before anything is written, so the
    #: recording path decides without looking first and looks (find_events) only when told. False: it looks first.
    detects_existing: bool

    # recording (in the writer's transaction)
    def find_events(self, tx: Tx, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], MeterEventRow]:
        """The stored events of these (customer, identifier) pairs; an identifier is its customer's own."""
        ...

    def load_totals(self, tx: Tx, keys: set[tuple[str, int, str]]) -> dict[tuple[str, int, str], PeriodTotalRow]:
        """The running totals of these (customer, period start, meter) keys that exist, read in the transaction."""
        ...

    def append(self, tx: Tx, events: Sequence[tuple[Any, ...]], totals: Sequence[PeriodTotalRow],
               operations: Sequence[OperationDelta]) -> None:
        """Insert new events (pending, no attempt yet; IntegrityError if a (identifier, customer) exists), set
        each total to its absolute values (a period keeps the terms of its first write), add each operation's
        delta. An event is a MeterEventRow or a plain tuple in its field order (the recording path's: the collector
        stops tracking a plain tuple of plain values at its first pass, and never promotes it). Each total is what
        `load_totals` answered for its key in this transaction (or nothing) plus its key's deltas (a `last` meter's:
        its new value), and each delta's key has its total here: a backend may write either side, or derive them
        from the events (SQLite's unfolded events)."""
        ...

    def remember_customer(self, tx: Tx, customer: str, verified_at: int) -> None:
        """Keep a customer Stripe confirmed exists (idempotent)."""
        ...

    # reads
    def is_known_customer(self, customer: str) -> bool:
        """True if the customer was verified before or holds a subscription provision."""
        ...

    def period_total(self, customer: str, period_start: int,
                     meter: str = DEFAULT_METER) -> PeriodTotalRow | None:
        """One period's running total of a meter, or None before its first event."""
        ...

    def usage_by_operation(self, customer: str, period_start: int,
                           meter: str = DEFAULT_METER) -> list[OperationUsageRow]:
        """A period's counters of a meter per operation, ordered by operation (failed events taken out)."""
        ...

    def unsettled_counts(self, customer: str, period_start: int,
                         meter: str = DEFAULT_METER) -> dict[EventStatus, int]:
        """How many of a period's events of a meter are pending and failed (missing: none)."""
        ...

    def month_usage(self, customer: str, start: int, end: int, custom: str,
                    meter: str = DEFAULT_METER) -> list[OperationUsageRow]:
        """A meter's events stamped in [start, end) per operation (`custom` for none): failed ones counted in
        `events` and `failed`, not in units or cost; `last_id` the newest event of each."""
        ...

    def latest_value(self, customer: str, start: int, end: int, meter: str) -> int | None:
        """The value of a meter's latest counted event stamped in [start, end) (a `last` meter's month), or None."""
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
        """Pending events with after_id < id <= upto_id, oldest first. A backend shared by several instances leases
        them here (PostgreSQL), so each is sent by one flusher at a time; its marks are fenced to the lease."""
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

    def period_has_pending(self, customer: str, period_start: int, meter: str = DEFAULT_METER) -> bool:
        """True while any event of the period's meter waits for Stripe (it may yet fail: not invoiced yet)."""
        ...

    def set_period_invoice(self, tx: Tx, customer: str, period_start: int, invoice_id: str,
                           meter: str = DEFAULT_METER) -> None:
        """Remember the invoice created for a P2P period's meter (before it is finalized)."""
        ...

    def mark_period_invoiced(self, tx: Tx, customer: str, period_start: int, invoice_id: str | None,
                             at: int, meter: str = DEFAULT_METER) -> None:
        """A P2P period's meter is invoiced (invoice None: nothing was owed)."""
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
_EVENT_ADD = f"{_EVENT_INSERT} ON CONFLICT (identifier, customer_id) DO NOTHING"  # skipped rows are not counted
_TOTAL_COLUMNS = ", ".join(PeriodTotalRow._fields)
_TOTAL_UPSERT = (  # absolute values, read and computed in the same transaction; the terms are the period's first
    f"INSERT INTO meter_usage_totals ({_TOTAL_COLUMNS}) VALUES ({', '.join('?' * len(PeriodTotalRow._fields))}) "
    "ON CONFLICT (customer_id, period_start, meter) DO UPDATE SET "
    "events = excluded.events, raw_units = excluded.raw_units, weighted_units = excluded.weighted_units, "
    "last_at = excluded.last_at, "
    "tier = COALESCE(meter_usage_totals.tier, excluded.tier), "
    "allowance = COALESCE(meter_usage_totals.allowance, excluded.allowance), "
    "overage_rate = COALESCE(meter_usage_totals.overage_rate, excluded.overage_rate)"
)
_OPERATION_ADD = (  # increments: nothing to read first
    "INSERT INTO meter_usage_by_operation (customer_id, period_start, operation, events, raw_units, weighted_units, "
    "overage_units, cost_cents, meter) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (customer_id, period_start, meter, operation) DO UPDATE SET events = events + excluded.events, "
    "raw_units = raw_units + excluded.raw_units, weighted_units = weighted_units + excluded.weighted_units, "
    "overage_units = overage_units + excluded.overage_units, cost_cents = cost_cents + excluded.cost_cents"
)
_UNFOLDED = "id > (SELECT folded_upto FROM meter_usage_version WHERE id = 1)"  # events not in the rows yet
_FOLD_TABLE = (  # the connection's own, in memory: what a fold adds, per (customer, period, meter, operation)
    "CREATE TEMP TABLE IF NOT EXISTS usage_fold (customer_id TEXT, period_start INTEGER, meter TEXT, operation TEXT, "
    "events INTEGER, raw_units INTEGER, weighted_units INTEGER, overage_units INTEGER, cost_cents INTEGER)")
_FOLD_ROW = ("INSERT INTO temp.usage_fold (customer_id, period_start, operation, events, raw_units, weighted_units, "
             "overage_units, cost_cents, meter) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")  # an OperationDelta's order
_FOLD_FROM_EVENTS = (  # the same sums read back from the unfolded events: one GROUP BY of a primary key range
    "INSERT INTO temp.usage_fold SELECT customer_id, period_start, meter, COALESCE(operation, 'custom'), COUNT(*), "
    "SUM(raw_units), SUM(weighted_units), SUM(overage_units), SUM(cost_cents) FROM meter_events WHERE id > ? "
    "GROUP BY 1, 2, 3, 4",
    # a `last` meter's events were counted when written (its total is a value, kept by append itself)
    "DELETE FROM temp.usage_fold WHERE EXISTS (SELECT 1 FROM meter_usage_totals AS t WHERE t.customer_id = "
    "usage_fold.customer_id AND t.period_start = usage_fold.period_start AND t.meter = usage_fold.meter AND "
    "t.last_at IS NOT NULL)",
)
_FOLD_INTO_ROWS = (  # temp.usage_fold into the counters and the totals (every totals row of an event exists)
    "INSERT INTO meter_usage_by_operation (customer_id, period_start, meter, operation, events, raw_units, "
    "weighted_units, overage_units, cost_cents) SELECT customer_id, period_start, meter, operation, events, "
    "raw_units, weighted_units, overage_units, cost_cents FROM temp.usage_fold WHERE true "
    "ON CONFLICT (customer_id, period_start, meter, operation) "
    "DO UPDATE SET events = meter_usage_by_operation.events + excluded.events, "
    "raw_units = meter_usage_by_operation.raw_units + excluded.raw_units, "
    "weighted_units = meter_usage_by_operation.weighted_units + excluded.weighted_units, "
    "overage_units = meter_usage_by_operation.overage_units + excluded.overage_units, "
    "cost_cents = meter_usage_by_operation.cost_cents + excluded.cost_cents",
    "UPDATE meter_usage_totals SET events = meter_usage_totals.events + d.events, "
    "raw_units = meter_usage_totals.raw_units + d.raw_units, "
    "weighted_units = meter_usage_totals.weighted_units + d.weighted_units FROM (SELECT customer_id, period_start, "
    "meter, SUM(events) AS events, SUM(raw_units) AS raw_units, SUM(weighted_units) AS weighted_units FROM "
    "temp.usage_fold GROUP BY customer_id, period_start, meter) AS d WHERE meter_usage_totals.customer_id = "
    "d.customer_id AND meter_usage_totals.period_start = d.period_start AND meter_usage_totals.meter = d.meter",
    "DELETE FROM temp.usage_fold",
)
# A period's running total as every read sees it: its totals row plus its unfolded events (none for a `last` meter).
_TOTAL_NOW = (
    "SELECT t.customer_id, t.period_start, t.period_end, t.events + COALESCE(d.events, 0) AS events, "
    "t.raw_units + COALESCE(d.raw_units, 0) AS raw_units, t.weighted_units + COALESCE(d.weighted_units, 0) AS "
    "weighted_units, t.tier, t.allowance, t.overage_rate, t.meter, t.last_at FROM meter_usage_totals AS t "
    "LEFT JOIN (SELECT COUNT(*) AS events, CAST(SUM(raw_units) AS BIGINT) AS raw_units, CAST(SUM(weighted_units) "
    f"AS BIGINT) AS weighted_units FROM meter_events WHERE {_UNFOLDED} AND customer_id = ? AND period_start = ? "
    "AND meter = ?) AS d ON t.last_at IS NULL WHERE t.customer_id = ? AND t.period_start = ? AND t.meter = ?"
)
_SYNC = "SELECT version, (SELECT data_version FROM pragma_data_version()) FROM meter_usage_version WHERE id = 1"
_SYNC_NEWEST = ("SELECT version, (SELECT data_version FROM pragma_data_version()), (SELECT MAX(id) FROM meter_events) "
                "FROM meter_usage_version WHERE id = 1")
FOLD_ROWS = 4096  # events the writer lets gather unfolded (every read adding them scans at most about this many)
MAX_CACHED_TOTALS = 100_000  # totals the writer keeps in memory; past it, it forgets them all and reads again
_TOTAL_OPEN = (  # a period's first totals row: its terms; its counts arrive when its events are folded
    f"INSERT INTO meter_usage_totals ({_TOTAL_COLUMNS}) VALUES ({', '.join('?' * len(PeriodTotalRow._fields))}) "
    "ON CONFLICT (customer_id, period_start, meter) DO NOTHING"
)
_P2P = "p2p"  # literal in SQL: the partial index meter_usage_totals_p2p_open names it so


def _marks(values: Sized) -> str:
    return ",".join("?" * len(values))


def _tuples(tx: Tx) -> sqlite3.Cursor:
    """A cursor of the writer's transaction answering plain tuples: the recording path reads a row per total (and
    per replayed event) of every batch, and a sqlite3.Row costs more to make and to index."""
    cursor = tx.cursor()
    cursor.row_factory = None
    return cursor


class SqliteMeteringStore:
    detects_existing = True  # the event INSERT's ON CONFLICT DO NOTHING counts what it skipped

    def __init__(self, core: StoreCore) -> None:
        self._core = core
        # The writer's memory, trusted while `_seen` (the database's meter_usage_version and this connection's
        # data_version) is what it left (see `_sync`): the totals it read or wrote (folded row plus unfolded events),
        # and what its unfolded events add per (customer, period, meter, operation) (None: not known, the fold reads
        # them back from the events).
        self._totals: dict[tuple[str, int, str], PeriodTotalRow] = {}
        self._seen: tuple[int, int] | None = None
        self._unfolded: int | None = None  # events not folded yet (None: not known, count them)
        self._adds: dict[tuple[str, int, str, str], list[int]] | None = None

    # --- recording -------------------------------------------------------------------------------------------

    def find_events(self, tx: Tx, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], MeterEventRow]:
        found: dict[tuple[str, str], MeterEventRow] = {}
        if not pairs:
            return found
        identifiers = list({identifier for _, identifier in pairs})
        for row in _tuples(tx).execute(  # identifiers are the customer's own: another customer's is not a replay
                f"SELECT {_EVENT_COLUMNS} FROM meter_events WHERE identifier IN ({_marks(identifiers)})", identifiers):
            key = (row[1], row[0])
            if key in pairs:
                found[key] = MeterEventRow._make(row)
        return found

    def load_totals(self, tx: Tx, keys: set[tuple[str, int, str]]) -> dict[tuple[str, int, str], PeriodTotalRow]:
        """From the writer's memory when it holds them (see `_sync`), else the totals rows plus their unfolded
        events."""
        totals: dict[tuple[str, int, str], PeriodTotalRow] = {}
        if not keys:
            return totals
        self._sync(tx)
        known = self._totals
        missing = []
        for key in keys:
            row = known.get(key)
            if row is None:
                missing.append(key)
            else:
                totals[key] = row
        if not missing:
            return totals
        wanted = set(missing)
        customers = list({key[0] for key in wanted})
        starts = list({key[1] for key in wanted})
        for row in _tuples(tx).execute(  # customer IN (...) AND start IN (...): a superset the primary key finds
                f"SELECT {_TOTAL_COLUMNS} FROM meter_usage_totals WHERE customer_id IN ({_marks(customers)}) AND "
                f"period_start IN ({_marks(starts)})", (*customers, *starts)):
            if (row[0], row[1], row[9]) in wanted:
                totals[(row[0], row[1], row[9])] = PeriodTotalRow._make(row)
        if self._unfolded != 0:  # the events not folded yet (a range of the primary key: the fold keeps it short)
            for customer, start, meter, events, raw, weighted in _tuples(tx).execute(
                    "SELECT customer_id, period_start, meter, COUNT(*), SUM(raw_units), SUM(weighted_units) FROM "
                    f"meter_events WHERE {_UNFOLDED} GROUP BY customer_id, period_start, meter"):
                key = (customer, start, meter)
                row = totals.get(key) if key in wanted else None
                if row is not None and row.last_at is None:  # a `last` meter's total counted its events already
                    totals[key] = row._replace(events=row.events + events, raw_units=row.raw_units + raw,
                                               weighted_units=row.weighted_units + weighted)
        if len(known) + len(missing) > MAX_CACHED_TOTALS:
            known.clear()
        for key in missing:
            if key in totals:
                known[key] = totals[key]
        return totals

    def append(self, tx: Tx, events: Sequence[tuple[Any, ...]], totals: Sequence[PeriodTotalRow],
               operations: Sequence[OperationDelta]) -> None:
        """The events (unfolded: their sum or count meters' usage is added by every read until it is folded); a
        totals row for a period that has none (its terms, counts 0); for a `last` meter (`last_at` set), its absolute
        total and counters. What the sum and count meters' operations add is kept in memory for the fold. Then the
        version moves on, and the events are folded once there are FOLD_ROWS of them."""
        last = self._sync(tx, newest=True)
        if events and insert_rows(tx, _EVENT_ADD, events) != len(events):  # some were there: undo ours only
            tx.execute("DELETE FROM meter_events WHERE id > ?", (last,))
            raise EventsExist("UNIQUE constraint failed: meter_events.identifier, meter_events.customer_id")
        known = self._totals
        opened: list[PeriodTotalRow] = []
        lasts: list[PeriodTotalRow] = []
        termless: list[PeriodTotalRow] = []
        remember: list[tuple[tuple[str, int, str], PeriodTotalRow]] = []  # once the writes went through
        for row in totals:
            key = (row.customer_id, row.period_start, row.meter)
            first = known.get(key)
            if first is None:
                if row.last_at is None:  # not in the database as far as this transaction read (DO NOTHING if it is)
                    opened.append(row._replace(events=0, raw_units=0, weighted_units=0))
            elif first.tier is None:
                if row.tier is not None and row.last_at is None:  # a row from before terms were kept gets them
                    termless.append(row)
            elif first.tier != row.tier or first.allowance != row.allowance or first.overage_rate != row.overage_rate:
                row = row._replace(tier=first.tier, allowance=first.allowance,  # the period keeps its first terms
                                   overage_rate=first.overage_rate)
            if row.last_at is not None:
                lasts.append(row)
            remember.append((key, row))
        if opened:
            insert_rows(tx, _TOTAL_OPEN, opened)
        if termless:
            tx.executemany(
                "UPDATE meter_usage_totals SET tier = COALESCE(tier, ?), allowance = COALESCE(allowance, ?), "
                "overage_rate = COALESCE(overage_rate, ?) WHERE customer_id = ? AND period_start = ? AND meter = ?",
                [(r.tier, r.allowance, r.overage_rate, r.customer_id, r.period_start, r.meter) for r in termless])
        sums: Sequence[OperationDelta] = operations
        if lasts:
            insert_rows(tx, _TOTAL_UPSERT, lasts)
            gauges = {(row.customer_id, row.period_start, row.meter) for row in lasts}
            insert_rows(tx, _OPERATION_ADD, [d for d in operations
                                              if (d.customer_id, d.period_start, d.meter) in gauges])
            sums = [d for d in operations if (d.customer_id, d.period_start, d.meter) not in gauges]
        self._moved_on(tx)
        if len(known) + len(remember) > MAX_CACHED_TOTALS:
            known.clear()
        known.update(remember)
        adds = self._adds
        if adds is not None:
            for customer, start, operation, n, raw, weighted, overage, cost, meter in sums:
                counters = adds.get((customer, start, meter, operation))
                if counters is None:
                    adds[(customer, start, meter, operation)] = [n, raw, weighted, overage, cost]
                else:
                    counters[0] += n
                    counters[1] += raw
                    counters[2] += weighted
                    counters[3] += overage
                    counters[4] += cost
        if self._unfolded is None:
            self._unfolded = int(tx.execute(f"SELECT COUNT(*) FROM meter_events WHERE {_UNFOLDED}").fetchone()[0])
        else:
            self._unfolded += len(events)
        if self._unfolded >= FOLD_ROWS:
            self.fold(tx)

    def fold(self, tx: Tx) -> None:
        """Fold every unfolded event into its counters and totals row and move `folded_upto` past them, in the
        caller's transaction (the sums stay the same: what leaves the unfolded range arrives in the rows, or neither
        does). The sums are the ones kept in memory while the database is as this writer left it, else one GROUP BY
        of the range."""
        self._sync(tx)
        folded, newest = tx.execute(
            "SELECT folded_upto, (SELECT COALESCE(MAX(id), 0) FROM meter_events) FROM meter_usage_version "
            "WHERE id = 1").fetchone()
        if newest > folded:
            tx.execute(_FOLD_TABLE)
            if self._adds is not None:
                insert_rows(tx, _FOLD_ROW, [(c, s, o, *sums, m) for (c, s, m, o), sums in self._adds.items()])
            else:
                tx.execute(_FOLD_FROM_EVENTS[0], (folded,))
                tx.execute(_FOLD_FROM_EVENTS[1])
            for statement in _FOLD_INTO_ROWS:
                tx.execute(statement)
            tx.execute("UPDATE meter_usage_version SET folded_upto = ? WHERE id = 1", (newest,))
            # should a savepoint undo this fold, the writer's memory (nothing left to fold) no longer matches the
            # database, and is forgotten
            self._moved_on(tx)
        self._unfolded = 0
        self._adds = {}

    def _moved_on(self, tx: Tx) -> None:
        """Move meter_usage_version on, in the caller's transaction, and remember it (see `_sync`)."""
        assert self._seen is not None
        version, data_version = self._seen
        tx.execute("UPDATE meter_usage_version SET version = ? WHERE id = 1", (version + 1,))
        self._seen = (version + 1, data_version)

    def _sync(self, tx: Tx, *, newest: bool = False) -> int:
        """Forget what the writer keeps in memory unless the database is as this writer left it: the same
        meter_usage_version (a transaction of ours that rolled back leaves the old number) and the same
        data_version (no other connection, another process say, committed since). With `newest`, answers the
        newest event id (0: none) in the same statement."""
        row = tx.execute(_SYNC_NEWEST if newest else _SYNC).fetchone()
        seen = (int(row[0]), int(row[1]))
        if seen != self._seen:
            self._totals.clear()
            self._seen = seen
            self._unfolded = None
            self._adds = None
        return int(row[2] or 0) if newest else 0

    def _forget(self, tx: Tx) -> None:
        """Before a change to totals or counters outside append (failing events): fold, so every total is its row,
        forget the totals in memory, and move the version on, so that should this transaction roll back, totals the
        writer reads after the change (and keeps) are forgotten too."""
        self.fold(tx)
        self._totals.clear()
        self._moved_on(tx)

    def remember_customer(self, tx: Tx, customer: str, verified_at: int) -> None:
        tx.execute("INSERT INTO meter_customers (customer_id, verified_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                   (customer, verified_at))

    # --- reads -----------------------------------------------------------------------------------------------

    def is_known_customer(self, customer: str) -> bool:
        return self._core.query_one(
            "SELECT 1 AS n FROM meter_customers WHERE customer_id = ? UNION ALL "
            "SELECT 1 FROM billing_provisions WHERE customer_id = ? LIMIT 1", (customer, customer)) is not None

    def period_total(self, customer: str, period_start: int,
                     meter: str = DEFAULT_METER) -> PeriodTotalRow | None:
        key = (customer, period_start, meter)
        row = self._core.query_one(_TOTAL_NOW, (*key, *key))
        return None if row is None else PeriodTotalRow(**row)

    def usage_by_operation(self, customer: str, period_start: int,
                           meter: str = DEFAULT_METER) -> list[OperationUsageRow]:
        key = (customer, period_start, meter)
        return [OperationUsageRow(**row) for row in self._core.query(  # the counters plus the unfolded events
            "SELECT operation, CAST(SUM(events) AS BIGINT) AS events, CAST(SUM(raw_units) AS BIGINT) AS raw_units, "
            "CAST(SUM(weighted_units) AS BIGINT) AS weighted_units, CAST(SUM(overage_units) AS BIGINT) AS "
            "overage_units, CAST(SUM(cost_cents) AS BIGINT) AS cost_cents FROM (SELECT "
            "operation, events, raw_units, weighted_units, overage_units, cost_cents FROM meter_usage_by_operation "
            "WHERE customer_id = ? AND period_start = ? AND meter = ? UNION ALL SELECT COALESCE(operation, 'custom'), "
            "1, raw_units, weighted_units, overage_units, cost_cents FROM meter_events WHERE "
            f"{_UNFOLDED} AND customer_id = ? AND period_start = ? AND meter = ? AND NOT EXISTS (SELECT 1 FROM "
            "meter_usage_totals AS t WHERE t.customer_id = ? AND t.period_start = ? AND t.meter = ? AND "
            "t.last_at IS NOT NULL)) AS u GROUP BY operation ORDER BY operation", (*key, *key, *key))]

    def unsettled_counts(self, customer: str, period_start: int,
                         meter: str = DEFAULT_METER) -> dict[EventStatus, int]:
        rows = self._core.query(  # pending and failed events are few; sent = the rest
            "SELECT status, COUNT(*) AS n FROM meter_events WHERE status IN (?, ?) AND customer_id = ? "
            "AND period_start = ? AND meter = ? GROUP BY status", (_PENDING, _FAILED, customer, period_start, meter))
        return {EventStatus(row["status"]): int(row["n"]) for row in rows}

    def latest_value(self, customer: str, start: int, end: int, meter: str) -> int | None:
        row = self._core.query_one(
            f"SELECT weighted_units FROM meter_events WHERE timestamp >= ? AND timestamp < ? AND customer_id = ? "
            f"AND meter = ? AND status IN ({_marks(COUNTED)}) ORDER BY timestamp DESC, id DESC LIMIT 1",
            (start, end, customer, meter, *COUNTED))
        return None if row is None else int(row["weighted_units"])

    def month_usage(self, customer: str, start: int, end: int, custom: str,
                    meter: str = DEFAULT_METER) -> list[OperationUsageRow]:
        return [OperationUsageRow(**row) for row in self._core.query(
            "SELECT COALESCE(operation, ?) AS operation, COUNT(*) AS events, "  # failed ones counted, not priced
            "SUM(IIF(status = ?, 0, raw_units)) AS raw_units, "
            "SUM(IIF(status = ?, 0, weighted_units)) AS weighted_units, "
            "SUM(IIF(status = ?, 0, overage_units)) AS overage_units, "
            "SUM(IIF(status = ?, 0, cost_cents)) AS cost_cents, SUM(status = ?) AS pending, "
            "SUM(status = ?) AS failed, "
            "MAX(id) AS last_id FROM meter_events WHERE timestamp >= ? AND timestamp < ? AND customer_id = ? "
            "AND meter = ? GROUP BY 1 ORDER BY 1",
            (custom, _FAILED, _FAILED, _FAILED, _FAILED, _PENDING, _FAILED, start, end, customer, meter))]

    def event_terms(self, event_id: int) -> PeriodTerms | None:
        row = self._core.query_one("SELECT tier, allowance, overage_rate FROM meter_events WHERE id = ?", (event_id,))
        return None if row is None else PeriodTerms(**row)

    def status_counts(self) -> dict[EventStatus, int]:
        return {EventStatus(row["status"]): int(row["n"]) for row in self._core.query(
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
        return bool(tx.execute("DELETE FROM task_slots WHERE customer_id = ? AND task_id = ?",
                               (customer, task_id)).rowcount > 0)

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
        self._forget(tx)
        lasts = _uncount(tx, [event_id for event_id, _ in failures], _TO_FAILED)
        tx.executemany(
            f"UPDATE meter_events SET status = ?, attempts = attempts + ?, last_error = ?, failed_at = ? "
            f"WHERE id = ? AND status IN ({_marks(_TO_FAILED)})",
            [(_FAILED, int(attempted), reason, failed_at, event_id, *_TO_FAILED) for event_id, reason in failures])
        _relast(tx, lasts)

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
        self._forget(tx)
        lasts = _uncount(tx, list(ids), _REPORTED)
        changed = 0
        for event_id, reason in ids.items():
            changed += tx.execute(
                f"UPDATE meter_events SET status = ?, last_error = ?, failed_at = ? "
                f"WHERE id = ? AND status IN ({_marks(_REPORTED)})",
                (_FAILED, reason, failed_at, event_id, *_REPORTED)).rowcount
        _relast(tx, lasts)
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
            "SELECT customer_id, period_start, period_end, weighted_units + CASE WHEN last_at IS NULL THEN "
            "COALESCE((SELECT CAST(SUM(e.weighted_units) AS BIGINT) FROM meter_events AS e WHERE "
            f"e.{_UNFOLDED} AND e.customer_id = t.customer_id AND e.period_start = t.period_start AND "
            "e.meter = t.meter), 0) ELSE 0 END AS weighted_units, allowance, "
            "overage_rate, invoice_id, meter "
            f"FROM meter_usage_totals AS t WHERE tier = '{_P2P}' AND invoiced_at IS NULL AND period_end <= ? "
            "ORDER BY period_end, meter LIMIT ?", (now, limit))]

    def period_has_pending(self, customer: str, period_start: int, meter: str = DEFAULT_METER) -> bool:
        return self._core.query_one(
            "SELECT 1 AS n FROM meter_events WHERE status = ? AND customer_id = ? AND period_start = ? AND meter = ? "
            "LIMIT 1", (_PENDING, customer, period_start, meter)) is not None

    def set_period_invoice(self, tx: Tx, customer: str, period_start: int, invoice_id: str,
                           meter: str = DEFAULT_METER) -> None:
        tx.execute("UPDATE meter_usage_totals SET invoice_id = ? WHERE customer_id = ? AND period_start = ? "
                   "AND meter = ?", (invoice_id, customer, period_start, meter))

    def mark_period_invoiced(self, tx: Tx, customer: str, period_start: int, invoice_id: str | None,
                             at: int, meter: str = DEFAULT_METER) -> None:
        tx.execute("UPDATE meter_usage_totals SET invoice_id = ?, invoiced_at = ? WHERE customer_id = ? "
                   "AND period_start = ? AND meter = ?", (invoice_id, at, customer, period_start, meter))


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


def _uncount(tx: Tx, event_ids: list[int], counted: Sequence[EventStatus]) -> set[tuple[str, int, str]]:
    """Take events Stripe will never bill out of their period's counted usage (each still in a counted state: it is
    taken out once, in the transaction that marks it failed), so the summary, later answers and quotes price what
    Stripe invoices. A `last` meter's total (last_at set) is not a sum: its events count one less here, and its value
    is recomputed by `_relast` once they are marked; answers those totals' keys."""
    assert set(counted) <= COUNTED
    rows = tx.execute(
        "SELECT e.customer_id, e.period_start, e.meter, COALESCE(e.operation, 'custom') AS operation, e.raw_units, "
        "e.weighted_units, t.last_at IS NOT NULL AS last FROM meter_events AS e LEFT JOIN meter_usage_totals AS t ON "
        "t.customer_id = e.customer_id AND t.period_start = e.period_start AND t.meter = e.meter "
        f"WHERE e.status IN ({_marks(counted)}) AND e.id IN ({_marks(event_ids)})",
        (*counted, *event_ids)).fetchall()
    lasts = {(row["customer_id"], row["period_start"], row["meter"]) for row in rows if row["last"]}
    units = [(0, 0) if row["last"] else (row["raw_units"], row["weighted_units"]) for row in rows]
    tx.executemany(
        "UPDATE meter_usage_totals SET events = events - 1, raw_units = raw_units - ?, weighted_units = weighted_units "
        "- ? WHERE customer_id = ? AND period_start = ? AND meter = ?",
        [(*unit, row["customer_id"], row["period_start"], row["meter"]) for unit, row in zip(units, rows, strict=True)])
    tx.executemany(
        "UPDATE meter_usage_by_operation SET events = events - 1, raw_units = raw_units - ?, weighted_units = "
        "weighted_units - ? WHERE customer_id = ? AND period_start = ? AND meter = ? AND operation = ?",
        [(*unit, row["customer_id"], row["period_start"], row["meter"], row["operation"])
         for unit, row in zip(units, rows, strict=True)])
    return lasts


def _relast(tx: Tx, keys: Iterable[tuple[str, int, str]]) -> None:
    """A `last` meter's totals after some of its events failed: the value and timestamp of its latest event still
    counted (0 and the period start when none is), as Stripe's `last` aggregation bills it (both backends: the
    PostgreSQL writer takes `?` texts, store/postgres_sql.py)."""
    latest = ("FROM meter_events AS e WHERE e.customer_id = t.customer_id AND e.period_start = t.period_start AND "
              "e.meter = t.meter AND e.status IN (?, ?) ORDER BY e.timestamp DESC, e.id DESC LIMIT 1")
    for customer, start, meter in sorted(keys):
        tx.execute(
            f"UPDATE meter_usage_totals AS t SET weighted_units = COALESCE((SELECT e.weighted_units {latest}), 0), "
            f"raw_units = COALESCE((SELECT e.raw_units {latest}), 0), last_at = COALESCE((SELECT e.timestamp "
            f"{latest}), t.period_start) WHERE t.customer_id = ? AND t.period_start = ? AND t.meter = ?",
            (*_statuses(COUNTED), *_statuses(COUNTED), *_statuses(COUNTED), customer, start, meter))


# --- PostgreSQL -------------------------------------------------------------------------------------------------

_PENDING_TEXT = EventStatus.PENDING.value
_PG_NOW_MS = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint"  # the database's clock: one for every instance
_PG_MINE = "(lease_owner IS NULL OR lease_owner = %s)"  # the fence: an event another instance took over is its own
LEASE_MS = 300_000  # how long a flusher's batch is its own: past it, another instance may take the batch over


def _pg_marks(values: Sized) -> str:
    return ", ".join(["%s"] * len(values))


def _statuses(states: Iterable[EventStatus]) -> list[str]:
    return [str(state) for state in states]


class PostgresMeteringStore(SqliteMeteringStore):
    """PostgreSQL: the same operations over a database several instances write at once (see the module docstring,
    "PostgreSQL"). The SQLite store's statements serve where the dialects agree (store/postgres_sql.py); what is
    written here is what differs: the per-customer locks, COPY and array upserts, and the flusher's leases. It writes
    its totals and counters directly (no unfolded events, no totals kept in memory: several instances write at once)
    and looks events up before appending them (`detects_existing` False); its `folded_upto` is the largest id there
    is (migration postgres/0022), so the shared reads add no event."""

    detects_existing = False  # COPY fails whole on a duplicate: find_events looks first, under the customers' locks

    def __init__(self, core: Any, *, lease_ms: int = LEASE_MS) -> None:
        self._core = core
        self.owner = f"{os.getpid()}-{secrets.token_hex(8)}"  # this instance, as its leases name it
        self.lease_ms = lease_ms

    # --- recording -------------------------------------------------------------------------------------------

    def find_events(self, tx: Tx, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], MeterEventRow]:
        found: dict[tuple[str, str], MeterEventRow] = {}
        if not pairs:
            return found
        # The customers' metering locks first (sorted: two batches take them in one order), in their own statement,
        # so the SELECT below (a new snapshot under READ COMMITTED) sees every event committed before the lock.
        PostgresDialect.lock(tx, *sorted({f"meter:{customer}" for customer, _ in pairs}))
        # One index lookup per pair, whatever the statistics say: `identifier = ANY(...)` on a table grown since its
        # last ANALYZE is planned as a sequential scan (every batch reading every event: 4 ms at 20,000 events and
        # growing); OFFSET 0 keeps the lookup a parameterized index scan instead of a join the planner may hash.
        keys = sorted(pairs)
        for row in tx.execute(
                "SELECT m.* FROM unnest(%s::text[], %s::text[]) AS k(customer_id, identifier), LATERAL (SELECT "
                f"{_EVENT_COLUMNS} FROM meter_events e WHERE e.identifier = k.identifier AND e.customer_id = "
                "k.customer_id OFFSET 0) AS m", array_columns(keys, 2)):
            key = (row[1], row[0])
            if key in pairs:
                found[key] = MeterEventRow._make(row)
        return found

    def load_totals(self, tx: Tx, keys: set[tuple[str, int, str]]) -> dict[tuple[str, int, str], PeriodTotalRow]:
        totals: dict[tuple[str, int, str], PeriodTotalRow] = {}
        if not keys:
            return totals
        PostgresDialect.lock(tx, *sorted({f"meter:{key[0]}" for key in keys}))  # held already after find_events
        customers = sorted({key[0] for key in keys})
        starts = sorted({key[1] for key in keys})
        for row in tx.execute(  # FOR UPDATE: a flusher's decrement (mark_failed) waits, or is read after its commit
                f"SELECT {_TOTAL_COLUMNS} FROM meter_usage_totals WHERE customer_id = ANY(%s::text[]) AND "
                "period_start = ANY(%s::bigint[]) ORDER BY customer_id, period_start, meter FOR UPDATE",
                (array_literal(customers), array_literal(starts))):
            if (row[0], row[1], row[9]) in keys:
                totals[(row[0], row[1], row[9])] = PeriodTotalRow._make(row)
        return totals

    def append(self, tx: Tx, events: Sequence[tuple[Any, ...]], totals: Sequence[PeriodTotalRow],
               operations: Sequence[OperationDelta]) -> None:
        if events:  # COPY: a tenth of a multi-row INSERT's time for 1,000 events (its 20,000 parameters)
            cursor: Any = tx.cursor()  # a psycopg cursor (Tx names SQLite's connection type)
            with cursor.copy(f"COPY meter_events ({_EVENT_COLUMNS}, status, attempts) FROM STDIN") as copy:
                for row in events:
                    copy.write_row((*row, _PENDING_TEXT, 0))
        latest = {(row.customer_id, row.period_start, row.meter): row for row in totals}  # one row per key
        if latest:  # one upsert from arrays, in key order: every batch locks the totals in one order
            tx.execute(
                f"INSERT INTO meter_usage_totals ({_TOTAL_COLUMNS}) SELECT * FROM unnest(%s::text[], %s::bigint[], "
                "%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::bigint[], %s::bigint[], "
                "%s::text[], %s::bigint[]) "
                "ON CONFLICT (customer_id, period_start, meter) DO UPDATE SET events = excluded.events, "
                "raw_units = excluded.raw_units, weighted_units = excluded.weighted_units, last_at = excluded.last_at, "
                "tier = COALESCE(meter_usage_totals.tier, excluded.tier), "
                "allowance = COALESCE(meter_usage_totals.allowance, excluded.allowance), "
                "overage_rate = COALESCE(meter_usage_totals.overage_rate, excluded.overage_rate)",
                array_columns([latest[key] for key in sorted(latest)], 11))
        added: dict[tuple[str, int, str, str], list[int]] = {}
        for delta in operations:
            sums = added.setdefault((delta.customer_id, delta.period_start, delta.meter, delta.operation), [0] * 5)
            for index, value in enumerate(delta[3:8]):
                sums[index] += value
        if added:
            tx.execute(
                "INSERT INTO meter_usage_by_operation (customer_id, period_start, meter, operation, events, raw_units, "
                "weighted_units, overage_units, cost_cents) SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], "
                "%s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) "
                "ON CONFLICT (customer_id, period_start, meter, operation) DO UPDATE SET "
                "events = meter_usage_by_operation.events + excluded.events, "
                "raw_units = meter_usage_by_operation.raw_units + excluded.raw_units, "
                "weighted_units = meter_usage_by_operation.weighted_units + excluded.weighted_units, "
                "overage_units = meter_usage_by_operation.overage_units + excluded.overage_units, "
                "cost_cents = meter_usage_by_operation.cost_cents + excluded.cost_cents",
                array_columns([(*key, *sums) for key, sums in sorted(added.items())], 9))

    # --- reads -----------------------------------------------------------------------------------------------

    def period_total(self, customer: str, period_start: int,
                     meter: str = DEFAULT_METER) -> PeriodTotalRow | None:
        row = self._core.query_one(
            f"SELECT {_TOTAL_COLUMNS} FROM meter_usage_totals WHERE customer_id = %s AND period_start = %s "
            "AND meter = %s", (customer, period_start, meter))
        return None if row is None else PeriodTotalRow(**row)

    def latest_value(self, customer: str, start: int, end: int, meter: str) -> int | None:
        row = self._core.query_one(
            "SELECT weighted_units FROM meter_events WHERE timestamp >= %s AND timestamp < %s AND customer_id = %s "
            "AND meter = %s AND status = ANY(%s) ORDER BY timestamp DESC, id DESC LIMIT 1",
            (start, end, customer, meter, _statuses(COUNTED)))
        return None if row is None else int(row["weighted_units"])

    def month_usage(self, customer: str, start: int, end: int, custom: str,
                    meter: str = DEFAULT_METER) -> list[OperationUsageRow]:
        counted = "CASE WHEN status = %s THEN 0 ELSE {} END"
        return [OperationUsageRow(**row) for row in self._core.query(
            "SELECT COALESCE(operation, %s) AS operation, COUNT(*) AS events, "  # failed ones counted, not priced
            f"SUM({counted.format('raw_units')})::bigint AS raw_units, "
            f"SUM({counted.format('weighted_units')})::bigint AS weighted_units, "
            f"SUM({counted.format('overage_units')})::bigint AS overage_units, "
            f"SUM({counted.format('cost_cents')})::bigint AS cost_cents, "
            "COUNT(*) FILTER (WHERE status = %s) AS pending, COUNT(*) FILTER (WHERE status = %s) AS failed, "
            "MAX(id) AS last_id FROM meter_events WHERE timestamp >= %s AND timestamp < %s AND customer_id = %s "
            "AND meter = %s GROUP BY 1 ORDER BY 1",
            (custom, *[str(_FAILED)] * 4, str(_PENDING), str(_FAILED), start, end, customer, meter))]

    def recent_failures(self, window: int, limit: int) -> list[FailureRow]:
        return [FailureRow(**row) for row in self._core.query(
            "SELECT COALESCE(last_error, 'unknown') AS reason, COUNT(*) AS events, MAX(failed_at) AS last_at FROM "
            "(SELECT last_error, failed_at FROM meter_events WHERE status = %s ORDER BY id DESC LIMIT %s) AS recent "
            "GROUP BY 1 ORDER BY 2 DESC, 3 DESC LIMIT %s", (str(_FAILED), window, limit))]

    # --- task slots ------------------------------------------------------------------------------------------

    def live_slots(self, tx: Tx, customer: str, now: int) -> list[SlotRow]:
        # Every slot decision (take, renew, free) starts here: the customer's slot lock makes two instances' decisions
        # take turns, so the last free slot goes to one of them (no row to lock while a customer holds no slot).
        PostgresDialect.lock(tx, f"slots:{customer}")
        tx.execute("DELETE FROM task_slots WHERE customer_id = %s AND expires_at <= %s", (customer, now))
        return [SlotRow(*row) for row in tx.execute(
            "SELECT task_id, acquired_at, expires_at, lease_hash FROM task_slots WHERE customer_id = %s "
            "ORDER BY expires_at, task_id", (customer,))]

    # --- the flusher -----------------------------------------------------------------------------------------

    def next_pending(self, after_id: int, upto_id: int, limit: int) -> list[PendingEvent]:
        """Lease the batch to this instance (one autocommitted statement: nothing stays open over the Stripe call):
        events no other instance holds a live lease on; rows another instance is leasing this instant are skipped."""
        rows = self._core.query(
            f"UPDATE meter_events SET lease_owner = %s, lease_until = {_PG_NOW_MS} + %s WHERE id IN ("
            "SELECT id FROM meter_events WHERE status = %s AND id > %s AND id <= %s AND (lease_owner IS NULL OR "
            f"lease_owner = %s OR lease_until <= {_PG_NOW_MS}) ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) "
            "RETURNING id, stripe_identifier AS identifier, customer_id, event_name, weighted_units, timestamp, tier",
            (self.owner, self.lease_ms, str(_PENDING), after_id, upto_id, self.owner, limit))
        return sorted((PendingEvent(**row) for row in rows), key=lambda row: row.id)

    def mark_sent(self, tx: Tx, event_ids: Sequence[int], sent_at: str) -> None:
        if event_ids:
            tx.execute(
                "UPDATE meter_events SET status = %s, attempts = attempts + 1, sent_at = %s, last_error = NULL "
                f"WHERE status = ANY(%s) AND id = ANY(%s) AND {_PG_MINE}",
                (str(_SENT), sent_at, _statuses(_TO_SENT), list(event_ids), self.owner))

    def mark_failed(self, tx: Tx, failures: Sequence[tuple[int, str]], failed_at: int, *, attempted: bool) -> None:
        if failures:
            _pg_fail(tx, dict(failures), failed_at, int(attempted), _TO_FAILED, owner=self.owner)

    def note_attempt(self, tx: Tx, event_ids: Sequence[int], error: str | None) -> None:
        if event_ids:
            tx.execute(  # the lease is given up: the next flush of any instance may try again
                "UPDATE meter_events SET attempts = attempts + 1, last_error = %s, lease_owner = NULL, "
                f"lease_until = NULL WHERE id = ANY(%s) AND {_PG_MINE}", (error, list(event_ids), self.owner))

    def fail_reported(self, tx: Tx, reports: Sequence[tuple[str, str]], failed_at: int) -> int:
        reasons = dict(reports)
        if not reasons:
            return 0
        ids = {event_id: reasons[stripe_id] for stripe_id, event_id in _by_stripe_identifier(tx, list(reasons))}
        return _pg_fail(tx, ids, failed_at, 0, _REPORTED) if ids else 0

    def record_flush(self, tx: Tx, flush: FlushRow, keep: int) -> None:
        row = tx.execute(
            "INSERT INTO meter_flushes (started_at, finished_at, sent, failed, pending_after, transport, error) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (flush.started_at, flush.finished_at, flush.sent, flush.failed, flush.pending_after, flush.transport,
             flush.error)).fetchone()
        tx.execute("DELETE FROM meter_flushes WHERE id <= %s", (int(row[0]) - keep,))

    # --- P2P invoices ----------------------------------------------------------------------------------------


def _pg_fail(tx: Tx, reasons: dict[int, str], failed_at: int, attempts: int, counted: Sequence[EventStatus], *,
             owner: str | None = None) -> int:
    """Mark events failed and take them out of their period's counted usage. The UPDATE is the claim: it locks each
    event and re-checks its status after any concurrent change commits (READ COMMITTED), so an event two instances
    fail at once leaves the counted usage once, by the one whose UPDATE returned it. With `owner` (the flusher's
    marks) only events not leased by another instance change."""
    assert set(counted) <= COUNTED
    event_ids = sorted(reasons)
    changed = tx.execute(
        "UPDATE meter_events AS m SET status = %s, attempts = m.attempts + %s, last_error = f.reason, failed_at = %s "
        "FROM unnest(%s::bigint[], %s::text[]) AS f(id, reason) WHERE m.id = f.id AND m.status = ANY(%s) "
        "AND (%s::text IS NULL OR m.lease_owner IS NULL OR m.lease_owner = %s) "
        "RETURNING m.customer_id, m.period_start, m.meter, COALESCE(m.operation, 'custom'), m.raw_units, "
        "m.weighted_units",
        (str(_FAILED), attempts, failed_at, event_ids, [reasons[i] for i in event_ids], _statuses(counted),
         owner, owner)).fetchall()
    lasts: set[tuple[str, int, str]] = set()
    if changed:  # a `last` meter's total (last_at set) is recomputed, not subtracted from (see _uncount)
        lasts = {(row[0], row[1], row[2]) for row in tx.execute(
            "SELECT customer_id, period_start, meter FROM meter_usage_totals WHERE last_at IS NOT NULL AND "
            "(customer_id, period_start, meter) IN (SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[]))",
            [list(column) for column in zip(*{row[:3] for row in changed}, strict=True)])}
    totals: dict[tuple[str, int, str], list[int]] = {}
    operations: dict[tuple[str, int, str, str], list[int]] = {}
    for customer, start, meter, operation, raw, weighted in changed:
        if (customer, start, meter) in lasts:
            raw = weighted = 0
        for sums in (totals.setdefault((customer, start, meter), [0, 0, 0]),
                     operations.setdefault((customer, start, meter, operation), [0, 0, 0])):
            sums[0] += 1
            sums[1] += raw
            sums[2] += weighted
    if totals:  # sorted: two transactions lock the counters in one order
        cursor = tx.cursor()  # a psycopg connection has no executemany; its cursors do
        cursor.executemany(
            "UPDATE meter_usage_totals SET events = events - %s, raw_units = raw_units - %s, weighted_units = "
            "weighted_units - %s WHERE customer_id = %s AND period_start = %s AND meter = %s",
            [(*sums, *key) for key, sums in sorted(totals.items(), key=lambda item: (item[0][0], item[0][1] or 0,
                                                                                    item[0][2]))])
        cursor.executemany(
            "UPDATE meter_usage_by_operation SET events = events - %s, raw_units = raw_units - %s, weighted_units = "
            "weighted_units - %s WHERE customer_id = %s AND period_start = %s AND meter = %s AND operation = %s",
            [(*sums, *key) for key, sums in sorted(operations.items(),
                                                   key=lambda item: (item[0][0], item[0][1] or 0, *item[0][2:]))])
        _relast(tx, lasts)
    return len(changed)


__all__ = [
    "COUNTED", "TRANSITIONS", "EventStatus", "EventsExist", "FailureRow", "FlushRow", "MeterEventRow", "MeteringStore",
    "OpenP2PPeriod", "OperationDelta", "OperationUsageRow", "PendingEvent", "PeriodTerms", "PeriodTotalRow",
    "PostgresMeteringStore", "SlotRow", "SqliteMeteringStore", "sources",
]
