"""Payment sessions: an agent pays for an item (a LUC credit pack, a prepaid tier) or an amount through a Stripe
PaymentIntent, confirmed with a payment method (`pm_card_visa`) or a Shared Payment Token (`spt_...`).

Fulfilment happens exactly once, in the same writer job that records the success, whoever sees the success first:
the confirm call, a later `get_payment_session` (which re-reads the PaymentIntent: status, amount_received,
currency) or the `payment_intent.succeeded` webhook. Three things stand behind "once": the session's UNIQUE
payment_intent_id (one session per PaymentIntent), the `fulfilled_at IS NULL` guard of the update that claims the
fulfilment (checked by rowcount), and the ledger credit's own idempotency key `fulfil:<session id>`. A tier is
fulfilled by recording its prepaid subscription in that job (prepaid.py starts it in Stripe after COMMIT), and a
session another seller owns (an ACP checkout's) is fulfilled by that seller, in the same job (the fulfilment
registry, fulfilment.py, asked first).

Retries: a confirm's state is checked under its key's lock, after its stored result was looked for, so a retry
gets the first result; a paid session is confirmed again at Stripe under the same Stripe key, which replays only
this key's own first request (its answer lost in a crash). When Stripe is ahead of our record (it says the
PaymentIntent already succeeded), the PaymentIntent is re-read and recorded before answering; a confirm sent is
marked (`confirming_since`) until its outcome is recorded, and `reconcile` re-reads the marked ones at start-up.
Keys belong to their owner: a create's to its agent (else customer), a confirm's or cancel's to its session.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import (
    BillingError,
    InvalidInput,
    InvalidState,
    NotFound,
    StripeCardDeclined,
    StripeError,
    StripeInvalidRequest,
)
from ..models import AGENT_ID, CURRENCIES, format_amount
from ..store import Store, Tx, utc_iso
from ..store.commerce import TERMINAL, TRANSITIONS, PaymentSessionRow, SessionStatus, session_status
from ..stripe_gateway import StripeGateway, StripeRequest, stripe_idempotency_key
from .ceiling import Ceiling
from .commerce_models import PaymentSession, PaymentSessionResult
from .connect import ConnectService, SalePlan
from .fulfilment import Fulfilment, Seller
from .idempotency import CallKey, IdempotencyService
from .ledger import LedgerService
from .mutations import StripeMutations, compact
from .prepaid import OPEN, PrepaidRow, PrepaidSubscriptions, prepaid_id
from .tiers import Item, Pricing

log = logging.getLogger(__name__)
CREATE_TOOL = "create_payment_session"
CONFIRM_TOOL = "confirm_payment_session"
CANCEL_TOOL = "cancel_payment_session"
__all__ = ["TERMINAL", "PaymentSessionService", "SessionStatus"]
_CUSTOMER = re.compile(r"cus_[A-Za-z0-9_]{1,200}")
_SESSION = re.compile(r"ps_[A-Za-z0-9_]{1,200}")
_PAYMENT_METHOD = re.compile(r"pm_[A-Za-z0-9_]{1,200}")
SHARED_PAYMENT_TOKEN = re.compile(r"spt_[A-Za-z0-9_]{1,200}")


def _session_id(call_key: str) -> str:
    """Deterministic per call key, so a replayed (or crashed and retried) create names the same session."""
    return "ps_" + hashlib.sha256(f"{CREATE_TOOL}\x00{call_key}".encode()).hexdigest()[:24]


def _decline_message(error: dict[str, Any] | None) -> str | None:
    if not error:
        return None
    message = str(error.get("message") or "the payment failed")
    code = error.get("decline_code") or error.get("code")
    return f"{message}{f' ({code})' if code else ''}: confirm again with another payment method or token"


class PaymentSessionService:
    def __init__(
        self, store: Store, mutations: StripeMutations, ledger: LedgerService, pricing: Pricing, *,
        gateway: StripeGateway, idempotency: IdempotencyService, ceiling: Ceiling, prepaid: PrepaidSubscriptions,
        fulfilment: Fulfilment, clock: Callable[[], float] = time.time, connect: ConnectService | None = None,
    ) -> None:
        self._connect = connect  # item "plug:<id>" sells a creator's plug as a destination charge (services/connect.py)
        self.connect = connect  # ACP checkouts selling plugs plan their splits with it
        self._store = store
        self._mutations = mutations
        self._gateway = gateway
        self._idempotency = idempotency
        self._ceiling = ceiling
        self.ledger = ledger  # the wallets fulfilment credits
        self._pricing = pricing
        self._clock = clock
        self.prepaid = prepaid  # tier items start a prepaid subscription
        self._fulfilment = fulfilment  # sessions another seller owns (ACP's) are fulfilled by that seller

    def seller(self) -> Seller:
        """What payment sessions register in the fulfilment registry (state.py): their tiers' outcomes."""
        return Seller(on_subscription=self._subscription_outcome)

    # --- create -----------------------------------------------------------------------------------------------

    def _priced(self, item: str | None, amount: int | None, currency: str | None) -> tuple[Item | None, int, str]:
        if item is not None and (amount is not None or currency is not None):
            raise InvalidInput("give item, or amount and currency, not both: an item carries its own price",
                               param="amount" if amount is not None else "currency")
        if item is not None:
            found = self._pricing.item(item)
            self._ceiling.check(found.unit_price, found.currency, "item", what=f"the price of {found.id}")
            return found, found.unit_price, found.currency
        if amount is None or currency is None:
            raise InvalidInput("give an item (e.g. luc_10k; valid items: " + ", ".join(self._pricing.items)
                               + ") or both amount and currency", param="item" if amount is None else "currency")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise InvalidInput(f"amount must be a positive whole number of minor units (cents for usd), got "
                               f"{amount!r}", param="amount")
        code = currency.strip().lower()
        if code not in CURRENCIES:
            raise InvalidInput(f"currency {currency!r} is not an ISO 4217 code Stripe accepts, e.g. usd",
                               param="currency")
        self._ceiling.check(amount, code, "amount")
        return None, amount, code

    def _check_can_subscribe(self, item: Item, customer: str | None) -> None:
        if customer is None:
            raise InvalidInput(f"item {item.id} starts a {item.tier} subscription for a customer: pass customer "
                               "(cus_...) or the agent_id of a wallet (its customer subscribes)", param="customer")
        if (tier := self.prepaid.live_tier(customer)) is not None:
            raise InvalidState(f"customer {customer} already has the {tier} tier: a second subscription would bill "
                               "twice (get_billing_status shows it; cancel_subscription ends it)", param="item")

    def _wallet_owner(self, agent_id: str) -> str:
        if not AGENT_ID.fullmatch(agent_id):
            raise InvalidInput(f"agent_id {agent_id[:40]!r} is not an agent id (letters, digits and _ . : @ -)",
                               param="agent_id")
        customer = self._store.commerce.wallet_customer(agent_id)
        if customer is None:
            raise NotFound(f"agent {agent_id} has no wallet to credit: open one with create_agent_wallet first",
                           param="agent_id")
        return customer

    async def create_session(
        self, *, customer: str | None, agent_id: str | None, item: str | None, amount: int | None,
        currency: str | None, description: str | None, idempotency_key: str | None, dry_run: bool,
        plan: SalePlan | None = None, split_path: str = "payment_session", split_note: str | None = None,
        with_record: Callable[[Tx, str], None] | None = None,
    ) -> PaymentSessionResult:
        """A payment session and its PaymentIntent (awaiting a payment method); replays return the same session.
        `plan` (an ACP cart's, with `amount` its total) splits it between creators, recorded as `split_path`.
        `with_record(tx, session_id)` runs in the transaction that records a new session (not on a replay: the
        session was recorded before), for a caller that links the session to what it pays for."""
        if plan is None and self._connect and item and item.startswith("plug:"):
            plan = await self._connect.plan_plug(item)
        if plan is not None:
            item, amount, currency, description = None, plan.total, plan.currency, description or plan.title
        found, amount, currency = self._priced(item, amount, currency)
        if customer is not None and not _CUSTOMER.fullmatch(customer.strip()):
            raise InvalidInput(f"customer must be a Stripe customer id starting with 'cus_' (got {customer[:40]!r})",
                               param="customer")
        customer = customer.strip() if customer else None
        owner = self._wallet_owner(agent_id) if agent_id is not None else None
        if found is not None and found.fulfil == "credit" and agent_id is None:
            raise InvalidInput(f"item {found.id} credits {found.luc} LUC to an agent's wallet: pass agent_id",
                               param="agent_id")
        if found is not None and found.subscribes:
            self._check_can_subscribe(found, customer or owner)
            await self.prepaid.check_customer(str(customer or owner), param="customer" if customer else "agent_id")
            await self.prepaid.check_prices(self._pricing.tier(str(found.tier)))
        description = description if description is not None else (found.title if found else None)
        item_id = found.id if found else None
        args = {"customer": customer, "agent_id": agent_id, "item": item_id, "amount": amount, "currency": currency,
                "description": description}
        # A key is its owner's (the wallet's agent, else the customer): one party's key never blocks or replays
        # another party's session.
        owned_key = None if idempotency_key is None else f"{_owner_scope(agent_id, customer)}:{idempotency_key}"
        call = self._idempotency.key_for(CREATE_TOOL, args, owned_key)
        session_id = _session_id(call.key)
        params = compact({
            "amount": amount, "currency": currency, "customer": customer, "description": description,
            "metadata": compact({"aims_session": session_id, "aims_item": item_id, "aims_agent": agent_id}),
            "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
            **(plan.destination(session_id) if plan is not None else {}),
        })
        recorded: dict[str, PaymentSession] = {}
        clock, store = self._clock, self._store.commerce

        async def record(pi: dict[str, Any], store_in: Callable[[Tx], None]) -> None:
            def job(tx: Tx) -> PaymentSession:
                session = _view(store.create(
                    tx, session_id=session_id, customer=customer or owner, agent_id=agent_id, item=item_id,
                    amount=amount, currency=currency, description=description,
                    status=session_status(str(pi["status"]), SessionStatus.REQUIRES_PAYMENT_METHOD),
                    payment_intent=pi["id"], idempotency_key=call.key,
                    amount_received=int(pi.get("amount_received") or 0), at=utc_iso(clock())))
                if with_record is not None:
                    with_record(tx, session_id)
                if plan is None:  # the call's result is final here (a plan's split is declared after COMMIT)
                    recorded["session"] = session
                    store_in(tx)
                return session

            recorded["session"] = await self._store.write(job)
            if plan is not None and self._connect is not None:
                await self._connect.declare(split_path, session_id, plan, payment_intent=pi["id"], note=split_note)

        result = await self._mutations.run(
            CREATE_TOOL, "/v1/payment_intents", params, PaymentSessionResult,
            lambda _pi: {"session": recorded["session"].model_dump(mode="json")},
            idempotency_key=owned_key, dry_run=dry_run, after_stores=record,
        )
        if result.replayed and result.session is not None:
            current = self._find(result.session.id)
            if current is not None:
                result.session = current
        return result

    # --- confirm, read, cancel --------------------------------------------------------------------------------

    async def confirm_session(
        self, session_id: str, *, payment_method: str | None, shared_payment_token: str | None, idempotency_key: str,
    ) -> PaymentSession:
        """Confirm the PaymentIntent with a payment method or a Shared Payment Token; fulfil on success. A decline
        records last_error, leaves the session payable, and raises the card error."""
        if (payment_method is None) == (shared_payment_token is None):
            raise InvalidInput("give exactly one of payment_method (pm_..., e.g. pm_card_visa) or "
                               "shared_payment_token (spt_...)", param="payment_method")
        if payment_method is not None and not _PAYMENT_METHOD.fullmatch(payment_method):
            raise InvalidInput(f"payment_method must be a Stripe payment method id starting with 'pm_' (got "
                               f"{payment_method[:40]!r})", param="payment_method")
        if shared_payment_token is not None and not SHARED_PAYMENT_TOKEN.fullmatch(shared_payment_token):
            raise InvalidInput(f"shared_payment_token must be a Shared Payment Token starting with 'spt_' (got "
                               f"{shared_payment_token[:40]!r})", param="shared_payment_token")
        session = self._session(session_id)
        args = {"session": session.id, "payment_method": payment_method, "shared_payment_token": shared_payment_token}
        # The key is the session's own: another session's identical key never blocks or replays this one.
        call = self._idempotency.key_for(CONFIRM_TOOL, args, f"{session.id}:{idempotency_key}")
        params = ({"payment_method": payment_method} if payment_method is not None
                  else {"shared_payment_granted_token": shared_payment_token})
        # The Stripe key covers the arguments too: another card after a decline is another Stripe request.
        stripe_key = stripe_idempotency_key(CONFIRM_TOOL, f"{call.key}:{call.request_hash[:16]}")
        request = StripeRequest("post", f"/v1/payment_intents/{session.payment_intent}/confirm", params, stripe_key)

        async def execute() -> tuple[dict[str, Any], str | None]:
            # Under the key's lock, after its stored result was looked for (a retry of a call that finished is
            # answered its first result before any state is checked): the session as it is now.
            now = self._session(session.id)
            paid = now.status == SessionStatus.SUCCEEDED or now.fulfilled
            if now.status == SessionStatus.CANCELED:
                raise InvalidState(f"payment session {session.id} was canceled: create a new one to pay",
                                   param="session_id")
            item = self._pricing.items.get(now.item or "")
            if not paid and item is not None and item.subscribes and now.customer is not None:
                self._check_can_subscribe(item, now.customer)  # another tier may have been bought since create
            if not paid and not self._marked_confirming(session.id):  # start-up re-reads it after a crash
                await self._store.write(self._confirming_job(session.id))
            try:
                # Paid already: only this key's own first request (its answer lost in a crash, the webhook
                # recorded it) is replayed by Stripe; any other request is told the session is paid.
                sent = await self._gateway.send(request)
            except StripeInvalidRequest as exc:
                if exc.details.get("stripe_code") == "payment_intent_unexpected_state":
                    current = await self.get_session(session.id)  # Stripe is ahead of our record: record it first
                    if current.status == SessionStatus.SUCCEEDED and not paid:
                        return current.model_dump(mode="json"), None  # paid by a request whose answer was lost
                    now_is = "already paid" if current.status == SessionStatus.SUCCEEDED else current.status
                    raise InvalidState(
                        f"payment session {session.id} is {now_is}: it cannot be "
                        "confirmed again (get_payment_session shows it)", param="session_id") from exc
                raise await self._still_payable(session.id, f"the payment was refused: {exc.message}", exc) from exc
            except StripeCardDeclined as exc:
                reason = exc.message.removeprefix("the card was declined: ").removesuffix(
                    " Ask for another payment method.")
                code = exc.details.get("decline_code") or exc.details.get("stripe_code") or "card_declined"
                raise await self._still_payable(session.id, f"the payment was declined ({code}): {reason}",
                                                exc) from exc
            return (await self._record(sent.data, call, sent.request_id)).model_dump(mode="json"), sent.request_id

        return await self._once(call, session.id, execute)

    async def get_session(self, session_id: str) -> PaymentSession:
        """The session after re-reading its PaymentIntent from Stripe; fulfils a success not yet fulfilled."""
        session = self._session(session_id)
        if session.payment_intent is None:
            return session
        pi = (await self._gateway.send(StripeRequest("get", f"/v1/payment_intents/{session.payment_intent}"))).data
        unchanged = (pi.get("status") == session.status
                     and int(pi.get("amount_received") or 0) == session.amount_received
                     and (session.fulfilled or pi.get("status") != SessionStatus.SUCCEEDED))
        if unchanged:
            return session
        return await self._record(pi)

    async def cancel_session(self, session_id: str, idempotency_key: str) -> PaymentSession:
        """Cancel an unpaid session's PaymentIntent; a paid one cannot be canceled."""
        session = self._session(session_id)
        call = self._idempotency.key_for(CANCEL_TOOL, {"session": session.id}, f"{session.id}:{idempotency_key}")
        if self._idempotency.find(call) is not None:
            return self._session(session.id)
        if session.status == SessionStatus.SUCCEEDED or session.fulfilled:
            raise InvalidState(f"payment session {session.id} is already paid ({session.amount_display}) and cannot "
                               "be canceled", param="session_id")
        if session.status == SessionStatus.CANCELED:
            return session
        request = StripeRequest("post", f"/v1/payment_intents/{session.payment_intent}/cancel", {},
                                stripe_idempotency_key(CANCEL_TOOL, call.key))

        async def execute() -> tuple[dict[str, Any], str | None]:
            try:
                sent = await self._gateway.send(request)
            except StripeInvalidRequest as exc:
                if exc.details.get("stripe_code") != "payment_intent_unexpected_state":
                    raise
                now = await self.get_session(session.id)  # paid (or canceled) meanwhile: record what Stripe says
                raise InvalidState(f"payment session {session.id} is {now.status} and cannot be canceled",
                                   param="session_id") from exc
            return (await self._record(sent.data, call, sent.request_id)).model_dump(mode="json"), sent.request_id

        return await self._once(call, session.id, execute)

    async def _still_payable(self, session_id: str, message: str, exc: StripeError) -> StripeError:
        """A refused or declined confirm: the reason recorded on the session (last_error) and the same kind of
        error for the agent, saying the session can be confirmed again."""
        await self._store.write(self._failure_job(session_id, message))
        return type(exc)(f"payment session {session_id}: {message} The session stays payable: confirm it again with "
                         "another payment method or token (and a new idempotency_key).",
                         param=exc.param, session_id=session_id, **exc.details)

    async def _record(self, pi: dict[str, Any], call: CallKey | None = None,
                      request_id: str | None = None) -> PaymentSession:
        """Record a PaymentIntent of one of our sessions, as Stripe answered it (confirm, cancel, re-read); a tier
        subscription it paid for is started before answering (retried in the background if Stripe fails). For a
        `call` (a confirm or cancel), its result is stored in the same job when nothing is left to start."""
        idempotency = self._idempotency

        def job(tx: Tx) -> PaymentSession | None:
            done = self.apply_payment_intent(tx, pi)
            if call is not None and done is not None and not _starts_subscription(done):
                idempotency.record_in(tx, call, done.model_dump(mode="json"), request_id)
            return done

        done = await self._store.write(job)
        assert done is not None
        self._committed()
        return await self._start_subscription(done)

    def _committed(self) -> None:
        """After a COMMIT that may have queued fulfilment work (a prepaid subscription, an ACP order event): free
        when it queued none (prepaid's kick looks only when a subscription was enqueued)."""
        self.prepaid.kick()
        self._fulfilment.committed()

    async def _start_subscription(self, session: PaymentSession) -> PaymentSession:
        if not _starts_subscription(session):
            return session
        await self.prepaid.start_now(prepaid_id(session.id))
        return self._session(session.id)

    def after_webhook(self, event: dict[str, Any]) -> None:
        """After a `payment_intent.succeeded` webhook committed: what its fulfilment queued (a subscription to
        start, an order event to send) goes out in the background; the webhook is answered at once."""
        if event.get("type") == "payment_intent.succeeded":
            self._committed()

    def _subscription_outcome(self, tx: Tx, row: PrepaidRow) -> None:
        self._store.commerce.update_fulfilment(tx, row.source_id, self.prepaid.summary(row), utc_iso(self._clock()))

    async def _once(self, call: CallKey, session_id: str,
                    execute: Callable[[], Awaitable[tuple[dict[str, Any], str | None]]]) -> PaymentSession:
        """Run a confirm or cancel once per idempotency key; a replay answers the session as it is now."""
        outcome = await self._idempotency.run(call, execute)
        return self._session(session_id) if outcome.replayed else PaymentSession.model_validate(outcome.response)

    # --- the webhook path and the one place a PaymentIntent's state is recorded ----------------------------------

    def apply_event(self, tx: Tx, event: dict[str, Any]) -> str | None:
        """Apply a `payment_intent.*` event inside the webhook's writer transaction; returns a note."""
        kind = str(event.get("type") or "")
        pi = ((event.get("data") or {}).get("object")) or {}
        if not kind.startswith("payment_intent.") or not isinstance(pi, dict) or not pi.get("id"):
            return None
        before = self._store.commerce.by_payment_intent(tx, str(pi["id"]))
        if before is None:
            return f"{kind}: no payment session for {pi['id']}"
        session = self._apply(tx, before, pi)
        note = f"{kind}: payment session {session.id} is {session.status}"
        if session.fulfilled and before.fulfilled_at is None:
            note += ", fulfilled"
        if session.last_error and kind == "payment_intent.payment_failed":
            note += f" ({session.last_error})"
        return note

    def apply_payment_intent(self, tx: Tx, pi: dict[str, Any]) -> PaymentSession | None:
        """Record what a PaymentIntent says about its session and, when it has succeeded for the full amount in the
        session's currency, fulfil once. Runs inside a writer job. A credit the ledger refuses never undoes the
        recording of the payment: the session stays unfulfilled, with the reason, and the next read tries again."""
        row = self._store.commerce.by_payment_intent(tx, str(pi.get("id")))
        return None if row is None else self._apply(tx, row, pi)

    def _apply(self, tx: Tx, row: PaymentSessionRow, pi: dict[str, Any]) -> PaymentSession:
        store = self._store.commerce
        iso = utc_iso(self._clock())
        status = session_status(str(pi.get("status") or row.status), row.status)
        received = int(pi.get("amount_received") or 0)
        last_error = row.last_error
        if status != row.status and status not in TRANSITIONS[row.status]:
            status, received = row.status, row.amount_received  # a stale snapshot (late event): keep the end
        elif status is SessionStatus.SUCCEEDED:
            if received < row.amount or str(pi.get("currency")) != row.currency:
                last_error = (f"PaymentIntent {pi.get('id')} succeeded with {received} {pi.get('currency')}, not "
                              f"{row.amount} {row.currency}: not fulfilled")
                status = SessionStatus.AMOUNT_MISMATCH
            else:
                last_error = None
        elif status is SessionStatus.REQUIRES_PAYMENT_METHOD:
            last_error = _decline_message(pi.get("last_payment_error")) or last_error
        store.record_status(tx, row.id, status, received, last_error, iso)
        if status is SessionStatus.SUCCEEDED and self._connect is not None:  # its creators' splits, if it sold plugs
            self._connect.paid(tx, str(pi["id"]))
        if status is SessionStatus.SUCCEEDED and store.claim_fulfilment(tx, row.id, iso):
            fulfilment = self._fulfil(tx, row, str(pi["id"]))
            undone = iso if fulfilment.get("status") != "failed" else None  # a refused credit stays to be done
            store.record_fulfilment(tx, row.id, fulfilment, undone)
        return _view(store.read(tx, row.id))

    def _fulfil(self, tx: Tx, row: PaymentSessionRow, pi_id: str) -> dict[str, Any]:
        if (done := self._fulfilment.fulfil(tx, row, pi_id)) is not None:
            return done
        item = self._pricing.items.get(row.item_id) if row.item_id else None
        if item is not None and item.subscribes:
            return self.prepaid.enqueue(tx, source="payment_session", source_id=row.id,
                                        customer=str(row.customer_id), tier=self._pricing.tier(str(item.tier)),
                                        amount=row.amount, currency=row.currency, payment_intent=pi_id)
        if item is None or item.fulfil != "credit":
            return {"kind": "payment", "note": "an amount payment: nothing to deliver beyond the receipt"}
        agent_id = str(row.agent_id)
        try:
            posting = self.ledger.credit_in(tx, agent_id, item.luc, idempotency_key=f"fulfil:{row.id}",
                                             reason=f"payment session {row.id}: {item.title}", reference=pi_id)
        except BillingError as exc:  # the payment is recorded all the same; the credit is retried on the next read
            return {"kind": "credit", "status": "failed", "agent_id": agent_id, "luc": item.luc,
                    "last_error": f"{exc.code}: {exc.message}"}
        return {"kind": "credit", "agent_id": agent_id, "luc_credited": item.luc,
                "wallet_balance": posting.balance_after, "txn_id": posting.txn_id}

    def _failure_job(self, session_id: str, message: str) -> Callable[[Tx], None]:
        clock, store = self._clock, self._store.commerce
        return lambda tx: store.mark_payable(tx, session_id, message, utc_iso(clock()))

    def _marked_confirming(self, session_id: str) -> bool:
        """Already marked (by an earlier attempt, or by the ACP checkout that linked it in its own transaction): one
        read instead of one more commit before the confirm."""
        return self._store.commerce.confirming(session_id)

    def _confirming_job(self, session_id: str) -> Callable[[Tx], None]:
        clock, store = self._clock, self._store.commerce
        return lambda tx: store.mark_confirming(tx, session_id, utc_iso(clock()))

    async def reconcile(self) -> list[PaymentSession]:
        """At start-up: re-read every PaymentIntent a confirm was sent for whose outcome was never recorded (a
        crash between Stripe's charge and our COMMIT, with no webhook since), and record it (fulfilling a success).
        A PaymentIntent Stripe cannot be asked about now stays marked for the next start."""
        done = []
        for session_id in self._store.commerce.unsettled_confirms():
            try:
                done.append(await self.get_session(session_id))
            except BillingError as exc:  # Stripe unavailable: the mark stays, the next start tries again
                log.warning("reconciling payment session %s failed: %s", session_id, exc.message)
        return done

    # --- reads ------------------------------------------------------------------------------------------------

    def _find(self, session_id: str) -> PaymentSession | None:
        row = self._store.commerce.find(session_id)
        if row is None:
            return None
        session = _view(row)
        fulfilment = session.fulfilment or {}
        if fulfilment.get("kind") == "subscription" and fulfilment.get("status") in OPEN:
            current = self.prepaid.find(str(fulfilment.get("prepaid_id")))  # how far its start has come
            if current is not None:
                session.fulfilment = self.prepaid.summary(current)
        return session

    def _session(self, session_id: str) -> PaymentSession:
        if not isinstance(session_id, str) or not _SESSION.fullmatch(session_id.strip()):
            raise InvalidInput(f"session_id must be a payment session id starting with 'ps_' (got "
                               f"{str(session_id)[:40]!r})", param="session_id")
        found = self._find(session_id.strip())
        if found is None:
            raise NotFound(f"no payment session {session_id}: create one with create_payment_session",
                           param="session_id")
        return found


def _starts_subscription(session: PaymentSession) -> bool:
    """A tier the session paid for is recorded and not started yet (the answer waits for its start)."""
    fulfilment = session.fulfilment or {}
    return fulfilment.get("kind") == "subscription" and fulfilment.get("status") in OPEN


def _owner_scope(agent_id: str | None, customer: str | None) -> str:
    """Whose a create's idempotency key is: the agent whose wallet pays or is credited, else the customer."""
    if agent_id is not None:
        return f"agent:{agent_id}"
    return f"customer:{customer}" if customer is not None else "anonymous"


def _view(row: PaymentSessionRow) -> PaymentSession:
    return PaymentSession(
        id=row.id, customer=row.customer_id, agent_id=row.agent_id, item=row.item_id, amount=row.amount,
        currency=row.currency, amount_display=format_amount(row.amount, row.currency),
        description=row.description, status=str(row.status), payment_intent=row.payment_intent_id,
        amount_received=row.amount_received, last_error=row.last_error, fulfilled=row.fulfilled_at is not None,
        fulfilment=row.fulfilment, created_at=row.created_at, updated_at=row.updated_at,
    )
