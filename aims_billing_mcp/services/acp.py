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
Request bodies are read by acp_protocol.py (the spec's own JSON Schema, then typed request models), so a
violating body is a 400 naming the JSONPath of the offending field. A refused request changes nothing.

Plugs (issue 17): a line item `plug:<id>` sells a creator's plug (services/connect.py). Completing checks every
creator can receive their share before anything is charged (else 400 `not_ready_for_payment` naming the account
and what Stripe still requires). One creator's plugs are a destination charge on the payment session's
PaymentIntent; several creators' are one platform charge with a transfer group and one transfer per creator,
made before the answer (idempotency keys derived from the payment session and the creator).

The protocol edge (request models, request signing, authentication, the response shapes) is acp_protocol.py; the
rows and state machines (`CheckoutStatus`, `OrderStatus` and their TRANSITIONS) are store/acp.py; this module
holds the operations.

Order webhooks (acp_webhooks.py): with an order webhook URL configured, completing a checkout writes an
`order_create` event in the transaction that completes it, and a tier line's outcome (started: `completed`; failed
for good: `manual_review`; refunded: `canceled`, the line `removed`) an `order_update`; each is sent after COMMIT
in the background.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from pydantic import SecretStr

from ..errors import (
    BillingError,
    InvalidInput,
    InvalidState,
    NotFound,
    Refused,
    StripeCardDeclined,
    StripeInvalidRequest,
)
from ..models import AGENT_ID, format_amount
from ..store import Store, Tx, dumps, utc_iso
from ..store.acp import (
    FINISHED,
    OPEN,
    ORDER_TRANSITIONS,
    CheckoutRow,
    CheckoutStatus,
    KeyRecord,
    KeyState,
    OrderStatus,
    PaymentRow,
    RefundStatus,
)
from ..store.commerce import PaymentSessionRow
from ..store.connect import AccountStatus
from ..store.prepaid import PrepaidRow
from ..stripe_gateway import StripeGateway, StripeRequest, stripe_idempotency_key
from .acp_models import AcpError, AcpResponse
from .acp_protocol import (
    DIGITAL_OPTION,
    HANDLER_ID,
    RETRY_AFTER_SECONDS,
    ItemRef,
    body_hash,
    check_cancel,
    check_complete,
    check_create,
    check_idempotency_key_length,
    check_update,
    checkout_view,
    discovery,
    identity_of,
    info,
    invalid,
    line_id,
    message,
    paying_error,
    require_idempotency_key,
    verify_signature,
)
from .acp_webhooks import ORDER_CREATE, ORDER_UPDATE, OrderWebhooks
from .background import Background
from .commerce import SHARED_PAYMENT_TOKEN, PaymentSessionService
from .commerce_models import PaymentSession
from .connect import ConnectService
from .fulfilment import Seller
from .ledger import LedgerService
from .prepaid import PrepaidSubscriptions, prepaid_id
from .tiers import Item, Pricing

log = logging.getLogger(__name__)
_CUSTOMER = re.compile(r"cus_[A-Za-z0-9_]{1,200}")
KEY_RETENTION_SECONDS = 24 * 3600  # ACP §6.6: at least 24 hours
# what `_settle` records as a checkout payment's fulfilment: a payment session showing one was settled already
SETTLED = frozenset({"acp_order", "acp_refund"})
IN_FLIGHT_STALE_SECONDS = 120  # a claim older than this belonged to a request that died: the key is free again
REFUND_LEASE_SECONDS = 300  # one refund attempt (a Stripe call and its retries); then another instance may take it


@dataclass(frozen=True, slots=True)
class Checkout:
    """A checkout session as read now: its row, its status as of now (`expired` past its expiry; an open one's
    readiness derived afresh) and why an open one cannot be paid yet (ACP error Messages)."""

    row: CheckoutRow
    status: CheckoutStatus
    problems: list[dict[str, Any]] = field(default_factory=list)


class Items(Mapping[str, Item]):
    """What an ACP checkout sells: pricing.toml's items (listed), and each plug as `plug:<id>` (a one-off item:
    its price, no LUC, no tier), looked up when named."""

    def __init__(self, pricing: Pricing, connect: ConnectService | None) -> None:
        self._pricing, self._connect = pricing, connect

    def __getitem__(self, item_id: str) -> Item:
        if item_id.startswith("plug:") and self._connect is not None:
            plug = self._connect.plug(item_id.removeprefix("plug:"))
            if plug is not None:
                return Item.model_construct(id=item_id, title=plug.name, description="", unit_price=plug.unit_amount,
                                            currency=plug.currency, fulfil="credit", luc=0, tier=None)
        return self._pricing.items[item_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pricing.items)

    def __len__(self) -> int:
        return len(self._pricing.items)


def is_plug(item_id: str) -> bool:
    return item_id.startswith("plug:")


def _reveal(secret: SecretStr | str | None) -> str | None:
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    return value or None


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
        self._acp = store.acp
        self._commerce = commerce
        self._pricing = pricing
        self._connect = commerce.connect  # plugs' splits (services/connect.py)
        self._items = Items(pricing, self._connect)
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
        return identity_of(self._api_keys, authorization)

    def verify_signature(self, signature: str | None, timestamp: str | None, body: bytes) -> None:
        """With a signing secret configured, `signature` must be ours over `timestamp` and `body`, and `timestamp`
        fresh; else 401 naming the cause (acp_protocol.py says how). Without one, nothing is checked."""
        verify_signature(self._signing_secret, signature, timestamp, body, clock=self._clock)

    async def idempotent(
        self, identity: str, endpoint: str, key: str | None, body: Any,
        handler: Callable[[], Awaitable[AcpResponse]],
    ) -> AcpResponse:
        """Run `handler` once per (identity, endpoint, Idempotency-Key), by ACP §6's rules."""
        key = require_idempotency_key(key)
        check_idempotency_key_length(key)
        scope = f"{identity}:{endpoint}"
        digest = body_hash(body)
        now = self._clock()
        acp = self._acp

        def claim(tx: Tx) -> KeyRecord | None:
            return acp.claim_key(tx, scope, key, digest, now, expired_before=now - KEY_RETENTION_SECONDS,
                                 abandoned_before=now - IN_FLIGHT_STALE_SECONDS)

        def release(tx: Tx) -> None:
            acp.release_key(tx, scope, key)

        found = await self._store.write(claim)
        if found is not None:
            if found.request_hash != digest:
                raise AcpError(422, "idempotency_conflict", "Idempotency-Key has already been used with a different "
                               "request body")
            if found.state == KeyState.IN_FLIGHT or found.status is None or found.response is None:
                raise AcpError(409, "idempotency_in_flight", "A request with this Idempotency-Key is currently being "
                               "processed", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            return AcpResponse(int(found.status), json.loads(found.response), {"Idempotent-Replayed": "true"},
                               replayed=True)
        try:
            try:
                result = await handler()
            except AcpError as exc:
                result = exc.response()
        except BaseException:
            await self._store.write(release)
            raise
        if result.status >= 500 or result.status == 409:  # a 409 is "retry later": the retry must run again
            await self._store.write(release)
            return result

        def done(tx: Tx) -> None:
            acp.finish_key(tx, scope, key, result.status, dumps(result.body))

        await self._store.write(done)
        return result

    # --- the five operations -------------------------------------------------------------------------------------

    async def create(self, body: Any, *, seed: str) -> AcpResponse:
        """A new checkout session (201). `seed` (identity + Idempotency-Key) names it, so a retried create after a
        crash finds the same session instead of a second one."""
        request = check_create(body)
        lines = self._lines(request.line_items)
        currency = request.currency.strip().lower()
        self._check_currency(lines, currency)
        metadata = dict(request.metadata or {})
        agent = metadata.get("agent_id")
        state = {"lines": lines, "buyer": request.buyer, "fulfillment_details": request.fulfillment_details,
                 "selected": None, "metadata": metadata, "order_notes": request.order_notes, "messages": [],
                 "order": None}
        session_id = "cs_" + hashlib.sha256(f"acp-create\x00{seed}".encode()).hexdigest()[:24]
        now = self._clock()
        iso = utc_iso(now)
        agent_id = agent if isinstance(agent, str) else None
        row = CheckoutRow(session_id, self._open_status(agent_id, state), currency, agent_id, dumps(state), None, None,
                          iso, iso, now + self._ttl, None)
        acp = self._acp

        def insert(tx: Tx) -> None:
            acp.create_session(tx, row)

        await self._store.write(insert)
        return AcpResponse(201, self._view(self._row(session_id)))

    async def get(self, session_id: str) -> AcpResponse:
        checkout = self._row(session_id)
        if checkout.status not in (CheckoutStatus.COMPLETED, CheckoutStatus.CANCELED) \
                and checkout.row.payment_session_id:
            checkout = await self._refresh(checkout)  # a payment whose outcome we have not recorded (even expired)
        return AcpResponse(200, self._view(checkout))

    async def update(self, session_id: str, body: Any) -> AcpResponse:
        request = check_update(body)
        given = request.model_fields_set
        checkout = self._open_row(session_id, "updated")
        self._refuse_while_paying(checkout, "updated")
        session_id = checkout.row.id
        state = json.loads(checkout.row.state)
        if "line_items" in given:
            state["lines"] = self._lines(request.line_items or [])
            self._check_currency(state["lines"], checkout.row.currency)
            state["selected"] = None
        for name in ("buyer", "fulfillment_details", "order_notes"):
            if name in given:
                state[name] = getattr(request, name)
        if "selected_fulfillment_options" in given:
            options = request.selected_fulfillment_options or []
            line_ids = {line_id(line["item"]) for line in state["lines"]}
            for i, option in enumerate(options):
                if option.type != "digital" or option.option_id != DIGITAL_OPTION:
                    raise invalid(f"$.selected_fulfillment_options[{i}].option_id", "these items are delivered "
                                  f"digitally: the only fulfillment option is {DIGITAL_OPTION} (type digital)",
                                  "invalid_fulfillment_option")
                for j, item_id in enumerate(option.item_ids):
                    if item_id not in line_ids:
                        raise invalid(f"$.selected_fulfillment_options[{i}].item_ids[{j}]", f"no line item "
                                      f"{item_id} in this session", "invalid_line_item_id")
            state["selected"] = [option.model_dump() for option in options]
        state["messages"] = []
        saved = await self._store.write(self._save_job(session_id, state,
                                                       self._open_status(checkout.row.agent_id, state),
                                                       only_open=True))
        if not saved:  # a completion claimed it (or it finished) since it was read
            self._open_row(session_id, "updated")
            raise paying_error(session_id)
        return AcpResponse(200, self._view(self._row(session_id)))

    async def cancel(self, session_id: str, body: Any) -> AcpResponse:
        """Cancel an open session. While a completion is charging it, 409; a PaymentIntent already made for it is
        canceled first, so no payment can succeed for a canceled session (one that did completes it instead)."""
        request = check_cancel(body)
        checkout = self._open_row(session_id, "canceled")
        self._refuse_while_paying(checkout, "canceled")
        session_id = checkout.row.id
        seen = checkout.row.payment_session_id
        if seen:
            try:
                await self._commerce.cancel_session(seen, f"acp-cancel:{session_id}")
            except InvalidState as exc:  # paid meanwhile: the session completes instead
                refreshed = await self._refresh(self._row(session_id))
                if refreshed.status == CheckoutStatus.COMPLETED:
                    raise AcpError(405, "session_not_cancelable", f"checkout session {session_id} is completed and "
                                   "cannot be canceled") from exc
                raise AcpError(409, "payment_in_progress", f"checkout session {session_id}: {exc.message}",
                               headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from exc
        state = json.loads(checkout.row.state)
        if request is not None and request.intent_trace is not None:
            state["intent_trace"] = request.intent_trace
        outcome = await self._store.write(self._cancel_job(session_id, seen, state))
        if outcome == "finished":
            raise AcpError(405, "session_not_cancelable", f"checkout session {session_id} is already finished")
        if outcome == "paying":
            raise paying_error(session_id)
        return AcpResponse(200, self._view(self._row(session_id)))

    def _cancel_job(self, session_id: str, seen: str | None,
                    state: dict[str, Any]) -> Callable[[Tx], Literal["finished", "paying", "canceled"]]:
        """Cancel, unless a payment was linked since `seen` (its PaymentIntent not canceled by us) or a completion
        holds the session with no PaymentIntent we canceled: then the payment decides."""
        clock, stale, acp = self._clock, self._stale_before(), self._acp

        def job(tx: Tx) -> Literal["finished", "paying", "canceled"]:
            current = acp.session_in(tx, session_id)
            if current is None or current.status in FINISHED:
                return "finished"
            claimed = current.completing_since is not None and current.completing_since >= stale
            if current.payment_session_id != seen or (seen is None and claimed):
                return "paying"
            acp.set_status(tx, session_id, CheckoutStatus.CANCELED, dumps(state), utc_iso(clock()))
            return "canceled"

        return job

    async def complete(self, session_id: str, body: Any, *, attempt: str) -> AcpResponse:
        """Pay with a Shared Payment Token; `attempt` (the caller's identity and Idempotency-Key) names this
        payment attempt. The session is claimed (`in_progress`) before anything is charged: no update or cancel
        lands while the payment runs, and the cart charged is the cart delivered."""
        request = check_complete(body)
        checkout = self._open_row(session_id, "completed")
        session_id = checkout.row.id
        data = request.payment_data
        if data.handler_id != HANDLER_ID:
            raise invalid("$.payment_data.handler_id", f"unknown payment handler {data.handler_id!r}: this "
                          f"seller accepts {HANDLER_ID}", "invalid_payment_handler")
        credential = data.instrument.credential
        if credential.type != "spt" or not SHARED_PAYMENT_TOKEN.fullmatch(credential.token):
            raise invalid("$.payment_data.instrument.credential", "the credential must be a Stripe Shared Payment "
                          "Token: {type: \"spt\", token: \"spt_...\"}", "invalid_payment_credential")
        if checkout.status == CheckoutStatus.IN_PROGRESS:
            if checkout.row.payment_session_id:
                checkout = await self._refresh(checkout)  # Stripe may be ahead of our record (a crash): recorded
            if checkout.status == CheckoutStatus.COMPLETED:
                raise AcpError(405, "session_not_completable", f"checkout session {session_id} is already completed")
            if checkout.status == CheckoutStatus.IN_PROGRESS and not self._stale(checkout.row):
                raise paying_error(session_id)
        state = json.loads(checkout.row.state)
        buyer_given = "buyer" in request.model_fields_set
        if buyer_given:  # it may name the customer a tier subscribes: readiness follows it, saved only to pay
            state["buyer"] = request.buyer
        await self._check_plugs(checkout.row, state)
        problems = self._problems(checkout.row.agent_id, state)
        if problems:
            raise AcpError(400, "not_ready_for_payment", f"checkout session {session_id} is not ready for payment: "
                           + "; ".join(p["content"] for p in problems), param=problems[0]["param"])
        await self._check_subscriber(checkout.row, state)
        if buyer_given:
            await self._store.write(self._save_job(session_id, state, None, only_open=True))
            checkout = self._row(session_id)
        claim = self._clock()
        if not await self._store.write(self._claim_job(checkout.row, claim)):
            self._refuse_while_paying(self._open_row(session_id, "completed"), "completed")
            raise paying_error(session_id)
        try:
            return await self._pay(self._row(session_id), state, credential.token, attempt, claim)
        except Exception:
            await self._store.write(self._release_job(session_id, claim, None))
            raise

    async def _pay(self, checkout: Checkout, state: dict[str, Any], token: str, attempt: str,
                   claim: float) -> AcpResponse:
        session_id = checkout.row.id
        payment_session = await self._payment_for(checkout.row, state, claim)
        try:
            paid = await self._commerce.confirm_session(
                payment_session, payment_method=None, shared_payment_token=token,
                idempotency_key=f"acp:{session_id}:{hashlib.sha256(attempt.encode()).hexdigest()[:24]}")
        except (StripeCardDeclined, StripeInvalidRequest) as exc:
            code = "payment_declined" if isinstance(exc, StripeCardDeclined) else "invalid"
            reason = exc.message.split(" The session stays payable")[0]
            state["messages"] = [message(code, f"{reason} Complete again with another Shared Payment Token.",
                                         param="$.payment_data.instrument.credential.token")]
            await self._store.write(self._release_job(session_id, claim, state))
            return AcpResponse(200, self._view(self._row(session_id)))
        except InvalidState as exc:  # a concurrent attempt paid it first, or a cancel canceled its PaymentIntent
            await self._store.write(self._release_job(session_id, claim, None))
            now = await self._refresh(self._row(session_id))
            raise AcpError(405, "session_not_completable", f"checkout session {session_id} is {now.status}: "
                           f"{exc.message}") from exc
        except BillingError as exc:  # Stripe unavailable, rate limited, ...: not stored, retry with the same key
            await self._store.write(self._release_job(session_id, claim, None))
            raise AcpError(502, "payment_provider_error", exc.message, type="processing_error") from exc
        done = await self._apply(session_id, paid, claim=claim)
        return AcpResponse(200, self._view(done))

    # --- the claim of a completion ------------------------------------------------------------------------------

    def _stale_before(self) -> float:
        return self._clock() - IN_FLIGHT_STALE_SECONDS

    def _stale(self, row: CheckoutRow) -> bool:
        """A claim older than IN_FLIGHT_STALE_SECONDS belonged to a request that died: another may take over."""
        return row.completing_since is not None and row.completing_since < self._stale_before()

    def _refuse_while_paying(self, checkout: Checkout, verb: str) -> None:
        row = checkout.row
        if checkout.status == CheckoutStatus.IN_PROGRESS and not self._stale(row) and (
                row.completing_since is not None or verb == "updated"):
            raise paying_error(row.id)

    def _save_job(self, session_id: str, state: dict[str, Any], status: CheckoutStatus | None, *,
                  only_open: bool) -> Callable[[Tx], bool]:
        clock, acp = self._clock, self._acp

        def job(tx: Tx) -> bool:
            return acp.save_state(tx, session_id, dumps(state), status, utc_iso(clock()), only_open=only_open)

        return job

    def _claim_job(self, row: CheckoutRow, claim: float) -> Callable[[Tx], bool]:
        """Open (or held by a stale claim) -> in_progress, held by this completion."""
        clock, acp, session_id, seen = self._clock, self._acp, row.id, row.completing_since

        def job(tx: Tx) -> bool:
            return acp.claim(tx, session_id, claim, seen, utc_iso(clock()))

        return job

    def _release_job(self, session_id: str, claim: float, state: dict[str, Any] | None) -> Callable[[Tx], None]:
        """The payment did not go through: the session is payable again (read recomputes its readiness)."""
        clock, acp = self._clock, self._acp

        def job(tx: Tx) -> None:
            acp.release(tx, session_id, claim, None if state is None else dumps(state), utc_iso(clock()))

        return job

    # --- payment ------------------------------------------------------------------------------------------------

    async def _check_subscriber(self, row: CheckoutRow, state: dict[str, Any]) -> None:
        """A tier line subscribes a customer: Stripe must know it, checked before anything is charged."""
        found = self._tier_line(state["lines"])
        if found is None:
            return
        customer, param = self._subscriber(row.agent_id, state)
        try:
            await self._prepaid.check_customer(customer or "", param=param)
            await self._prepaid.check_prices(self._pricing.tier(str(found[1].tier)))
        except NotFound as exc:
            raise AcpError(400, "not_ready_for_payment", exc.message, param=param) from exc
        except BillingError as exc:  # Stripe unavailable, rate limited, ...: not stored, retry with the same key
            raise AcpError(502, "payment_provider_error", exc.message, type="processing_error") from exc

    async def _plan(self, row: CheckoutRow, lines: list[dict[str, Any]]) -> Any:
        if self._connect is None or not any(is_plug(line["item"]) for line in lines):
            return None
        return await self._connect.plan_lines([(line["item"], line["quantity"]) for line in lines],
                                              self._total(lines), row.currency)

    async def _check_plugs(self, row: CheckoutRow, state: dict[str, Any]) -> None:
        """Every plug's creator can receive their share (Stripe asked when our record says not): checked before
        anything is charged, refused naming the account and what Stripe still requires."""
        try:
            await self._plan(row, state["lines"])
        except (InvalidInput, NotFound, Refused) as exc:
            raise AcpError(400, "not_ready_for_payment", exc.message, param=exc.param) from exc
        except BillingError as exc:  # Stripe unavailable, rate limited, ...: not stored, retry with the same key
            raise AcpError(502, "payment_provider_error", exc.message, type="processing_error") from exc

    async def _payment_for(self, row: CheckoutRow, state: dict[str, Any], claim: float) -> str:
        """The payment session for the cart as it is now: the linked one if it was made for this very cart, else a
        new one (the old PaymentIntent canceled first), linked with the cart frozen (`acp_payments`): delivery
        follows what the payment was made for, never the cart as it may be later."""
        lines = state["lines"]
        total = self._total(lines)
        subscriber = self._subscriber(row.agent_id, state)[0] if self._tier_line(lines) else None
        frozen = {"lines": lines, "subscriber": subscriber}
        made = {ps: json.loads(cart) for ps, cart in self._acp.payment_carts(row.id).items()}
        current = row.payment_session_id
        if current is not None and made.get(current) == frozen:
            return str(current)
        if current is not None:  # made for another cart: canceled, so it can never be paid for that cart
            try:
                await self._commerce.cancel_session(current, f"acp-replace:{row.id}")
            except InvalidState as exc:  # it was paid meanwhile: that payment completes the session
                await self._refresh(self._row(row.id))
                raise AcpError(405, "session_not_completable", f"checkout session {row.id} was paid for its "
                               f"earlier cart meanwhile: {exc.message}") from exc
        digest = hashlib.sha256(dumps(frozen).encode()).hexdigest()[:16]
        titles = ", ".join(f"{line['quantity']} x {self._items[line['item']].title}" for line in lines)
        clock, acp, cart = self._clock, self._acp, dumps(frozen)
        linked: dict[str, bool] = {}

        def link(tx: Tx, ps_id: str) -> None:
            linked[ps_id] = acp.link_payment(tx, PaymentRow(ps_id, row.id, cart, total, row.currency), claim,
                                             utc_iso(clock()))

        try:
            plan = await self._plan(row, lines)  # a creator restricted since the check: refused before the charge
            created = await self._commerce.create_session(
                customer=subscriber, agent_id=row.agent_id if self._has_credits(lines) else None, item=None,
                amount=total, currency=row.currency, description=f"ACP checkout {row.id}: {titles}"[:500],
                idempotency_key=f"acp:{row.id}:{len(made)}:{digest}", dry_run=False, plan=plan, split_path="acp",
                split_note=f"ACP checkout {row.id}", with_record=link)  # linked in the job that records it
        except BillingError as exc:
            raise AcpError(400, "payment_not_possible", exc.message, param="$.payment_data") from exc
        assert created.session is not None
        ps_id = created.session.id
        if ps_id not in linked:  # a replayed create (recorded by an attempt that died before linking it)
            await self._store.write(lambda tx: link(tx, ps_id))
        if not linked[ps_id]:  # canceled (or taken over) meanwhile: this one is never confirmed
            await self._commerce.cancel_session(ps_id, f"acp-unlinked:{row.id}")
            raise AcpError(405, "session_not_completable", f"checkout session {row.id} changed while it was "
                           "being paid (canceled?): GET it to see its state")
        return ps_id

    async def _refresh(self, checkout: Checkout) -> Checkout:
        paid = await self._commerce.get_session(str(checkout.row.payment_session_id))
        return await self._apply(checkout.row.id, paid)

    async def _apply(self, session_id: str, paid: PaymentSession, *, claim: float | None = None) -> Checkout:
        """Record what the payment session says. Success normally settled the session already, inside the
        transaction that recorded the payment (`_settle`, whose outcome is the payment session's fulfilment: no
        second transaction then); this settles it too, for a payment recorded before, guarded the same way (once).
        Any other outcome moves the status only for the completion that holds the session (`claim`), or when none
        does. Then the order's tier subscription is started before answering."""
        clock, stale, acp = self._clock, self._stale_before(), self._acp

        def job(tx: Tx) -> None:
            current = acp.session_in(tx, session_id)
            if current is None:
                return
            if paid.status == "succeeded":
                self._settle(tx, paid.id, paid.payment_intent, amount=paid.amount)
                return
            holder = current.completing_since
            if current.status in FINISHED or (holder is not None and holder != claim and holder >= stale):
                return  # another request is paying: its own answer moves the status
            state = json.loads(current.state)
            if paid.status in ("processing", "requires_action", "requires_confirmation"):
                status = CheckoutStatus.IN_PROGRESS
            elif paid.status == "canceled":
                status = CheckoutStatus.CANCELED
            else:  # requires_payment_method after a failure, or amount_mismatch: payable again
                status = CheckoutStatus.READY_FOR_PAYMENT
                if paid.last_error:
                    state["messages"] = [message("payment_declined", paid.last_error,
                                                 param="$.payment_data.instrument.credential.token")]
            acp.set_status(tx, session_id, status, dumps(state), utc_iso(clock()))

        settled = paid.status == "succeeded" and (paid.fulfilment or {}).get("kind") in SETTLED
        if not settled:  # a success whose fulfilment is recorded was settled in the transaction that recorded it
            await self._store.write(job)
        self._after_payment()
        if paid.status == "succeeded" and self._connect is not None:
            await self._connect.transfers.drain()  # several creators' transfers, made before the answer
        checkout = self._row(session_id)
        if paid.status == "succeeded" and self._tier_line(json.loads(checkout.row.state)["lines"]) is not None:
            await self._prepaid.start_now(prepaid_id(session_id))
            return self._row(session_id)  # the order as its subscription's start left it
        return checkout

    def _fulfil_paid(self, tx: Tx, payment: PaymentSessionRow, pi_id: str) -> dict[str, Any] | None:
        """The payment session of one of our checkouts succeeded: settle the checkout in the same transaction,
        whoever saw the success (our complete, a GET, Stripe's webhook), so a paid order is never lost."""
        return self._settle(tx, payment["id"], pi_id, amount=int(payment["amount"]))

    def _settle(self, tx: Tx, ps_id: str, pi_id: str | None, *, amount: int) -> dict[str, Any] | None:
        """A payment made for one of our checkouts succeeded: deliver what it was made for (its frozen lines) if
        the checkout is still open, else (canceled, or completed by another payment) refund it in full: whatever
        the order of events, a charge ends delivered or refunded. None: not a checkout's payment."""
        acp = self._acp
        payment = acp.payment_in(tx, ps_id)
        current = acp.session_in(tx, payment.checkout_session_id) if payment is not None \
            else acp.session_paid_by(tx, ps_id)
        if current is None:
            return None
        state = json.loads(current.state)
        frozen = json.loads(payment.lines) if payment else {"lines": state["lines"], "subscriber": None}
        order_id = "ord_" + current.id.removeprefix("cs_")
        delivered = {"kind": "acp_order", "checkout_session": current.id, "order": order_id}
        if current.status not in FINISHED and self._total(frozen["lines"]) <= amount:
            self._complete_in(tx, current, frozen, amount=amount, currency=current.currency,
                              payment_intent=pi_id, payment_session=ps_id)
            return delivered
        if current.status == CheckoutStatus.COMPLETED and (state.get("order") or {}).get("payment_intent") == pi_id:
            return delivered
        acp.mark_refund_due(tx, payment or PaymentRow(ps_id, current.id, dumps(frozen), amount, current.currency),
                            utc_iso(self._clock()), record=payment is None)
        self._refunds_marked.add(ps_id)  # looked for after COMMIT by _after_payment
        return {"kind": "acp_refund", "checkout_session": current.id, "status": "refund_due",
                "note": f"checkout session {current.id} is {current.status}: this payment is refunded in full"}

    def _complete_in(self, tx: Tx, current: CheckoutRow, frozen: dict[str, Any], *,
                     amount: int, currency: str, payment_intent: str | None, payment_session: str) -> None:
        """Complete a paid checkout inside the caller's transaction with the lines the payment was made for:
        credit the LUC (ledger key `acp:<id>`), record the tier subscription to start (the outbox's UNIQUE
        source), create the order and its `order_create`."""
        session_id = current.id
        state = json.loads(current.state)
        iso = utc_iso(self._clock())
        lines = frozen["lines"]
        state["lines"] = lines  # the order shows what was paid for
        luc = sum(self._items[line["item"]].luc * line["quantity"] for line in lines)
        done_what = []
        balance, refused = None, None
        if luc:
            try:
                posting = self._ledger.credit_in(tx, cast(str, current.agent_id), luc,
                                                 idempotency_key=f"acp:{session_id}",
                                                 reason=f"ACP checkout {session_id}", reference=payment_intent)
                balance = posting.balance_after
                done_what.append(f"{luc} LUC credited to agent {current.agent_id} (balance {balance} LUC)")
            except BillingError as exc:  # the payment is taken all the same: the order goes to manual review
                refused = f"{exc.code}: {exc.message}"
                done_what.append(f"the credit of {luc} LUC was refused ({refused}); the order is in manual review")
        subscription = None
        found = self._tier_line(lines)
        if found is not None:
            item = found[1]
            owner = frozen.get("subscriber") or self._subscriber(current.agent_id, state, tx)[0]
            assert owner is not None  # a session without its subscriber is never ready for payment
            subscription = self._prepaid.enqueue(
                tx, source="acp", source_id=session_id, customer=owner, tier=self._pricing.tier(str(item.tier)),
                amount=item.unit_price, currency=current.currency, payment_intent=payment_intent)
            done_what.append(f"the {item.tier} tier subscription for customer {owner} is starting")
        order_id = "ord_" + session_id.removeprefix("cs_")
        status = OrderStatus.MANUAL_REVIEW if refused else OrderStatus.PROCESSING if subscription \
            else OrderStatus.COMPLETED
        state["order"] = {
            "id": order_id, "status": status, "created_at": iso, "luc_credited": 0 if refused else luc,
            "luc_refused": refused, "agent_id": current.agent_id, "wallet_balance": balance,
            "payment_intent": payment_intent, "subscription": subscription,
        }
        state["messages"] = [info(f"Paid {format_amount(amount, currency)}: " + "; ".join(done_what) + ".")]
        saved = dumps(state)
        self._acp.complete(tx, session_id, order_id, saved, iso, payment_session)
        if self.order_webhooks is not None:
            done = replace(current, status=CheckoutStatus.COMPLETED, state=saved, updated_at=iso)
            self.order_webhooks.enqueue(tx, ORDER_CREATE, self._view(Checkout(done, done.status))["order"])

    # --- refunds of payments that cannot be delivered (an outbox) ---------------------------------------------------

    def _after_payment(self) -> None:
        """After a COMMIT that may have written order events or refunds due: send them in the background."""
        self._send_orders()
        if not self._refunds_marked:  # most payments are delivered: no query after each one
            return
        due = self._acp.refunds_due()
        self._refunds_marked -= set(due)
        self.refunds.spawn((f"refund:{ps}", lambda ps=ps: self._refund(ps))  # type: ignore[misc]
                           for ps in due)

    def resume_refunds(self) -> None:
        """At start-up, on the server's loop: refunds a previous run recorded as due but did not make."""
        self.refunds.bind()
        self._refunds_marked.add("")  # look once for whatever a previous run left due
        self._after_payment()
        self._refunds_marked.discard("")

    async def _refund(self, ps_id: str) -> None:
        """Refund in full a payment its checkout cannot take; recorded when Stripe says it succeeded. One sender
        across instances: the refund is leased first, and its outcome recorded only under that lease."""
        token, now, acp = "lease_" + uuid.uuid4().hex, self._clock(), self._acp
        if not await self._store.write(lambda tx: acp.lease_refunds(tx, token, now, now + REFUND_LEASE_SECONDS,
                                                                    payment_session_ids=[ps_id])):
            return  # refunded already, or another sender holds it
        found = self._acp.refund_target(ps_id)
        if found is None or found.refund_status != RefundStatus.DUE:
            return
        refund: dict[str, Any] | None = None
        error = None
        try:
            refund = (await self._gateway.send(StripeRequest(
                "post", "/v1/refunds", {"payment_intent": found.payment_intent_id, "reason": "requested_by_customer",
                                        "metadata": {"aims_acp_payment": ps_id},
                                        **(self._connect.full_refund_params("acp", ps_id) if self._connect else {})},
                stripe_idempotency_key("acp-refund", ps_id)))).data
        except StripeInvalidRequest as exc:
            if exc.details.get("stripe_code") != "charge_already_refunded":
                error = f"{exc.code}: {exc.message}"
        except BillingError as exc:
            error = f"{exc.code}: {exc.message}"
        done = error is None and (refund is None or refund.get("status") == "succeeded")
        if refund is not None and not done:
            error = f"refund {refund.get('id')} is {refund.get('status')}"
        refund_id = refund.get("id") if refund else None

        def job(tx: Tx) -> bool:
            return acp.record_refund(tx, ps_id, succeeded=done, refund_id=refund_id, error=error, lease=token)

        if not await self._store.write(job):
            log.warning("refunding ACP payment %s: its lease ended and another sender took it over; this outcome "
                        "is not recorded", ps_id)
            return
        if done and self._connect is not None:  # the plugs' creators give back their part
            try:
                await self._connect.refunded_in_full("acp", ps_id, str(refund_id or ps_id))
            except BillingError as exc:
                log.warning("refunding ACP payment %s: the creators' transfers are not reversed yet: %s", ps_id,
                            exc.message)
        if error:
            log.warning("refunding ACP payment %s: %s (retried at the next start-up)", ps_id, error)

    async def drain(self) -> None:
        """Wait for the refunds in flight (shutdown and tests)."""
        await self.refunds.drain()

    def _send_orders(self) -> None:
        """After a COMMIT that may have written order events: send the pending ones in the background."""
        if self.order_webhooks is not None:
            self.order_webhooks.kick()

    def _subscription_outcome(self, tx: Tx, prepaid: PrepaidRow) -> Callable[[], None] | None:
        """The order's tier subscription started, failed for good, or was refunded: update the order, and tell the
        agent platform with an `order_update` event sent after COMMIT."""
        current = self._acp.session_in(tx, prepaid.source_id)
        if current is None:
            return None
        state = json.loads(current.state)
        summary = self._prepaid.summary(prepaid)
        outcome = prepaid["status"]
        credits_ok = not state["order"].get("luc_refused")
        credits = self._delivered_with_payment(state["lines"])
        if not credits_ok:
            status = OrderStatus.MANUAL_REVIEW  # the LUC the buyer paid for is neither credited nor refunded yet
        elif outcome == "started":
            status = OrderStatus.COMPLETED
        elif outcome == "refunded":
            status = OrderStatus.COMPLETED if credits else OrderStatus.CANCELED
        else:
            status = OrderStatus.MANUAL_REVIEW
        before = OrderStatus(state["order"]["status"])
        if status not in ORDER_TRANSITIONS[before]:
            log.warning("ACP order %s: %s -> %s is not a transition of the order machine", state["order"]["id"],
                        before, status)
        state["order"].update(subscription=summary, status=status)
        content = {
            "started": f"The {summary['tier']} tier subscription {summary['subscription']} started for customer "
                       f"{summary['customer']}: {summary['prepaid_display']} prepaid as credit on the customer's "
                       f"Stripe balance; it ends at the commitment end {summary.get('commitment_end')}.",
            "refunded": f"The {summary['tier']} tier subscription could not be started; "
                        f"{summary.get('refunded_display')} was refunded ({summary.get('refund') or 'nothing left'}).",
        }.get(outcome, f"The {summary['tier']} tier subscription could not be started ({summary.get('last_error')}); "
                       "the payment is kept and an operator has been told.")
        state["messages"] = [*state.get("messages", []), info(content)]
        iso = utc_iso(self._clock())
        saved = dumps(state)
        self._acp.save_state(tx, current.id, saved, None, iso, only_open=False)
        webhooks = self.order_webhooks
        if webhooks is None:
            return None
        updated = replace(current, state=saved, updated_at=iso)
        webhooks.enqueue(tx, ORDER_UPDATE, self._view(Checkout(updated, updated.status))["order"])
        return self._send_orders

    # --- state --------------------------------------------------------------------------------------------------

    def _lines(self, items: list[ItemRef]) -> list[dict[str, Any]]:
        """Our line items: one per item id, its quantity the number of times the id was given."""
        counts: dict[str, int] = {}
        for i, item in enumerate(items):
            item_id = item.id.strip()
            if item_id not in self._items:
                raise AcpError(400, "invalid_item_id", f"The item ID {item_id[:64]!r} does not exist. Items for sale: "
                               + ", ".join(sorted(self._items)) + " (and plug:<id> for a declared plug)",
                               param=f"$.line_items[{i}].id")
            counts[item_id] = counts.get(item_id, 0) + 1
        tiers = 0
        for i, item in enumerate(items):
            item_id = item.id.strip()
            if counts[item_id] > 100:
                raise AcpError(400, "quantity_exceeded", "at most 100 of one item per checkout",
                               param=f"$.line_items[{i}].id")
            if self._items[item_id].subscribes:
                tiers += 1
                if tiers > 1:
                    raise AcpError(400, "quantity_exceeded", f"{item_id}: one tier subscription per checkout (a "
                                   "customer has one subscription at a time)", param=f"$.line_items[{i}].id")
        return [{"item": item_id, "quantity": quantity} for item_id, quantity in counts.items()]

    def _check_currency(self, lines: list[dict[str, Any]], currency: str) -> None:
        for line in lines:
            item = self._items[line["item"]]
            if item.currency != currency:
                raise AcpError(400, "unsupported_currency", f"{item.id} is sold in {item.currency}, not "
                               f"{currency[:8]!r}", param="$.currency")

    def _has_credits(self, lines: list[dict[str, Any]]) -> bool:
        """LUC to credit: the buying agent's wallet is needed (a plug line credits nothing)."""
        return any(self._items[line["item"]].luc for line in lines)

    def _delivered_with_payment(self, lines: list[dict[str, Any]]) -> bool:
        """Lines other than a tier (credits, plugs): delivered by the payment itself."""
        return any(not self._items[line["item"]].subscribes for line in lines)

    def _tier_line(self, lines: list[dict[str, Any]]) -> tuple[int, Item] | None:
        """The checkout's tier line (its index and item), if it has one: `_lines` allows at most one."""
        return next(((i, self._items[line["item"]]) for i, line in enumerate(lines)
                     if self._items[line["item"]].subscribes), None)

    def _wallet_customer(self, agent_id: str | None, tx: Tx | None = None) -> str | None:
        """The customer whose wallet the agent holds (None: no such wallet), read in `tx` when given."""
        if agent_id is None or not AGENT_ID.fullmatch(agent_id):
            return None
        return self._acp.wallet_customer(agent_id) if tx is None else self._acp.wallet_customer_in(tx, agent_id)

    def _subscriber(self, agent_id: str | None, state: dict[str, Any],
                    tx: Tx | None = None) -> tuple[str | None, str]:
        """Who a tier line subscribes, and the field that says so: `buyer.customer_id` (ACP's merchant customer
        identifier: our Stripe customer), else the customer of the agent's wallet."""
        named = (state.get("buyer") or {}).get("customer_id")
        if isinstance(named, str) and named.strip():
            return named.strip(), "$.buyer.customer_id"
        owner = self._wallet_customer(agent_id, tx)
        return (owner, "$.metadata.agent_id") if owner is not None else (None, "$.buyer.customer_id")

    def _problems(self, agent_id: str | None, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Why the session cannot be paid yet: credits need the buying agent's wallet (`metadata.agent_id`); a tier
        needs the customer who subscribes (`buyer.customer_id`, or the agent's wallet's customer), who must not
        already have a tier (two subscriptions would bill twice); a plug's creator must be able to receive their
        share (as our record says: completing asks Stripe first)."""
        lines = state["lines"]
        if plugs := self._plug_problems(lines):
            return plugs
        if self._has_credits(lines):
            if agent_id is None:
                return [message("missing", "Name the buying agent whose wallet receives the credits: create the "
                                "checkout session with metadata.agent_id.", param="$.metadata.agent_id",
                                resolution="requires_buyer_input")]
            if self._wallet_customer(agent_id) is None:
                return [message("invalid", f"Agent {agent_id[:64]!r} has no wallet to credit: open one with "
                                "create_agent_wallet, then create a new checkout session.",
                                param="$.metadata.agent_id", resolution="requires_buyer_input")]
        found = self._tier_line(lines)
        if found is None:
            return []
        i, item = found
        customer, param = self._subscriber(agent_id, state)
        if customer is None:
            return [message("missing", f"Name the customer {item.id} subscribes: buyer.customer_id (the Stripe "
                            "customer, cus_...) or metadata.agent_id of an agent whose wallet belongs to it.",
                            param=param, resolution="requires_buyer_input")]
        if not _CUSTOMER.fullmatch(customer):
            return [message("invalid", f"buyer.customer_id {customer[:64]!r} is not a Stripe customer id (cus_...).",
                            param=param, resolution="requires_buyer_input")]
        tier = self._prepaid.live_tier(customer)
        if tier is not None:
            return [message("invalid", f"Customer {customer} already has the {tier} tier: remove {item.id} (a "
                            "second subscription would bill twice).", param=f"$.line_items[{i}]",
                            resolution="requires_buyer_input")]
        return []

    def _plug_problems(self, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for i, line in enumerate(lines):
            plug = self._connect.plug(line["item"].removeprefix("plug:")) \
                if self._connect is not None and is_plug(line["item"]) else None
            account = self._store.connect.account(plug.account_id) if plug is not None else None
            if account is not None and account.status is not AccountStatus.ACTIVE:
                due = ", ".join(account.requirements_due) or "nothing listed yet"
                out.append(message("invalid", f"The creator of {line['item']} (account {account.account_id}) cannot "
                                   f"receive transfers yet; Stripe still requires: {due}. Remove the line, or pay once "
                                   "they finished onboarding.", param=f"$.line_items[{i}]",
                                   resolution="requires_buyer_input"))
        return out

    def _open_status(self, agent_id: str | None, state: dict[str, Any]) -> CheckoutStatus:
        return CheckoutStatus.NOT_READY_FOR_PAYMENT if self._problems(agent_id, state) \
            else CheckoutStatus.READY_FOR_PAYMENT

    def _total(self, lines: list[dict[str, Any]]) -> int:
        return sum(self._items[line["item"]].unit_price * line["quantity"] for line in lines)

    def _row(self, session_id: str) -> Checkout:
        row = self._acp.session(session_id)
        if row is None:
            raise AcpError(404, "not_found", f"no checkout session {session_id[:64]!r}", param="$.id")
        if row.status not in FINISHED and row.expires_at <= self._clock():
            return Checkout(row, CheckoutStatus.EXPIRED)
        if row.status in OPEN:
            # a wallet opened since makes it payable; the problems are looked up once, here, for the view too
            problems = self._problems(row.agent_id, json.loads(row.state))
            return Checkout(row, CheckoutStatus.NOT_READY_FOR_PAYMENT if problems
                            else CheckoutStatus.READY_FOR_PAYMENT, problems)
        return Checkout(row, row.status)

    def _open_row(self, session_id: str, verb: str) -> Checkout:
        checkout = self._row(session_id)
        if checkout.status in FINISHED:
            code = {"completed": "session_not_completable", "canceled": "session_not_cancelable"}.get(
                verb, "session_not_modifiable")
            raise AcpError(405, code, f"checkout session {checkout.row.id} is {checkout.status}: it cannot be {verb}")
        return checkout

    def _view(self, checkout: Checkout) -> dict[str, Any]:
        """The session as ACP's CheckoutSession (CheckoutSessionWithOrder once completed)."""
        return checkout_view(checkout.row, checkout.status, checkout.problems, self._items, self._public_url)

    def discovery(self, api_base_url: str) -> dict[str, Any]:
        return discovery(self._pricing, api_base_url)
