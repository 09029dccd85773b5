"""The ACP seller's protocol edge: the requests it reads, how they are signed and authenticated, what it answers.

Requests. A body is first checked against the spec's own JSON Schema (acp_schema.py: every field the spec allows
is accepted; a violating body is a 400 naming the JSONPath of the offending field), then read into the pydantic
models below (`CreateRequest`, `UpdateRequest`, `CompleteRequest`, `CancelRequest`: the fields this seller uses,
typed, every other field the spec allows kept as given), which add what this seller requires beyond the spec: at
least one line item (also on update), no empty item id, `unit_amount` a true integer, and a `payment_data` with a
handler and an instrument (purchase orders are not accepted). Their refusals are ACP Errors like the schema's.

Request signing. When a signing secret is configured (`AIMS_BILLING_ACP_SIGNING_SECRET`), every checkout request
must carry `Signature` and `Timestamp` (REST headers; `meta.signature` / `meta.timestamp` over MCP), else 401.
The spec fixes the headers' formats (RFC `rfc.agentic_checkout.md` §3.1: `Signature: <base64url>`,
`Timestamp: <RFC 3339>`) and leaves the algorithm to the seller; ours is:
- `Signature` = base64url (padding optional) of HMAC-SHA256(secret as UTF-8, `<Timestamp>` + "." + body), where
  `<Timestamp>` is the header's exact string and body is the exact raw HTTP body (empty for GET and a bodyless
  cancel). Over MCP, where there is no HTTP body, body is the canonical JSON of `payload` (sorted keys,
  separators `,` `:`, UTF-8, no ASCII escaping; empty when the tool has no payload).
- The HMAC is compared in constant time; `Timestamp` must be within 300 s of our clock, either way.
- Errors are ACP's Error (type `invalid_request`) with a code naming the cause: `missing_signature` (a header is
  absent), `invalid_timestamp` (not RFC 3339 with an offset), `stale_timestamp` (outside the 300 s window),
  `invalid_signature` (wrong or malformed). Without a secret nothing is checked. Discovery stays unsigned.

Answers: `checkout_view` renders a session as ACP's CheckoutSession (CheckoutSessionWithOrder once completed);
`discovery` the `/.well-known/acp.json` document; `message` / `info` ACP's Message objects.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..store import dumps, utc_iso
from ..store.acp import CheckoutRow, CheckoutStatus
from .acp_models import AcpError
from .acp_schema import SPEC_VERSION, SUPPORTED_VERSIONS, json_path, parse
from .tiers import Item, Pricing

API_VERSION = SPEC_VERSION
HANDLER_ID = "stripe_spt"
DIGITAL_OPTION = "digital_wallet_credit"
RETRY_AFTER_SECONDS = 1
SIGNATURE_TOLERANCE_SECONDS = 300
MAX_IDEMPOTENCY_KEY = 255

HANDLER: dict[str, Any] = {
    "id": HANDLER_ID, "name": "dev.acp.tokenized.card", "display_name": "Card (Stripe Shared Payment Token)",
    "version": "2026-01-22", "spec": "https://acp.dev/handlers/tokenized.card",
    "requires_delegate_payment": True, "requires_pci_compliance": False, "psp": "stripe",
    "config_schema": "https://acp.dev/schemas/handlers/tokenized.card/config.json",
    "instrument_schemas": ["https://acp.dev/schemas/handlers/tokenized.card/instrument.json"],
    "config": {"psp": "stripe", "credential_types": ["spt"], "token_prefix": "spt_"},
}

# --- requests: the spec's schema first (acp_schema.parse), then these models ----------------------------------------


class _Request(BaseModel):
    """A part of an ACP request: the fields this seller reads, typed; every other field the spec allows kept."""

    model_config = ConfigDict(extra="allow", frozen=True)


class ItemRef(_Request):
    """The spec's `Item` (create/update): one of our item ids (repeating an id buys more of it)."""

    id: str
    name: str | None = None
    unit_amount: int | None = None

    @field_validator("id")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("invalid_field", "is empty")
        return value

    @field_validator("unit_amount", mode="before")
    @classmethod
    def _true_integer(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):  # the schema's integer lets 5.0 through
            raise PydanticCustomError("invalid_field", "must be an integer (minor units)")
        return value


def _at_least_one(items: list[ItemRef]) -> list[ItemRef]:
    if not items:
        raise PydanticCustomError("invalid_field", "needs at least one item")
    return items


class CreateRequest(_Request):
    """CheckoutSessionCreateRequest."""

    line_items: list[ItemRef]
    currency: str
    buyer: dict[str, Any] | None = None
    fulfillment_details: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    order_notes: str | None = None

    _items = field_validator("line_items")(_at_least_one)


class SelectedOption(_Request):
    """The spec's `SelectedFulfillmentOption`."""

    type: str
    option_id: str
    item_ids: list[str]


class UpdateRequest(_Request):
    """CheckoutSessionUpdateRequest: what a field given replaces (`model_fields_set` says which were given)."""

    line_items: list[ItemRef] | None = None
    buyer: dict[str, Any] | None = None
    fulfillment_details: dict[str, Any] | None = None
    order_notes: str | None = None
    selected_fulfillment_options: list[SelectedOption] | None = None

    _items = field_validator("line_items")(_at_least_one)


class Credential(_Request):
    type: str
    token: str


class Instrument(_Request):
    type: str
    credential: Credential


class PaymentData(_Request):
    """The spec's `PaymentData`, as this seller takes it: a handler and an instrument, no purchase order."""

    handler_id: str
    instrument: Instrument

    @model_validator(mode="before")
    @classmethod
    def _a_handler_and_an_instrument(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("handler_id" not in data or "instrument" not in data):
            raise PydanticCustomError("unsupported_payment", "purchase orders are not accepted: pay with the "
                                      f"{HANDLER_ID} handler and a Shared Payment Token", {"whole": True})
        return data


class CompleteRequest(_Request):
    """CheckoutSessionCompleteRequest."""

    payment_data: PaymentData
    buyer: dict[str, Any] | None = None


class CancelRequest(_Request):
    """CancelSessionRequest."""

    intent_trace: dict[str, Any] | None = None


_M = TypeVar("_M", bound=_Request)


def _read(model: type[_M], definition: str, raw: Any) -> _M:
    """`raw` checked against the spec's `definition`, then read into `model` (its refusals as ACP Errors, the first
    one: named by the JSONPath of its field)."""
    body = parse(definition, raw)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        path = json_path(error["loc"])
        whole = bool((error.get("ctx") or {}).get("whole"))
        code = error["type"] if error["type"] in ("invalid_field", "unsupported_payment") else "invalid_field"
        raise AcpError(400, code, error["msg"] if whole else f"{path} {error['msg']}", param=path) from None


def check_create(raw: Any) -> CreateRequest:
    return _read(CreateRequest, "CheckoutSessionCreateRequest", raw)


def check_update(raw: Any) -> UpdateRequest:
    return _read(UpdateRequest, "CheckoutSessionUpdateRequest", raw)


def check_complete(raw: Any) -> CompleteRequest:
    return _read(CompleteRequest, "CheckoutSessionCompleteRequest", raw)


def check_cancel(raw: Any) -> CancelRequest | None:
    return None if raw is None else _read(CancelRequest, "CancelSessionRequest", raw)


def invalid(param: str, message: str, code: str = "invalid_field") -> AcpError:
    return AcpError(400, code, message, param=param)


def require_idempotency_key(key: str | None) -> str:
    """ACP §6: every POST carries an Idempotency-Key; its absence is a 400 before anything else is read."""
    if key is None or not key.strip():
        raise AcpError(400, "idempotency_key_required", "Idempotency-Key header is required on all POST requests")
    return key


def check_idempotency_key_length(key: str) -> None:
    if len(key) > MAX_IDEMPOTENCY_KEY:
        raise AcpError(400, "invalid_idempotency_key", "Idempotency-Key is at most 255 characters")


def _canonical(value: Any) -> Any:
    """ACP §6.2 equivalence: key order never matters, 1.0 equals 1, null differs from absent, arrays keep order."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def body_hash(body: Any) -> str:
    return hashlib.sha256(dumps(_canonical(body)).encode()).hexdigest()


# --- authentication and signing --------------------------------------------------------------------------------------


def identity_of(api_keys: set[str], authorization: str | None) -> str:
    """The caller's identity (a digest of its API key) for a valid `Authorization: Bearer <key>`; else 401."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AcpError(401, "unauthorized", "send Authorization: Bearer <api key> (the key this seller issued to "
                       "your agent platform)")
    if not api_keys or token not in api_keys:
        raise AcpError(401, "invalid_api_key", "the bearer token is not an API key this seller accepts")
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def signed_payload(payload: Any) -> bytes:
    """What an MCP call's signature covers in place of the HTTP body: the payload's canonical JSON (b"" if none)."""
    if payload is None:
        return b""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _request_digest(secret: str, timestamp: str, body: bytes) -> bytes:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).digest()


def sign_request(secret: str, timestamp: str, body: bytes) -> str:
    """The `Signature` a buyer sends with `Timestamp: <timestamp>` over `body` (see the module docstring)."""
    return base64.urlsafe_b64encode(_request_digest(secret, timestamp, body)).decode().rstrip("=")


def verify_signature(secret: str | None, signature: str | None, timestamp: str | None, body: bytes, *,
                     clock: Callable[[], float]) -> None:
    """With a signing secret, `signature` must be ours over `timestamp` and `body`, and `timestamp` fresh; else
    401 naming the cause. Without one, nothing is checked."""
    if secret is None:
        return
    if not signature or not timestamp:
        missing = "Signature" if not signature else "Timestamp"
        raise AcpError(401, "missing_signature", f"this seller requires signed requests: the {missing} header "
                       "(meta.signature / meta.timestamp over MCP) is missing")
    try:
        when = datetime.fromisoformat(timestamp.strip())
        if when.tzinfo is None:
            raise ValueError("no UTC offset")
    except ValueError as exc:
        raise AcpError(401, "invalid_timestamp", "Timestamp must be an RFC 3339 date-time with an offset, e.g. "
                       "2026-04-17T10:30:00Z") from exc
    if abs(clock() - when.timestamp()) > SIGNATURE_TOLERANCE_SECONDS:
        raise AcpError(401, "stale_timestamp", f"Timestamp is more than {SIGNATURE_TOLERANCE_SECONDS} seconds "
                       "from the seller's clock: sign the request again")
    expected = _request_digest(secret, timestamp, body)
    try:
        given = base64.urlsafe_b64decode(signature.strip() + "=" * (-len(signature.strip()) % 4))
    except (binascii.Error, ValueError):
        given = b""
    if not hmac.compare_digest(expected, given):
        raise AcpError(401, "invalid_signature", "the Signature does not match the request (HMAC-SHA256 over "
                       "Timestamp + '.' + body, base64url)")


# --- answers ---------------------------------------------------------------------------------------------------------


def message(code: str, content: str, *, param: str | None = None, resolution: str = "recoverable") -> dict[str, Any]:
    """ACP's error Message (inside a session's `messages`, not an Error answer)."""
    out: dict[str, Any] = {"type": "error", "code": code, "severity": "high", "resolution": resolution,
                           "content_type": "plain", "content": content}
    if param is not None:
        out["param"] = param
    return out


def info(content: str) -> dict[str, Any]:
    return {"type": "info", "severity": "info", "content_type": "plain", "content": content}


def paying_error(session_id: str) -> AcpError:
    return AcpError(409, "payment_in_progress", f"checkout session {session_id} has a payment in progress: GET "
                    "it to see the outcome", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def line_id(item_id: str) -> str:
    return f"li_{item_id}"


def _totals(amount: int) -> list[dict[str, Any]]:
    return [{"type": "items_base_amount", "display_text": "Base amount", "amount": amount},
            {"type": "subtotal", "display_text": "Subtotal", "amount": amount},
            {"type": "total", "display_text": "Total", "amount": amount}]


def _order_line(line: dict[str, Any], *, delivered: bool, removed: bool = False) -> dict[str, Any]:
    """An order line; its status derived from the quantities as the schema defines it (removed: current 0)."""
    quantity = line["quantity"]
    current = 0 if removed else quantity
    return {"id": line["id"], "title": line["name"], "product_id": line["product_id"],
            "quantity": {"ordered": quantity, "current": current, "fulfilled": quantity if delivered else 0},
            "unit_price": line["unit_amount"], "subtotal": line["unit_amount"] * quantity,
            "status": "removed" if removed else "fulfilled" if delivered else "processing"}


def checkout_view(row: CheckoutRow, status: CheckoutStatus, problems: list[dict[str, Any]],
                  items: Mapping[str, Item], public_url: str) -> dict[str, Any]:
    """The session as ACP's CheckoutSession (CheckoutSessionWithOrder once completed), as of `status` (the row's,
    or `expired`, or its readiness now) and `problems` (why an open session cannot be paid yet)."""
    state = json.loads(row.state)
    currency = row.currency
    lines, total = [], 0
    for line in state["lines"]:
        item = items[line["item"]]
        amount = item.unit_price * line["quantity"]
        total += amount
        lines.append({
            "id": line_id(item.id), "item": {"id": item.id, "name": item.title, "unit_amount": item.unit_price},
            "quantity": line["quantity"], "name": item.title, "unit_amount": item.unit_price,
            "product_id": item.id,
            "category": "subscription" if item.subscribes else "plug" if item.id.startswith("plug:")
            else "digital_credits",
            "availability_status": "in_stock",
            "totals": _totals(amount),
        })
    line_ids = [line["id"] for line in lines]
    messages = list(state.get("messages") or [])
    if status in (CheckoutStatus.NOT_READY_FOR_PAYMENT, CheckoutStatus.READY_FOR_PAYMENT):
        messages = problems + messages
    body: dict[str, Any] = {
        "id": row.id, "protocol": {"version": API_VERSION},
        "capabilities": {"payment": {"handlers": [HANDLER]}}, "status": str(status), "currency": currency,
        "line_items": lines,
        "fulfillment_options": [{"type": "digital", "id": DIGITAL_OPTION,
                                 "title": "Instant: LUC to the agent's wallet, a tier subscription starts at once",
                                 "totals": [{"type": "total", "display_text": "Free", "amount": 0}]}],
        "selected_fulfillment_options": state.get("selected") or [
            {"type": "digital", "option_id": DIGITAL_OPTION, "item_ids": line_ids}],
        "totals": [{"type": "items_base_amount", "display_text": "Item(s) total", "amount": total},
                   {"type": "subtotal", "display_text": "Subtotal", "amount": total},
                   {"type": "fulfillment", "display_text": "Digital delivery", "amount": 0},
                   {"type": "total", "display_text": "Total", "amount": total}],
        "messages": messages, "links": [], "created_at": row.created_at, "updated_at": row.updated_at,
        "expires_at": utc_iso(row.expires_at),
    }
    if state.get("buyer"):
        body["buyer"] = state["buyer"]
    if state.get("fulfillment_details"):
        body["fulfillment_details"] = state["fulfillment_details"]
    if state.get("metadata"):
        body["metadata"] = state["metadata"]
    order = state.get("order")
    if order:
        # credits are delivered with the payment; a tier line once its subscription has started in Stripe
        outcome = (order.get("subscription") or {}).get("status")
        credited = not order.get("luc_refused")
        body["order"] = {
            "type": "order", "id": order["id"], "checkout_session_id": row.id,
            "permalink_url": f"{public_url}/acp/checkout_sessions/{row.id}", "status": order["status"],
            "line_items": [_order_line(line, delivered=outcome == "started", removed=outcome == "refunded")
                           if line["category"] == "subscription" else _order_line(line, delivered=credited)
                           for line in lines],
            "totals": [{"type": "total", "display_text": "Total", "amount": total}],
        }
        refunded = (order.get("subscription") or {}) if outcome == "refunded" else None
        if refunded:
            tier_line = next(line["id"] for line in lines if line["category"] == "subscription")
            body["order"]["adjustments"] = [{
                "id": refunded.get("refund") or f"adj_{order['id']}", "type": "refund",
                "occurred_at": row.updated_at, "status": "completed",
                "line_items": [{"id": tier_line, "quantity": 1}], "amount": refunded.get("refunded", 0),
                "currency": currency, "description": "The tier subscription could not be started",
                "reason": "not_fulfilled"}]
            body["order"]["totals"].append({"type": "amount_refunded", "display_text": "Refunded",
                                            "amount": refunded.get("refunded", 0)})
    return body


def discovery(pricing: Pricing, api_base_url: str) -> dict[str, Any]:
    """The `/.well-known/acp.json` document."""
    currencies = sorted({item.currency for item in pricing.items.values()})
    return {"protocol": {"name": "acp", "version": API_VERSION, "supported_versions": SUPPORTED_VERSIONS},
            "api_base_url": api_base_url, "transports": ["rest", "mcp"],  # MCP on /acp/mcp
            "capabilities": {"services": ["checkout"], "supported_currencies": currencies}}
