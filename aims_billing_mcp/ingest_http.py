"""`POST /v1/usage/events`: usage from services that are not MCP clients, on the same code path as the
`create_meter_events` tool (`MeteringService.record_many`: each event accepted, replayed or refused on its own, the
accepted ones written in one group-committed job before the answer).

- **Keys**: `Authorization: Bearer <key>`, a key of `AIMS_BILLING_INGEST_KEYS` (comma-separated, held as SecretStr;
  separate from the MCP token). The presented key's SHA-256 is compared with every configured key's SHA-256 by
  `hmac.compare_digest`, all of them each time, so neither the match nor its position shows in the timing. No key
  or another key: 401, nothing stored; ingestion without configured keys: 403.
- **Bodies**: a JSON array of events with create_meter_event's fields (`Content-Type: application/json`, or none),
  or a CloudEvents batch (`application/cloudevents-batch+json`): each CloudEvent's `subject` is the customer, `id`
  the identifier, `time` (RFC 3339) the timestamp, `type` the meter (a meter id of the pricing file, e.g.
  `luc_tokens` or `compute_seconds`, or its Stripe event name, e.g. `aims_luc_units`), `data` the rest (`units`,
  `operation` or `multiplier`, `agent_id`, `metadata`). A JSON event names its meter in `meter` (default
  `luc_tokens`). At most
  MAX_EVENTS events (else 413) and the body cap of http_guard's LIMITS table (413 before the body is read).
  JSON that is neither: 400; another media type: 415.
- **Answer**: 200 with one result per event in order and totals, as the tool answers; a CloudEvent's refusal names
  its own attribute (`subject`, `id`, `time`, `type`, `data.units`, ...).
- **Policy**: read-only mode and the allow-list govern it as the tool `create_meter_events` (http_guard.py).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import jsonsafe
from .errors import BillingError, InvalidInput
from .services.metering_models import MeterEventBatchResult

if TYPE_CHECKING:
    from .services.tiers import Pricing
    from .settings import Settings
    from .state import AppState

log = logging.getLogger(__name__)
MAX_EVENTS = 1000
JSON = "application/json"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"
_CE_ATTRIBUTES = ("specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema", "data")
_CE_FIELDS = {"customer": "subject", "identifier": "id", "timestamp": "time", "meter": "type"}  # ours -> CloudEvents
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="aims-billing-ingest"'}


class IngestRefused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class IngestKeys:
    """The configured ingestion keys, kept as SHA-256 digests and compared in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    @classmethod
    def from_settings(cls, settings: Settings) -> IngestKeys:
        return _keys(tuple(key.get_secret_value() for key in settings.aims_billing_ingest_keys))

    def authenticate(self, authorization: str | None) -> str:
        """The caller (`ingest:<digest prefix>`) for `Bearer <a configured key>`; else IngestRefused (401/403)."""
        if not self._digests:
            raise IngestRefused(403, "ingest_disabled", "usage ingestion over HTTP is off: set "
                                "AIMS_BILLING_INGEST_KEYS (comma-separated keys) and send one as Authorization: "
                                "Bearer <key>")
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise IngestRefused(401, "unauthorized", "send Authorization: Bearer <key>, a key of "
                                "AIMS_BILLING_INGEST_KEYS (not the MCP token)")
        given = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        matched = False
        for digest in self._digests:  # every key, every time: the timing says nothing about which matched
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise IngestRefused(401, "invalid_api_key", "the bearer key is not one of AIMS_BILLING_INGEST_KEYS")
        return f"ingest:{given.hex()[:16]}"


def authenticate(state: Any, authorization: str | None) -> str:
    """The caller of a request, by the keys configured in the state's settings (hashed once, not per request: the
    guard and the route both ask)."""
    return IngestKeys.from_settings(state.settings).authenticate(authorization)


@functools.lru_cache(maxsize=4)
def _keys(values: tuple[str, ...]) -> IngestKeys:
    return IngestKeys(values)


def _refusal(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


def ingest_handler(get_state: Callable[[], AppState | None]) -> Callable[[Request], Awaitable[Response]]:

    async def handle(request: Request) -> Response:
        state = get_state()
        if state is None:
            return _refusal(503, "starting", "the server is starting: retry", {"Retry-After": "1"})
        try:
            authenticate(state, request.headers.get("authorization"))
        except IngestRefused as exc:
            return _refusal(exc.status, exc.code, exc.message, _CHALLENGE if exc.status == 401 else None)
        media = request.headers.get("content-type", JSON).split(";", 1)[0].strip().lower()
        if media not in (JSON, CLOUDEVENTS_BATCH):
            return _refusal(415, "unsupported_media_type", f"Content-Type {media!r} is not taken: send a JSON array "
                            f"of events as {JSON}, or a CloudEvents batch as {CLOUDEVENTS_BATCH}")
        try:
            body = jsonsafe.loads(await request.body())
        except ValueError as exc:
            return _refusal(400, "invalid_json", f"the body is not JSON ({exc}): send a JSON array of events")
        if not isinstance(body, list) or not body:
            kind = "an empty array" if isinstance(body, list) else f"a JSON {type(body).__name__}"
            return _refusal(400, "invalid_body", f"the body is {kind}: send a JSON array of 1-{MAX_EVENTS} events "
                            f"({JSON}: objects with create_meter_event's fields; {CLOUDEVENTS_BATCH}: CloudEvents)")
        if len(body) > MAX_EVENTS:
            return _refusal(413, "too_many_events", f"{len(body)} events in one request; at most {MAX_EVENTS} are "
                            f"taken: split them into requests of {MAX_EVENTS}")
        cloud = media == CLOUDEVENTS_BATCH
        items = [from_cloudevent(item, state.pricing) for item in body] if cloud else body
        try:
            result = await state.metering.record_many(items, limit=MAX_EVENTS)
        except BillingError as exc:
            return _refusal(400, exc.code, exc.message)
        except Exception:  # the write itself failed (disk full, database broken): nothing of the batch was recorded
            log.exception("recording a batch of %d usage events failed", len(items))
            return _refusal(503, "write_failed", "the batch could not be written and none of it was recorded: retry "
                            "it (replays are safe); if it keeps failing, see the server's log", {"Retry-After": "1"})
        if cloud:
            cloudevents_fields(result, [not isinstance(item, BillingError) for item in items])
        return Response(result.model_dump_json(), media_type=JSON)

    return handle


def from_cloudevent(event: Any, pricing: Pricing) -> dict[str, Any] | InvalidInput:
    """A CloudEvent (structured JSON, spec 1.0) as an event of ours, or the refusal naming its attribute."""
    if not isinstance(event, dict):
        return InvalidInput(f"a CloudEvent must be a JSON object, not {type(event).__name__}", param=None)
    unknown = sorted(set(event) - set(_CE_ATTRIBUTES))
    if unknown:
        return InvalidInput(f"unknown CloudEvents attribute {unknown[0]!r}: an event takes {', '.join(_CE_ATTRIBUTES)}",
                            param=unknown[0])
    if event.get("specversion", "1.0") != "1.0":
        return InvalidInput(f"specversion {event['specversion']!r} is not taken: send CloudEvents 1.0",
                            param="specversion")
    for name, what in (("subject", "the customer (cus_...)"), ("id", "the event's unique identifier")):
        if event.get(name) is None:
            return InvalidInput(f"{name} is required: it is {what}", param=name)
    kind = event.get("type")
    if not isinstance(kind, str) or not kind:
        return InvalidInput(f"type is required: it names the meter ({', '.join(pricing.meters)}, or a meter's "
                            "Stripe event name)", param="type")
    try:
        meter = pricing.meter(kind, param="type")
    except InvalidInput as exc:
        return InvalidInput(f"type: {exc.message} (by id or Stripe event name)", param="type")
    data = event.get("data")
    if not isinstance(data, dict):
        return InvalidInput("data must be an object with units (and operation or multiplier, agent_id, metadata)",
                            param="data")
    for ours, theirs in _CE_FIELDS.items():
        if ours in data:
            return InvalidInput(f"data.{ours} is not taken: a CloudEvent gives it as {theirs}", param=f"data.{ours}")
    item: dict[str, Any] = {"customer": event["subject"], "identifier": event["id"], "meter": meter.id, **data}
    if "time" in event:
        when = event["time"]
        try:
            if not isinstance(when, str):
                raise ValueError(when)
            moment = datetime.fromisoformat(when)
            if moment.tzinfo is None:
                raise ValueError(when)
        except ValueError:
            return InvalidInput(f"time {str(when)[:40]!r} is not an RFC 3339 timestamp with an offset (e.g. "
                                "2026-12-06T10:00:00Z)", param="time")
        item["timestamp"] = int(moment.timestamp())
    return item


def cloudevents_fields(result: MeterEventBatchResult, converted: list[bool]) -> None:
    """The service's refusals of converted CloudEvents name the CloudEvent's own attributes: subject, id, time, and
    data.<field> for the rest (`converted`: which events reached the service; the others were refused in their own
    terms already)."""
    for outcome, ours in zip(result.results, converted, strict=True):
        error = outcome.error
        if error is None or error.field is None or not ours:
            continue
        if error.field in _CE_FIELDS:
            error.field = _CE_FIELDS[error.field]
        elif error.field not in _CE_ATTRIBUTES and not error.field.startswith("data."):
            error.field = f"data.{error.field}"
