"""Stripe events, each stored once and applied in the same transaction.

The event id is UNIQUE in `webhook_events`, and the insert and the provision update run in one writer job: a
duplicate delivery (even five at once) inserts nothing and applies nothing, and a crash leaves either both or
neither. Events of any type are stored and acknowledged; only the ones that change a provision are applied.

Every event is parsed into a strict model first (`check_event`): an envelope (`id`, `type`, `created`, `data`)
and, for the types that are applied, the fields of `data.object` the handlers read. A signed event of another
shape (`"type": 123`, `"created": "abc"`, an `id` that is null or an object, `data.object` a list, nesting deeper
than the parser goes, a lone surrogate anywhere) raises `InvalidEvent`: the endpoint answers 400, nothing stored.

`ProvisionEvents` applies subscription, checkout and invoice events to the customer's provision; payment intents
go to the commerce service, Connect's events to the Connect service. How provisions converge: each applied event
leaves its `created` time on the provision; an older event for the same customer is stored but not applied, so
duplicates and out-of-order deliveries end in the state of the newest event, which is Stripe's current state.
Within one second (Stripe's resolution) the later status in a subscription's life wins (incomplete < trialing <
active < past_due < unpaid < canceled). The end of an old subscription never downgrades a newer live one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from .. import jsonsafe
from ..settings import Settings
from ..store import Store, Tx, utc_now
from ..store.webhooks import (
    LIVE,
    DuplicateEvent,
    EventRecord,
    EventRef,
    Provision,
    ProvisionUpdate,
    StoredEvent,
    WebhooksStore,
    blank_provision,
    can_move,
)
from ..store.webhooks import SubscriptionStatus as S
from .tiers import TIER_METADATA, Pricing, add_months

if TYPE_CHECKING:
    from .commerce import PaymentSessionService
    from .connect import ConnectService
    from .subscriptions import SubscriptionService


@dataclass(frozen=True)
class Applied:
    """What applying one event did: the customer it concerned, and a note when it was not applied."""

    customer_id: str | None
    note: str | None = None


@dataclass(frozen=True)
class Ingested:
    event_id: str
    duplicate: bool
    note: str | None = None
    customer_id: str | None = None


MAX_EPOCH = 32_503_680_000  # 3000-01-01: any real timestamp, and months can still be added to it
MAX_AMOUNT = 2**53  # minor units: far above any PaymentIntent, far below SQLite's 64-bit integers

StripeId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]{1,255}$")]
EventType = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,64}(\.[a-z0-9_]{1,64}){1,6}$")]
Word = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,64}$")]
Epoch = Annotated[int, Field(ge=0, le=MAX_EPOCH)]
Metadata = dict[Annotated[str, StringConstraints(max_length=40)], Annotated[str, StringConstraints(max_length=500)]]


class InvalidEvent(ValueError):
    """A payload whose signature verified but which is not a Stripe event of a shape we can apply."""


class _Strict(BaseModel):
    """A checker: the handlers read the event's own dict; other fields are ignored here, not copied."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class _Price(_Strict):
    id: StripeId | None = None
    lookup_key: str | None = None


class _SubscriptionItem(_Strict):
    price: _Price | StripeId | None = None
    current_period_start: Epoch | None = None
    current_period_end: Epoch | None = None


class _SubscriptionItems(_Strict):
    data: list[_SubscriptionItem] = Field(default_factory=list, max_length=100)


class _Subscription(_Strict):
    id: StripeId
    customer: StripeId | None = None
    status: Word = S.INCOMPLETE  # absent: incomplete (as the handler reads it); null is refused, never stored
    metadata: Metadata | None = None
    items: _SubscriptionItems | None = None
    current_period_start: Epoch | None = None
    current_period_end: Epoch | None = None
    start_date: Epoch | None = None
    created: Epoch | None = None
    ended_at: Epoch | None = None
    canceled_at: Epoch | None = None
    cancel_at: Epoch | None = None
    cancel_at_period_end: bool | None = None

    @field_validator("metadata")
    @classmethod
    def _delivered_months(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        months = (value or {}).get("aims_delivered_months")
        if months is not None and not re.fullmatch(r"[0-9]{1,3}", months):
            raise ValueError("aims_delivered_months must be a whole number of months (0-999)")
        return value


class _CheckoutSession(_Strict):
    customer: StripeId | None = None
    subscription: StripeId | None = None
    mode: Word | None = None
    payment_status: Word | None = None
    metadata: Metadata | None = None


class _SubscriptionDetails(_Strict):
    subscription: StripeId | None = None


class _InvoiceParent(_Strict):
    subscription_details: _SubscriptionDetails | None = None


class _Invoice(_Strict):
    customer: StripeId | None = None
    subscription: StripeId | None = None
    parent: _InvoiceParent | None = None


class _PaymentError(_Strict):
    message: Annotated[str, StringConstraints(max_length=5000)] | None = None


class _PaymentIntent(_Strict):
    id: StripeId
    customer: StripeId | None = None
    status: Word | None = None
    amount_received: Annotated[int, Field(ge=0, le=MAX_AMOUNT)] | None = None
    currency: Annotated[str, StringConstraints(pattern=r"^[a-z]{3}$")] | None = None
    last_payment_error: _PaymentError | None = None


class _Object(_Strict):
    customer: StripeId | None = None  # every event's customer lands in webhook_events.customer_id


def _an_object(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")  # checked, not copied: the object's own model checks its fields
    return value


AnObject = Annotated[Any, AfterValidator(_an_object)]


class _EventData(_Strict):
    object: AnObject
    previous_attributes: AnObject | None = None


class StripeEvent(_Strict):
    """The envelope of a Stripe event, as far as we read it."""

    id: Annotated[str, StringConstraints(pattern=r"^evt_[A-Za-z0-9_]{1,251}$")]
    type: EventType
    created: Epoch
    data: _EventData
    livemode: bool = False


def _object_model(kind: str) -> type[_Strict]:
    if kind.startswith("customer.subscription."):
        return _Subscription
    if kind == "checkout.session.completed":
        return _CheckoutSession
    if kind.startswith("invoice."):
        return _Invoice
    if kind.startswith("payment_intent."):
        return _PaymentIntent
    return _Object


class CheckedEvent(dict[str, Any]):
    """An event `check_event` passed (so `ingest` does not check it twice)."""


def check_event(event: Any) -> CheckedEvent:
    """`event` (decoded JSON) if it is a Stripe event of a shape the handlers can apply; else `InvalidEvent`
    naming the first bad fields."""
    if isinstance(event, CheckedEvent):
        return event
    try:
        envelope = StripeEvent.model_validate(event)
    except ValidationError as exc:
        raise _invalid(exc, "") from None
    try:
        _object_model(envelope.type).model_validate(envelope.data.object)
    except ValidationError as exc:
        raise _invalid(exc, "data.object.") from None
    return CheckedEvent(event)


def _invalid(error: ValidationError, prefix: str) -> InvalidEvent:
    problems = [f"{prefix}{'.'.join(str(part) for part in item['loc']) or 'event'}: {item['msg']}"
                for item in error.errors()[:3]]
    return InvalidEvent("not a Stripe event this endpoint can apply: " + "; ".join(problems))


def parse_event(payload: bytes | str) -> CheckedEvent:
    """The event as plain JSON (after the signature was verified on these exact bytes), checked by `check_event`.
    jsonsafe refuses what cannot be stored: nesting past 200 levels, a lone surrogate escape, NaN."""
    text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
    try:
        event = jsonsafe.loads(text)
    except ValueError as exc:
        raise InvalidEvent(f"the body is not JSON: {exc}") from None
    return check_event(event)


ENABLED_EVENTS = ("account.updated", "checkout.session.completed", "customer.subscription.*", "invoice.*",
                  "payment_intent.*", "refund.created", "v1.billing.meter.error_report_triggered")
"""The Stripe events this endpoint applies or records: the ones to enable on its Stripe webhook endpoint (and, for
the thin `v1.billing.meter.error_report_triggered`, its event destination); the embedded sandbox sends only these.
A handler for a new type must add it here. A destination charge's `transfer.created` and `application_fee.created`,
for instance, are not needed: `checkout.session.completed` / `payment_intent.succeeded` mark a split paid."""


class Provisions(Protocol):
    """Where ProvisionEvents reads and changes provisions."""

    def load(self, customer: str) -> Provision | None: ...

    def owner_of(self, subscription_id: str) -> str | None:
        """The customer whose provision holds this subscription, if any."""

    def apply(self, customer: str, update: ProvisionUpdate, event: EventRef) -> None: ...


class InTransaction:
    """Provisions read and written by the job's own statements."""

    __slots__ = ("_store", "_tx")

    def __init__(self, store: WebhooksStore, tx: Tx) -> None:
        self._store = store
        self._tx = tx

    def load(self, customer: str) -> Provision | None:
        return self._store.load_provision(self._tx, customer)

    def owner_of(self, subscription_id: str) -> str | None:
        return self._store.subscription_owners(self._tx, [subscription_id]).get(subscription_id)

    def apply(self, customer: str, update: ProvisionUpdate, event: EventRef) -> None:
        self._store.apply(self._tx, customer, update, event)


class ProvisionBatch:
    """A batch of events' provisions in memory: read in one statement before the first event, each event applied
    to what the ones before it left, written in one statement after the last (see WebhookEventService)."""

    __slots__ = ("_changed", "_now", "_owners", "_rows")

    def __init__(self, loaded: dict[str, Provision], owners: dict[str, str], now: str) -> None:
        self._rows = loaded
        self._owners = owners  # subscription id -> customer, for the subscriptions the batch's events name
        self._now = now
        self._changed: set[str] = set()

    def load(self, customer: str) -> Provision | None:
        return self._rows.get(customer)

    def owner_of(self, subscription_id: str) -> str | None:
        return self._owners.get(subscription_id)

    def apply(self, customer: str, update: ProvisionUpdate, event: EventRef) -> None:
        row = self._rows.get(customer) or blank_provision(customer, self._now)
        self._rows[customer] = replace(row, **update, last_event_id=event.id, last_event_type=event.type,
                                       last_event_created=event.created, updated_at=self._now)
        self._changed.add(customer)
        if (held := update.get("subscription_id")) is not None and held != row.subscription_id:
            if row.subscription_id is not None and self._owners.get(row.subscription_id) == customer:
                del self._owners[row.subscription_id]
            self._owners[held] = customer

    def changed(self) -> list[Provision]:
        return [self._rows[customer] for customer in sorted(self._changed)]


class ProvisionEvents:
    """Stripe's subscription, checkout and invoice events applied to the customer's provision (the tier it
    entitles to), in the writer's transaction: the newest state wins whatever the order of delivery, the end of
    an old subscription never downgrades a newer live one, an invoice moves only the subscription it is for."""

    def __init__(self, store: Store, pricing: Pricing, settings: Settings) -> None:
        self._store = store
        self._pricing = pricing
        self._settings = settings

    def apply(self, tx: Tx, event: dict[str, Any]) -> Applied:
        """Apply `event` to its customer's provision inside the writer's transaction `tx`."""
        return self.apply_to(InTransaction(self._store.webhooks, tx), event)

    def apply_to(self, provisions: Provisions, event: dict[str, Any]) -> Applied:
        """Apply `event` to its customer's provision in `provisions` (the transaction's, or a batch's)."""
        kind = event.get("type", "")
        obj = (event.get("data") or {}).get("object") or {}
        if kind.startswith("customer.subscription."):
            return self._apply_subscription(provisions, event, obj)
        if kind == "checkout.session.completed":
            return self._apply_checkout(provisions, event, obj)
        if kind in ("invoice.paid", "invoice.payment_failed"):
            return self._apply_invoice(provisions, event, obj)
        customer = obj.get("customer") if isinstance(obj.get("customer"), str) else None
        if kind.startswith("invoice."):
            return Applied(customer, "recorded")
        return Applied(customer, "not handled: stored and acknowledged")

    def _apply_subscription(self, provisions: Provisions, event: dict[str, Any], sub: dict[str, Any]) -> Applied:
        customer = sub.get("customer")
        if not isinstance(customer, str):
            return Applied(None, "subscription without a customer")
        status = S.CANCELED if event["type"] == "customer.subscription.deleted" else sub.get("status", S.INCOMPLETE)
        row = provisions.load(customer)
        tier = self._tier_of(sub) or (row.tier if row and row.subscription_id == sub["id"] else None)
        if tier is None:
            return Applied(customer, "not a tier subscription (no aims_tier metadata and no tier price): ignored")
        if row is not None and not _supersedes(row, event["created"], status, sub["id"]):
            return Applied(customer, "older than the state already applied: stored, not applied")
        if (held_by := _held_elsewhere(provisions, sub["id"], customer)) is not None:
            return Applied(customer, held_by)
        provisions.apply(customer, {
            "tier": tier, "status": status, "subscription_id": sub["id"], "price_id": _price_of(sub),
            "current_period_end": period_end_of(sub), "current_period_start": _period_start(sub),
            "ended_at": sub.get("ended_at"), "commitment_end": commitment_end_of(sub, self._pricing),
            "cancel_at": sub.get("cancel_at"), "cancel_at_period_end": bool(sub.get("cancel_at_period_end")),
        }, _ref(event))
        return Applied(customer)

    def _apply_checkout(self, provisions: Provisions, event: dict[str, Any], session: dict[str, Any]) -> Applied:
        customer, sub_id = session.get("customer"), session.get("subscription")
        if session.get("mode") != "subscription" or not isinstance(customer, str) or not isinstance(sub_id, str):
            return Applied(customer if isinstance(customer, str) else None, "not a subscription checkout: recorded")
        tier = (session.get("metadata") or {}).get(TIER_METADATA)
        if tier not in self._pricing.tiers:
            return Applied(customer, "checkout without a known aims_tier: recorded")
        row = provisions.load(customer)
        if row is not None and row.subscription_id == sub_id:
            return Applied(customer, "subscription already provisioned by its own events")
        if row is not None and row.status in LIVE and (row.last_event_created or 0) > event["created"]:
            return Applied(customer, "a newer subscription is live: stored, not applied")
        if (held_by := _held_elsewhere(provisions, sub_id, customer)) is not None:
            return Applied(customer, held_by)
        paid = session.get("payment_status")
        status = S.ACTIVE if paid == "paid" else S.TRIALING if paid == "no_payment_required" else S.INCOMPLETE
        provisions.apply(customer, {"tier": tier, "status": status, "subscription_id": sub_id}, _ref(event))
        return Applied(customer)

    def _apply_invoice(self, provisions: Provisions, event: dict[str, Any], invoice: dict[str, Any]) -> Applied:
        customer = invoice.get("customer")
        if not isinstance(customer, str):
            return Applied(None, "invoice without a customer")
        row = provisions.load(customer)
        if row is None:
            return Applied(customer, f"unknown customer {customer}: no provision to update (flagged)")
        sub_id = invoice.get("subscription") or (
            ((invoice.get("parent") or {}).get("subscription_details") or {}).get("subscription"))
        if sub_id and sub_id != row.subscription_id:
            return Applied(customer, "invoice of another subscription: recorded")
        if (row.last_event_created or 0) > event["created"]:
            return Applied(customer, "older than the state already applied: stored, not applied")
        target = S.PAST_DUE if event["type"] == "invoice.payment_failed" else S.ACTIVE
        if not can_move(row.status, target):
            return Applied(customer, "no change")
        provisions.apply(customer, {"status": target}, _ref(event))
        return Applied(customer)

    def _tier_of(self, sub: dict[str, Any]) -> str | None:
        tier = (sub.get("metadata") or {}).get(TIER_METADATA)
        if tier in self._pricing.tiers:
            return str(tier)
        price = _price_of(sub)
        for candidate in self._pricing.paid_tiers():
            if price and price == self._settings.price_id_for(candidate.price_env):
                return candidate.id
        lookup = (((sub.get("items") or {}).get("data") or [{}])[0].get("price") or {}).get("lookup_key")
        return next((t.id for t in self._pricing.paid_tiers() if t.lookup_key == lookup), None)


STATUS_RANK: dict[str, int] = {S.INCOMPLETE: 0, S.TRIALING: 1, S.ACTIVE: 2, S.PAST_DUE: 3, S.UNPAID: 4, S.PAUSED: 4,
                               S.CANCELED: 5, S.INCOMPLETE_EXPIRED: 5}


class WebhookEventService:
    def __init__(self, store: Store, subscriptions: SubscriptionService,
                 commerce: PaymentSessionService | None = None, connect: ConnectService | None = None) -> None:
        self._store = store
        self._subscriptions = subscriptions
        self._provisions = subscriptions.provisions
        self._commerce = commerce
        self._connect = connect

    async def ingest(self, event: dict[str, Any], payload: bytes | str) -> Ingested:
        """Store and apply `event` (the decoded `payload`) once; `InvalidEvent` when its shape is not one we can
        apply (see `check_event`)."""
        checked = check_event(event)
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        try:
            if self._in_batches(checked["type"]):
                result: Ingested = await self._store.write_item(self._ingest_batch, (checked, text), in_order=True)
            else:
                result = await self._store.write(self._job(checked, text))
        except DuplicateEvent:  # stored by another instance since the batch looked (PostgreSQL), or a plain job's
            return Ingested(checked["id"], duplicate=True)
        if result.duplicate:
            return result
        self._subscriptions.forget(result.customer_id)
        if self._commerce is not None:
            self._commerce.after_webhook(event)
        if self._connect is not None:
            self._connect.committed()  # creators' separate transfers the event queued (a paid checkout session)
        return result

    def _in_batches(self, kind: str) -> bool:
        """Whether the event changes nothing but its own record and a provision (subscription and invoice events,
        and the types nobody applies), so it can share `_ingest_batch` with the others queued next to it; an event
        other services apply too (their own tables, read and written by their own statements) is a job of its
        own, and the events queued before and after it are applied before and after it (`in_order`): a checkout
        that starts a new subscription, then that subscription's failed invoice, end past due as delivered."""
        return not (kind.startswith("payment_intent.") or kind == "checkout.session.completed"
                    or (self._connect is not None and kind in self._connect.EVENT_TYPES))

    def _ingest_batch(self, tx: Tx, items: list[tuple[CheckedEvent, str]]) -> list[Ingested]:
        """The events queued together, stored and applied with one read of which ids are already stored, one of
        their customers' provisions, and one multi-row write of each table, instead of five statements an event:
        on SQLite every statement hands the GIL to the event loop and back, which was most of what an event
        cost. A duplicate (stored before, or earlier in the batch) is answered as one and changes nothing."""
        webhooks = self._store.webhooks
        seen = webhooks.received(tx, [event["id"] for event, _ in items])
        objects = [event["data"]["object"] for event, _ in items]
        subscriptions = {event["data"]["object"]["id"] for event, _ in items  # the model made it a Stripe id
                         if event["type"].startswith("customer.subscription.")}
        provisions = ProvisionBatch(
            webhooks.load_provisions(tx, {c for obj in objects if isinstance(c := obj.get("customer"), str)}),
            webhooks.subscription_owners(tx, sorted(subscriptions)), utc_now())
        records: list[EventRecord] = []
        results: list[Ingested] = []
        for event, text in items:
            if event["id"] in seen:
                results.append(Ingested(event["id"], duplicate=True))
                continue
            seen.add(event["id"])
            applied = self._provisions.apply_to(provisions, event)
            records.append(EventRecord(_ref(event), text, applied.customer_id, applied.note))
            results.append(Ingested(event["id"], duplicate=False, note=applied.note, customer_id=applied.customer_id))
        webhooks.save_provisions(tx, provisions.changed())
        webhooks.record_events(tx, records)
        return results

    def _job(self, event: CheckedEvent, text: str) -> Callable[[Tx], Ingested]:
        """An event's own job: the services that apply it read and write through the transaction themselves."""

        def job(tx: Tx) -> Ingested:
            # Apply first, then record: a duplicate's record fails on the UNIQUE id (DuplicateEvent) and the
            # savepoint undoes the apply with it (one statement fewer than insert-check-apply-update on the common,
            # first delivery).
            if event["type"].startswith("payment_intent.") and self._commerce is not None:
                obj = (event.get("data") or {}).get("object") or {}
                customer = obj.get("customer") if isinstance(obj.get("customer"), str) else None
                applied = Applied(customer, self._commerce.apply_event(tx, event))
            else:
                applied = self._provisions.apply(tx, event)
            if self._connect is not None and (note := self._connect.apply_event(tx, event)) is not None:
                applied = Applied(applied.customer_id, note if applied.note is None else f"{applied.note}; {note}")
            self._store.webhooks.record_event(tx, EventRef(event["id"], event["type"], int(event["created"])), text,
                                              customer_id=applied.customer_id, note=applied.note)
            return Ingested(event["id"], duplicate=False, note=applied.note, customer_id=applied.customer_id)

        return job

    def recent(self, limit: int = 20) -> list[StoredEvent]:
        """The most recently received events, newest first (without their payloads)."""
        return self._store.webhooks.list_events(limit)


def _held_elsewhere(provisions: Provisions, subscription_id: str, customer: str) -> str | None:
    """The note for an event that gives `customer` a subscription another customer's provision holds (a Stripe
    subscription belongs to one customer; a subscription id is UNIQUE across provisions), or None."""
    owner = provisions.owner_of(subscription_id)
    if owner is None or owner == customer:
        return None
    return f"subscription {subscription_id} is provisioned for another customer ({owner}): stored, not applied"


def _supersedes(row: Provision, created: int, status: str, sub_id: str) -> bool:
    last = row.last_event_created or 0
    if row.subscription_id not in (None, sub_id) and row.status in LIVE and status not in LIVE:
        return False  # the end of an old subscription must not downgrade a live newer one
    if created != last:
        return created > last
    return row.subscription_id != sub_id or STATUS_RANK.get(status, 0) >= STATUS_RANK.get(row.status, 0)


def _ref(event: dict[str, Any]) -> EventRef:
    return EventRef(event["id"], event["type"], event["created"])


def _price_of(sub: dict[str, Any]) -> str | None:
    items = (sub.get("items") or {}).get("data") or []
    price = (items[0].get("price") or {}) if items else {}
    return price.get("id") if isinstance(price, dict) else price


def period_end_of(sub: dict[str, Any]) -> int | None:
    ends = [item.get("current_period_end") for item in (sub.get("items") or {}).get("data") or []]
    ends = [end for end in ends if end] or ([sub["current_period_end"]] if sub.get("current_period_end") else [])
    return max(ends) if ends else None


def _period_start(sub: dict[str, Any]) -> int | None:
    starts = [item.get("current_period_start") for item in (sub.get("items") or {}).get("data") or []]
    starts = [start for start in starts if start] or (
        [sub["current_period_start"]] if sub.get("current_period_start") else [])
    return max(starts) if starts else None


def commitment_end_of(sub: dict[str, Any], pricing: Pricing) -> int | None:
    metadata = sub.get("metadata") or {}
    tier = pricing.tiers.get(metadata.get(TIER_METADATA, ""))
    start = sub.get("start_date") or sub.get("created")
    months = int(metadata.get("aims_delivered_months") or (tier.delivered_months if tier else 0))
    return add_months(int(start), months) if start and months else None
