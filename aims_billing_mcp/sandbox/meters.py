"""Billing meters (``/v1/billing/meters``), meter events (v1 ``/v1/billing/meter_events`` and the v2
session + stream), and event summaries.

Meter events are kept in their own table (``meter_events``), keyed by ``identifier`` forever, so a
repeated identifier (from v1 or v2) is accepted without counting twice. Usage is aggregated on
read: ``sum``, ``count`` or ``last`` over ``[start, end)`` for one customer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Mapping
from typing import Any

from .core import LIST_PARAMS, Ctx, Obj, Route, list_page
from .errors import StripeError, invalid, missing, no_such
from .ids import new_id, random_base62
from .params import Params

MAX_AGE = 35 * 86400
MAX_AHEAD = 300
SESSION_TTL = 15 * 60
MAX_STREAM_EVENTS = 100
FORMULAS = ("sum", "count", "last")
WINDOWS = {"hour": 3600, "day": 86400}


# -- meters ------------------------------------------------------------------------------------

def _active_meter(ctx: Ctx, event_name: str) -> Obj | None:
    found, _ = ctx.store.page("billing.meter", {"event_name": event_name, "status": "active"}, limit=1)
    return found[0] if found else None


def create_meter(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("display_name", "event_name", "default_aggregation", "customer_mapping", "value_settings",
             "event_time_window"))
    display_name = p.req_str("display_name")
    event_name = p.req_str("event_name")
    if len(event_name) > 100:
        raise invalid("event_name", "event_name can be at most 100 characters.")
    aggregation = p.sub("default_aggregation", required=True)
    assert aggregation is not None
    aggregation.allow(("formula",))
    formula = aggregation.req_str("formula", choices=FORMULAS)
    mapping = p.sub("customer_mapping")
    payload_key = "stripe_customer_id"
    if mapping is not None:
        mapping.allow(("event_payload_key", "type"))
        payload_key = mapping.req_str("event_payload_key")
        mapping.req_str("type", choices=("by_id",))
    settings = p.sub("value_settings")
    value_key = "value"
    if settings is not None:
        settings.allow(("event_payload_key",))
        value_key = settings.req_str("event_payload_key")
    window = p.string("event_time_window", choices=("day", "hour"))
    if _active_meter(ctx, event_name) is not None:
        raise invalid("event_name", f"An active meter with event_name `{event_name}` already exists.")
    meter: Obj = {
        "id": new_id("mtr_test_", 32),
        "object": "billing.meter",
        "created": ctx.now,
        "customer_mapping": {"event_payload_key": payload_key, "type": "by_id"},
        "default_aggregation": {"formula": formula},
        "display_name": display_name,
        "event_name": event_name,
        "event_time_window": window,
        "livemode": False,
        "status": "active",
        "status_transitions": {"deactivated_at": None},
        "updated": ctx.now,
        "value_settings": {"event_payload_key": value_key},
    }
    ctx.store.insert(meter)
    return meter


def retrieve_meter(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return ctx.fetch("billing.meter", args["id"], "billing.meter", "id")


def update_meter(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    p.allow(("display_name",))
    meter = ctx.fetch("billing.meter", args["id"], "billing.meter", "id")
    if p.has("display_name"):
        meter["display_name"] = p.req_str("display_name")
        meter["updated"] = ctx.now
        ctx.store.update(meter)
    return meter


def list_meters(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "status"))
    status = p.string("status", choices=("active", "inactive"))
    return list_page(ctx, p, "billing.meter", "/v1/billing/meters", {"status": status} if status else {})


def _set_status(ctx: Ctx, meter_id: str, status: str) -> Obj:
    meter = ctx.fetch("billing.meter", meter_id, "billing.meter", "id")
    if meter["status"] == status:
        raise StripeError(400, f"This meter is already {status}.")
    if status == "active" and _active_meter(ctx, meter["event_name"]) is not None:
        raise invalid("event_name", f"An active meter with event_name `{meter['event_name']}` already exists.")
    meter["status"] = status
    meter["status_transitions"]["deactivated_at"] = ctx.now if status == "inactive" else None
    meter["updated"] = ctx.now
    ctx.store.update(meter)
    return meter


def deactivate_meter(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return _set_status(ctx, args["id"], "inactive")


def reactivate_meter(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return _set_status(ctx, args["id"], "active")


# -- summaries ---------------------------------------------------------------------------------

def _summary_id(meter: str, customer: str, start: int, end: int) -> str:
    digest = hashlib.sha256(f"{meter}|{customer}|{start}|{end}".encode()).hexdigest()[:40]
    return f"mtrusg_test_{digest}"


def list_summaries(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    """Summaries over ``[start_time, end_time)``: one, or one per hour/day window (oldest first)."""
    p.allow((*LIST_PARAMS, "customer", "start_time", "end_time", "value_grouping_window"))
    meter = ctx.fetch("billing.meter", args["id"], "billing.meter", "id")
    customer = p.req_str("customer")
    start = p.integer("start_time", required=True)
    end = p.integer("end_time", required=True)
    assert start is not None and end is not None
    window = p.string("value_grouping_window", choices=("day", "hour"))
    for key, value in (("start_time", start), ("end_time", end)):
        if value % 60:
            raise invalid(key, f"{key} must be aligned with minute boundaries.", code="parameter_invalid_integer")
        if window is not None and value % WINDOWS[window]:
            raise invalid(key, f"{key} must be aligned with {window} boundaries (UTC) when value_grouping_window "
                          f"is {window}.", code="parameter_invalid_integer")
    if end <= start:
        raise invalid("end_time", "end_time must be after start_time.", code="parameter_invalid_integer")
    step = WINDOWS[window] if window else end - start
    formula = meter["default_aggregation"]["formula"]
    summaries: list[Obj] = []
    for lo in range(start, end, step):
        hi = min(lo + step, end)
        summaries.append({
            "id": _summary_id(meter["id"], customer, lo, hi),
            "object": "billing.meter_event_summary",
            "aggregated_value": ctx.store.meter_usage(meter["id"], customer, lo, hi, formula),
            "end_time": hi,
            "livemode": False,
            "meter": meter["id"],
            "start_time": lo,
        })
    limit = p.integer("limit") or 10
    if not 1 <= limit <= 100:
        raise invalid("limit", "This value must be greater than or equal to 1 and less than or equal to 100.",
                      code="parameter_invalid_integer")
    ids = [s["id"] for s in summaries]
    begin, stop = 0, len(summaries)
    after, before = p.string("starting_after"), p.string("ending_before")
    if after is not None:
        if after not in ids:
            raise no_such("billing.meter_event_summary", after, "starting_after")
        begin = ids.index(after) + 1
        page = summaries[begin:begin + limit]
        more = begin + limit < stop
    elif before is not None:
        if before not in ids:
            raise no_such("billing.meter_event_summary", before, "ending_before")
        stop = ids.index(before)
        page = summaries[max(0, stop - limit):stop]
        more = stop - limit > 0
    else:
        page, more = summaries[:limit], len(summaries) > limit
    return {"object": "list", "data": page, "has_more": more,
            "url": f"/v1/billing/meters/{meter['id']}/event_summaries"}


# -- meter events ------------------------------------------------------------------------------

def ingest(ctx: Ctx, event_name: str | None, payload: Any, identifier: str | None, timestamp: int | None,
           *, prefix: str = "") -> Obj:
    """Validate and record one meter event (v1 or v2); a known identifier is accepted, not counted."""
    if not event_name:
        raise missing(f"{prefix}event_name")
    if identifier is not None and (not identifier or len(identifier) > 100):
        raise invalid(f"{prefix}identifier", "identifier must be between 1 and 100 characters.")
    identifier = identifier or str(uuid.uuid4())
    when = ctx.now if timestamp is None else timestamp
    if when < ctx.now - MAX_AGE:
        raise invalid(f"{prefix}timestamp", "Timestamp must be within the past 35 calendar days.",
                      code="timestamp_too_far_in_past")
    if when > ctx.now + MAX_AHEAD:
        raise invalid(f"{prefix}timestamp", "Timestamp must not be more than 5 minutes in the future.",
                      code="timestamp_in_future")
    meter = _active_meter(ctx, event_name)
    if meter is None:
        raise invalid(f"{prefix}event_name", f"No active meter was found for event_name `{event_name}`.")
    if not isinstance(payload, dict):
        raise missing(f"{prefix}payload")
    customer_key = meter["customer_mapping"]["event_payload_key"]
    value_key = meter["value_settings"]["event_payload_key"]
    customer = payload.get(customer_key)
    if not isinstance(customer, str) or not customer:
        raise missing(f"{prefix}payload[{customer_key}]")
    if ctx.store.get(customer, "customer") is None:
        raise invalid(f"{prefix}payload[{customer_key}]", f"No such customer: '{customer}'",
                      code="resource_missing")
    raw_value = payload.get(value_key)
    if raw_value is None and meter["default_aggregation"]["formula"] == "count":
        raw_value = "1"
    if raw_value is None or raw_value == "":
        raise missing(f"{prefix}payload[{value_key}]")
    try:
        value = int(str(raw_value), 10)
    except ValueError:
        raise invalid(f"{prefix}payload[{value_key}]", f"Invalid integer: {raw_value}",
                      code="parameter_invalid_integer") from None
    ctx.store.meter_event_add(identifier, meter["id"], event_name, customer, value, when, ctx.now)
    return {
        "object": "billing.meter_event",
        "created": ctx.now,
        "event_name": event_name,
        "identifier": identifier,
        "livemode": False,
        "payload": {k: str(v) for k, v in payload.items()},
        "timestamp": when,
    }


def create_meter_event(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow(("event_name", "payload", "identifier", "timestamp"))
    return ingest(ctx, p.string("event_name"), p.raw("payload"), p.string("identifier") if p.has("identifier")
                  else None, p.integer("timestamp"))


# -- v2: session and stream --------------------------------------------------------------------

def rfc3339(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def parse_rfc3339(text: str) -> int:
    parsed = dt.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp())


def create_session(ctx: Ctx) -> Obj:
    """A v2 meter event session: a token for the stream, valid 15 minutes (of sandbox time)."""
    session_id = f"mtres_test_{random_base62(32)}"
    token = f"ek_test_{random_base62(48)}"
    ctx.store.session_add(token, session_id, ctx.now + SESSION_TTL)
    return {
        "id": session_id,
        "object": "v2.billing.meter_event_session",
        "authentication_token": token,
        "created": rfc3339(ctx.now),
        "expires_at": rfc3339(ctx.now + SESSION_TTL),
        "livemode": False,
    }


def session_valid(ctx: Ctx, token: str | None) -> bool:
    if not token:
        return False
    expires = ctx.store.session_expiry(token)
    return expires is not None and ctx.now < expires


def stream(ctx: Ctx, events: list[Any], errors: list[Obj]) -> None:
    """Ingest a validated-size batch; invalid events are dropped, appended to ``errors`` and reported (thin
    ``v1.billing.meter.error_report_triggered`` events, one per meter)."""
    dropped: list[tuple[Any, Any, StripeError]] = []
    for index, raw in enumerate(events):
        prefix = f"events[{index}]."
        event = raw if isinstance(raw, dict) else {}
        identifier = event.get("identifier")
        try:
            timestamp = event.get("timestamp")
            when: int | None = None
            if timestamp is not None:
                try:
                    when = parse_rfc3339(str(timestamp))
                except ValueError:
                    raise invalid(f"{prefix}timestamp", f"Invalid RFC 3339 timestamp: {timestamp}") from None
            ingest(ctx, event.get("event_name"), event.get("payload"),
                   None if identifier is None else str(identifier), when, prefix=prefix)
        except StripeError as exc:
            errors.append({"identifier": identifier, "event_name": event.get("event_name"), "code": exc.code,
                           "param": exc.param, "message": exc.message, "received_at": ctx.now})
            dropped.append((event.get("event_name"), identifier, exc))
    report_errors(ctx, dropped)


# -- v2: error reports (``v1.billing.meter.error_report_triggered``, a thin event) --------------------------------

V2_EVENT = "v2.core.event"
ERROR_REPORT = "v1.billing.meter.error_report_triggered"


def _report_code(exc: StripeError, meter: Obj) -> str | None:
    """Stripe's error report code for an event the meter dropped; None for a refusal no meter reports."""
    param = exc.param or ""
    if exc.code in ("timestamp_too_far_in_past", "timestamp_in_future"):
        return exc.code
    if param.endswith(f"payload[{meter['customer_mapping']['event_payload_key']}]"):
        return "meter_event_customer_not_found" if exc.code == "resource_missing" else "meter_event_no_customer_defined"
    if param.endswith(f"payload[{meter['value_settings']['event_payload_key']}]"):
        return "meter_event_invalid_value"
    return None


def report_errors(ctx: Ctx, dropped: list[tuple[Any, Any, StripeError]]) -> None:
    """One error report per meter for the events a stream request dropped (Stripe sends one per meter and
    validation window; here the window is the request): the thin event goes to the webhook endpoint, the full one
    (with its ``data``) is kept for ``GET /v2/core/events/{id}``."""
    by_meter: dict[str, list[tuple[str, str, str]]] = {}
    for event_name, identifier, exc in dropped:
        meter = _active_meter(ctx, event_name) if isinstance(event_name, str) else None
        code = None if meter is None else _report_code(exc, meter)
        if meter is not None and code is not None:  # no meter: Stripe's `no_meter_found`, not reported here
            by_meter.setdefault(meter["id"], []).append((code, str(identifier or ""), exc.message))
    for meter_id, failures in by_meter.items():
        types: dict[str, list[tuple[str, str]]] = {}
        for code, identifier, message in failures:
            types.setdefault(code, []).append((identifier, message))
        thin: Obj = {
            "id": new_id("evt_test_"), "object": V2_EVENT, "type": ERROR_REPORT, "created": rfc3339(ctx.now),
            "livemode": False, "context": None, "reason": None,
            "related_object": {"id": meter_id, "type": "billing.meter", "url": f"/v1/billing/meters/{meter_id}"},
        }
        ctx.store.insert({**thin, "data": {
            "developer_message_summary": f"There are {len(failures)} invalid meter events.",
            "reason": {"error_count": len(failures), "error_types": [
                {"code": code, "error_count": len(samples), "sample_errors": [
                    {"error_message": message, "request": {"identifier": identifier}} for identifier, message
                    in samples[:20]]} for code, samples in types.items()]},
            "validation_start": rfc3339(ctx.now), "validation_end": rfc3339(ctx.now),
        }})
        ctx.events.append(thin)  # delivered after commit, like every event


def retrieve_v2_event(ctx: Ctx, event_id: str) -> Obj:
    """``GET /v2/core/events/{id}``: a thin event's full form, with its ``data``."""
    found = ctx.store.get(event_id, V2_EVENT)
    if found is None:
        raise StripeError(404, f"No such event: '{event_id}'", code="not_found")
    return found


ROUTES = [
    Route("POST", "/v1/billing/meters", create_meter),
    Route("GET", "/v1/billing/meters", list_meters),
    Route("GET", "/v1/billing/meters/{id}", retrieve_meter),
    Route("POST", "/v1/billing/meters/{id}", update_meter),
    Route("POST", "/v1/billing/meters/{id}/deactivate", deactivate_meter),
    Route("POST", "/v1/billing/meters/{id}/reactivate", reactivate_meter),
    Route("GET", "/v1/billing/meters/{id}/event_summaries", list_summaries),
    Route("POST", "/v1/billing/meter_events", create_meter_event),
]
