"""Stripe events, each stored once and applied in the same transaction.

The event id is UNIQUE in `webhook_events`, and the insert and the provision update run in one writer job: a
duplicate delivery (even five at once) inserts nothing and applies nothing, and a crash leaves either both or
neither. Events of any type are stored and acknowledged; only the ones that change a provision are applied.

Every event is parsed into a strict model first (`check_event`): an envelope (`id`, `type`, `created`, `data`)
and, for the types that are applied, the fields of `data.object` the handlers read. A signed event of another
shape (`"type": 123`, `"created": "abc"`, an `id` that is null or an object, `data.object` a list, nesting deeper
than the parser goes, a lone surrogate anywhere) raises `InvalidEvent`: the endpoint answers 400, nothing stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from .. import jsonsafe
from ..store import Store, Tx
from ..store.webhooks import DuplicateEvent, EventRef, StoredEvent
from .commerce import PaymentSessionService
from .connect import ConnectService
from .subscriptions import Applied, SubscriptionService


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
    status: Word | None = None
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


class WebhookEventService:
    def __init__(self, store: Store, subscriptions: SubscriptionService,
                 commerce: PaymentSessionService | None = None, connect: ConnectService | None = None) -> None:
        self._store = store
        self._subscriptions = subscriptions
        self._commerce = commerce
        self._connect = connect

    async def ingest(self, event: dict[str, Any], payload: bytes | str) -> Ingested:
        """Store and apply `event` (the decoded `payload`) once; `InvalidEvent` when its shape is not one we can
        apply (see `check_event`)."""
        check_event(event)
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload

        def job(tx: Tx) -> Ingested:
            # Apply first, then record: a duplicate's record fails on the UNIQUE id (DuplicateEvent) and the
            # savepoint undoes the apply with it (one statement fewer than insert-check-apply-update on the common,
            # first delivery).
            if event["type"].startswith("payment_intent.") and self._commerce is not None:
                obj = (event.get("data") or {}).get("object") or {}
                customer = obj.get("customer") if isinstance(obj.get("customer"), str) else None
                applied = Applied(customer, self._commerce.apply_event(tx, event))
            else:
                applied = self._subscriptions.apply_event(tx, event)
            if self._connect is not None and (note := self._connect.apply_event(tx, event)) is not None:
                applied = Applied(applied.customer_id, note if applied.note is None else f"{applied.note}; {note}")
            self._store.webhooks.record_event(tx, EventRef(event["id"], event["type"], int(event["created"])), text,
                                              customer_id=applied.customer_id, note=applied.note)
            return Ingested(event["id"], duplicate=False, note=applied.note, customer_id=applied.customer_id)

        try:
            result = await self._store.write(job)
        except DuplicateEvent:
            return Ingested(event["id"], duplicate=True)
        self._subscriptions.forget(result.customer_id)
        if self._commerce is not None:
            self._commerce.after_webhook(event)
        return result

    def recent(self, limit: int = 20) -> list[StoredEvent]:
        """The most recently received events, newest first (without their payloads)."""
        return self._store.webhooks.list_events(limit)
