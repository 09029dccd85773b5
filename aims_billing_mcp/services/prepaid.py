"""Prepaid tier subscriptions: what fulfilling a paid tier item (pricing.toml `fulfil = "subscribe"`) does.

The buyer paid the whole commitment once (a Shared Payment Token is single-use: nothing can be charged later), so
the payment becomes Stripe's own prepaid credit and Stripe bills the months from it:
1. a customer balance transaction of -amount (a credit on the customer's Stripe balance);
2. a subscription on the tier's monthly price (and its metered overage price) with `collection_method=send_invoice`
   (no card on file: nothing is ever charged automatically), the tier's free months as a trial, and the tier in its
   metadata, as a checkout-started subscription has;
3. its `cancel_at` set to the commitment end counted from Stripe's own `start_date` (Stripe's clock, not ours).
Each monthly invoice is paid from the credit at finalization; usage beyond the allowance draws on it too and, once
it is spent, is invoiced to the customer (open invoice, 30 days), never charged without consent.

Why an outbox: the row is written in the transaction that records the payment (so a paid order is never without
its fulfilment), and the Stripe calls run after COMMIT, step by step (pending -> claimed -> credited -> subscribed
-> started). Every step is a guarded update from the status it expects, so two workers (two processes) cannot both
advance a row, nor a slow one rewind it. What makes "never two subscriptions, never two credits" hold:
- claiming: a writer job lets a row go from pending to claimed only when the customer has no other row in progress
  and no live paid subscription; the check runs again before the subscription is created (a row left credited by a
  failure may be retried days later, when the customer may have subscribed another way);
- each Stripe call has a deterministic idempotency key, and since Stripe forgets keys after 24 hours, a step that
  is not fresh first looks for its object by `metadata.aims_prepaid` before creating it.
The subscription is recorded in `billing_provisions` in the job that marks the row started, and the source
(payment session or ACP order) is told in that job too, through the fulfilment registry (fulfilment.py); the
source may hand back an after-COMMIT action.

Once per row across instances (PostgreSQL: every instance runs this worker on one outbox): an attempt leases its
row first (`store.prepaid.take`, LEASE_WORK_SECONDS under a fresh token, in the claim's own transaction for a
pending row; a row another worker holds is left to it and looked at again later), renews the lease before each
step's Stripe calls unless it renewed it less than a quarter of a lease ago, and renews it at the start of every
job that records a step, in the same transaction: a worker paused past its lease (a stopped process, a long GC)
while another took the row over finds its token gone and records nothing and sends nothing more. A request it had
already sent when it was paused is the same request the other worker sends (the same idempotency key): one effect.
A started row's lease is not let go (only open rows are ever taken): the start ends with its last step's COMMIT.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from ..errors import BillingError, InvalidState, NotFound
from ..models import format_amount
from ..store import Store, Tx, utc_iso
from ..store.prepaid import IN_PROGRESS, OPEN, REFUNDABLE, PrepaidRow, PrepaidStatus
from ..stripe_gateway import StripeGateway, StripeRequest, stripe_idempotency_key
from .background import Background
from .fulfilment import Fulfilment
from .subscriptions import SubscriptionService
from .tiers import TIER_METADATA, Pricing, Tier, add_months, trial_days

log = logging.getLogger(__name__)
T = TypeVar("T")
DAYS_UNTIL_DUE = 30
__all__ = ["IN_PROGRESS", "OPEN", "PrepaidRow", "PrepaidStatus", "PrepaidSubscriptions", "prepaid_id"]
S = PrepaidStatus
FRESH_SECONDS = 3600  # a step younger than this retries under Stripe's idempotency key (kept 24 h) without looking
LEASE_SECONDS = 23 * 3600  # a subscription creation request is re-sent as is for this long (Stripe keeps keys 24 h)
MAX_BACKOFF_SECONDS = 300
REFUND_LEASE_SECONDS = 600  # a refund run's claim: another run waits this long before taking over a dead one
PREPAID_METADATA = "aims_prepaid"
REVERSAL_METADATA = "aims_prepaid_reversal"
LEASE_WORK_SECONDS = 120.0  # an attempt holds its row this long after each renewal; then another worker may take it
RENEWED_RECENTLY = 0.25  # of LEASE_WORK_SECONDS: a lease renewed this recently is not renewed again before a call
PENDING_FOR_SECONDS = 60.0  # an enqueued id no kick has seen committed is forgotten after this (its job rolled back)
Job = Callable[[Tx], tuple[PrepaidRow, bool]]


class _LeaseLost(Exception):
    """Another worker took the row over (this attempt's lease ended while it was held up): stop, record nothing."""


def prepaid_id(source_id: str) -> str:
    """One prepaid subscription per paid source (payment session ps_..., ACP checkout cs_...)."""
    return f"pre_{source_id}"


class PrepaidSubscriptions:
    """The outbox of prepaid subscriptions and the worker that starts them in Stripe."""

    def __init__(self, store: Store, gateway: StripeGateway, subscriptions: SubscriptionService, pricing: Pricing, *,
                 fulfilment: Fulfilment, clock: Callable[[], float] = time.time,
                 retry_delay_scale: float = 1.0) -> None:
        self._store = store
        self._gateway = gateway
        self._subscriptions = subscriptions
        self._pricing = pricing
        self._clock = clock
        self._scale = retry_delay_scale
        self._fulfilment = fulfilment  # tells a row's source how its subscription went
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.lease_seconds = LEASE_WORK_SECONDS
        self._renewed: dict[str, float] = {}  # lease token -> when this attempt last took or renewed its lease
        self.background = Background()
        # Ids enqueued (in the writer's thread) that no kick has yet seen committed: while empty, a kick costs
        # nothing (no query after every payment); start-up's resume() looks at the table itself.
        self._enqueued: dict[str, float] = {}
        self._enqueued_lock = threading.Lock()

    # --- before the payment -------------------------------------------------------------------------------------

    def live_tier(self, customer: str) -> str | None:
        """The paid tier a customer already has (live subscription, or a prepaid one paid and not yet started):
        buying a second one would bill two subscriptions for one customer."""
        open_tier = self._store.prepaid.open_tier(customer)
        if open_tier is not None:
            return open_tier
        tier = self._subscriptions.entitled_tier(customer)
        return tier.id if tier.paid else None

    async def check_prices(self, tier: Tier) -> None:
        """Refuse before the payment a tier Stripe has no price for (`setup-stripe` never ran): its start would
        fail after the buyer paid."""
        await self._subscriptions.prices_for(tier)

    async def check_customer(self, customer: str, *, param: str = "customer") -> None:
        """Refuse before the payment what would fail after it: a subscription needs a customer Stripe knows."""
        if not await self._subscriptions.customer_exists(customer):
            raise NotFound(f"Stripe has no customer {customer}, and a tier subscribes a customer: create one with "
                           "create_customer (or buy for an agent whose wallet belongs to an existing customer)",
                           param=param)

    # --- the outbox -------------------------------------------------------------------------------------------

    def enqueue(self, tx: Tx, *, source: str, source_id: str, customer: str, tier: Tier,
                amount: int, currency: str, payment_intent: str | None) -> dict[str, Any]:
        """Record the subscription to start, inside the caller's write transaction (start it after COMMIT: the
        caller's kick() finds it)."""
        row = self._store.prepaid.enqueue(
            tx, row_id=prepaid_id(source_id), source=source, source_id=source_id, customer=customer, tier=tier.id,
            amount=amount, currency=currency, payment_intent=payment_intent, at=utc_iso(self._clock()))
        with self._enqueued_lock:
            self._enqueued[row.id] = time.monotonic()
        return self.summary(row)

    def summary(self, row: PrepaidRow | dict[str, Any]) -> dict[str, Any]:
        """What the buyer sees: the tier, what was prepaid, and how far the start has come."""
        if isinstance(row, dict):  # services/acp.py's hook still names its PrepaidRow a dict
            row = PrepaidRow.from_mapping(row)
        tier = self._pricing.tiers.get(row.tier)
        summary: dict[str, Any] = {
            "kind": "subscription", "prepaid_id": row.id, "customer": row.customer_id, "tier": row.tier,
            "prepaid": row.amount, "prepaid_display": format_amount(row.amount, row.currency),
            "status": str(row.status), "subscription": row.subscription_id,
        }
        if tier is not None:
            summary["months"] = tier.delivered_months
        if row.ends_at:
            summary["commitment_end"] = utc_iso(row.ends_at)
        if row.last_error:
            summary["last_error"] = row.last_error
        if row.refund_id:
            summary["refund"] = row.refund_id
        if row.refunded_amount is not None:
            summary["refunded"] = row.refunded_amount
            summary["refunded_display"] = format_amount(row.refunded_amount, row.currency)
        return summary

    def find(self, row_id: str) -> PrepaidRow | None:
        return self._store.prepaid.find(row_id)

    def pending(self) -> list[PrepaidRow]:
        """The rows still to be started, oldest first."""
        return self._store.prepaid.pending()

    # --- starting them ----------------------------------------------------------------------------------------

    async def start(self, row_id: str) -> PrepaidRow | None:
        """One attempt to start a recorded subscription; returns the row as it ends (None: no such row). Errors are
        recorded on the row (retryable ones leave it open for the next attempt), never raised: the payment already
        succeeded."""
        lock, users = self._locks.get(row_id) or (asyncio.Lock(), 0)
        self._locks[row_id] = (lock, users + 1)
        try:
            async with lock:
                row = self.find(row_id)
                if row is None or row.status not in OPEN:
                    return row
                token = secrets.token_hex(12)
                # A pending row is leased by its claim's own job (`_claimed`: the take and the claim are one
                # transaction); any other open row is leased here first.
                if row.status is not S.PENDING and not await self._store.write(self._take(row_id, token)):
                    return self.find(row_id)  # another worker holds it: it is theirs until their lease ends
                ended: PrepaidRow | None = None
                try:
                    ended = await self._start(row, token)
                except _LeaseLost:
                    ended = self.find(row_id)
                except BillingError as exc:
                    ended = await self._record_error(row_id, exc, token)
                finally:
                    self._renewed.pop(token, None)
                    # A started row is never taken again (`take` takes open rows only): its lease needs no letting
                    # go. Any other outcome lets go, so the next attempt need not wait for the lease to end.
                    if ended is None or ended.status is not S.STARTED:
                        await self._let_go(row_id, token)
                return ended
        finally:  # one lock per row in flight, not per row ever seen: dropped when its last user leaves
            lock, users = self._locks[row_id]
            if users <= 1:
                del self._locks[row_id]
            else:
                self._locks[row_id] = (lock, users - 1)

    async def _start(self, row: PrepaidRow, token: str) -> PrepaidRow:
        tier = self._pricing.tier(row.tier)
        fresh = self._fresh(row)  # decided once, on the row as found: each step below refreshes updated_at
        if row.status is S.PENDING:
            row, moved = await self._claimed(row.id, token)
            if not moved:
                return row
        prices: tuple[str, dict[str, str]] | None = None
        held: dict[str, Any] | None = None  # the subscription as Stripe answered this attempt
        if row.status is S.CLAIMED:
            if fresh:
                prices = await self._subscriptions.prices_for(tier)  # refused before anything is credited
            await self._renew(row.id, token)
            txn = None if fresh else await self._existing_credit(row)  # an earlier attempt's, its answer lost
            if txn is None and prices is None:
                prices = await self._subscriptions.prices_for(tier)
                await self._renew(row.id, token)
            txn = txn or (await self._gateway.send(StripeRequest(
                "post", f"/v1/customers/{row.customer_id}/balance_transactions",
                {"amount": -row.amount, "currency": row.currency,
                 "description": f"Prepaid {tier.name} subscription ({tier.commitment_months} months billed, "
                                f"{tier.delivered_months} delivered)",
                 "metadata": {PREPAID_METADATA: row.id, TIER_METADATA: tier.id}},
                stripe_idempotency_key("prepaid-credit", row.id)))).data
            row, moved = await self._store.write(self._step(row.id, S.CLAIMED, S.CREDITED, token,
                                                            balance_transaction_id=txn["id"],
                                                            starts_at=int(self._clock())))
            if not moved:
                return row
        if row.status is S.CREDITED:
            leased = self._leased(row)
            await self._renew(row.id, token)
            sub = None if fresh and leased else await self._existing_subscription(row)
            if sub is None:
                price, overage = prices or await self._subscriptions.prices_for(tier)
                if not fresh:  # left credited a while: the customer may have subscribed another way
                    row, moved = await self._claimed(row.id, token)
                    if not moved:
                        return row
                if not self._leased(row):  # on the row as it is now: another worker may have just leased it
                    row, moved = await self._store.write(self._fenced(row.id, token, self._lease(row)))
                    if not moved:
                        return row
                await self._renew(row.id, token)
                sub = await self._create_subscription(row, tier, price, overage)
            row, moved = await self._store.write(self._step(row.id, S.CREDITED, S.SUBSCRIBED, token,
                                                            subscription_id=sub["id"]))
            if not moved:
                return row
            held = sub
        # subscribed: end it at the commitment end, counted from Stripe's own start of the subscription (as Stripe
        # just answered it when this attempt created or found it; else read)
        await self._renew(row.id, token)
        if held is None or held.get("id") != row.subscription_id:
            held = (await self._gateway.send(StripeRequest("get", f"/v1/subscriptions/{row.subscription_id}"))).data
        sub = held
        ends_at = add_months(int(sub["start_date"]), tier.delivered_months)
        if sub.get("cancel_at") != ends_at:
            sub = (await self._gateway.send(StripeRequest(
                "post", f"/v1/subscriptions/{sub['id']}", {"cancel_at": ends_at},
                stripe_idempotency_key("prepaid-end", f"{row.id}:{ends_at}")))).data
        return await self._finish(row.id, S.SUBSCRIBED, S.STARTED, token, sub=sub, ends_at=ends_at)

    # --- the row's lease (once per row across instances) --------------------------------------------------------

    def _take(self, row_id: str, token: str) -> Callable[[Tx], bool]:
        """Take (or renew) the row's lease for `token`; False while another worker holds it."""
        clock, store, seconds = self._clock, self._store.prepaid, self.lease_seconds

        renewed = self._renewed

        def job(tx: Tx) -> bool:
            now = clock()
            taken = store.take(tx, row_id, token, now, now + seconds)
            if taken:  # read by `_renew` (a job that raises after this ends the attempt: the token is not used again)
                renewed[token] = now
            return taken

        return job

    def _fenced(self, row_id: str, token: str, job: Callable[[Tx], T], lost: Callable[[Tx], T] | None = None,
                ) -> Callable[[Tx], T]:
        """`job`, run only while `token` still holds the row: the renewal and the job's writes are one transaction
        (the renewal's UPDATE holds the row until COMMIT). Otherwise `lost(tx)`, or the row unmoved."""
        take, store = self._take(row_id, token), self._store.prepaid

        def fenced(tx: Tx) -> T:
            if take(tx):
                return job(tx)
            if lost is not None:
                return lost(tx)
            return (store.read(tx, row_id), False)  # type: ignore[return-value]  # a Job's answer: not moved

        return fenced

    async def _renew(self, row_id: str, token: str) -> None:
        """Before a Stripe call: the lease renewed, or `_LeaseLost` (another worker has the row now). A lease this
        attempt took or renewed less than RENEWED_RECENTLY of its length ago (the step just recorded renewed it in
        its own transaction) has most of its time left: no second write for it. A worker paused past that (a
        stopped process) renews, and stops if the row was taken over meanwhile."""
        last = self._renewed.get(token)
        if last is not None and 0 <= self._clock() - last < self.lease_seconds * RENEWED_RECENTLY:
            return
        if not await self._store.write(self._take(row_id, token)):
            raise _LeaseLost(row_id)

    async def _let_go(self, row_id: str, token: str) -> None:
        store = self._store.prepaid
        try:
            await self._store.write(lambda tx: store.let_go(tx, row_id, token))
        except Exception:  # the lease then simply ends on time
            log.warning("could not let go of prepaid subscription %s's lease; it ends on its own", row_id)

    def _leased(self, row: PrepaidRow) -> bool:
        """Whether the row's `starts_at` still names a usable creation request: it is the moment the trial is
        counted from and part of the request's idempotency key, so every worker within a day sends the very same
        request (Stripe creates one subscription); past that, Stripe has forgotten the key and a start that late
        would be short-changed, so a new one is leased (after looking for what the old one created)."""
        return bool(row.starts_at) and self._clock() - int(row.starts_at or 0) < LEASE_SECONDS

    def _lease(self, row: PrepaidRow) -> Job:
        """A new `starts_at` for a credited row, compare-and-set: a worker that loses takes the winner's."""
        now, clock, store = int(self._clock()), self._clock, self._store.prepaid
        return lambda tx: store.lease(tx, row.id, now, row.starts_at, utc_iso(clock()))

    async def _create_subscription(self, row: PrepaidRow, tier: Tier, price: str,
                                   overage: dict[str, str]) -> dict[str, Any]:
        starts_at = int(row.starts_at or 0)
        params: dict[str, Any] = {
            "customer": row.customer_id,
            "items": [{"price": price, "quantity": 1}] + [{"price": metered} for metered in overage.values()],
            "collection_method": "send_invoice", "days_until_due": DAYS_UNTIL_DUE,
            "metadata": {TIER_METADATA: tier.id, "aims_commitment_months": str(tier.commitment_months),
                         "aims_delivered_months": str(tier.delivered_months), PREPAID_METADATA: row.id,
                         "aims_prepaid_amount": str(row.amount)},
            "description": f"{tier.name} tier, prepaid ({row.id})",
        }
        if tier.free_months:
            params["trial_period_days"] = trial_days(starts_at, tier.free_months)
        key = stripe_idempotency_key("prepaid-subscription", f"{row.id}:{starts_at}")
        return (await self._gateway.send(StripeRequest("post", "/v1/subscriptions", params, key))).data

    def _fresh(self, row: PrepaidRow) -> bool:
        """Whether the row's last step is recent and error-free enough for Stripe to still hold its idempotency keys
        (else the step first looks for what an earlier attempt may have created)."""
        changed = datetime.fromisoformat(row.updated_at.replace("Z", "+00:00")).timestamp()
        return self._clock() - changed < FRESH_SECONDS and not row.attempts and not row.last_error

    async def _existing_credit(self, row: PrepaidRow) -> dict[str, Any] | None:
        """The credit an earlier attempt made, when its idempotency key may have expired."""
        return await self._made_for(row, f"/v1/customers/{row.customer_id}/balance_transactions", {})

    async def _existing_subscription(self, row: PrepaidRow) -> dict[str, Any] | None:
        """The subscription an earlier attempt created, when its idempotency key may have expired."""
        return await self._made_for(row, "/v1/subscriptions", {"customer": row.customer_id, "status": "all"})

    async def _made_for(self, row: PrepaidRow, path: str, params: dict[str, Any], *,
                        key: str = "aims_prepaid") -> dict[str, Any] | None:
        """The newest object under `path` (a list, paged) whose metadata `key` names this row."""
        found = await self._all_made_for(row, path, params, key=key, first=True)
        return found[0] if found else None

    async def _all_made_for(self, row: PrepaidRow, path: str, params: dict[str, Any], *,
                            key: str = "aims_prepaid", first: bool = False) -> list[dict[str, Any]]:
        """The objects under `path` (a list, paged, newest first) whose metadata `key` names this row."""
        matches: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = (await self._gateway.send(StripeRequest(
                "get", path, {**params, "limit": 100, **({"starting_after": after} if after else {})}))).data
            found = page.get("data") or []
            for obj in found:
                if (obj.get("metadata") or {}).get(key) == row.id:
                    matches.append(dict(obj))
                    if first:
                        return matches
            if not page.get("has_more") or not found:
                return matches
            after = str(found[-1]["id"])

    async def _write(self, job: Callable[[Tx, list[Callable[[], None]]], T]) -> T:
        """Run a writer job that may queue actions for after its COMMIT (a source's hook), then run them."""
        after: list[Callable[[], None]] = []
        done = await self._store.write(lambda tx: job(tx, after))
        for action in after:
            action()
        return done

    def _tell(self, tx: Tx, row: PrepaidRow, after: list[Callable[[], None]]) -> None:
        """Tell the row's source (payment session, ACP order) its outcome, inside the job that recorded it."""
        if (action := self._fulfilment.subscription_outcome(tx, row)) is not None:
            after.append(action)

    async def _claimed(self, row_id: str, token: str) -> tuple[PrepaidRow, bool]:
        claim, take, store = self._claim(row_id), self._take(row_id, token), self._store.prepaid

        def job(tx: Tx, after: list[Callable[[], None]]) -> tuple[PrepaidRow, bool]:
            return claim(tx, after) if take(tx) else (store.read(tx, row_id), False)

        return await self._write(job)

    def _claim(self, row_id: str) -> Callable[[Tx, list[Callable[[], None]]], tuple[PrepaidRow, bool]]:
        """pending -> claimed (or credited -> credited): only when this row may hold the customer's subscription;
        otherwise the row fails with the reason (nothing was credited when it fails from pending)."""
        clock, subscriptions, store = self._clock, self._subscriptions, self._store.prepaid

        def job(tx: Tx, after: list[Callable[[], None]]) -> tuple[PrepaidRow, bool]:
            row = store.read(tx, row_id)
            if row.status not in (S.PENDING, S.CREDITED):
                return row, False
            holder = store.holder(tx, row)
            provision = holder.provision
            live = subscriptions.tier_of(provision).paid
            if holder.other_id is None and not live:
                status = S.CLAIMED if row.status is S.PENDING else S.CREDITED
                return store.advance(tx, row_id, (row.status,), status, utc_iso(clock()))
            assert holder.other_id is not None or provision is not None
            has = f"{holder.other_tier} tier being started ({holder.other_id})" if holder.other_id else (
                f"{provision['tier']} tier (subscription {provision['subscription_id']})")  # type: ignore[index]
            kept = ("nothing was credited: refund the payment" if row.status is S.PENDING else
                    f"the credit of {format_amount(row.amount, row.currency)} stays on the customer's Stripe "
                    "balance: reverse it and refund, or end the other subscription")
            error = (f"customer {row.customer_id} already has the {has}: a second subscription would bill "
                     f"twice; {kept}, then `aims-billing-mcp start-subscriptions --failed {row_id}` if it should "
                     "start after all")
            subscriptions.forget(row.customer_id)
            return self._fail_in(tx, row, error, after, status=S.REFUSED), False

        return job

    def _step(self, row_id: str, expected: PrepaidStatus | tuple[PrepaidStatus, ...], status: PrepaidStatus,
              token: str, **values: Any) -> Job:
        """Move the row from `expected` (one status, or any of several) to `status`, recording `values`; nothing if
        another worker moved it elsewhere or took it over (`token` no longer holds it)."""
        clock, store = self._clock, self._store.prepaid
        froms = (expected,) if isinstance(expected, PrepaidStatus) else expected
        return self._fenced(row_id, token,
                            lambda tx: store.advance(tx, row_id, froms, status, utc_iso(clock()), **values))

    async def _record_error(self, row_id: str, exc: BillingError, token: str) -> PrepaidRow:
        message = f"{exc.code}: {exc.message}"[:500]
        clock, store, take = self._clock, self._store.prepaid, self._take(row_id, token)

        def job(tx: Tx, after: list[Callable[[], None]]) -> PrepaidRow:
            row = store.read(tx, row_id)
            if row.status not in OPEN or not take(tx):
                return row  # another worker finished it, or took it over, meanwhile
            row = store.retry_later(tx, row_id, row.attempts + 1, message, utc_iso(clock()))
            # An outage is outlasted, never given up: the credit may have been made with its answer lost (a
            # claimed row), and giving up later would strand it or leave a subscription with no end. A refusal
            # fails at once, for an operator to see.
            if exc.retryable:
                return row
            log.error("prepaid subscription %s failed: %s", row_id, message)
            return self._fail_in(tx, row, message, after)

        return await self._write(job)

    def _fail_in(self, tx: Tx, row: PrepaidRow, error: str, after: list[Callable[[], None]], *,
                 status: PrepaidStatus = S.FAILED) -> PrepaidRow:
        """Mark the row failed (or refused) and tell its source, inside the caller's job."""
        failed = self._store.prepaid.fail(tx, row.id, status, error, utc_iso(self._clock()))
        self._tell(tx, failed, after)
        return failed

    async def _finish(self, row_id: str, expected: PrepaidStatus, status: PrepaidStatus, token: str, *,
                      sub: dict[str, Any], ends_at: int) -> PrepaidRow:
        """Mark the row started and record the subscription as the customer's provision, and tell the source, in
        one job (only while `token` holds the row); the source's after-COMMIT action runs once it has committed."""
        clock, subscriptions, store = self._clock, self._subscriptions, self._store.prepaid
        take = self._take(row_id, token)

        def job(tx: Tx, after: list[Callable[[], None]]) -> PrepaidRow:
            if not take(tx):
                return store.read(tx, row_id)  # another worker took it over (or finished it)
            current, moved = store.complete(tx, row_id, expected, status, ends_at, utc_iso(clock()))
            if not moved:
                return current  # another attempt finished it first
            subscriptions.apply_event(tx, {"id": f"api_prepaid_{sub['id']}", "type": "customer.subscription.created",
                                           "created": int(clock()), "data": {"object": sub}})
            self._tell(tx, current, after)
            return current

        done = await self._write(job)
        self._subscriptions.forget(done.customer_id)
        return done

    # --- refunding one that cannot start -------------------------------------------------------------------------

    async def refund(self, row_id: str) -> PrepaidRow:
        """Give the money back for a subscription that was refused or failed for good (`refund-prepaid`).

        The row is claimed first (`refunding`: no retry can start it now). If a balance credit was made (recorded,
        or found by its metadata when its answer was lost), what is left of it is reversed, at most the amount paid
        and at most what the customer's balance still holds (invoices may have drawn on it: that part was used,
        and the customer must not end up owing it), and that much is refunded; with no credit, the whole payment
        is. Each step is found by its metadata before it is made again (operators may run it twice, or days
        apart). The row ends `refunded` only when Stripe says the refund succeeded, with the amount Stripe refunded;
        a pending or failed refund leaves it `refunding`, with the reason, for a later run. One run at a time: a
        second (another process) while one holds the row is refused, since it would read the customer's balance
        while the first is reversing it."""
        row = self.find(row_id)
        if row is None:
            raise NotFound(f"no prepaid subscription {row_id!r}: `aims-billing-mcp report prepaid` lists them",
                           param="prepaid_id")
        if row.status is S.REFUNDED:
            return row
        if row.status not in REFUNDABLE:
            raise InvalidState(f"prepaid subscription {row_id} is {row.status}: only a failed or refused one is "
                               "refunded (a started one is cancelled with cancel_subscription)", param="prepaid_id")
        if not row.payment_intent_id:
            raise InvalidState(f"prepaid subscription {row_id} has no PaymentIntent to refund", param="prepaid_id")
        if row.subscription_id:
            sub = (await self._gateway.send(StripeRequest("get", f"/v1/subscriptions/{row.subscription_id}"))).data
            if sub.get("status") not in ("canceled", "incomplete_expired"):
                raise InvalidState(f"prepaid subscription {row_id} holds subscription {sub['id']}, which is "
                                   f"{sub.get('status')}: cancel it first (cancel_subscription with immediately=true), "
                                   "then refund", param="prepaid_id")
        lock, users = self._locks.get(row_id) or (asyncio.Lock(), 0)
        self._locks[row_id] = (lock, users + 1)
        try:
            async with lock:  # in one process a second run waits for the first; across processes, the claim
                return await self._refund(row_id)
        finally:
            lock, users = self._locks[row_id]
            if users <= 1:
                del self._locks[row_id]
            else:
                self._locks[row_id] = (lock, users - 1)

    async def _refund(self, row_id: str) -> PrepaidRow:
        row, claimed = await self._store.write(self._refund_claim(row_id))
        if row.status is S.REFUNDED:
            return row  # the run this one waited for finished it
        if not claimed:
            raise InvalidState(f"prepaid subscription {row_id} is being refunded by another run (since "
                               f"{row.updated_at}): run refund-prepaid again once it has finished, or after "
                               f"{REFUND_LEASE_SECONDS // 60} minutes if it died", param="prepaid_id")
        store = self._store.prepaid
        try:
            amount = await self._reverse_credit(row)
            refund = await self._refund_payment(row, amount) if amount > 0 else None
        except BaseException:  # Stripe said no or is down: the claim is let go, a new run may start at once
            held_at = row.refund_claimed_at  # only this run's hold: a newer run's stays
            await self._store.write(lambda tx: store.release_refund(tx, row_id, held_at))
            raise
        status = S.REFUNDED if refund is None or refund["status"] == "succeeded" else S.REFUNDING
        if refund is not None:
            amount = int(refund["amount"])  # what Stripe holds is what is recorded
        note = None if refund is None or status is S.REFUNDED else (
            f"refund {refund['id']} is {refund['status']}"
            f"{' (' + str(refund['failure_reason']) + ')' if refund.get('failure_reason') else ''}: "
            "run refund-prepaid again later")
        clock = self._clock

        def job(tx: Tx, after: list[Callable[[], None]]) -> PrepaidRow:
            before = store.read(tx, row_id)
            if before.status not in (S.REFUNDING, S.REFUNDED) or (before.status is S.REFUNDED
                                                                   and status is not S.REFUNDED):
                return before  # never rewind a recorded refund
            # A run that outlived its lease records what Stripe holds too (never dropped, never 0 over a refund).
            current = store.record_refund(tx, row_id, status, refund["id"] if refund else None,
                                          amount if status is S.REFUNDED else None, note, utc_iso(clock()))
            if before.status is S.REFUNDING and status is S.REFUNDED:
                self._tell(tx, current, after)
            return current

        return await self._write(job)

    def _refund_claim(self, row_id: str) -> Job:
        """failed/refused (or refunding left by a run that finished with its refund pending, or that died: its
        claim older than REFUND_LEASE_SECONDS) -> refunding, held by this run (`refund_claimed_at`);
        a claim another run holds now is not taken: two runs would each read the balance the other is reversing."""
        clock, store = self._clock, self._store.prepaid

        def job(tx: Tx) -> tuple[PrepaidRow, bool]:
            row = store.read(tx, row_id)
            if row.status not in REFUNDABLE:
                return row, False
            held = row.refund_claimed_at
            if held is not None and clock() - held < REFUND_LEASE_SECONDS:
                return row, False
            return store.hold_for_refund(tx, row_id, clock(), utc_iso(clock())), True

        return job

    async def _reverse_credit(self, row: PrepaidRow) -> int:
        """Reverse what is left of the row's balance credit, if it made one; returns the amount to refund."""
        credit = row.balance_transaction_id or (await self._existing_credit(row) or {}).get("id")
        if not credit:
            return int(row.amount)
        path = f"/v1/customers/{row.customer_id}/balance_transactions"
        reversal = await self._made_for(row, path, {}, key=REVERSAL_METADATA)
        if reversal is not None:
            return int(reversal["amount"])
        customer = (await self._gateway.send(StripeRequest("get", f"/v1/customers/{row.customer_id}"))).data
        left = min(int(row.amount), max(0, -int(customer.get("balance") or 0)))
        if left > 0:
            await self._gateway.send(StripeRequest("post", path, {
                "amount": left, "currency": row.currency,
                "description": f"Reversal of the prepaid credit {credit} (refunded)",
                "metadata": {REVERSAL_METADATA: row.id}}, stripe_idempotency_key("prepaid-uncredit", row.id)))
        return left

    async def _refund_payment(self, row: PrepaidRow, amount: int) -> dict[str, Any]:
        """The refund of `amount` for this row: a succeeded or pending one found by its metadata, else a new one
        (a failed earlier one is not reused: each new attempt has its own key)."""
        earlier = await self._all_made_for(row, "/v1/refunds", {"payment_intent": row.payment_intent_id})
        for refund in earlier:
            if refund.get("status") in ("succeeded", "pending", "requires_action"):
                return refund
        key = stripe_idempotency_key("prepaid-refund", f"{row.id}:{len(earlier)}")
        return (await self._gateway.send(StripeRequest("post", "/v1/refunds", {
            "payment_intent": row.payment_intent_id, "amount": amount, "reason": "requested_by_customer",
            "metadata": {PREPAID_METADATA: row.id}}, key))).data

    # --- in the background ------------------------------------------------------------------------------------

    async def start_now(self, row_id: str) -> PrepaidRow | None:
        """Start it before answering the buyer; if Stripe is unavailable, keep trying in the background."""
        row = await self.start(row_id)
        if row is not None and row.status in OPEN:
            self.dispatch([row_id])
        return row

    def dispatch(self, row_ids: Sequence[str]) -> None:
        """Start these (committed) subscriptions in the background, retrying with backoff (any thread's loop)."""
        self.background.spawn((row_id, lambda row_id=row_id: self._run(row_id))  # type: ignore[misc]
                              for row_id in row_ids)

    async def _run(self, row_id: str) -> None:
        failures = 0
        while True:
            try:
                row = await self.start(row_id)
                if row is None or row.status not in OPEN:
                    return
                attempts = row.attempts
            except Exception:  # e.g. the database busy beyond its timeout: the row is intact, try again later
                log.exception("starting prepaid subscription %s failed; retrying", row_id)
                failures += 1
                attempts = failures
            await asyncio.sleep(self._scale * min(2 ** max(0, attempts - 1), MAX_BACKOFF_SECONDS))

    def kick(self) -> list[str]:
        """After a COMMIT that may have recorded a subscription to start: start every open one not already being
        started. Free when nothing was enqueued since the last kick that saw its row (no query after every payment
        or webhook); an enqueued row stays looked for until a kick sees it committed (or it is long gone: its job
        rolled back), so a kick that runs before another job's COMMIT loses nothing."""
        if not self._enqueued:
            return []
        return self._kick_all()

    def _kick_all(self) -> list[str]:
        rows = self.pending()
        ids = [row.id for row in rows]
        self.dispatch(ids)
        if self._enqueued:
            seen, stale = set(ids), time.monotonic() - PENDING_FOR_SECONDS
            with self._enqueued_lock:
                for row_id, since in list(self._enqueued.items()):
                    if row_id in seen or since < stale or (row_id not in seen and self._settled(row_id)):
                        del self._enqueued[row_id]
        return ids

    def _settled(self, row_id: str) -> bool:
        """An enqueued row that is committed but no longer open (started already, or failed)."""
        row = self.find(row_id)
        return row is not None and row.status not in OPEN

    def resume(self) -> list[str]:
        """At start-up, on the server's loop: background starts run there from now on, beginning with every open
        row a previous run left."""
        self.background.bind()
        return self._kick_all()

    async def retry(self, *, include_failed: bool, only: Sequence[str] = ()) -> list[PrepaidRow]:
        """Attempt every open (and, when asked, failed) subscription now, one by one (`start-subscriptions`);
        `only` limits it to these ids, and only a named row is retried when it was refused (the operator was told
        to refund it: retrying every failed row must not start one that was refunded)."""
        if include_failed:
            store, named = self._store.prepaid, tuple(only)
            await self._store.write(lambda tx: store.reopen(tx, named))
        rows = [row for row in self.pending() if not only or row.id in only]
        started = [await self.start(row.id) for row in rows]
        return [row for row in started if row is not None]

    async def drain(self) -> None:
        """Wait for the starts in flight (shutdown and tests)."""
        await self.background.drain()
