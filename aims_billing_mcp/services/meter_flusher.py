"""The meter flusher: delivers pending meter events to Stripe Billing meters, and marks them only once Stripe took them.

Transport. Batches of at most 100 events, oldest first, go through the v2 meter event stream: a meter event session
(`POST /v2/billing/meter_event_session`, a token valid 15 minutes, renewed a minute before it expires or when Stripe
says it expired) authorizes `POST /v2/billing/meter_event_stream` on Stripe's meter-events host. When v2 fails in a
way retrying will not fix (the endpoint is missing, the key may not use it, Stripe refuses the request as a whole),
the batch goes through v1 `POST /v1/billing/meter_events`, one event at a time, with an idempotency key derived from
the identifier; v2 is tried again after V2_COOLDOWN seconds.

Retries. 5xx, network errors and 429 are retried with exponential backoff (`retry_delay_scale` shrinks it in tests),
beyond the gateway's own retries. When they run out, the flush stops and reports why; the events stay pending for
the next flush.

Marking. Events are marked `sent` only after Stripe accepted them, one writer job per batch (which also counts the
attempt). A crash or cancellation between Stripe's acceptance and the mark leaves them pending, so the next flush
sends them again: Stripe deduplicates by identifier (and the sandbox does too), so nothing is counted twice. The mark
of one batch overlaps the sending of the next.

Failing for good. An event is marked `failed`, with the reason, when Stripe can no longer take it (and leaves its
period's counted usage in the same transaction, so nothing Stripe never billed is reported as owed): older than Stripe's
35 days (less a minute's margin, since the v2 stream validates asynchronously and would drop it silently), or refused
by v1 for its own content (an unknown customer, a timestamp out of range). A refusal about the meter itself (no
active meter for the event name) is a setup problem: the flush stops and the events stay pending. Because v2
validates asynchronously, the flusher checks before sending that an active meter exists for each event name (cached
for METER_CHECK_SECONDS); usage recording refuses unknown customers up front.

P2P usage is not sent to the meter: the meter is what subscriptions' metered prices bill, by timestamp, so P2P
usage stamped in the moment a subscription starts (before its webhook arrives) would be billed twice. It is billed
on its own invoice once its period ends (`invoice_p2p`: one per meter used), and marked sent when the flush
reaches it. Every other event goes to Stripe under its own meter's event name (stored with it when recorded).

One flush at a time per flusher (a lock). On SQLite two processes flushing the same database may both send an event,
which Stripe's identifier dedupe absorbs; on PostgreSQL every instance flushes and each batch is leased to one of
them (`store.metering.next_pending`, see store/metering.py), so an event is sent once unless its lease ran out.

Stripe's error reports. The v2 stream validates asynchronously: an event it accepted and later found invalid (its
customer deleted, say) is reported in a thin `v1.billing.meter.error_report_triggered` event (no `data`: the
webhook endpoint hands it to `apply_thin_event`, which reads the full event from `GET /v2/core/events/{id}`). Every
event its samples name (by the identifier Stripe knows it by) is marked failed with Stripe's reason, `refused by
Stripe (<code>): <message>`, and leaves its period's counted usage, pending or already sent. Marking is the state
machine's own edge (sent -> failed, never back), so a repeated delivery changes nothing. Stripe lists samples of
each error type, not always every event: the rest are logged as a count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .. import jsonsafe
from ..errors import (
    BillingError,
    StripeAuthenticationFailed,
    StripeInvalidRequest,
    StripeRateLimited,
    StripeUnavailable,
)
from ..store import Store, Tx, utc_now
from ..store.metering import DEFAULT_METER, FlushRow, OpenP2PPeriod, PendingEvent
from ..stripe_gateway import StripeRequest, StripeResult, StripeSessionExpired, stripe_idempotency_key
from .metering import STRIPE_MAX_AGE
from .metering_models import FlushReport
from .tiers import cost_cents
from .webhook_events import InvalidEvent

log = logging.getLogger(__name__)

MAX_BATCH = 100  # Stripe's limit per v2 stream request
STALE_MARGIN = 60  # seconds short of 35 days at which an event is no longer sent
SESSION_MARGIN = 60  # renew the v2 session this long before it expires
V2_COOLDOWN = 600.0
METER_CHECK_SECONDS = 600.0
KEEP_FLUSHES = 100
TOO_OLD = "older than 35 days: Stripe no longer accepts it"
P2P = "p2p"  # the tier whose usage no meter price bills: it is invoiced per period by `invoice_p2p`
V2_SESSION = "/v2/billing/meter_event_session"
V2_STREAM = "/v2/billing/meter_event_stream"
V1_EVENTS = "/v1/billing/meter_events"
_EVENT_PARAMS = ("payload", "timestamp", "identifier", "value")  # refusals about the event itself, not the setup
_TRANSIENT = (StripeUnavailable, StripeRateLimited)
Transport = Literal["v2", "v1", "mixed", "none"]


THIN = "v2.core.event"
ERROR_REPORT = "v1.billing.meter.error_report_triggered"
MAX_REASON = 500  # characters of Stripe's message kept as an event's reason


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class ThinEvent(_Strict):
    """A thin (v2) event as Stripe posts it: what happened and to which object, no snapshot."""

    id: Annotated[str, StringConstraints(pattern=r"^evt_[A-Za-z0-9_]{1,251}$")]
    object: Literal["v2.core.event"]
    type: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,64}(\.[a-z0-9_]{1,64}){1,6}$")]


class _SampleRequest(_Strict):
    identifier: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class _SampleError(_Strict):
    error_message: Annotated[str, StringConstraints(max_length=5000)] = ""
    request: _SampleRequest | None = None


class _ErrorType(_Strict):
    code: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,100}$")]
    error_count: int = Field(default=0, ge=0)
    sample_errors: list[_SampleError] = Field(default_factory=list, max_length=1000)


class _ErrorReason(_Strict):
    error_count: int = Field(default=0, ge=0)
    error_types: list[_ErrorType] = Field(default_factory=list, max_length=100)


class _ErrorReportData(_Strict):
    reason: _ErrorReason


class _ErrorReport(_Strict):
    """The full `v1.billing.meter.error_report_triggered` event, as far as we read it."""

    id: str
    type: Literal["v1.billing.meter.error_report_triggered"]
    data: _ErrorReportData


def thin_event(payload: bytes) -> ThinEvent | None:
    """The thin (v2) event a verified webhook body carries, or None for a snapshot (v1) event; InvalidEvent when
    it says it is a thin event but is not one we can read."""
    if THIN.encode() not in payload:  # the common case, a v1 event, costs one scan of the bytes
        return None
    try:
        body = jsonsafe.loads(payload.decode("utf-8"))
    except ValueError:
        return None  # the v1 path answers it (400)
    if not isinstance(body, dict) or body.get("object") != THIN:
        return None
    try:
        return ThinEvent.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise InvalidEvent(f"not a thin Stripe event this endpoint can read: {problems}") from None


class Gateway(Protocol):
    async def send(self, request: StripeRequest) -> StripeResult: ...


class _Stop(Exception):
    """The flush cannot go on (Stripe unavailable after retries, no meter): the events stay pending."""


@dataclass
class _Delivery:
    accepted: list[int] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    transport: str = "v2"
    error: str | None = None


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _epoch(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value)).timestamp()


class MeterFlusher:
    def __init__(
        self,
        store: Store,
        gateway: Gateway,
        *,
        batch_size: int = MAX_BATCH,
        clock: Callable[[], float] = time.time,
        retries: int = 4,
        retry_delay_scale: float = 1.0,
        currency: str = "usd",
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be within 1-{MAX_BATCH} (Stripe's limit per stream request)")
        self._store = store
        self._gateway = gateway
        self._batch_size = batch_size
        self._clock = clock
        self._retries = retries
        self._scale = retry_delay_scale
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._token_deadline = 0.0
        self._v2_off_until = 0.0
        self._meters: set[str] = set()
        self._meters_checked = float("-inf")
        self._currency = currency

    # --- one flush ---------------------------------------------------------------------------------------------

    async def flush_once(self, max_events: int | None = None) -> FlushReport:
        """Send what is pending now (oldest first, at most `max_events`), mark what Stripe took, report."""
        async with self._lock:
            started, begun = self._clock(), time.perf_counter()
            sent = failed = batches = 0
            transports: set[str] = set()
            error: str | None = None
            marking: asyncio.Task[None] | None = None
            upto, cursor = self._store.metering.newest_pending_id(), 0
            try:
                while max_events is None or sent + failed < max_events:
                    limit = self._batch_size if max_events is None else min(self._batch_size,
                                                                            max_events - sent - failed)
                    rows = self._store.metering.next_pending(cursor, upto, limit)
                    if not rows:
                        break
                    cursor = rows[-1].id
                    batches += 1
                    oldest_allowed = self._clock() - STRIPE_MAX_AGE + STALE_MARGIN
                    p2p = [row.id for row in rows if row.tier == P2P]  # billed on their period's own invoice
                    metered = [row for row in rows if row.tier != P2P]
                    stale = [(row.id, TOO_OLD) for row in metered if row.timestamp < oldest_allowed]
                    fresh = [row for row in metered if row.timestamp >= oldest_allowed]
                    delivery = await self._deliver(fresh) if fresh else _Delivery(transport="none")
                    delivery.accepted.extend(p2p)
                    if fresh:
                        transports.add(delivery.transport)
                    if marking is not None:
                        await marking
                    marking = asyncio.ensure_future(self._mark(delivery, stale, fresh))
                    sent += len(delivery.accepted)
                    failed += len(delivery.refused) + len(stale)
                    if delivery.error is not None:
                        error = delivery.error
                        break
            except _Stop as stop:
                error = str(stop)
            finally:
                if marking is not None:
                    await marking
            invoiced = 0
            if error is None:
                try:
                    invoiced = await self.invoice_p2p()
                except BillingError as exc:  # Stripe refused or is down: the periods stay open for the next flush
                    error = f"P2P usage not invoiced yet: {exc.message}"
            pending = self._store.metering.pending_count()
            transport: Transport = "none" if not transports else "mixed" if len(transports) > 1 else (
                "v1" if "v1" in transports else "v2")
            report = FlushReport(
                started_at=started, duration_ms=round((time.perf_counter() - begun) * 1000, 3), sent=sent,
                failed=failed, pending=pending, batches=batches,
                transport=transport, error=error, invoiced=invoiced,
            )
            if batches or error or invoiced:
                await self._record(report)
            if error:
                log.warning("meter flush stopped: %s", error)
            return report

    async def run(self, interval_seconds: float) -> None:
        """Flush every `interval_seconds` until cancelled; after a failed flush wait longer (up to 5 minutes)."""
        delay = interval_seconds
        while True:
            try:
                ok = (await self.flush_once()).error is None
            except Exception:  # the loop must outlive any one flush
                log.exception("meter flush failed")
                ok = False
            delay = interval_seconds if ok else min(max(delay, interval_seconds) * 2, 300.0)
            await asyncio.sleep(delay)

    # --- Stripe's error reports ------------------------------------------------------------------------------

    async def apply_thin_event(self, event: ThinEvent) -> int:
        """Apply a thin event: an error report marks the events it names failed (see the module docstring); other
        types are acknowledged and ignored. Returns how many events changed; raises BillingError when the full
        event cannot be read from Stripe (the webhook answers 503, so Stripe delivers it again)."""
        if event.type != ERROR_REPORT:
            return 0
        full = (await self._gateway.send(StripeRequest("get", f"/v2/core/events/{event.id}"))).data
        try:
            report = _ErrorReport.model_validate(full)
        except ValidationError as exc:
            raise InvalidEvent(f"Stripe's event {event.id} is not an error report we can read: "
                               f"{exc.errors()[0]['msg']}") from None
        reason = report.data.reason
        failures = [(sample.request.identifier, f"refused by Stripe ({kind.code}): {sample.error_message}"[:MAX_REASON])
                    for kind in reason.error_types for sample in kind.sample_errors if sample.request is not None]
        now = int(self._clock())
        changed: int = await self._store.write(lambda tx: self._store.metering.fail_reported(tx, failures, now))
        unnamed = max(reason.error_count, sum(kind.error_count for kind in reason.error_types)) - len(failures)
        log.warning("Stripe reported %d invalid meter events (%s): %d marked failed%s", max(reason.error_count,
                    len(failures)), ", ".join(kind.code for kind in reason.error_types), changed,
                    f"; {unnamed} not named in its samples" if unnamed > 0 else "")
        return changed

    # --- P2P invoices ------------------------------------------------------------------------------------------

    async def invoice_p2p(self) -> int:
        """Invoice every ended P2P period whose events all reached Stripe: one invoice per customer and period, with
        one line of the period's usage at the P2P rate (the summary's overage cost, the sum of the events' answered
        costs), sent to the customer (`send_invoice`, due in 30 days). P2P has no subscription, so no metered price
        bills it. Each step is idempotent and checked, so a crash or an outage between steps resumes without a
        second invoice or line. Returns how many periods were invoiced."""
        now = int(self._clock())
        metering = self._store.metering
        done = 0
        for row in metering.open_p2p_periods(now, limit=100):
            if metering.period_has_pending(row.customer_id, row.period_start, row.meter):
                continue  # a pending event may yet fail; invoice what Stripe holds, once it is settled
            amount = cost_cents(max(0, row.weighted_units - (row.allowance or 0)), row.overage_rate or 0)
            invoice_id = row.invoice_id
            if amount > 0:
                invoice_id = await self._p2p_invoice(row, amount)

            def invoiced(tx: Tx, row: OpenP2PPeriod = row, invoice_id: str | None = invoice_id) -> None:
                metering.mark_period_invoiced(tx, row.customer_id, row.period_start, invoice_id, now, row.meter)

            await self._store.write(invoiced)
            done += 1
        return done

    async def _p2p_invoice(self, row: OpenP2PPeriod, amount: int) -> str:
        customer, start, end, meter = row.customer_id, row.period_start, row.period_end, row.meter
        luc = meter == DEFAULT_METER
        scope = f"{customer}:{start}" if luc else f"{customer}:{start}:{meter}"  # LUC's keys as they always were
        invoice_id = row.invoice_id
        if invoice_id is None:
            invoice = (await self._gateway.send(StripeRequest("post", "/v1/invoices", {
                "customer": customer, "collection_method": "send_invoice", "days_until_due": 30,
                "pending_invoice_items_behavior": "exclude", "currency": self._currency,
                "description": f"{'LUC' if luc else meter} usage, pay per use: {rfc3339(start)[:10]} to "
                               f"{rfc3339(end)[:10]}",
                "metadata": {"aims_usage_period_start": str(start), "aims_usage_period_end": str(end),
                             **({} if luc else {"aims_meter": meter})},
            }, stripe_idempotency_key("p2p_usage_invoice", scope)))).data
            invoice_id = str(invoice["id"])
            created = invoice_id
            await self._store.write(lambda tx: self._store.metering.set_period_invoice(tx, customer, start, created,
                                                                                       meter))
        else:
            invoice = (await self._gateway.send(StripeRequest("get", f"/v1/invoices/{invoice_id}"))).data
        if invoice["status"] == "draft":
            if not invoice["lines"]["data"]:
                await self._gateway.send(StripeRequest("post", "/v1/invoiceitems", {
                    "customer": customer, "invoice": invoice_id, "amount": amount, "currency": self._currency,
                    "description": f"{row.weighted_units:,} {'weighted LUC' if luc else meter} units at "
                                   f"{row.overage_rate} cents per 1,000",
                    "period": {"start": start, "end": end},
                }, stripe_idempotency_key("p2p_usage_item", invoice_id)))
            await self._gateway.send(StripeRequest("post", f"/v1/invoices/{invoice_id}/finalize", {},
                                                   stripe_idempotency_key("p2p_usage_finalize", invoice_id)))
        return str(invoice_id)

    # --- marking -----------------------------------------------------------------------------------------------

    async def _mark(self, delivery: _Delivery, stale: list[tuple[int, str]], fresh: Sequence[PendingEvent]) -> None:
        now = int(self._clock())
        sent_at = utc_now()
        settled = set(delivery.accepted) | {event_id for event_id, _ in delivery.refused}
        unsettled = [row.id for row in fresh if row.id not in settled]
        metering = self._store.metering

        def mark(tx: Tx) -> None:
            metering.mark_sent(tx, delivery.accepted, sent_at)
            metering.mark_failed(tx, delivery.refused, now, attempted=True)
            metering.mark_failed(tx, stale, now, attempted=False)
            metering.note_attempt(tx, unsettled, delivery.error)

        if delivery.accepted or delivery.refused or stale or unsettled:
            await self._store.write(mark)

    async def _record(self, report: FlushReport) -> None:
        flush = FlushRow(int(report.started_at), int(self._clock()), report.sent, report.failed, report.pending,
                         report.transport, report.error)
        await self._store.write(lambda tx: self._store.metering.record_flush(tx, flush, KEEP_FLUSHES))

    # --- delivery ----------------------------------------------------------------------------------------------

    async def _deliver(self, rows: Sequence[PendingEvent]) -> _Delivery:
        await self._check_meters({row.event_name for row in rows})
        if self._clock() >= self._v2_off_until:
            try:
                await self._send_v2(rows)
            except (StripeInvalidRequest, StripeAuthenticationFailed) as exc:
                log.warning("v2 meter event stream unusable (%s); falling back to v1 for %.0f s", exc, V2_COOLDOWN)
                self._v2_off_until = self._clock() + V2_COOLDOWN
            except _TRANSIENT as exc:
                return _Delivery(transport="v2", error=f"Stripe did not take the batch after retries: {exc.message}")
            else:
                return _Delivery(accepted=[row.id for row in rows], transport="v2")
        return await self._send_v1(rows)

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(min(0.5 * 2**attempt, 8.0) * self._scale)

    async def _session(self) -> str:
        if self._token is not None and self._clock() < self._token_deadline:
            return self._token
        result = await self._gateway.send(StripeRequest("post", V2_SESSION, {}))
        data = result.data
        ttl = _epoch(data["expires_at"]) - _epoch(data["created"])  # in Stripe's clock; we count it in ours
        self._token = str(data["authentication_token"])
        self._token_deadline = self._clock() + (ttl - SESSION_MARGIN if ttl > 2 * SESSION_MARGIN else ttl / 2)
        return self._token

    async def _send_v2(self, rows: Sequence[PendingEvent]) -> None:
        events = [_meter_event(row, rfc3339(row.timestamp)) for row in rows]
        attempt = 0
        while True:
            try:
                token = await self._session()
                await self._gateway.send(StripeRequest("post", V2_STREAM, {"events": events}, base="meter_events",
                                                       api_key=token))
                return
            except StripeSessionExpired:
                self._token = None
                if attempt >= self._retries:
                    raise
            except _TRANSIENT:
                if attempt >= self._retries:
                    raise
                await self._backoff(attempt)
            attempt += 1

    async def _send_v1(self, rows: Sequence[PendingEvent]) -> _Delivery:
        delivery = _Delivery(transport="v1")
        for row in rows:
            request = StripeRequest("post", V1_EVENTS, _meter_event(row, row.timestamp),
                                    stripe_idempotency_key("meter_event", row.identifier))
            attempt = 0
            while True:
                try:
                    await self._gateway.send(request)
                except StripeInvalidRequest as exc:
                    if (exc.param or "").startswith(_EVENT_PARAMS):
                        delivery.refused.append((row.id, f"refused by Stripe: {exc.message}"))
                        break
                    delivery.error = f"Stripe refused the meter event ({exc.param or 'request'}): {exc.message}"
                    return delivery
                except _TRANSIENT as exc:
                    if attempt >= self._retries:
                        delivery.error = f"Stripe did not take the event after retries: {exc.message}"
                        return delivery
                    await self._backoff(attempt)
                    attempt += 1
                    continue
                except BillingError as exc:
                    delivery.error = f"Stripe refused the meter event: {exc.message}"
                    return delivery
                delivery.accepted.append(row.id)
                break
        return delivery

    async def _check_meters(self, event_names: set[str]) -> None:
        """Refuse to send (the events stay pending) while an event name has no active meter: v2 would drop them."""
        now = self._clock()
        if event_names <= self._meters and now - self._meters_checked < METER_CHECK_SECONDS:
            return
        active: set[str] = set()
        params: dict[str, Any] = {"status": "active", "limit": 100}
        try:
            while True:
                page = (await self._gateway.send(StripeRequest("get", "/v1/billing/meters", params))).data
                active.update(meter["event_name"] for meter in page.get("data", []))
                if not page.get("has_more") or not page.get("data"):
                    break
                params = {**params, "starting_after": page["data"][-1]["id"]}
        except StripeAuthenticationFailed:  # a restricted key that may send events but not list meters
            self._meters, self._meters_checked = set(event_names), now
            return
        except BillingError as exc:
            raise _Stop(f"could not check the billing meters: {exc.message}") from None
        self._meters, self._meters_checked = active, now
        missing = sorted(event_names - active)
        if missing:
            self._meters_checked = float("-inf")
            raise _Stop(f"no active Stripe billing meter for event name {', '.join(missing)}: run "
                        "`aims-billing-mcp setup-stripe` to create it; the events stay pending")


def _meter_event(row: PendingEvent, timestamp: str | int) -> dict[str, Any]:
    """A stored event as Stripe takes it: v2 wants the timestamp in RFC 3339, v1 in epoch seconds."""
    return {
        "event_name": row.event_name,
        "payload": {"stripe_customer_id": row.customer_id, "value": str(row.weighted_units)},
        "identifier": row.identifier,
        "timestamp": timestamp,
    }
