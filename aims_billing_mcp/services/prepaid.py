"""Prepaid tier subscriptions: what fulfilling a paid tier item (pricing.toml `fulfil = "subscribe"`) does.

The buyer paid the whole commitment once (a Shared Payment Token is single-use: nothing can be charged later), so
the payment becomes Stripe's own prepaid credit and Stripe bills the months from it:
1. a customer balance transaction of -amount (a credit on the customer's Stripe balance);
2. a subscription on the tier's monthly price (and its metered overage price) with `collection_method=send_invoice`
   (no card on file: nothing is ever charged automatically), the tier's free months as a trial, `cancel_at` at the
   commitment end and the tier in its metadata, as a checkout-started subscription has.
Each monthly invoice is paid from the credit at finalization; usage beyond the allowance draws on it too and, once
it is spent, is invoiced to the customer (open invoice, 30 days), never charged without consent.

Why an outbox: the row is written in the transaction that records the payment (so a paid order is never without
its fulfilment), and the Stripe calls run after COMMIT. Each step's result is stored before the next one starts and
each call has a deterministic idempotency key, so a retry after a crash (at start-up, or `start-subscriptions`)
resumes where it stopped and can neither credit twice nor start two subscriptions. The subscription is recorded in
`billing_provisions` in the same job that marks the row started, and the source (payment session or ACP order)
is told in that job too (its hook may hand back an after-COMMIT action, e.g. sending ACP's order_update).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import BillingError, InvalidState, NotFound
from ..models import format_amount
from ..store import Store, utc_iso
from ..stripe_gateway import StripeGateway, StripeRequest, stripe_idempotency_key
from .subscriptions import SubscriptionService
from .tiers import TIER_METADATA, Pricing, Tier, add_months, trial_days

log = logging.getLogger(__name__)
DAYS_UNTIL_DUE = 30
OPEN = ("pending", "credited")
# A hook runs inside the job that records the start (or the failure); it may return an action for after COMMIT.
Hook = Callable[[sqlite3.Connection, dict[str, Any]], Callable[[], None] | None]


def prepaid_id(source_id: str) -> str:
    """One prepaid subscription per paid source (payment session ps_..., ACP checkout cs_...)."""
    return f"pre_{source_id}"


class PrepaidSubscriptions:
    """The outbox of prepaid subscriptions and the worker that starts them in Stripe."""

    def __init__(self, store: Store, gateway: StripeGateway, subscriptions: SubscriptionService, pricing: Pricing, *,
                 clock: Callable[[], float] = time.time, max_attempts: int = 5,
                 retry_delay_scale: float = 1.0) -> None:
        self._store = store
        self._gateway = gateway
        self._subscriptions = subscriptions
        self._pricing = pricing
        self._clock = clock
        self._max_attempts = max(1, max_attempts)
        self._scale = retry_delay_scale
        self._hooks: dict[str, Hook] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def on_outcome(self, source: str, hook: Hook) -> None:
        """Tell `source` (payment_session, acp) when one of its subscriptions starts or fails for good."""
        self._hooks[source] = hook

    # --- the outbox -------------------------------------------------------------------------------------------

    def live_tier(self, customer: str) -> str | None:
        """The paid tier a customer already has (live subscription, or a prepaid one not yet started): buying a
        second one would bill two subscriptions for one customer."""
        open_row = self._store.query_one(
            "SELECT tier FROM prepaid_subscriptions WHERE customer_id = ? AND status IN ('pending', 'credited')",
            (customer,))
        if open_row is not None:
            return str(open_row["tier"])
        tier = self._subscriptions.entitled_tier(customer)
        return tier.id if tier.paid else None

    async def check_customer(self, customer: str, *, param: str = "customer") -> None:
        """Refuse before the payment what would fail after it: a subscription needs a customer Stripe knows."""
        if not await self._subscriptions.customer_exists(customer):
            raise NotFound(f"Stripe has no customer {customer}, and a tier subscribes a customer: create one with "
                           "create_customer (or buy for an agent whose wallet belongs to an existing customer)",
                           param=param)

    def enqueue(self, conn: sqlite3.Connection, *, source: str, source_id: str, customer: str, tier: Tier,
                amount: int, currency: str, payment_intent: str | None) -> dict[str, Any]:
        """Record the subscription to start, inside the caller's write transaction (start it after COMMIT)."""
        iso = utc_iso(self._clock())
        row_id = prepaid_id(source_id)
        conn.execute(
            "INSERT INTO prepaid_subscriptions (id, source, source_id, customer_id, tier, amount, currency, "
            "payment_intent_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (source_id) DO NOTHING",
            (row_id, source, source_id, customer, tier.id, amount, currency, payment_intent, iso, iso))
        return self.summary(dict(conn.execute("SELECT * FROM prepaid_subscriptions WHERE id = ?",
                                              (row_id,)).fetchone()))

    def summary(self, row: dict[str, Any]) -> dict[str, Any]:
        """What the buyer sees: the tier, what was prepaid, and how far the start has come."""
        tier = self._pricing.tiers.get(row["tier"])
        summary: dict[str, Any] = {
            "kind": "subscription", "prepaid_id": row["id"], "customer": row["customer_id"], "tier": row["tier"],
            "prepaid": row["amount"], "prepaid_display": format_amount(row["amount"], row["currency"]),
            "status": row["status"], "subscription": row["subscription_id"],
        }
        if tier is not None:
            summary["months"] = tier.delivered_months
        if row["starts_at"]:
            summary["commitment_end"] = utc_iso(self._commitment_end(tier, row["starts_at"])) if tier else None
        if row["last_error"]:
            summary["last_error"] = row["last_error"]
        return summary

    def find(self, row_id: str) -> dict[str, Any] | None:
        return self._store.query_one("SELECT * FROM prepaid_subscriptions WHERE id = ?", (row_id,))

    def pending(self, *, include_failed: bool = False) -> list[dict[str, Any]]:
        statuses = (*OPEN, "failed") if include_failed else OPEN
        return self._store.query(f"SELECT * FROM prepaid_subscriptions WHERE status IN "
                                 f"({', '.join('?' * len(statuses))}) ORDER BY created_at", statuses)

    # --- starting them ----------------------------------------------------------------------------------------

    async def start(self, row_id: str) -> dict[str, Any]:
        """One attempt to start a recorded subscription; returns the row as it ends. Errors are recorded on the
        row (retryable ones leave it open for the next attempt), never raised: the payment already succeeded."""
        lock = self._locks.setdefault(row_id, asyncio.Lock())
        async with lock:
            row = self.find(row_id)
            if row is None or row["status"] not in OPEN:
                return row or {}
            try:
                return await self._start(row)
            except BillingError as exc:
                return await self._record_error(row, exc)

    async def _start(self, row: dict[str, Any]) -> dict[str, Any]:
        tier = self._pricing.tier(row["tier"])
        price, overage = await self._subscriptions.prices_for(tier)
        if row["status"] == "pending":
            if (live := self._subscriptions.entitled_tier(row["customer_id"])).paid:
                raise InvalidState(f"customer {row['customer_id']} got the {live.id} tier meanwhile: a second "
                                   "subscription would bill twice; refund the payment or cancel one, then run "
                                   "`aims-billing-mcp start-subscriptions --failed`", param="customer")
            txn = (await self._gateway.send(StripeRequest(
                "post", f"/v1/customers/{row['customer_id']}/balance_transactions",
                {"amount": -row["amount"], "currency": row["currency"],
                 "description": f"Prepaid {tier.name} subscription ({tier.commitment_months} months billed, "
                                f"{tier.delivered_months} delivered)",
                 "metadata": {"aims_prepaid": row["id"], TIER_METADATA: tier.id}},
                stripe_idempotency_key("prepaid-credit", row["id"])))).data
            # The commitment runs on Stripe's clock (the credit's `created`), not ours: a cancel_at computed from a
            # clock behind Stripe's (a test clock, the sandbox after `advance`) could already be in Stripe's past.
            starts_at = int(txn.get("created") or self._clock())
            row = await self._store.write(self._step(row["id"], "UPDATE prepaid_subscriptions SET status = "
                                                     "'credited', balance_transaction_id = ?, starts_at = ?",
                                                     (txn["id"], starts_at)))
        starts_at = int(row["starts_at"])
        end = self._commitment_end(tier, starts_at)
        metadata = {TIER_METADATA: tier.id, "aims_commitment_months": str(tier.commitment_months),
                    "aims_delivered_months": str(tier.delivered_months), "aims_prepaid": row["id"],
                    "aims_prepaid_amount": str(row["amount"])}
        params: dict[str, Any] = {
            "customer": row["customer_id"],
            "items": [{"price": price, "quantity": 1}] + ([{"price": overage}] if overage else []),
            "collection_method": "send_invoice", "days_until_due": DAYS_UNTIL_DUE, "cancel_at": end,
            "metadata": metadata, "description": f"{tier.name} tier, prepaid ({row['id']})",
        }
        if tier.free_months:
            params["trial_period_days"] = trial_days(starts_at, tier.free_months)
        sub = (await self._gateway.send(StripeRequest("post", "/v1/subscriptions", params,
                                                      stripe_idempotency_key("prepaid-subscription", row["id"])))).data
        return await self._finish(row, "started", sub=sub)

    def _commitment_end(self, tier: Tier, starts_at: int) -> int:
        return add_months(starts_at, tier.delivered_months)

    async def _record_error(self, row: dict[str, Any], exc: BillingError) -> dict[str, Any]:
        attempts = int(row["attempts"]) + 1
        message = f"{exc.code}: {exc.message}"[:500]
        if exc.retryable and attempts < self._max_attempts:
            return await self._store.write(self._step(row["id"], "UPDATE prepaid_subscriptions SET attempts = ?, "
                                                      "last_error = ?", (attempts, message)))
        log.error("prepaid subscription %s failed: %s", row["id"], message)
        return await self._finish({**row, "attempts": attempts}, "failed", error=message)

    async def _finish(self, row: dict[str, Any], status: str, *, sub: dict[str, Any] | None = None,
                      error: str | None = None) -> dict[str, Any]:
        """Mark the row started (recording the subscription as its provision) or failed, and tell the source, in
        one job; the source's after-COMMIT action runs once the job has committed."""
        hook = self._hooks.get(row["source"])
        clock, subscriptions = self._clock, self._subscriptions
        after: list[Callable[[], None]] = []

        def job(conn: sqlite3.Connection) -> dict[str, Any]:
            cursor = conn.execute(
                "UPDATE prepaid_subscriptions SET status = ?, subscription_id = ?, attempts = ?, last_error = ?, "
                "updated_at = ? WHERE id = ? AND status IN ('pending', 'credited')",
                (status, sub["id"] if sub else None, row["attempts"], error, utc_iso(clock()), row["id"]))
            current = dict(conn.execute("SELECT * FROM prepaid_subscriptions WHERE id = ?", (row["id"],)).fetchone())
            if cursor.rowcount != 1:
                return current  # another attempt finished it first
            if sub is not None:
                now = int(clock())
                subscriptions.apply_event(conn, {"id": f"api_prepaid_{sub['id']}", "type":
                                                 "customer.subscription.created", "created": now,
                                                 "data": {"object": sub}})
            if hook is not None and (action := hook(conn, current)) is not None:
                after.append(action)
            return current

        done = await self._store.write(job)
        self._subscriptions.forget(done["customer_id"])
        for action in after:
            action()
        return done

    def _step(self, row_id: str, update: str, values: Sequence[Any]) -> Callable[[sqlite3.Connection],
                                                                                  dict[str, Any]]:
        clock = self._clock

        def job(conn: sqlite3.Connection) -> dict[str, Any]:
            conn.execute(f"{update}, updated_at = ? WHERE id = ?", (*values, utc_iso(clock()), row_id))
            return dict(conn.execute("SELECT * FROM prepaid_subscriptions WHERE id = ?", (row_id,)).fetchone())

        return job

    # --- in the background ------------------------------------------------------------------------------------

    def dispatch(self, row_ids: Sequence[str]) -> None:
        """Start these (committed) subscriptions in the background, retrying with backoff, on the server's event
        loop: a caller on another loop (the embedded sandbox delivers its webhooks from its own thread) hands the
        work over instead of starting tasks its loop would drop."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        if loop is self._loop:
            self._spawn(row_ids)
        else:
            self._loop.call_soon_threadsafe(self._spawn, list(row_ids))

    def _spawn(self, row_ids: Sequence[str]) -> None:
        for row_id in row_ids:
            task = asyncio.get_running_loop().create_task(self._run(row_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, row_id: str) -> None:
        while True:
            row = await self.start(row_id)
            if not row or row["status"] not in OPEN:
                return
            await asyncio.sleep(self._scale * 2 ** max(0, int(row["attempts"]) - 1))

    def resume(self) -> list[str]:
        """Start every subscription a previous run recorded but did not finish (at start-up)."""
        self._loop = asyncio.get_running_loop()  # the server's loop: background starts run here
        ids = [row["id"] for row in self.pending()]
        self.dispatch(ids)
        return ids

    async def retry(self, *, include_failed: bool) -> list[dict[str, Any]]:
        """Attempt every open (and, when asked, failed) subscription now, one by one (`start-subscriptions`)."""
        if include_failed:
            await self._store.write(lambda conn: conn.execute(
                "UPDATE prepaid_subscriptions SET status = CASE WHEN balance_transaction_id IS NULL THEN 'pending' "
                "ELSE 'credited' END, attempts = 0 WHERE status = 'failed'"))
        return [await self.start(row["id"]) for row in self.pending()]

    async def drain(self) -> None:
        """Wait for the starts in flight (shutdown and tests), including ones another thread just handed over."""
        await asyncio.sleep(0)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
