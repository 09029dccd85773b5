"""Usage metering: durable meter events, task multipliers, tier allowances and overage, concurrency slots.

Meters. Every event is on one meter of the pricing file (`meter`, default luc_tokens; Pricing.meter finds one by id
or Stripe event name, else InvalidInput naming the field and the meters). A period's running total, its terms and
its operation counters are per (customer, period, meter): a meter's terms are the period's tier with the meter's
allowance and rate (LUC's are the tier's own). Only luc_tokens is weighted by the task multipliers. A `count` meter
counts events (units 1 each); a `last` meter's total is its latest value by timestamp (`_last`: `last_at` on its
totals row; an earlier-stamped event changes nothing, a later one replaces the value, and what an event costs is
the rise of the period's charge, 0 when it falls); `sum` is LUC's arithmetic. Each event is stored with its
meter's Stripe event name, which the flusher sends it under.

Recording. `record` validates everything it can without data (units, operation or multiplier, identifier, Stripe's
timestamp window, the customer), then hands the event to the one writer. Inside the writer's transaction the event
row (UNIQUE identifier, status pending) and what it adds to its period's running total (`meter_usage_totals`, one row
per customer, usage period and meter) and per-operation counters (`meter_usage_by_operation`) are written together
(on SQLite the event row alone, which every read counts until the writer folds it in: store/metering.py, "Unfolded
events"), so the answer (period usage,
remaining allowance, overage, cost) is computed from a total no other write can interleave with, and never from a
SUM over the period's events. The caller hears back only after COMMIT.

Sharing writer jobs. The store already commits every job that has gathered in one transaction; record goes one step
further: each event is an item of one batch function (`store.write_item(self._apply, event)`), so the events the
writer finds queued go to `_apply` together: one read of their period totals (from the writer's memory on SQLite),
one multi-row insert of the events, which also finds any recorded before (on SQLite; else one lookup of their
identifiers first), and one of what they add to their totals. Each event is still in exactly one call with its
totals, and a replay or conflict is an answer computed in the call, not an exception, so one event never undoes
another: a batch the insert finds an event of is decided again, looking its identifiers up first.

Batches. `record_many` (create_meter_events, POST /v1/usage/events) parses each item on its own (MeterEventInput,
strict), checks it as `record` does, asks about each new customer once, and submits every event that passed as one
writer job of one group commit, so the batch's accepted events land together or not at all. Each event's outcome
(accepted, replayed, or refused with its field) is its own; the answer keeps a few numbers per event. The per-event
work is kept small (bench/ingest.py (c)): an event of plain str and int fields on the default meter, the common
shape, is taken as it is when every check would pass it unchanged (anything else goes through the model and the
checks, which name the field); the job is trusted (no savepoint: `_apply` decides everything before its one append,
and a failure after writing makes the writer undo and rerun the transaction a savepoint per job); the writer's turn
answers each event's few numbers, and the batch builds its answer after COMMIT, outside it, constructing the models
from the values it made (`trusted`) rather than validating them again. The collector is the other cost: drafts,
events and rows are plain tuples of plain values (it stops tracking those at its first pass), the results share one
fields set, and what a batch needs on the way is gone before the write, so the batches queued for the writer are not
promoted to the old generation, whose full collections scan the whole heap (tens of ms each).

Indexes. Events are indexed by identifier, status and time, never by customer: an index with the customer in its
key scatters each commit's entries over as many pages as the batch has customers, which made COMMIT about five
times dearer (bench/metering.py). Per-customer reads go through the totals tables instead.

Idempotency. The identifier is the event's key within its customer (UNIQUE (identifier, customer_id), written in the
event's own transaction): one customer's identifier never blocks or replays another's. The same customer and
identifier with the same content (units, operation or multiplier, agent, metadata, and the timestamp when one is
given) returns the first answer with `replayed: true`, rebuilt from the numbers stored with the event; other content
is IdempotencyConflict. Stripe deduplicates identifiers account-wide, so the event goes to Stripe under
`stripe_identifier(customer, identifier)`.

Money. Weighted units = raw x multiplier, rounded half up (integers throughout). Overage is the period's usage
beyond the tier's allowance (P2P: allowance 0, every unit). An event's cost is cost(period overage after it) minus
cost(period overage before it), each rounded half up as Stripe rounds a line total, so the events' costs add up to
the period's overage charge exactly. Stripe receives the weighted units (the meter sums them); the tier's metered
price makes the allowance free and charges the overage rate.

Periods. `period_of(customer, t)` gives the usage period containing t and its terms: the subscription period that
contains it (the renewal predicted before its webhook arrives; a trial is one free period), or P2P's UTC calendar
month. The answer, the summary, the quote and the flush all use it, so each period's summary is one invoice line. A
period keeps the terms it was opened with (tier, allowance, rate, written on its totals row by its first event), and
usage stamped before the customer's current period is refused: that period is closed (invoiced, or it predates the
subscription). `summary("current")` is the current period's counted total (events Stripe refused for good are taken
out when marked failed) priced on its terms; `summary("YYYY-MM")` sums the events whose timestamps fall in that
calendar month (a scan of the time index; for a subscription period the month may span two periods, and its overage
is what those events incurred).

Customers. An unknown customer is refused. A customer is asked about once: the answer is kept in
`meter_customers` (customers known from subscriptions count as verified), so the hot path never calls Stripe twice
for one customer; a "does not exist" answer is remembered for a minute, in memory only.

Slots. A concurrency slot is a row of `task_slots`; counting the customer's live slots and inserting the new one is
one writer job, so two racing acquires cannot both take the last slot. Expired slots are ignored and deleted by the
next acquire or release of that customer. A slot belongs to the agent that took it: acquiring answers a random lease
(kept as its SHA-256), and only that lease renews the slot (the same task id again: expiry = now + ttl) or releases
it. A refusal at the limit gives counts and the first expiry, never other tasks' ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import InvalidOperation
from typing import Any, Final

from pydantic import ValidationError

from ..errors import BillingError, IdempotencyConflict, InvalidInput, LimitReached, NotFound, Refused
from ..store import Store, Tx, dumps, new_id, utc_now
from ..store.metering import (
    EventsExist,
    EventStatus,
    MeterEventRow,
    OperationDelta,
    PeriodTotalRow,
    SlotRow,
)
from .ceiling import Ceiling
from .metering_models import (
    BatchEventError,
    BatchEventOutcome,
    BatchTotals,
    EventCounts,
    FailureReason,
    MeterEventBatchResult,
    MeterEventInput,
    MeterEventResult,
    MeteringStatus,
    OperationUsage,
    SlotRelease,
    TaskSlot,
    UsageQuote,
    UsageSummary,
    trusted,
)
from .tiers import (
    DAY,
    LUC_METER,
    MAX_MULTIPLIER_MILLI,
    MIN_MULTIPLIER_MILLI,
    Meter,
    Pricing,
    Tier,
    UsagePeriod,
    cost_cents,
    marginal_overage,
    month_bounds,
    to_milli,
    weighted_units,
)

STRIPE_MAX_AGE = 35 * DAY  # Stripe accepts meter events from the past 35 days ...
STRIPE_MAX_AHEAD = 300  # ... and at most 5 minutes ahead
RECORD_MARGIN = 600  # we accept 10 minutes less than Stripe's 35 days, so the flusher still has time to deliver
MAX_IDENTIFIER = 100  # Stripe's limit
MAX_TEXT = 200
MAX_METADATA = 4000  # characters of canonical JSON
MAX_UNITS = 10**12  # per event; weighted totals stay far below SQLite's 2**63
MAX_SLOT_TTL = 7 * DAY
MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z: the last second a date formatter can show
MAX_BATCH = 1000  # events per record_many call: one writer job, so a batch is written whole or not at all
UNKNOWN_CUSTOMER_TTL = 60.0
CUSTOM = "custom"  # the operation label of events recorded with an explicit multiplier
_REFUSED = ("index", "status", "identifier", "error")  # the fields a refusal gives (the rest are their defaults)
_COMMON_FIELDS = frozenset({"customer", "units", "operation", "identifier", "agent_id"})  # what `_placed` takes
_UNPLACED = InvalidInput("not placed yet")  # the place of an event whose customer is being verified (never answered)

_Draft = tuple[str, str, str | None, int, int, str | None, int, str | None, bool, str]
"""An event's fields, each checked, not yet placed in a period (that needs the customer verified): (identifier,
customer, operation, multiplier_milli, raw_units, agent_id, timestamp, metadata, timestamp_given, meter id). A plain
tuple, as the event it becomes: the cheapest record to make and to unpack, and the collector stops tracking it."""

_ID: Final = 0  # where a draft and an event hold their identifier
_CUSTOMER: Final = 1  # ... and their customer
_START: Final = 9  # where an event holds its period's start
_METER: Final = 13  # ... and its meter id

_Terms = tuple[str, int, int]
"""A period's terms as the writer needs them: (tier id, allowance, overage rate)."""
_NO_TERMS: Final = (None, None, None)  # a totals row's terms before terms were kept
_new_tuple: Final = tuple.__new__

_Place = tuple[int, int, _Terms, str | None, int]
"""Where a batch's common events of one customer go (`_placed`): (period start, period end, terms, the prefix of
their Stripe identifiers, None when `stripe_identifier` hashes them, the end of the moments it holds for: see
UsagePeriod.holds_until)."""

_Current = dict[tuple[str, str], tuple[UsagePeriod, _Terms]]  # (customer, meter) -> its current period and terms
_Places = dict[str, _Place]  # customer -> where its common events go
REUSE_SECONDS = 1.0  # how long a customer's period and terms are reused across batches at most (see `placements`)
REUSE_MAX = 100_000  # customers whose periods are kept for reuse; past it, they are all asked again

_Event = tuple[str, str, str | None, int, int, int, str | None, int, str | None, int, int, _Terms, bool, str, str]
"""A validated event waiting for the writer: (identifier, customer, operation, multiplier_milli, raw_units,
weighted_units, agent_id, timestamp, metadata, period_start, period_end, terms, timestamp_given, meter id,
stripe_identifier), the first nine in MeterEventRow's order. A plain tuple of str, int, bool and None, not an object:
the collector stops tracking such a tuple at its first pass, so the events of the batches queued for the writer
(thousands at a time) are never promoted to the old generation, and promotions are what make it scan the whole heap
(a full collection of the server's heap costs tens of ms; bench/ingest.py (c): several us an event)."""


@dataclass(slots=True)
class _Total:
    """A row of meter_usage_totals (a period), as the writer updates it."""

    period_end: int = 0
    events: int = 0
    raw_units: int = 0
    weighted_units: int = 0
    changed: bool = False
    terms: _Terms | None = None  # the period's tier, allowance and rate, fixed by its first event
    last_at: int | None = None  # a `last` meter's: the timestamp of the value the total holds


def stripe_identifier(customer: str, identifier: str) -> str:
    """The identifier an event is sent to Stripe under. Stripe deduplicates identifiers across the whole account,
    ours are per customer, so it is `<customer>:<identifier>` (a `cus_` id has no colon, so the pair is unambiguous),
    or, when that is not a plain Stripe customer id or is over Stripe's 100 characters, `h_` + the SHA-256 of both."""
    scoped = f"{customer}:{identifier}"
    if len(scoped) <= MAX_IDENTIFIER and _plain_customer(customer):
        return scoped
    return "h_" + hashlib.sha256(f"{customer}\x1f{identifier}".encode()).hexdigest()


def _plain_customer(customer: str) -> bool:
    """Whether `customer` is a plain Stripe customer id (`cus_` and letters or digits), which `stripe_identifier`
    scopes an identifier with as it stands."""
    return customer.startswith("cus_") and customer[4:].isalnum() and customer.isascii()


_INPUT_FIELDS = ", ".join(MeterEventInput.model_fields)
# The fields of an event that strict parsing passes through unchanged when each is exactly str or int (or None):
# `_draft_of` takes such an event as it is (multiplier and metadata always go through MeterEventInput)
_PLAIN_FIELDS = frozenset({"customer", "units", "operation", "identifier", "timestamp", "agent_id", "meter"})


def _input_error(error: ValidationError) -> InvalidInput:
    """The first thing wrong with an event's fields, naming the field (`metadata.key` for a nested one)."""
    first = error.errors(include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    name = ".".join(loc) or None
    if first["type"] == "missing":
        return InvalidInput(f"{name} is required", param=name)
    if first["type"] == "extra_forbidden":
        return InvalidInput(f"unknown field {name!r}: an event takes {_INPUT_FIELDS}", param=name)
    shown = repr(first.get("input"))
    return InvalidInput(f"{name}: {first['msg'].lower()}, not {shown[:60]}", param=name)


def _given_identifier(item: Any) -> str | None:
    """The identifier a refused event gave, when it gave a usable one (to match results to events)."""
    ident = item.get("identifier") if isinstance(item, Mapping) else None
    return ident if isinstance(ident, str) and 0 < len(ident) <= MAX_IDENTIFIER else None


def _brief(row: MeterEventRow, replayed: bool) -> tuple[str, int, int, int, int, bool]:
    """What a batch answers for an event recorded now or before, as a tuple of plain values: the collector stops
    tracking it at its first pass, so a batch's answers waiting for their caller are never promoted (the row would
    be, and then make a full collection due sooner)."""
    return (row.identifier, row.weighted_units, row.cost_cents, row.period_units_after, row.allowance, replayed)


def _last(total: _Total, raw: int, weighted: int, when: int, terms: _Terms) -> tuple[int, int, int]:
    """A `last` meter's event: (the period's value after it, overage units and cents it adds). The period is billed
    on its latest value by timestamp (a tie: the later recorded, as Stripe takes them in the order sent), so an event
    stamped before the value the total holds changes nothing; a later one replaces the value. What it adds is the
    rise of the period's overage and charge, 0 when it lowers them (the summary prices the value itself)."""
    before = total.weighted_units
    total.events += 1
    total.changed = True
    if total.last_at is not None and when < total.last_at:
        return before, 0, 0
    total.raw_units, total.weighted_units, total.last_at = raw, weighted, when
    return weighted, *_rise(before, weighted, terms[1], terms[2])


def _rise(before: int, after: int, allowance: int, rate: int) -> tuple[int, int]:
    """(overage units, cents) by which a `last` meter's period value going from `before` to `after` raises its
    overage and charge (0 when it lowers them)."""
    over_before, over_after = max(0, before - allowance), max(0, after - allowance)
    return max(0, over_after - over_before), max(0, cost_cents(over_after, rate) - cost_cents(over_before, rate))


def _key(tier: Tier) -> _Terms:
    """The terms of a period priced at `tier`, as the writer keeps them."""
    return tier.id, tier.tokens_per_month, tier.overage_rate


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class MeteringService:
    def __init__(
        self,
        store: Store,
        pricing: Pricing,
        *,
        tier_of: Callable[[str], Tier],
        period_of: Callable[[str, int], UsagePeriod | tuple[int, int]],
        customer_exists: Callable[[str], Awaitable[bool]],
        clock: Callable[[], float] = time.time,
        ceiling: Ceiling | None = None,
        placements: Callable[[], int] | None = None,
    ) -> None:
        """`placements`, when given, is a number that changes whenever `tier_of` or `period_of` may answer otherwise
        than before for a customer already asked (the subscription service's `placement_version`): while it stays
        the same, a customer's current period and terms are reused from one batch to the next for up to
        REUSE_SECONDS (then asked again), each only while the time is within that period and before the moment the
        period says its answer changes (`UsagePeriod.until`). Without it every batch asks for each of its
        customers."""
        self._store = store
        self._pricing = pricing
        self._ceiling = ceiling or Ceiling()
        self._tier_of = tier_of
        self._period_of = period_of
        self._customer_exists = customer_exists
        self._clock = clock
        self._known: set[str] = set()
        self._unknown: dict[str, float] = {}
        self._verifying: dict[tuple[asyncio.AbstractEventLoop, str], asyncio.Task[bool]] = {}
        self._terms_cache: dict[tuple[str, int, int], Tier] = {}
        self._placements = placements
        self._reused: tuple[int, float, _Current, _Places] | None = None  # version, until, current, places
        try:  # the ceiling on what an event's units can cost, known once (None: each event asks, and is told why)
            self._ceiling_units: int | None = self._ceiling.limit(pricing.currency, "units")
        except BillingError:
            self._ceiling_units = None
        luc = pricing.meters[LUC_METER]
        self._plain_luc = luc.weighted and luc.aggregation == "sum"  # the common event's meter: `_placed` takes it
        # the operation names `_multiplier` finds as they stand (already stripped and lower case): `_placed` looks an
        # operation up here first, and normalizes only one it does not find
        self._exact_operations = {name: milli for name, milli in pricing.multipliers.items()
                                  if name == name.strip().lower()}

    # --- validation (no data needed) ---------------------------------------------------------------------------

    @staticmethod
    def _customer(customer: Any) -> str:
        if not isinstance(customer, str) or not customer.strip():
            raise InvalidInput("customer is empty: pass the Stripe customer id (cus_...)", param="customer")
        if customer != customer.strip() or len(customer) > 255:
            raise InvalidInput(f"customer {customer[:60]!r} is not a Stripe customer id (cus_..., no spaces, at most "
                               "255 characters)", param="customer")
        return customer

    @staticmethod
    def _units(units: Any, meter: Meter | None = None) -> int:
        if not _is_int(units):
            raise InvalidInput(f"units must be a whole number of {meter.unit if meter else 'LUC unit'}s, not "
                               f"{units!r}", param="units")
        if meter is not None and meter.aggregation == "last" and units < 0:
            raise InvalidInput(f"units is {units}: meter {meter.id} bills the last value reported in a period "
                               f"(aggregation last), which cannot be negative: report the current total of "
                               f"{meter.unit}s, 0 or more", param="units")
        if meter is not None and meter.aggregation == "last" and units == 0:
            return 0
        if meter is not None and meter.aggregation == "count" and units != 1:
            raise InvalidInput(f"units is {units}: meter {meter.id} counts events (aggregation count), each one "
                               f"{meter.unit}: send units 1, one event per {meter.unit}", param="units")
        if units <= 0:
            raise InvalidInput(f"units is {units}: report a positive number of units (the tokens the operation used)",
                               param="units")
        if units > MAX_UNITS:
            raise InvalidInput(f"units is {units}, above the {MAX_UNITS:,} allowed in one event: split the usage into "
                               "several events", param="units")
        return int(units)

    def _multiplier(self, operation: Any, multiplier: Any, meter: Meter | None = None) -> tuple[str | None, int]:
        """(operation, multiplier in milli): an operation type from the pricing, or an explicit multiplier, or 1.0x.
        Only a weighted meter (luc_tokens) takes either."""
        if meter is not None and not meter.weighted and (operation is not None or multiplier is not None):
            raise InvalidInput(f"meter {meter.id} is not weighted by task multipliers (only luc_tokens is): leave "
                               "operation and multiplier out", param="operation" if operation is not None
                               else "multiplier")
        if operation is not None and multiplier is not None:
            raise InvalidInput("give operation or multiplier, not both: the operation's multiplier comes from the "
                               "pricing file", param="multiplier")
        if operation is not None:
            name = operation.strip().lower() if isinstance(operation, str) else operation
            milli = self._pricing.multipliers.get(name) if isinstance(name, str) else None
            if milli is None:
                valid = ", ".join(f"{op} ({m / 1000:g}x)" for op, m in self._pricing.multipliers.items())
                raise InvalidInput(f"unknown operation type {operation!r}: valid ones are {valid}; or pass an explicit "
                                   "multiplier within 1.0-3.0 instead", param="operation")
            assert isinstance(name, str)
            return name, milli
        if multiplier is None:
            return None, 1000
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float | str):
            raise InvalidInput(f"multiplier must be a number within 1.0-3.0, not {multiplier!r}", param="multiplier")
        try:
            milli = to_milli(multiplier)
        except (ValueError, InvalidOperation):
            raise InvalidInput(f"multiplier {multiplier!r} must be a number within 1.0-3.0 with at most 3 decimals",
                               param="multiplier") from None
        if not MIN_MULTIPLIER_MILLI <= milli <= MAX_MULTIPLIER_MILLI:
            raise InvalidInput(f"multiplier {multiplier} is outside 1.0-3.0: pass a multiplier in that range, or an "
                               "operation type", param="multiplier")
        return None, milli

    @staticmethod
    def _identifier(identifier: Any) -> str:
        if identifier is None:
            return new_id("luc")
        if not isinstance(identifier, str) or not identifier:
            raise InvalidInput("identifier must be a non-empty string (or omit it to have one generated)",
                               param="identifier")
        if len(identifier) > MAX_IDENTIFIER:
            raise InvalidInput(f"identifier is {len(identifier)} characters; Stripe allows at most {MAX_IDENTIFIER}: "
                               "use a shorter unique id (a UUID is 36)", param="identifier")
        return identifier

    @staticmethod
    def _timestamp(timestamp: Any, now: float) -> int:
        if not _is_int(timestamp):
            raise InvalidInput(f"timestamp must be whole epoch seconds, not {timestamp!r}", param="timestamp")
        oldest, latest = int(now) - STRIPE_MAX_AGE + RECORD_MARGIN, int(now) + STRIPE_MAX_AHEAD
        if not -MAX_EPOCH <= timestamp <= MAX_EPOCH:  # no date to show: 2**63 overflows every formatter
            raise InvalidInput(
                f"timestamp {str(timestamp)[:30]} is not epoch seconds of a date Stripe accepts (within the past 35 "
                "days and at most 5 minutes ahead): pass whole seconds since 1970, or omit timestamp to use now",
                param="timestamp")
        if timestamp < oldest:
            age = (int(now) - timestamp) / DAY
            raise InvalidInput(
                f"timestamp {timestamp} ({_iso(timestamp)}) is {age:.1f} days ago: Stripe accepts meter events from "
                f"the past 35 days only (this service: since {_iso(oldest)}); record usage when it happens, or omit "
                "timestamp to use now", param="timestamp")
        if timestamp > latest:
            raise InvalidInput(
                f"timestamp {timestamp} ({_iso(timestamp)}) is {timestamp - int(now)} s in the future: Stripe accepts "
                "at most 5 minutes ahead; check the clock, or omit timestamp to use now", param="timestamp")
        return int(timestamp)

    @staticmethod
    def _text(value: Any, param: str, *, required: bool = False, limit: int = MAX_TEXT) -> str | None:
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"{param} must be a non-empty string", param=param)
        if len(value) > limit:
            raise InvalidInput(f"{param} is {len(value)} characters; at most {limit} are allowed", param=param)
        return value

    @staticmethod
    def _metadata(metadata: Any) -> str | None:
        if metadata is None:
            return None
        if not isinstance(metadata, Mapping) or not all(isinstance(key, str) for key in metadata):
            raise InvalidInput("metadata must be an object with string keys", param="metadata")
        text = dumps(dict(metadata))
        if len(text) > MAX_METADATA:
            raise InvalidInput(f"metadata is {len(text)} characters as JSON; at most {MAX_METADATA} are kept: send "
                               "less", param="metadata")
        return text

    def _period(self, customer: str, timestamp: int) -> UsagePeriod:
        found = self._period_of(customer, timestamp)
        period = found if isinstance(found, UsagePeriod) else UsagePeriod(int(found[0]), int(found[1]))
        if not period.start <= timestamp < period.end:
            raise RuntimeError(f"period_of({customer!r}, {timestamp}) gave [{period.start}, {period.end}), which does "
                               "not contain it")
        return period

    def _terms(self, customer: str, period: UsagePeriod, meter: Meter) -> Tier:
        """The tier, allowance and rate of a meter's period with no stored terms yet: the period's own tier (the
        customer's when the period does not say) on the meter's terms, at rate 0 in a free (trial) period."""
        tier = meter.terms(self._tier_of(customer) if period.tier is None else period.tier)
        return tier.model_copy(update={"overage_rate": 0}) if period.free else tier

    def _stored_terms(self, tier: str | None, allowance: int | None, rate: int | None) -> Tier | None:
        """The terms a period's totals row was opened with (None for rows written before terms were kept)."""
        if tier is None or allowance is None or rate is None:
            return None
        key = (tier, allowance, rate)
        terms = self._terms_cache.get(key)
        if terms is None:
            base = self._pricing.tiers.get(tier, self._pricing.p2p)
            terms = base.model_copy(update={"id": tier, "tokens_per_month": allowance, "overage_rate": rate})
            self._terms_cache[key] = terms
        return terms

    def _opened(self, customer: str, period: UsagePeriod, meter: Meter) -> tuple[Tier, int, int]:
        """A meter's period: its terms and its counted usage (weighted units, events) from its totals row."""
        row = self._store.metering.period_total(customer, period.start, meter.id)
        if row is None:
            return self._terms(customer, period, meter), 0, 0
        terms = self._stored_terms(row.tier, row.allowance, row.overage_rate)
        return terms or self._terms(customer, period, meter), row.weighted_units, row.events

    # --- customers ---------------------------------------------------------------------------------------------

    async def _ensure_customer(self, customer: str) -> None:
        if customer in self._known:
            return
        refused_at = self._unknown.get(customer)
        if refused_at is not None and self._clock() - refused_at < UNKNOWN_CUSTOMER_TTL:
            raise self._unknown_customer(customer)
        key = (asyncio.get_running_loop(), customer)
        task = self._verifying.get(key)
        if task is None:  # concurrent first sightings of one customer share one question
            task = asyncio.ensure_future(self._verify(customer))
            self._verifying[key] = task
            task.add_done_callback(lambda _: self._verifying.pop(key, None))
        if not await asyncio.shield(task):
            raise self._unknown_customer(customer)

    async def _verify(self, customer: str) -> bool:
        if not self._store.metering.is_known_customer(customer):
            if not await self._customer_exists(customer):
                self._unknown[customer] = self._clock()
                return False
            now = int(self._clock())
            await self._store.write(lambda tx: self._store.metering.remember_customer(tx, customer, now))
        self._known.add(customer)
        self._unknown.pop(customer, None)
        return True

    @staticmethod
    def _unknown_customer(customer: str) -> NotFound:
        return NotFound(f"customer {customer!r} does not exist in Stripe: create it with create_customer (or check "
                        "the id), then record the usage again", param="customer")

    # --- record ------------------------------------------------------------------------------------------------

    async def record(
        self,
        customer: str,
        units: int,
        *,
        operation: str | None = None,
        multiplier: float | str | None = None,
        identifier: str | None = None,
        timestamp: int | None = None,
        agent_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        meter: str | None = None,
    ) -> MeterEventResult:
        """Record one meter event durably; answer after COMMIT with the period's usage, allowance and overage."""
        now = self._clock()
        draft = self._draft(now, customer, units, operation, multiplier, identifier, timestamp, agent_id, metadata,
                            meter)
        await self._ensure_customer(draft[_CUSTOMER])
        event = self._event(draft, now, self._batch_places()[0])
        row, replayed = await self._store.write_item(self._apply, event)
        return self._result(row, replayed=replayed)  # built here, not in the writer's turn

    def _draft(self, now: float, customer: Any, units: Any, operation: Any, multiplier: Any, identifier: Any,
               timestamp: Any, agent_id: Any, metadata: Any, meter: Any = None) -> _Draft:
        """Everything about an event that needs no data: each field checked, naming it."""
        if (timestamp is None and multiplier is None and metadata is None and meter is None
                and type(customer) is str and type(units) is int and 0 < units <= MAX_UNITS
                and (identifier is None or (type(identifier) is str and 0 < len(identifier) <= MAX_IDENTIFIER))
                and (agent_id is None or (type(agent_id) is str and 0 < len(agent_id) <= MAX_TEXT))
                and customer and len(customer) <= 255 and customer == customer.strip()):
            # the common event of the default meter, each check below passed as it stands (the rest say why not)
            kind = self._pricing.meters[LUC_METER]
            if kind.weighted and kind.aggregation == "sum":
                op = None if operation is None else operation.strip().lower() if type(operation) is str else ""
                milli = 1000 if op is None else self._pricing.multipliers.get(op)
                if milli is not None:
                    return (new_id("luc") if identifier is None else identifier, customer, op, milli, units,
                            agent_id, int(now), None, False, LUC_METER)
        customer = self._customer(customer)
        kind = self._pricing.meter(meter)
        raw = self._units(units, kind)
        op, milli = self._multiplier(operation, multiplier, kind)
        ident = self._identifier(identifier)
        when = int(now) if timestamp is None else self._timestamp(timestamp, now)
        return (ident, customer, op, milli, raw, self._text(agent_id, "agent_id"), when, self._metadata(metadata),
                timestamp is not None, kind.id)

    def _event(self, draft: _Draft, now: float, current: dict[tuple[str, str], tuple[UsagePeriod, _Terms]]) -> _Event:
        """The event of a verified customer's draft: its period and terms, within the money ceiling. `current` keeps
        each customer's current period and its terms (per meter) across a batch: an event inside that period (every
        event without a timestamp) is in it, since a customer's periods do not overlap from the current one on."""
        identifier, customer, operation, milli, raw, agent_id, when, metadata, given, meter = draft
        now_period, terms = self._current(customer, meter, int(now), current)
        if now_period.start <= when < now_period.end:
            period = now_period
        else:
            if when < now_period.start:
                raise InvalidInput(
                    f"timestamp {when} ({_iso(when)}) is before the customer's current usage period, which began at "
                    f"{_iso(now_period.start)}: the period it falls in has ended and been invoiced (or it predates "
                    "the subscription), so this usage could no longer be billed; record usage as it happens, or omit "
                    "timestamp to use now", param="timestamp")
            period = self._period(customer, when)
            terms = _key(self._terms(customer, period, self._pricing.meters[meter]))
        weighted = weighted_units(raw, milli)
        most = cost_cents(weighted, terms[2])
        if self._ceiling_units is None or most > self._ceiling_units:  # else within it: nothing to say
            self._ceiling.check(most, self._pricing.currency, "units",
                                what="the most these units can cost, all at the overage rate")
        return (identifier, customer, operation, milli, raw, weighted, agent_id, when, metadata, period.start,
                period.end, terms, given, meter, stripe_identifier(customer, identifier))

    def _current(self, customer: str, meter: str, now: int,
                 current: dict[tuple[str, str], tuple[UsagePeriod, _Terms]]) -> tuple[UsagePeriod, _Terms]:
        """The customer's current period on `meter` and its terms, found once per batch (`current` keeps them, and
        may have them from an earlier batch: see `_batch_places`)."""
        known = current.get((customer, meter))
        if known is None or not known[0].start <= now < known[0].holds_until:
            period = self._period(customer, now)
            terms = _key(self._terms(customer, period, self._pricing.meters[meter]))
            known = current[(customer, meter)] = (period, terms)
        return known

    async def record_many(self, items: Sequence[Any], *, limit: int = MAX_BATCH) -> MeterEventBatchResult:
        """Record a batch of events, each on its own: accepted, replayed (its identifier already recorded with the
        same content) or refused (with its field and reason). Every item is a mapping with create_meter_event's
        fields (parsed strictly, per event), or a BillingError an adapter already found (CloudEvents). The accepted
        events are written in one writer job (one savepoint of a group commit): all of them durable before the
        answer, or, should the write itself fail, none of them and an error for the batch."""
        if len(items) > limit:
            raise InvalidInput(f"{len(items)} events in one batch; at most {limit} are taken: split it into batches "
                               f"of {limit}", param="events")
        outcomes = await self._prepare(items)
        events = [outcome for outcome in outcomes if type(outcome) is tuple]
        applied: list[Any] = []
        if events:
            # trusted (no savepoint of its own): _apply decides everything before its one append, and should the
            # append fail after writing, the writer undoes the transaction and runs it again a savepoint per job
            applied = await self._store.write(lambda tx: self._apply(tx, events, True), savepoint=False)
        return self._answer(items, outcomes, applied)

    async def _prepare(self, items: Sequence[Any]) -> list[_Event | BillingError]:
        """Each item's event, or why it is refused: parsed, checked, its customer verified (each new one asked
        once), placed in its period. An event of a known customer (nearly all) is placed as soon as it is parsed, so
        its draft is gone at once; what the batch needs on the way is gone before the write: objects that outlive
        a collection are promoted, and promotions are what make the collector scan the whole heap."""
        now = self._clock()
        known = self._known
        current, places = self._batch_places()
        outcomes: list[_Event | BillingError] = []
        waiting: list[tuple[int, _Draft]] = []  # drafts of customers not known yet: placed once they are verified
        placed = self._placed if self._plain_luc else None
        for item in items:
            if placed is not None and type(item) is dict:
                event = placed(item, now, current, places)
                if event is not None:
                    outcomes.append(event)
                    continue
            try:
                draft = self._draft_of(item, now)
                if draft[_CUSTOMER] in known:
                    outcomes.append(self._event(draft, now, current))
                    continue
                waiting.append((len(outcomes), draft))
                outcomes.append(_UNPLACED)
            except BillingError as exc:
                outcomes.append(exc)
        if not waiting:
            return outcomes
        customers = list(dict.fromkeys(draft[_CUSTOMER] for _, draft in waiting))  # each asked once, in order
        verdicts = await asyncio.gather(*(self._ensure_customer(c) for c in customers), return_exceptions=True)
        unknown: dict[str, BillingError] = {}
        for customer, verdict in zip(customers, verdicts, strict=True):
            if isinstance(verdict, BillingError):
                unknown[customer] = verdict
            elif isinstance(verdict, BaseException):
                raise verdict
        for index, draft in waiting:
            try:
                outcomes[index] = unknown.get(draft[_CUSTOMER]) or self._event(draft, now, current)
            except BillingError as exc:
                outcomes[index] = exc
        return outcomes

    def _batch_places(self) -> tuple[_Current, _Places]:
        """The periods and terms a batch (or one event) starts from: none, or, with `placements`, those earlier
        batches found while its number is unchanged, for up to REUSE_SECONDS (a period is taken only for a time
        within it, and before the moment it says its answer changes: `_current` and `_placed` check, by
        UsagePeriod.holds_until). In a batch of a hundred customers each asking once, asking was
        about a third of the batch's checking and placing (bench/ingest.py (c), batches of 100)."""
        if self._placements is None:
            return {}, {}
        version, now = self._placements(), time.monotonic()
        reused = self._reused
        if reused is None or reused[0] != version or reused[1] <= now or len(reused[2]) > REUSE_MAX:
            reused = self._reused = (version, now + REUSE_SECONDS, {}, {})
        return reused[2], reused[3]

    def _placed(self, item: dict[str, Any], now: float, current: dict[tuple[str, str], tuple[UsagePeriod, _Terms]],
                places: dict[str, _Place]) -> _Event | None:
        """The event of an item in the common shape, parsed, checked and placed in one step, or None: anything else
        goes through `_draft_of` and `_event`, which decide it with every check and name the field. The common
        shape: a known customer's event on the default meter (a plain `sum` meter) at the current time, with only
        customer, units, operation, identifier and agent_id, each of exactly str or int (or None) and within its
        bounds, a known operation, units that cannot cost more than the ceiling. Every check of the full path would
        pass it unchanged (a known customer passed `_customer` when it was first verified), and the event is the one
        `_event(_draft(...))` makes; this only skips the draft and the calls between (bench/ingest.py (c)).

        `places` keeps, per customer, what every such event of the batch shares (all are stamped `now`): its period,
        terms and the prefix of its Stripe identifiers, so each event is a few lookups and its own arithmetic."""
        get = item.get
        customer, units, operation, identifier, agent_id = (
            get("customer"), get("units"), get("operation"), get("identifier"), get("agent_id"))
        if not (item.keys() <= _COMMON_FIELDS and type(customer) is str and customer in self._known
                and type(units) is int and 0 < units <= MAX_UNITS
                and (identifier is None or (type(identifier) is str and 0 < len(identifier) <= MAX_IDENTIFIER))
                and (agent_id is None or (type(agent_id) is str and 0 < len(agent_id) <= MAX_TEXT))):
            return None
        if operation is None:
            milli: int | None = 1000
        elif type(operation) is str:
            milli = self._exact_operations.get(operation)
            if milli is None:
                operation = operation.strip().lower()
                milli = self._pricing.multipliers.get(operation)
        else:
            milli = None
        if milli is None:  # an operation to refuse
            return None
        place = places.get(customer)
        if place is None or not place[0] <= now < place[4]:
            period, terms = self._current(customer, LUC_METER, int(now), current)
            place = places[customer] = (period.start, period.end, terms,
                                        f"{customer}:" if _plain_customer(customer) else None, period.holds_until)
        start, end, terms, scope, _ = place
        weighted = weighted_units(units, milli)
        ceiling = self._ceiling_units
        if ceiling is None or cost_cents(weighted, terms[2]) > ceiling:  # the full path says why
            return None
        if identifier is None:
            identifier = new_id("luc")
        if scope is None or len(scope) + len(identifier) > MAX_IDENTIFIER:
            sent = stripe_identifier(customer, identifier)
        else:  # stripe_identifier's scoped form
            sent = scope + identifier
        return (identifier, customer, operation, milli, units, weighted, agent_id, int(now), None, start, end, terms,
                False, LUC_METER, sent)

    def _answer(self, items: Sequence[Any], outcomes: list[_Event | BillingError],
                applied: list[Any]) -> MeterEventBatchResult:
        """The batch's answer from each event's outcome, built here, after COMMIT, not in the writer's turn. Every
        value is one the service made itself, of its field's type, so the models are constructed as they stand
        (`trusted`), not validated again: the same answer, for a fraction of the cost (bench/ingest.py (c))."""
        answers = iter(applied)
        results: list[BatchEventOutcome] = []
        accepted = replayed = weighted = cost = 0
        for index, outcome in enumerate(outcomes):
            answer = next(answers) if type(outcome) is tuple else outcome
            if type(answer) is not tuple:  # a BillingError: the event's own refusal, or the writer's conflict
                assert isinstance(answer, BillingError)
                ident = outcome[_ID] if type(outcome) is tuple else _given_identifier(items[index])
                error = trusted(BatchEventError, {"code": answer.code, "field": answer.param,
                                                  "message": answer.message})
                results.append(trusted(BatchEventOutcome, {
                    "index": index, "status": "refused", "identifier": ident, "weighted_units": None,
                    "cost_cents": None, "period_usage": None, "remaining": None, "error": error}, set(_REFUSED)))
                continue
            ident, units, cents, after, allowance, again = answer
            if again:
                replayed += 1
            else:
                accepted += 1
                weighted += units
                cost += cents
            results.append(trusted(BatchEventOutcome, {
                "index": index, "status": "replayed" if again else "accepted", "identifier": ident,
                "weighted_units": units, "cost_cents": cents, "period_usage": after,
                "remaining": allowance - after if allowance > after else 0, "error": None}))
        totals = trusted(BatchTotals, {
            "events": len(items), "accepted": accepted, "replayed": replayed,
            "refused": len(items) - accepted - replayed, "weighted_units": weighted, "cost_cents": cost})
        return trusted(MeterEventBatchResult, {"totals": totals, "results": results})

    def _draft_of(self, item: Any, now: float) -> _Draft:
        if type(item) is not dict:  # a plain dict (every JSON object) is a Mapping: no ABC check on the hot path
            if isinstance(item, BillingError):
                raise item
            if not isinstance(item, Mapping):
                raise InvalidInput(f"an event must be an object with create_meter_event's fields ({_INPUT_FIELDS}), "
                                   f"not {type(item).__name__}", param=None)
        elif item.keys() <= _PLAIN_FIELDS and "customer" in item and "units" in item:
            get = item.get
            customer, units, operation, ident = get("customer"), get("units"), get("operation"), get("identifier")
            timestamp, agent_id, meter = get("timestamp"), get("agent_id"), get("meter")
            if (type(customer) is str and type(units) is int and (operation is None or type(operation) is str)
                    and (ident is None or type(ident) is str) and (timestamp is None or type(timestamp) is int)
                    and (agent_id is None or type(agent_id) is str) and (meter is None or type(meter) is str)):
                # the common shape, every value exactly what strict parsing would pass through unchanged: the model
                # has nothing to add, and _draft makes every check with its own words
                return self._draft(now, customer, units, operation, None, ident, timestamp, agent_id, None, meter)
        try:
            event = MeterEventInput.model_validate(item)
        except ValidationError as exc:
            raise _input_error(exc) from None
        return self._draft(now, event.customer, event.units, event.operation, event.multiplier, event.identifier,
                           event.timestamp, event.agent_id, event.metadata, event.meter)

    def _apply(self, tx: Tx, events: Sequence[_Event], brief: bool = False, *, look: bool = False) -> list[Any]:
        """The writer side: replays and conflicts, running totals, then every new event and total in one append.
        Each event's answer is (its row, replayed), or with `brief` (a batch) `_brief`'s few numbers: the caller
        builds its answer from them outside the writer's turn (a thousand full results cost more than writing the
        events); conflicts are BillingErrors. Rows are plain tuples in MeterEventRow's order (a MeterEventRow is made
        only for an answer that needs one): like the events, the collector stops tracking them at its first pass."""
        metering = self._store.metering
        meters = self._pricing.meters
        stored: dict[tuple[str, str], tuple[Any, ...]] = {}  # recorded before, or earlier in this batch
        # Else the append finds them, the rare time there are any: recorded before, or twice in this batch (then
        # decided again with `look`, which finds the second after the first), so nothing is kept of each event here
        track = look or not metering.detects_existing
        if track:
            stored.update(metering.find_events(tx, {(event[_CUSTOMER], event[_ID]) for event in events}))
        totals = self._load_totals(tx, {(e[_CUSTOMER], e[_START], e[_METER]) for e in events
                                        if not stored or (e[_CUSTOMER], e[_ID]) not in stored})
        by_operation: dict[tuple[str, int, str, str], list[int]] = {}  # events, raw, weighted, overage, cents
        inserts: list[tuple[Any, ...]] = []
        outcomes: list[Any] = []
        created_at = utc_now()
        for event in events:
            (identifier, customer, operation, milli, raw, weighted, agent_id, when, metadata, start, end, given_terms,
             _, meter_id, stripe_id) = event
            if track:
                prior = stored.get((customer, identifier))
                if prior is not None:
                    outcomes.append(self._replay(MeterEventRow._make(prior), event, brief))
                    continue
            meter = meters[meter_id]
            total = totals[(customer, start, meter_id)]
            if not total.period_end:
                total.period_end = end
            terms = total.terms
            if terms is None:  # the period keeps the terms it was opened with
                terms = total.terms = given_terms
            tier, allowance, rate = terms
            if meter.aggregation == "last":
                after, overage, cost = _last(total, raw, weighted, when, terms)
                counted = (0, 0, 0, 0)  # a gauge: its operation counters count events only
            else:  # marginal_overage, inline: the cost of the period's overage after, minus before
                before = total.weighted_units
                after = before + weighted
                over_before = before - allowance if before > allowance else 0
                over_after = after - allowance if after > allowance else 0
                overage = over_after - over_before
                cost = (over_after * rate + 500) // 1000 - (over_before * rate + 500) // 1000 if overage else 0
                total.events += 1
                total.raw_units += raw
                total.weighted_units = after
                total.changed = True
                counted = (raw, weighted, overage, cost)
            op_key = (customer, start, operation or CUSTOM, meter_id)
            counters = by_operation.get(op_key)
            if counters is None:
                by_operation[op_key] = [1, *counted]
            else:
                counters[0] += 1
                counters[1] += counted[0]
                counters[2] += counted[1]
                counters[3] += counted[2]
                counters[4] += counted[3]
            row = (identifier, customer, operation, milli, raw, weighted, agent_id, when, metadata, tier, start, end,
                   after, allowance, rate, overage, cost, meter.event_name, created_at, stripe_id, meter_id)
            inserts.append(row)
            if track:
                stored[(customer, identifier)] = row
            outcomes.append((identifier, weighted, cost, after, allowance, False)  # brief: _brief(row, False), inline
                            if brief else (MeterEventRow._make(row), False))
        if inserts:
            # the rows by tuple.__new__: the same named tuples, without a Python call each (hundreds a batch)
            changed = [
                _new_tuple(PeriodTotalRow, (customer, start, t.period_end, t.events, t.raw_units, t.weighted_units,
                                            *(t.terms or _NO_TERMS), meter, t.last_at))
                for (customer, start, meter), t in totals.items() if t.changed]
            deltas = [
                _new_tuple(OperationDelta, (customer, start, operation, n, raw, weighted, overage, cost, meter))
                for (customer, start, operation, meter), (n, raw, weighted, overage, cost) in by_operation.items()]
            try:
                metering.append(tx, inserts, changed, deltas)
            except EventsExist:  # some were recorded before (replays or conflicts): decide again, looking first
                if look:
                    raise
                return self._apply(tx, events, brief, look=True)
        return outcomes

    def _load_totals(self, tx: Tx, keys: set[tuple[str, int, str]]) -> dict[tuple[str, int, str], _Total]:
        """The running totals of these (customer, period, meter) keys, read in the writer's transaction."""
        totals: dict[tuple[str, int, str], _Total] = {}
        if keys:
            for key, row in self._store.metering.load_totals(tx, keys).items():  # positional: _Total's field order
                tier, allowance, rate = row.tier, row.allowance, row.overage_rate
                terms = None if tier is None or allowance is None or rate is None else (tier, allowance, rate)
                totals[key] = _Total(row.period_end, row.events, row.raw_units, row.weighted_units, False, terms,
                                     row.last_at)
            for key in keys - totals.keys():
                totals[key] = _Total()
        return totals

    def _replay(self, prior: MeterEventRow, event: _Event, brief: bool = False) -> Any:
        identifier, _, operation, milli, raw, _, agent_id, when, metadata, _, _, _, given, meter, _ = event
        differences = []
        if prior.meter != meter:
            differences.append(f"meter {prior.meter} vs {meter}")
        if prior.raw_units != raw:
            differences.append(f"units {prior.raw_units} vs {raw}")
        if prior.operation != operation or (operation is None and prior.multiplier_milli != milli):
            first = prior.operation or f"multiplier {prior.multiplier_milli / 1000:g}"
            now = operation or f"multiplier {milli / 1000:g}"
            differences.append(f"{first} vs {now}")
        if prior.agent_id != agent_id:
            differences.append(f"agent_id {prior.agent_id} vs {agent_id}")
        if prior.metadata != metadata:
            differences.append("metadata")
        if given and prior.timestamp != when:
            differences.append(f"timestamp {prior.timestamp} vs {when}")
        if differences:
            return IdempotencyConflict(
                f"identifier {identifier!r} was already recorded with other content ({'; '.join(differences)}): "
                "use a new identifier for new usage, or resend exactly the first event to get its result",
                param="identifier", identifier=identifier)
        return _brief(prior, True) if brief else (prior, True)

    def _result(self, row: MeterEventRow, *, replayed: bool) -> MeterEventResult:
        after, allowance, rate = row.period_units_after, row.allowance, row.overage_rate
        period_overage = max(0, after - allowance)
        return MeterEventResult(
            identifier=row.identifier, customer=row.customer_id, operation=row.operation,
            multiplier=row.multiplier_milli / 1000, tier=row.tier, timestamp=row.timestamp,
            raw_units=row.raw_units, weighted_units=row.weighted_units, period_start=row.period_start,
            period_end=row.period_end, period_usage=after, allowance=allowance, remaining=max(0, allowance - after),
            overage_units=row.overage_units, period_overage_units=period_overage, overage_rate=rate,
            cost_cents=row.cost_cents, period_overage_cost_cents=cost_cents(period_overage, rate),
            currency=self._pricing.currency, replayed=replayed, meter=row.meter,
        )

    # --- reads -------------------------------------------------------------------------------------------------

    def meters(self) -> list[str]:
        """The pricing file's meter ids, luc_tokens first."""
        return list(self._pricing.meters)

    def summary(self, customer: str, period: str = "current", meter: str | None = None) -> UsageSummary:
        """A meter's usage (luc_tokens by default) by operation type, totals, allowance, overage and event statuses
        for one period (read-only).

        `current`: the customer's current usage period, from its running totals. `YYYY-MM`: the events whose
        timestamps fall in that UTC calendar month, on the terms (tier, allowance, rate) of the latest of them (a
        `last` meter: the latest event's value)."""
        customer = self._customer(customer)
        kind = self._pricing.meter(meter)
        if not isinstance(period, str):
            raise InvalidInput("period must be `current` or YYYY-MM", param="period")
        counted: int | None = None
        if period.strip().lower() == "current":
            period = "current"
            current = self._period(customer, int(self._clock()))
            terms, counted, _ = self._opened(customer, current, kind)
            allowance, rate, tier_id = terms.tokens_per_month, terms.overage_rate, terms.id
            start, end = current.start, current.end
            rows = self._store.metering.usage_by_operation(customer, start, kind.id)
            counts = self._store.metering.unsettled_counts(customer, start, kind.id)
        else:
            tier = kind.terms(self._tier_of(customer))
            allowance, rate, tier_id = tier.tokens_per_month, tier.overage_rate, tier.id
            start, end = month_bounds(period.strip())
            rows = self._store.metering.month_usage(customer, start, end, CUSTOM, kind.id)
            counts = {EventStatus.PENDING: sum(row.pending for row in rows),
                      EventStatus.FAILED: sum(row.failed for row in rows)}
            if kind.aggregation == "last":  # the month is billed on its latest value, not a sum
                counted = self._store.metering.latest_value(customer, start, end, kind.id) or 0
            if rows:  # a past month: the terms its latest event was recorded under
                latest = self._store.metering.event_terms(max(row.last_id for row in rows))
                if latest is not None and latest.tier is not None:
                    assert latest.allowance is not None and latest.overage_rate is not None
                    allowance, rate, tier_id = latest.allowance, latest.overage_rate, latest.tier
        weighted = sum(row.weighted_units for row in rows)
        events = sum(row.events for row in rows)
        pending, failed = counts.get(EventStatus.PENDING, 0), counts.get(EventStatus.FAILED, 0)
        overage_units = sum(row.overage_units for row in rows)
        overage_cost = sum(row.cost_cents for row in rows)
        if counted is not None:  # what Stripe bills, from the counted total (no failed events)
            if period == "current":
                events = sum(row.events for row in rows) + failed
            weighted = counted
            overage_units = max(0, counted - allowance)
            overage_cost = cost_cents(overage_units, rate)
        return UsageSummary(
            customer=customer, period=period, period_start=start, period_end=end, tier=tier_id, meter=kind.id,
            unit=kind.unit, aggregation=kind.aggregation,
            by_operation=[OperationUsage(operation=row.operation, events=row.events, raw_units=row.raw_units,
                                         weighted_units=row.weighted_units) for row in rows],
            raw_units=weighted if kind.aggregation == "last" else sum(row.raw_units for row in rows),
            weighted_units=weighted, allowance=allowance,
            remaining=max(0, allowance - weighted), overage_units=overage_units,
            overage_cost_cents=overage_cost, overage_rate=rate,
            currency=self._pricing.currency,
            events=EventCounts(pending=pending, sent=events - pending - failed, failed=failed),
        )

    def quote(
        self, units: int, *, operation: str | None = None, multiplier: float | str | None = None,
        customer: str | None = None, meter: str | None = None,
    ) -> UsageQuote:
        """Weighted units and the marginal cost of this usage now (the P2P rate without a customer); writes nothing.
        A count meter's units are that many events; a `last` meter's, the value the period would then hold."""
        kind = self._pricing.meter(meter)
        raw = self._units(units, kind if kind.aggregation == "last" else None)
        op, milli = self._multiplier(operation, multiplier, kind)
        weighted = weighted_units(raw, milli)
        used = 0
        if customer is not None:
            customer = self._customer(customer)
            tier, used, _ = self._opened(customer, self._period(customer, int(self._clock())), kind)
        else:
            tier = kind.terms(self._pricing.p2p)
        if kind.aggregation == "last":
            overage, cost = _rise(used, weighted, tier.tokens_per_month, tier.overage_rate)
        else:
            overage, cost = marginal_overage(used, weighted, tier)
        return UsageQuote(
            customer=customer, tier=tier.id, operation=op, multiplier=milli / 1000, raw_units=raw, meter=kind.id,
            weighted_units=weighted, period_usage=used, allowance=tier.tokens_per_month,
            remaining=max(0, tier.tokens_per_month - used), overage_units=overage, overage_rate=tier.overage_rate,
            cost_cents=cost, currency=self._pricing.currency,
        )

    def status(self) -> MeteringStatus:
        """The flusher's queue and recent history, for operators."""
        now = int(self._clock())
        metering = self._store.metering
        counts = metering.status_counts()
        oldest = metering.oldest_pending_created_at()
        age = None
        if oldest is not None:
            age = max(0, now - int(datetime.fromisoformat(oldest).timestamp()))
        flush = metering.last_flush()
        last = None
        if flush is not None:
            last = (f"sent {flush.sent}, failed {flush.failed}, {flush.pending_after} pending after"
                    + (f" via {flush.transport}" if flush.transport else "")
                    + (f"; stopped: {flush.error}" if flush.error else ""))
        failures = metering.recent_failures(window=500, limit=10)
        return MeteringStatus(
            pending=counts.get(EventStatus.PENDING, 0), oldest_pending_age_seconds=age,
            sent=counts.get(EventStatus.SENT, 0), failed=counts.get(EventStatus.FAILED, 0),
            last_flush_at=flush.finished_at if flush else None, last_flush=last,
            recent_failures=[FailureReason(reason=row.reason, events=row.events, last_at=row.last_at)
                             for row in failures],
        )

    # --- concurrency slots -------------------------------------------------------------------------------------

    async def acquire_slot(self, customer: str, task_id: str, ttl_seconds: int, lease: str | None = None) -> TaskSlot:
        """Take one of the tier's concurrent task slots for `ttl_seconds`, answered with the slot's lease (its proof of
        ownership). The same task id again with its lease renews the slot (expiry = now + ttl); without it, refused."""
        customer = self._customer(customer)
        task = self._text(task_id, "task_id", required=True)
        assert task is not None
        if not _is_int(ttl_seconds) or not 1 <= ttl_seconds <= MAX_SLOT_TTL:
            raise InvalidInput(f"ttl_seconds is {ttl_seconds!r}: pass whole seconds within 1-{MAX_SLOT_TTL} (how long "
                               "the task may hold the slot before it frees itself)", param="ttl_seconds")
        given = None if lease is None else _lease_hash(self._text(lease, "lease", limit=MAX_TEXT))
        await self._ensure_customer(customer)
        tier = self._tier_of(customer)
        now = int(self._clock())
        fresh = f"lease_{secrets.token_urlsafe(24)}"  # 192 random bits: unguessable

        slots = self._store.metering

        def take(tx: Tx) -> TaskSlot:
            held = slots.live_slots(tx, customer, now)
            mine = next((row for row in held if row.task_id == task), None)
            if mine is not None:
                if given is None or mine.lease_hash is None or not hmac.compare_digest(given, mine.lease_hash):
                    raise Refused(
                        f"task {task!r} already holds a slot of customer {customer} (until "
                        f"{_iso(mine.expires_at)}): only its holder can renew it, by passing the lease "
                        "acquire_task_slot answered with; otherwise use another task_id", param="lease")
                slots.renew_slot(tx, customer, task, now + ttl_seconds)
                return TaskSlot(customer=customer, task_id=task, acquired_at=mine.acquired_at,
                                expires_at=now + ttl_seconds, limit=tier.concurrent, in_use=len(held),
                                lease=str(lease), replayed=True)
            if len(held) >= tier.concurrent:
                raise LimitReached(
                    f"customer {customer} already runs {len(held)} of the {tier.concurrent} concurrent tasks tier "
                    f"{tier.id} allows: release one with release_task_slot, or wait until the first expires at "
                    f"{_iso(held[0].expires_at)}", param="task_id", limit=tier.concurrent, in_use=len(held))
            slots.take_slot(tx, customer, SlotRow(task, now, now + ttl_seconds, _lease_hash(fresh)))
            return TaskSlot(customer=customer, task_id=task, acquired_at=now, expires_at=now + ttl_seconds,
                            limit=tier.concurrent, in_use=len(held) + 1, lease=fresh)

        return await self._store.write(take)

    async def release_slot(self, customer: str, task_id: str, lease: str) -> SlotRelease:
        """Free the task's slot, given its lease; a slot not held (released, expired, unknown) answers released: false,
        and a slot held under another lease is refused (it belongs to the agent that took it)."""
        customer = self._customer(customer)
        task = self._text(task_id, "task_id", required=True)
        assert task is not None
        given = _lease_hash(self._text(lease, "lease", required=True, limit=MAX_TEXT))
        now = int(self._clock())

        slots = self._store.metering

        def free(tx: Tx) -> SlotRelease:
            held = slots.live_slots(tx, customer, now)
            mine = next((row for row in held if row.task_id == task), None)
            if mine is not None and (mine.lease_hash is None or not hmac.compare_digest(given, mine.lease_hash)):
                raise Refused(f"task {task!r}'s slot was taken under another lease: only the agent that took it can "
                              "release it (pass the lease acquire_task_slot answered with); it frees itself when it "
                              "expires", param="lease")
            released = mine is not None and slots.free_slot(tx, customer, task)
            return SlotRelease(customer=customer, task_id=task, released=released, in_use=len(held) - int(released))

        return await self._store.write(free)


def _lease_hash(lease: str | None) -> str:
    """A slot's lease is kept as its SHA-256 only: the database never holds the proof of ownership itself."""
    return hashlib.sha256(str(lease).encode()).hexdigest()
