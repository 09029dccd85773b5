"""The Agentic Commerce Protocol (ACP, version 2026-04-17) seller: checkout sessions for our sellable items.

A buyer agent creates a checkout session with line items (our item ids; repeating an id buys more of it: the
2026-04-17 create/update `Item` has no quantity field), may update it, and completes it with a Stripe Shared
Payment Token (`payment_data.instrument.credential = {type: "spt", token: "spt_..."}`). Completing creates a
payment session (a PaymentIntent for the session total, see commerce.py) and confirms it with the token as
`shared_payment_granted_token`. The payment's success completes the checkout in the transaction that records it,
whoever sees it (our complete, a GET re-reading the PaymentIntent, Stripe's webhook): the order is created, LUC
lines are credited to the agent wallet named by `metadata.agent_id` (ledger key `acp:<session id>`), and a tier
line records its prepaid subscription (prepaid.py) for `buyer.customer_id` or the wallet's customer, started
before the answer. A declined token leaves the session payable with a `payment_declined` error message.
Completing, updating or canceling a finished session answers 405.

Money rules (issue 12): a charge for a checkout ends delivered or refunded in full, whatever the order of events.
`complete` holds the session (`in_progress`, `completing_since`) before anything is charged: `update` and `cancel`
answer 409 while it runs (a hold older than IN_FLIGHT_STALE_SECONDS is a dead request's and is taken over). Each
payment session made for a checkout is recorded with the lines it was made for (`acp_payments`); a cart changed
since gets a new one (the old PaymentIntent canceled first), and the order is made from the lines of the payment
that succeeded. A payment that succeeds for a checkout that cannot take it (canceled, or completed by another
payment) is marked to refund in the transaction that records it and refunded in full after COMMIT (resumed at
start-up).

Every POST carries an `Idempotency-Key` (ACP §6): scoped to the caller's identity and the endpoint; the same key
and the same body replay the stored response; another body is 422 `idempotency_conflict`; a key whose first
request is still running is 409 `idempotency_in_flight` with `Retry-After`; 5xx answers are never stored.
Request bodies are parsed against the spec's own JSON Schema (acp_schema.py: every field it allows is accepted), so
a violating body is a 400 naming the JSONPath of the offending field. A refused request changes nothing.

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

Order webhooks (acp_webhooks.py): with an order webhook URL configured, completing a checkout writes an
`order_create` event in the transaction that completes it, and a tier line's outcome (started: `completed`; failed
for good: `manual_review`; refunded: `canceled`, the line `removed`) an `order_update`; each is sent after COMMIT
in the background.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from pydantic import SecretStr

from ..errors import BillingError, InvalidState, NotFound, StripeCardDeclined, StripeInvalidRequest
from ..models import AGENT_ID, format_amount
from ..store import Store, dumps, utc_iso
from ..store.commerce import PaymentSessionRow
from ..store.prepaid import PrepaidRow
from ..stripe_gateway import StripeGateway, StripeRequest, stripe_idempotency_key
from .acp_models import AcpError, AcpResponse
from .acp_schema import SPEC_VERSION, SUPPORTED_VERSIONS, parse
from .acp_webhooks import ORDER_CREATE, ORDER_UPDATE, OrderWebhooks
from .background import Background
from .commerce import SHARED_PAYMENT_TOKEN, PaymentSessionService
from .commerce_models import PaymentSession
from .fulfilment import Seller
from .ledger import LedgerService
from .prepaid import PrepaidSubscriptions, prepaid_id
from .tiers import Item, Pricing

log = logging.getLogger(__name__)
API_VERSION = SPEC_VERSION
_CUSTOMER = re.compile(r"cus_[A-Za-z0-9_]{1,200}")
HANDLER_ID = "stripe_spt"
DIGITAL_OPTION = "digital_wallet_credit"
FINISHED = ("completed", "canceled", "expired")
KEY_RETENTION_SECONDS = 24 * 3600  # ACP §6.6: at least 24 hours
IN_FLIGHT_STALE_SECONDS = 120  # a claim older than this belonged to a request that died: the key is free again
RETRY_AFTER_SECONDS = 1
SIGNATURE_TOLERANCE_SECONDS = 300

HANDLER: dict[str, Any] = {
    "id": HANDLER_ID, "name": "dev.acp.tokenized.card", "display_name": "Card (Stripe Shared Payment Token)",
    "version": "2026-01-22", "spec": "https://acp.dev/handlers/tokenized.card",
    "requires_delegate_payment": True, "requires_pci_compliance": False, "psp": "stripe",
    "config_schema": "https://acp.dev/schemas/handlers/tokenized.card/config.json",
    "instrument_schemas": ["https://acp.dev/schemas/handlers/tokenized.card/instrument.json"],
    "config": {"psp": "stripe", "credential_types": ["spt"], "token_prefix": "spt_"},
}

# --- request shapes: parsed against the bundled spec schema (acp_schema.py), plus what this seller requires ----------


def _invalid(param: str, message: str, code: str = "invalid_field") -> AcpError:
    return AcpError(400, code, message, param=param)


def _check_items(items: list[dict[str, Any]]) -> None:
    """Beyond the schema: at least one item (also on update), no empty id, `unit_amount` a true integer."""
    if not items:
        raise _invalid("$.line_items", "$.line_items needs at least one item")
    for i, item in enumerate(items):
        if not item["id"].strip():
            raise _invalid(f"$.line_items[{i}].id", f"$.line_items[{i}].id is empty")
        amount = item.get("unit_amount", 0)
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise _invalid(f"$.line_items[{i}].unit_amount", f"$.line_items[{i}].unit_amount must be an integer "
                           "(minor units)")


def check_create(raw: Any) -> dict[str, Any]:
    body = parse("CheckoutSessionCreateRequest", raw)
    _check_items(body["line_items"])
    return body


def check_update(raw: Any) -> dict[str, Any]:
    body = parse("CheckoutSessionUpdateRequest", raw)
    if "line_items" in body:
        _check_items(body["line_items"])
    return body


def check_complete(raw: Any) -> dict[str, Any]:
    body = parse("CheckoutSessionCompleteRequest", raw)
    if "handler_id" not in body["payment_data"] or "instrument" not in body["payment_data"]:
        raise AcpError(400, "unsupported_payment", "purchase orders are not accepted: pay with the "
                       f"{HANDLER_ID} handler and a Shared Payment Token", param="$.payment_data")
    return body


def check_cancel(raw: Any) -> dict[str, Any] | None:
    return None if raw is None else parse("CancelSessionRequest", raw)


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


def require_idempotency_key(key: str | None) -> str:
    """ACP §6: every POST carries an Idempotency-Key; its absence is a 400 before anything else is read."""
    if key is None or not key.strip():
        raise AcpError(400, "idempotency_key_required", "Idempotency-Key header is required on all POST requests")
    return key


def _reveal(secret: SecretStr | str | None) -> str | None:
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    return value or None


def _message(code: str, content: str, *, param: str | None = None, resolution: str = "recoverable") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "code": code, "severity": "high", "resolution": resolution,
                           "content_type": "plain", "content": content}
    if param is not None:
        out["param"] = param
    return out


class AcpService:
    def __init__(
        self, store: Store, commerce: PaymentSessionService, pricing: Pricing, *, ledger: LedgerService,
        prepaid: PrepaidSubscriptions, gateway: StripeGateway, api_keys: set[str],
        clock: Callable[[], float] = time.time,
        public_url: str = "http://localhost", session_ttl_seconds: int = 24 * 3600,
        signing_secret: SecretStr | str | None = None, order_webhook_url: str | None = None,
        order_webhook_secret: SecretStr | str | None = None, retry_delay_scale: float = 1.0,
        webhook_transport: Any = None,
    ) -> None:
        self._store = store
        self._commerce = commerce
        self._pricing = pricing
        self._api_keys = {key for key in api_keys if key}
        self._clock = clock
        self._ledger = ledger  # the wallets an order's LUC are credited to
        self._gateway = gateway
        self._public_url = public_url.rstrip("/")
        self._ttl = session_ttl_seconds
        self._signing_secret = _reveal(signing_secret)
        self.order_webhooks: OrderWebhooks | None = None
        if order_webhook_url:
            self.order_webhooks = OrderWebhooks(store, order_webhook_url, _reveal(order_webhook_secret) or "",
                                                clock=clock, retry_delay_scale=retry_delay_scale,
                                                transport=webhook_transport)
        self._prepaid = prepaid  # an order's tier starts a prepaid subscription, as a payment session's does
        self.refunds = Background()  # refunds of payments a checkout could not take (acp_payments.refund_status)
        # payments a job marked refund-due that no look after a COMMIT has seen yet (a mark is dropped only once
        # seen, so a look that ran before its COMMIT does not lose it)
        self._refunds_marked: set[str] = set()

    def seller(self) -> Seller:
        """What this seller registers in the fulfilment registry (state.py): it settles the orders its payment
        sessions paid for, sends what they queued after COMMIT, and hears how their tier subscriptions went."""
        return Seller(fulfil=self._fulfil_paid, after_commit=self._after_payment,
                      on_subscription=self._subscription_outcome)

    # --- authentication and idempotency -------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> str:
        """The caller's identity (a digest of its API key) for a valid `Authorization: Bearer <key>`; else 401."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AcpError(401, "unauthorized", "send Authorization: Bearer <api key> (the key this seller issued to "
                           "your agent platform)")
        if not self._api_keys or token not in self._api_keys:
            raise AcpError(401, "invalid_api_key", "the bearer token is not an API key this seller accepts")
        return hashlib.sha256(token.encode()).hexdigest()[:32]

    def verify_signature(self, signature: str | None, timestamp: str | None, body: bytes) -> None:
        """With a signing secret configured, `signature` must be ours over `timestamp` and `body`, and `timestamp`
        fresh; else 401 naming the cause. Without one, nothing is checked."""
        secret = self._signing_secret
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
        if abs(self._clock() - when.timestamp()) > SIGNATURE_TOLERANCE_SECONDS:
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

    async def idempotent(
        self, identity: str, endpoint: str, key: str | None, body: Any,
        handler: Callable[[], Awaitable[AcpResponse]],
    ) -> AcpResponse:
        """Run `handler` once per (identity, endpoint, Idempotency-Key), by ACP §6's rules."""
        key = require_idempotency_key(key)
        if len(key) > 255:
            raise AcpError(400, "invalid_idempotency_key", "Idempotency-Key is at most 255 characters")
        scope = f"{identity}:{endpoint}"
        digest = body_hash(body)
        now = self._clock()

        def claim(conn: sqlite3.Connection) -> tuple[str, str, int | None, str | None] | None:
            row = conn.execute("SELECT request_hash, state, status, response, created_at FROM acp_idempotency "
                               "WHERE scope = ? AND key = ?", (scope, key)).fetchone()
            if row is not None:
                expired = row["created_at"] < now - KEY_RETENTION_SECONDS
                abandoned = row["state"] == "in_flight" and row["created_at"] < now - IN_FLIGHT_STALE_SECONDS
                if not (expired or abandoned):
                    return row["request_hash"], row["state"], row["status"], row["response"]
            conn.execute("INSERT OR REPLACE INTO acp_idempotency (scope, key, request_hash, state, created_at) "
                         "VALUES (?, ?, ?, 'in_flight', ?)", (scope, key, digest, now))
            return None

        found = await self._store.write(claim)
        if found is not None:
            stored_hash, state, status, response = found
            if stored_hash != digest:
                raise AcpError(422, "idempotency_conflict", "Idempotency-Key has already been used with a different "
                               "request body")
            if state == "in_flight" or status is None or response is None:
                raise AcpError(409, "idempotency_in_flight", "A request with this Idempotency-Key is currently being "
                               "processed", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            return AcpResponse(int(status), json.loads(response), {"Idempotent-Replayed": "true"}, replayed=True)
        try:
            try:
                result = await handler()
            except AcpError as exc:
                result = exc.response()
        except BaseException:
            await self._store.write(_release(scope, key))
            raise
        if result.status >= 500 or result.status == 409:  # a 409 is "retry later": the retry must run again
            await self._store.write(_release(scope, key))
            return result

        def done(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE acp_idempotency SET state = 'done', status = ?, response = ? WHERE scope = ? AND "
                         "key = ?", (result.status, dumps(result.body), scope, key))

        await self._store.write(done)
        return result

    # --- the five operations -------------------------------------------------------------------------------------

    async def create(self, body: Any, *, seed: str) -> AcpResponse:
        """A new checkout session (201). `seed` (identity + Idempotency-Key) names it, so a retried create after a
        crash finds the same session instead of a second one."""
        body = check_create(body)
        lines = self._lines(body["line_items"])
        currency = body["currency"].strip().lower()
        self._check_currency(lines, currency)
        metadata = dict(body.get("metadata") or {})
        agent = metadata.get("agent_id")
        state = {"lines": lines, "buyer": body.get("buyer"), "fulfillment_details": body.get("fulfillment_details"),
                 "selected": None, "metadata": metadata, "order_notes": body.get("order_notes"), "messages": [],
                 "order": None}
        session_id = "cs_" + hashlib.sha256(f"acp-create\x00{seed}".encode()).hexdigest()[:24]
        now = self._clock()
        iso = utc_iso(now)
        agent_id = agent if isinstance(agent, str) else None
        status = self._open_status(agent_id, state)

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO acp_checkout_sessions (id, status, currency, agent_id, state, created_at, "
                         "updated_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                         (session_id, status, currency, agent_id, dumps(state), iso, iso, now + self._ttl))

        await self._store.write(insert)
        return AcpResponse(201, self._view(self._row(session_id)))

    async def get(self, session_id: str) -> AcpResponse:
        row = self._row(session_id)
        if row["status"] not in ("completed", "canceled") and row["payment_session_id"]:
            row = await self._refresh(row)  # a payment whose outcome we have not recorded yet (even past expiry)
        return AcpResponse(200, self._view(row))

    async def update(self, session_id: str, body: Any) -> AcpResponse:
        body = check_update(body)
        row = self._open_row(session_id, "updated")
        self._refuse_while_paying(row, "updated")
        state = json.loads(row["state"])
        if "line_items" in body:
            state["lines"] = self._lines(body["line_items"])
            self._check_currency(state["lines"], row["currency"])
            state["selected"] = None
        for name in ("buyer", "fulfillment_details", "order_notes"):
            if name in body:
                state[name] = body[name]
        if "selected_fulfillment_options" in body:
            line_ids = {_line_id(line["item"]) for line in state["lines"]}
            for i, option in enumerate(body["selected_fulfillment_options"]):
                if option["type"] != "digital" or option["option_id"] != DIGITAL_OPTION:
                    raise _invalid(f"$.selected_fulfillment_options[{i}].option_id", "these items are delivered "
                                   f"digitally: the only fulfillment option is {DIGITAL_OPTION} (type digital)",
                                   "invalid_fulfillment_option")
                for j, item_id in enumerate(option["item_ids"]):
                    if item_id not in line_ids:
                        raise _invalid(f"$.selected_fulfillment_options[{i}].item_ids[{j}]", f"no line item "
                                       f"{item_id} in this session", "invalid_line_item_id")
            state["selected"] = body["selected_fulfillment_options"]
        state["messages"] = []
        saved = await self._store.write(self._save_job(row["id"], state, self._open_status(row["agent_id"], state),
                                                       only_open=True))
        if not saved:  # a completion claimed it (or it finished) since it was read
            self._open_row(row["id"], "updated")
            raise self._paying_error(row["id"])
        return AcpResponse(200, self._view(self._row(row["id"])))

    async def cancel(self, session_id: str, body: Any) -> AcpResponse:
        """Cancel an open session. While a completion is charging it, 409; a PaymentIntent already made for it is
        canceled first, so no payment can succeed for a canceled session (one that did completes it instead)."""
        body = check_cancel(body)
        row = self._open_row(session_id, "canceled")
        self._refuse_while_paying(row, "canceled")
        seen = row["payment_session_id"]
        if seen:
            try:
                await self._commerce.cancel_session(seen, f"acp-cancel:{row['id']}")
            except InvalidState as exc:  # paid meanwhile: the session completes instead
                refreshed = await self._refresh(self._row(row["id"]))
                if refreshed["status"] == "completed":
                    raise AcpError(405, "session_not_cancelable", f"checkout session {row['id']} is completed and "
                                   "cannot be canceled") from exc
                raise AcpError(409, "payment_in_progress", f"checkout session {row['id']}: {exc.message}",
                               headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from exc
        state = json.loads(row["state"])
        if isinstance(body, dict) and isinstance(body.get("intent_trace"), dict):
            state["intent_trace"] = body["intent_trace"]
        outcome = await self._store.write(self._cancel_job(row["id"], seen, state))
        if outcome == "finished":
            raise AcpError(405, "session_not_cancelable", f"checkout session {row['id']} is already finished")
        if outcome == "paying":
            raise self._paying_error(row["id"])
        return AcpResponse(200, self._view(self._row(row["id"])))

    def _cancel_job(self, session_id: str, seen: str | None,
                    state: dict[str, Any]) -> Callable[[sqlite3.Connection], str]:
        """Cancel, unless a payment was linked since `seen` (its PaymentIntent not canceled by us) or a completion
        holds the session with no PaymentIntent we canceled: then the payment decides."""
        clock, stale = self._clock, self._stale_before()

        def job(conn: sqlite3.Connection) -> str:
            current = conn.execute("SELECT * FROM acp_checkout_sessions WHERE id = ?", (session_id,)).fetchone()
            if current["status"] in FINISHED:
                return "finished"
            claimed = current["completing_since"] is not None and current["completing_since"] >= stale
            if current["payment_session_id"] != seen or (seen is None and claimed):
                return "paying"
            conn.execute("UPDATE acp_checkout_sessions SET status = 'canceled', state = ?, completing_since = NULL, "
                         "updated_at = ? WHERE id = ?", (dumps(state), utc_iso(clock()), session_id))
            return "canceled"

        return job

    async def complete(self, session_id: str, body: Any, *, attempt: str) -> AcpResponse:
        """Pay with a Shared Payment Token; `attempt` (the caller's identity and Idempotency-Key) names this
        payment attempt. The session is claimed (`in_progress`) before anything is charged: no update or cancel
        lands while the payment runs, and the cart charged is the cart delivered."""
        body = check_complete(body)
        row = self._open_row(session_id, "completed")
        data = body["payment_data"]
        if data["handler_id"] != HANDLER_ID:
            raise _invalid("$.payment_data.handler_id", f"unknown payment handler {data['handler_id']!r}: this "
                           f"seller accepts {HANDLER_ID}", "invalid_payment_handler")
        credential = data["instrument"]["credential"]
        if credential["type"] != "spt" or not SHARED_PAYMENT_TOKEN.fullmatch(credential["token"]):
            raise _invalid("$.payment_data.instrument.credential", "the credential must be a Stripe Shared Payment "
                           "Token: {type: \"spt\", token: \"spt_...\"}", "invalid_payment_credential")
        if row["status"] == "in_progress":
            if row["payment_session_id"]:
                row = await self._refresh(row)  # Stripe may be ahead of our record (a crash): recorded first
            if row["status"] == "completed":
                raise AcpError(405, "session_not_completable", f"checkout session {row['id']} is already completed")
            if row["status"] == "in_progress" and not self._stale(row):
                raise self._paying_error(row["id"])
        state = json.loads(row["state"])
        if "buyer" in body:  # it may name the customer a tier subscribes: readiness follows it, saved only to pay
            state["buyer"] = body["buyer"]
        problems = self._problems(row["agent_id"], state)
        if problems:
            raise AcpError(400, "not_ready_for_payment", f"checkout session {row['id']} is not ready for payment: "
                           + "; ".join(p["content"] for p in problems), param=problems[0]["param"])
        await self._check_subscriber(row, state)
        if "buyer" in body:
            await self._store.write(self._save_job(row["id"], state, None, only_open=True))
            row = self._row(row["id"])
        claim = self._clock()
        if not await self._store.write(self._claim_job(row, claim)):
            self._refuse_while_paying(self._open_row(row["id"], "completed"), "completed")
            raise self._paying_error(row["id"])
        try:
            return await self._pay(self._row(row["id"]), state, credential["token"], attempt, claim)
        except Exception:
            await self._store.write(self._release_job(row["id"], claim, None))
            raise

    async def _pay(self, row: dict[str, Any], state: dict[str, Any], token: str, attempt: str,
                   claim: float) -> AcpResponse:
        payment_session = await self._payment_for(row, state, claim)
        try:
            paid = await self._commerce.confirm_session(
                payment_session, payment_method=None, shared_payment_token=token,
                idempotency_key=f"acp:{row['id']}:{hashlib.sha256(attempt.encode()).hexdigest()[:24]}")
        except (StripeCardDeclined, StripeInvalidRequest) as exc:
            code = "payment_declined" if isinstance(exc, StripeCardDeclined) else "invalid"
            reason = exc.message.split(" The session stays payable")[0]
            state["messages"] = [_message(code, f"{reason} Complete again with another Shared Payment Token.",
                                          param="$.payment_data.instrument.credential.token")]
            await self._store.write(self._release_job(row["id"], claim, state))
            return AcpResponse(200, self._view(self._row(row["id"])))
        except InvalidState as exc:  # a concurrent attempt paid it first, or a cancel canceled its PaymentIntent
            await self._store.write(self._release_job(row["id"], claim, None))
            now = await self._refresh(self._row(row["id"]))
            raise AcpError(405, "session_not_completable", f"checkout session {row['id']} is {now['status']}: "
                           f"{exc.message}") from exc
        except BillingError as exc:  # Stripe unavailable, rate limited, ...: not stored, retry with the same key
            await self._store.write(self._release_job(row["id"], claim, None))
            raise AcpError(502, "payment_provider_error", exc.message, type="processing_error") from exc
        done = await self._apply(self._row(row["id"]), paid, claim=claim)
        return AcpResponse(200, self._view(done))

    # --- the claim of a completion ------------------------------------------------------------------------------

    def _stale_before(self) -> float:
        return self._clock() - IN_FLIGHT_STALE_SECONDS

    def _stale(self, row: dict[str, Any]) -> bool:
        """A claim older than IN_FLIGHT_STALE_SECONDS belonged to a request that died: another may take over."""
        return row["completing_since"] is not None and row["completing_since"] < self._stale_before()

    def _refuse_while_paying(self, row: dict[str, Any], verb: str) -> None:
        if row["status"] == "in_progress" and not self._stale(row) and (
                row["completing_since"] is not None or verb == "updated"):
            raise self._paying_error(row["id"])

    def _paying_error(self, session_id: str) -> AcpError:
        return AcpError(409, "payment_in_progress", f"checkout session {session_id} has a payment in progress: GET "
                        "it to see the outcome", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def _claim_job(self, row: dict[str, Any], claim: float) -> Callable[[sqlite3.Connection], bool]:
        """Open (or held by a stale claim) -> in_progress, held by this completion."""
        clock, session_id, seen = self._clock, row["id"], row["completing_since"]

        def job(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE acp_checkout_sessions SET status = 'in_progress', completing_since = ?, updated_at = ? "
                "WHERE id = ? AND ((status IN ('ready_for_payment', 'not_ready_for_payment') AND completing_since "
                "IS NULL) OR (status = 'in_progress' AND completing_since = ?))",
                (claim, utc_iso(clock()), session_id, seen))
            return cursor.rowcount == 1

        return job

    def _release_job(self, session_id: str, claim: float,
                     state: dict[str, Any] | None) -> Callable[[sqlite3.Connection], None]:
        """The payment did not go through: the session is payable again (read recomputes its readiness)."""
        clock = self._clock

        def job(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE acp_checkout_sessions SET status = 'ready_for_payment', completing_since = NULL, "
                         "state = COALESCE(?, state), updated_at = ? WHERE id = ? AND status = 'in_progress' AND "
                         "completing_since = ?", (None if state is None else dumps(state), utc_iso(clock()),
                                                  session_id, claim))

        return job

    # --- payment ------------------------------------------------------------------------------------------------

    async def _check_subscriber(self, row: dict[str, Any], state: dict[str, Any]) -> None:
        """A tier line subscribes a customer: Stripe must know it, checked before anything is charged."""
        found = self._tier_line(state["lines"])
        if found is None:
            return
        customer, param = self._subscriber(row["agent_id"], state)
        try:
            await self._prepaid.check_customer(customer or "", param=param)
            await self._prepaid.check_prices(self._pricing.tier(str(found[1].tier)))
        except NotFound as exc:
            raise AcpError(400, "not_ready_for_payment", exc.message, param=param) from exc
        except BillingError as exc:  # Stripe unavailable, rate limited, ...: not stored, retry with the same key
            raise AcpError(502, "payment_provider_error", exc.message, type="processing_error") from exc

    async def _payment_for(self, row: dict[str, Any], state: dict[str, Any], claim: float) -> str:
        """The payment session for the cart as it is now: the linked one if it was made for this very cart, else a
        new one (the old PaymentIntent canceled first), linked with the cart frozen (`acp_payments`): delivery
        follows what the payment was made for, never the cart as it may be later."""
        lines = state["lines"]
        total = self._total(lines)
        subscriber = self._subscriber(row["agent_id"], state)[0] if self._tier_line(lines) else None
        frozen = {"lines": lines, "subscriber": subscriber}
        made = {p["payment_session_id"]: json.loads(p["lines"]) for p in self._store.query(
            "SELECT payment_session_id, lines FROM acp_payments WHERE checkout_session_id = ?", (row["id"],))}
        current = row["payment_session_id"]
        if current is not None and made.get(current) == frozen:
            return str(current)
        if current is not None:  # made for another cart: canceled, so it can never be paid for that cart
            try:
                await self._commerce.cancel_session(current, f"acp-replace:{row['id']}")
            except InvalidState as exc:  # it was paid meanwhile: that payment completes the session
                await self._refresh(self._row(row["id"]))
                raise AcpError(405, "session_not_completable", f"checkout session {row['id']} was paid for its "
                               f"earlier cart meanwhile: {exc.message}") from exc
        digest = hashlib.sha256(dumps(frozen).encode()).hexdigest()[:16]
        titles = ", ".join(f"{line['quantity']} x {self._pricing.items[line['item']].title}" for line in lines)
        try:
            created = await self._commerce.create_session(
                customer=subscriber, agent_id=row["agent_id"] if self._has_credits(lines) else None, item=None,
                amount=total, currency=row["currency"], description=f"ACP checkout {row['id']}: {titles}"[:500],
                idempotency_key=f"acp:{row['id']}:{len(made)}:{digest}", dry_run=False)
        except BillingError as exc:
            raise AcpError(400, "payment_not_possible", exc.message, param="$.payment_data") from exc
        assert created.session is not None
        ps_id, clock = created.session.id, self._clock

        def link(conn: sqlite3.Connection) -> bool:
            conn.execute("INSERT INTO acp_payments (payment_session_id, checkout_session_id, lines, amount, currency, "
                         "created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (payment_session_id) DO NOTHING",
                         (ps_id, row["id"], dumps(frozen), total, row["currency"], utc_iso(clock())))
            cursor = conn.execute("UPDATE acp_checkout_sessions SET payment_session_id = ? WHERE id = ? AND status = "
                                  "'in_progress' AND completing_since = ?", (ps_id, row["id"], claim))
            if cursor.rowcount != 1:
                return False
            # about to be confirmed: marked for start-up reconciliation here, saving the confirm its own commit
            conn.execute("UPDATE payment_sessions SET confirming_since = ? WHERE id = ?", (utc_iso(clock()), ps_id))
            return True

        if not await self._store.write(link):  # canceled (or taken over) meanwhile: this one is never confirmed
            await self._commerce.cancel_session(ps_id, f"acp-unlinked:{row['id']}")
            raise AcpError(405, "session_not_completable", f"checkout session {row['id']} changed while it was "
                           "being paid (canceled?): GET it to see its state")
        return ps_id

    async def _refresh(self, row: dict[str, Any]) -> dict[str, Any]:
        paid = await self._commerce.get_session(row["payment_session_id"])
        return await self._apply(row, paid)

    async def _apply(self, row: dict[str, Any], paid: PaymentSession, *, claim: float | None = None) -> dict[str, Any]:
        """Record what the payment session says. Success normally settled the session already, inside the
        transaction that recorded the payment (`_settle`); this settles it too, for a payment recorded before,
        guarded the same way (once). Any other outcome moves the status only for the completion that holds the
        session (`claim`), or when none does. Then the order's tier subscription is started before answering."""
        session_id = row["id"]
        clock, stale = self._clock, self._stale_before()

        def job(conn: sqlite3.Connection) -> None:
            current = conn.execute("SELECT * FROM acp_checkout_sessions WHERE id = ?", (session_id,)).fetchone()
            if current is None:
                return
            if paid.status == "succeeded":
                self._settle(conn, paid.id, paid.payment_intent, amount=paid.amount)
                return
            holder = current["completing_since"]
            if current["status"] in FINISHED or (holder is not None and holder != claim and holder >= stale):
                return  # another request is paying: its own answer moves the status
            state = json.loads(current["state"])
            iso = utc_iso(clock())
            if paid.status in ("processing", "requires_action", "requires_confirmation"):
                status = "in_progress"
            elif paid.status == "canceled":
                status = "canceled"
            else:  # requires_payment_method after a failure, or amount_mismatch: payable again
                status = "ready_for_payment"
                if paid.last_error:
                    state["messages"] = [_message("payment_declined", paid.last_error,
                                                  param="$.payment_data.instrument.credential.token")]
            conn.execute("UPDATE acp_checkout_sessions SET status = ?, state = ?, completing_since = NULL, "
                         "updated_at = ? WHERE id = ?", (status, dumps(state), iso, session_id))

        await self._store.write(job)
        self._after_payment()
        tier = self._tier_line(json.loads(self._row(session_id)["state"])["lines"])
        if paid.status == "succeeded" and tier is not None:
            await self._prepaid.start_now(prepaid_id(session_id))
        return self._row(session_id)

    def _fulfil_paid(self, conn: sqlite3.Connection, payment: PaymentSessionRow,
                     pi_id: str) -> dict[str, Any] | None:
        """The payment session of one of our checkouts succeeded: settle the checkout in the same transaction,
        whoever saw the success (our complete, a GET, Stripe's webhook), so a paid order is never lost."""
        return self._settle(conn, payment["id"], pi_id, amount=int(payment["amount"]))

    def _settle(self, conn: sqlite3.Connection, ps_id: str, pi_id: str | None, *,
                amount: int) -> dict[str, Any] | None:
        """A payment made for one of our checkouts succeeded: deliver what it was made for (its frozen lines) if
        the checkout is still open, else (canceled, or completed by another payment) refund it in full: whatever
        the order of events, a charge ends delivered or refunded. None: not a checkout's payment."""
        payment = conn.execute("SELECT * FROM acp_payments WHERE payment_session_id = ?", (ps_id,)).fetchone()
        sql = ("SELECT * FROM acp_checkout_sessions WHERE id = ?", (payment["checkout_session_id"],)) if payment \
            else ("SELECT * FROM acp_checkout_sessions WHERE payment_session_id = ?", (ps_id,))
        found = conn.execute(*sql).fetchone()
        if found is None:
            return None
        current = dict(found)
        state = json.loads(current["state"])
        frozen = json.loads(payment["lines"]) if payment else {"lines": state["lines"], "subscriber": None}
        order_id = "ord_" + str(current["id"]).removeprefix("cs_")
        delivered = {"kind": "acp_order", "checkout_session": current["id"], "order": order_id}
        if current["status"] not in FINISHED and self._total(frozen["lines"]) <= amount:
            self._complete_in(conn, current, frozen, amount=amount, currency=current["currency"],
                              payment_intent=pi_id, payment_session=ps_id)
            return delivered
        if current["status"] == "completed" and (state.get("order") or {}).get("payment_intent") == pi_id:
            return delivered
        if payment is None:
            conn.execute("INSERT INTO acp_payments (payment_session_id, checkout_session_id, lines, amount, currency, "
                         "created_at) VALUES (?, ?, ?, ?, ?, ?)", (ps_id, current["id"], dumps(frozen), amount,
                                                                   current["currency"], utc_iso(self._clock())))
        conn.execute("UPDATE acp_payments SET refund_status = 'due' WHERE payment_session_id = ? AND refund_status "
                     "IS NULL", (ps_id,))
        self._refunds_marked.add(ps_id)  # looked for after COMMIT by _after_payment
        return {"kind": "acp_refund", "checkout_session": current["id"], "status": "refund_due",
                "note": f"checkout session {current['id']} is {current['status']}: this payment is refunded in full"}

    def _complete_in(self, conn: sqlite3.Connection, current: dict[str, Any], frozen: dict[str, Any], *,
                     amount: int, currency: str, payment_intent: str | None, payment_session: str) -> None:
        """Complete a paid checkout inside the caller's transaction with the lines the payment was made for:
        credit the LUC (ledger key `acp:<id>`), record the tier subscription to start (the outbox's UNIQUE
        source), create the order and its `order_create`."""
        session_id = current["id"]
        state = json.loads(current["state"])
        iso = utc_iso(self._clock())
        lines = frozen["lines"]
        state["lines"] = lines  # the order shows what was paid for
        luc = sum(self._pricing.items[line["item"]].luc * line["quantity"] for line in lines)
        done_what = []
        balance, refused = None, None
        if luc:
            try:
                posting = self._ledger.credit_in(conn, current["agent_id"], luc, idempotency_key=f"acp:{session_id}",
                                                 reason=f"ACP checkout {session_id}", reference=payment_intent)
                balance = posting.balance_after
                done_what.append(f"{luc} LUC credited to agent {current['agent_id']} (balance {balance} LUC)")
            except BillingError as exc:  # the payment is taken all the same: the order goes to manual review
                refused = f"{exc.code}: {exc.message}"
                done_what.append(f"the credit of {luc} LUC was refused ({refused}); the order is in manual review")
        subscription = None
        found = self._tier_line(lines)
        if found is not None:
            item = found[1]
            owner = frozen.get("subscriber") or self._subscriber(current["agent_id"], state, conn)[0]
            assert owner is not None  # a session without its subscriber is never ready for payment
            subscription = self._prepaid.enqueue(
                conn, source="acp", source_id=session_id, customer=owner, tier=self._pricing.tier(str(item.tier)),
                amount=item.unit_price, currency=current["currency"], payment_intent=payment_intent)
            done_what.append(f"the {item.tier} tier subscription for customer {owner} is starting")
        order_id = "ord_" + session_id.removeprefix("cs_")
        state["order"] = {
            "id": order_id, "status": "manual_review" if refused else "processing" if subscription else "completed",
            "created_at": iso, "luc_credited": 0 if refused else luc, "luc_refused": refused,
            "agent_id": current["agent_id"], "wallet_balance": balance, "payment_intent": payment_intent,
            "subscription": subscription,
        }
        state["messages"] = [_info(f"Paid {format_amount(amount, currency)}: " + "; ".join(done_what) + ".")]
        conn.execute("UPDATE acp_checkout_sessions SET status = 'completed', order_id = ?, state = ?, updated_at = ?, "
                     "payment_session_id = ?, completing_since = NULL WHERE id = ?",
                     (order_id, dumps(state), iso, payment_session, session_id))
        if self.order_webhooks is not None:
            done = {**current, "status": "completed", "state": dumps(state), "updated_at": iso}
            self.order_webhooks.enqueue(conn, ORDER_CREATE, self._view(done)["order"])

    # --- refunds of payments that cannot be delivered (an outbox) ---------------------------------------------------

    def _after_payment(self) -> None:
        """After a COMMIT that may have written order events or refunds due: send them in the background."""
        self._send_orders()
        if not self._refunds_marked:  # most payments are delivered: no query after each one
            return
        due = self._store.query("SELECT payment_session_id FROM acp_payments WHERE refund_status = 'due'")
        self._refunds_marked -= {str(r["payment_session_id"]) for r in due}
        self.refunds.spawn((f"refund:{r['payment_session_id']}",
                            lambda ps=str(r["payment_session_id"]): self._refund(ps))  # type: ignore[misc]
                           for r in due)

    def resume_refunds(self) -> None:
        """At start-up, on the server's loop: refunds a previous run recorded as due but did not make."""
        self.refunds.bind()
        self._refunds_marked.add("")  # look once for whatever a previous run left due
        self._after_payment()
        self._refunds_marked.discard("")

    async def _refund(self, ps_id: str) -> None:
        """Refund in full a payment its checkout cannot take; recorded when Stripe says it succeeded."""
        found = self._store.query_one(
            "SELECT a.refund_status, s.payment_intent_id FROM acp_payments a JOIN payment_sessions s ON s.id = "
            "a.payment_session_id WHERE a.payment_session_id = ?", (ps_id,))
        if found is None or found["refund_status"] != "due":
            return
        refund: dict[str, Any] | None = None
        error = None
        try:
            refund = (await self._gateway.send(StripeRequest(
                "post", "/v1/refunds", {"payment_intent": found["payment_intent_id"], "reason": "requested_by_customer",
                                        "metadata": {"aims_acp_payment": ps_id}},
                stripe_idempotency_key("acp-refund", ps_id)))).data
        except StripeInvalidRequest as exc:
            if exc.details.get("stripe_code") != "charge_already_refunded":
                error = f"{exc.code}: {exc.message}"
        except BillingError as exc:
            error = f"{exc.code}: {exc.message}"
        done = error is None and (refund is None or refund.get("status") == "succeeded")
        if refund is not None and not done:
            error = f"refund {refund.get('id')} is {refund.get('status')}"

        def job(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE acp_payments SET refund_status = CASE WHEN ? THEN 'succeeded' ELSE refund_status END, "
                         "refund_id = COALESCE(?, refund_id), last_error = ? WHERE payment_session_id = ?",
                         (done, refund.get("id") if refund else None, error, ps_id))

        await self._store.write(job)
        if error:
            log.warning("refunding ACP payment %s: %s (retried at the next start-up)", ps_id, error)

    async def drain(self) -> None:
        """Wait for the refunds in flight (shutdown and tests)."""
        await self.refunds.drain()

    def _send_orders(self) -> None:
        """After a COMMIT that may have written order events: send the pending ones in the background."""
        if self.order_webhooks is not None:
            self.order_webhooks.kick()

    def _subscription_outcome(self, conn: sqlite3.Connection, prepaid: PrepaidRow) -> Callable[[], None] | None:
        """The order's tier subscription started, failed for good, or was refunded: update the order, and tell the
        agent platform with an `order_update` event sent after COMMIT."""
        current = conn.execute("SELECT * FROM acp_checkout_sessions WHERE id = ?", (prepaid["source_id"],)).fetchone()
        if current is None:
            return None
        state = json.loads(current["state"])
        summary = self._prepaid.summary(prepaid)
        outcome = prepaid["status"]
        credits_ok = not state["order"].get("luc_refused")
        credits = self._has_credits(state["lines"])
        if not credits_ok:
            status = "manual_review"  # the LUC the buyer paid for is neither credited nor refunded yet
        elif outcome == "started":
            status = "completed"
        elif outcome == "refunded":
            status = "completed" if credits else "canceled"
        else:
            status = "manual_review"
        state["order"].update(subscription=summary, status=status)
        content = {
            "started": f"The {summary['tier']} tier subscription {summary['subscription']} started for customer "
                       f"{summary['customer']}: {summary['prepaid_display']} prepaid as credit on the customer's "
                       f"Stripe balance; it ends at the commitment end {summary.get('commitment_end')}.",
            "refunded": f"The {summary['tier']} tier subscription could not be started; "
                        f"{summary.get('refunded_display')} was refunded ({summary.get('refund') or 'nothing left'}).",
        }.get(outcome, f"The {summary['tier']} tier subscription could not be started ({summary.get('last_error')}); "
                       "the payment is kept and an operator has been told.")
        state["messages"] = [*state.get("messages", []), _info(content)]
        iso = utc_iso(self._clock())
        conn.execute("UPDATE acp_checkout_sessions SET state = ?, updated_at = ? WHERE id = ?",
                     (dumps(state), iso, current["id"]))
        webhooks = self.order_webhooks
        if webhooks is None:
            return None
        updated = {**dict(current), "state": dumps(state), "updated_at": iso}
        webhooks.enqueue(conn, ORDER_UPDATE, self._view(updated)["order"])
        return self._send_orders

    # --- state --------------------------------------------------------------------------------------------------

    def _lines(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Our line items: one per item id, its quantity the number of times the id was given."""
        counts: dict[str, int] = {}
        for i, item in enumerate(items):
            item_id = item["id"].strip()
            if item_id not in self._pricing.items:
                raise AcpError(400, "invalid_item_id", f"The item ID {item_id[:64]!r} does not exist. Items for sale: "
                               + ", ".join(sorted(self._pricing.items)), param=f"$.line_items[{i}].id")
            counts[item_id] = counts.get(item_id, 0) + 1
        tiers = 0
        for i, item in enumerate(items):
            item_id = item["id"].strip()
            if counts[item_id] > 100:
                raise AcpError(400, "quantity_exceeded", "at most 100 of one item per checkout",
                               param=f"$.line_items[{i}].id")
            if self._pricing.items[item_id].subscribes:
                tiers += 1
                if tiers > 1:
                    raise AcpError(400, "quantity_exceeded", f"{item_id}: one tier subscription per checkout (a "
                                   "customer has one subscription at a time)", param=f"$.line_items[{i}].id")
        return [{"item": item_id, "quantity": quantity} for item_id, quantity in counts.items()]

    def _check_currency(self, lines: list[dict[str, Any]], currency: str) -> None:
        for line in lines:
            item = self._pricing.items[line["item"]]
            if item.currency != currency:
                raise AcpError(400, "unsupported_currency", f"{item.id} is sold in {item.currency}, not "
                               f"{currency[:8]!r}", param="$.currency")

    def _has_credits(self, lines: list[dict[str, Any]]) -> bool:
        return any(not self._pricing.items[line["item"]].subscribes for line in lines)

    def _tier_line(self, lines: list[dict[str, Any]]) -> tuple[int, Item] | None:
        """The checkout's tier line (its index and item), if it has one: `_lines` allows at most one."""
        return next(((i, self._pricing.items[line["item"]]) for i, line in enumerate(lines)
                     if self._pricing.items[line["item"]].subscribes), None)

    def _wallet_customer(self, agent_id: str | None, conn: sqlite3.Connection | None = None) -> str | None:
        """The customer whose wallet the agent holds (None: no such wallet), read in `conn` when given."""
        if agent_id is None or not AGENT_ID.fullmatch(agent_id):
            return None
        sql, args = "SELECT customer_id FROM agent_wallets WHERE agent_id = ?", (agent_id,)
        wallet = conn.execute(sql, args).fetchone() if conn is not None else self._store.query_one(sql, args)
        return None if wallet is None else str(wallet["customer_id"])

    def _subscriber(self, agent_id: str | None, state: dict[str, Any],
                    conn: sqlite3.Connection | None = None) -> tuple[str | None, str]:
        """Who a tier line subscribes, and the field that says so: `buyer.customer_id` (ACP's merchant customer
        identifier: our Stripe customer), else the customer of the agent's wallet."""
        named = (state.get("buyer") or {}).get("customer_id")
        if isinstance(named, str) and named.strip():
            return named.strip(), "$.buyer.customer_id"
        owner = self._wallet_customer(agent_id, conn)
        return (owner, "$.metadata.agent_id") if owner is not None else (None, "$.buyer.customer_id")

    def _problems(self, agent_id: str | None, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Why the session cannot be paid yet: credits need the buying agent's wallet (`metadata.agent_id`); a tier
        needs the customer who subscribes (`buyer.customer_id`, or the agent's wallet's customer), who must not
        already have a tier (two subscriptions would bill twice)."""
        lines = state["lines"]
        if self._has_credits(lines):
            if agent_id is None:
                return [_message("missing", "Name the buying agent whose wallet receives the credits: create the "
                                 "checkout session with metadata.agent_id.", param="$.metadata.agent_id",
                                 resolution="requires_buyer_input")]
            if self._wallet_customer(agent_id) is None:
                return [_message("invalid", f"Agent {agent_id[:64]!r} has no wallet to credit: open one with "
                                 "create_agent_wallet, then create a new checkout session.",
                                 param="$.metadata.agent_id", resolution="requires_buyer_input")]
        found = self._tier_line(lines)
        if found is None:
            return []
        i, item = found
        customer, param = self._subscriber(agent_id, state)
        if customer is None:
            return [_message("missing", f"Name the customer {item.id} subscribes: buyer.customer_id (the Stripe "
                             "customer, cus_...) or metadata.agent_id of an agent whose wallet belongs to it.",
                             param=param, resolution="requires_buyer_input")]
        if not _CUSTOMER.fullmatch(customer):
            return [_message("invalid", f"buyer.customer_id {customer[:64]!r} is not a Stripe customer id (cus_...).",
                             param=param, resolution="requires_buyer_input")]
        tier = self._prepaid.live_tier(customer)
        if tier is not None:
            return [_message("invalid", f"Customer {customer} already has the {tier} tier: remove {item.id} (a "
                             "second subscription would bill twice).", param=f"$.line_items[{i}]",
                             resolution="requires_buyer_input")]
        return []

    def _open_status(self, agent_id: str | None, state: dict[str, Any]) -> str:
        return "not_ready_for_payment" if self._problems(agent_id, state) else "ready_for_payment"

    def _total(self, lines: list[dict[str, Any]]) -> int:
        return sum(self._pricing.items[line["item"]].unit_price * line["quantity"] for line in lines)

    def _save_job(self, session_id: str, state: dict[str, Any], status: str | None, *,
                  only_open: bool) -> Callable[[sqlite3.Connection], bool]:
        clock = self._clock

        def job(conn: sqlite3.Connection) -> bool:
            # open, and not held by a completion (the cart being paid for never changes under it)
            guard = " AND status NOT IN ('completed', 'canceled', 'expired', 'in_progress')" if only_open else ""
            if status is None:
                cursor = conn.execute(f"UPDATE acp_checkout_sessions SET state = ?, updated_at = ? WHERE id = ?{guard}",
                                      (dumps(state), utc_iso(clock()), session_id))
            else:
                cursor = conn.execute(f"UPDATE acp_checkout_sessions SET state = ?, status = ?, updated_at = ? "
                                      f"WHERE id = ?{guard}", (dumps(state), status, utc_iso(clock()), session_id))
            return cursor.rowcount == 1

        return job

    def _row(self, session_id: str) -> dict[str, Any]:
        row = self._store.query_one("SELECT * FROM acp_checkout_sessions WHERE id = ?", (session_id,))
        if row is None:
            raise AcpError(404, "not_found", f"no checkout session {session_id[:64]!r}", param="$.id")
        if row["status"] not in FINISHED and row["expires_at"] <= self._clock():
            row["status"] = "expired"
        elif row["status"] in ("not_ready_for_payment", "ready_for_payment"):
            # a wallet opened since makes it payable; the problems are looked up once, here, for the view too
            row["problems"] = self._problems(row["agent_id"], json.loads(row["state"]))
            row["status"] = "not_ready_for_payment" if row["problems"] else "ready_for_payment"
        return row

    def _open_row(self, session_id: str, verb: str) -> dict[str, Any]:
        row = self._row(session_id)
        if row["status"] in FINISHED:
            code = {"completed": "session_not_completable", "canceled": "session_not_cancelable"}.get(
                verb, "session_not_modifiable")
            raise AcpError(405, code, f"checkout session {row['id']} is {row['status']}: it cannot be {verb}")
        return row

    def _view(self, row: dict[str, Any]) -> dict[str, Any]:
        """The session as ACP's CheckoutSession (CheckoutSessionWithOrder once completed)."""
        state = json.loads(row["state"])
        currency = row["currency"]
        lines, total = [], 0
        for line in state["lines"]:
            item = self._pricing.items[line["item"]]
            amount = item.unit_price * line["quantity"]
            total += amount
            lines.append({
                "id": _line_id(item.id), "item": {"id": item.id, "name": item.title, "unit_amount": item.unit_price},
                "quantity": line["quantity"], "name": item.title, "unit_amount": item.unit_price,
                "product_id": item.id, "category": "subscription" if item.subscribes else "digital_credits",
                "availability_status": "in_stock",
                "totals": _totals(amount),
            })
        line_ids = [line["id"] for line in lines]
        messages = list(state.get("messages") or [])
        if row["status"] in ("not_ready_for_payment", "ready_for_payment"):
            messages = row["problems"] + messages
        body: dict[str, Any] = {
            "id": row["id"], "protocol": {"version": API_VERSION},
            "capabilities": {"payment": {"handlers": [HANDLER]}}, "status": row["status"], "currency": currency,
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
            "messages": messages, "links": [], "created_at": row["created_at"], "updated_at": row["updated_at"],
            "expires_at": utc_iso(row["expires_at"]),
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
                "type": "order", "id": order["id"], "checkout_session_id": row["id"],
                "permalink_url": f"{self._public_url}/acp/checkout_sessions/{row['id']}", "status": order["status"],
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
                    "occurred_at": row["updated_at"], "status": "completed",
                    "line_items": [{"id": tier_line, "quantity": 1}], "amount": refunded.get("refunded", 0),
                    "currency": currency, "description": "The tier subscription could not be started",
                    "reason": "not_fulfilled"}]
                body["order"]["totals"].append({"type": "amount_refunded", "display_text": "Refunded",
                                                "amount": refunded.get("refunded", 0)})
        return body

    def discovery(self, api_base_url: str) -> dict[str, Any]:
        currencies = sorted({item.currency for item in self._pricing.items.values()})
        return {"protocol": {"name": "acp", "version": API_VERSION, "supported_versions": SUPPORTED_VERSIONS},
                "api_base_url": api_base_url, "transports": ["rest", "mcp"],  # MCP on /acp/mcp
                "capabilities": {"services": ["checkout"], "supported_currencies": currencies}}


def _order_line(line: dict[str, Any], *, delivered: bool, removed: bool = False) -> dict[str, Any]:
    """An order line; its status derived from the quantities as the schema defines it (removed: current 0)."""
    quantity = line["quantity"]
    current = 0 if removed else quantity
    return {"id": line["id"], "title": line["name"], "product_id": line["product_id"],
            "quantity": {"ordered": quantity, "current": current, "fulfilled": quantity if delivered else 0},
            "unit_price": line["unit_amount"], "subtotal": line["unit_amount"] * quantity,
            "status": "removed" if removed else "fulfilled" if delivered else "processing"}


def _info(content: str) -> dict[str, Any]:
    return {"type": "info", "severity": "info", "content_type": "plain", "content": content}


def _line_id(item_id: str) -> str:
    return f"li_{item_id}"


def _totals(amount: int) -> list[dict[str, Any]]:
    return [{"type": "items_base_amount", "display_text": "Base amount", "amount": amount},
            {"type": "subtotal", "display_text": "Subtotal", "amount": amount},
            {"type": "total", "display_text": "Total", "amount": amount}]


def _release(scope: str, key: str) -> Callable[[sqlite3.Connection], None]:
    def job(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM acp_idempotency WHERE scope = ? AND key = ? AND state = 'in_flight'", (scope, key))

    return job
