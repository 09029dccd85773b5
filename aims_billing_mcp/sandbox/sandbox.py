"""The :class:`Sandbox`: state and controls behind the HTTP app.

It owns the store, the fault injector, the request log and the event listeners, and runs each
operation in one transaction (:meth:`Sandbox.execute` for API requests, with idempotency).
Tests and the gateway reach it as ``app.state.sandbox``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from . import connect, events, fulfilment, lifecycle
from .core import DEFAULT_API_VERSION, Ctx, Obj, Route, public
from .errors import StripeError, idempotency_mismatch
from .faults import FaultInjector
from .forms import Form
from .params import Params
from .store import IdempotencyRecord, Store
from .webhooks import WebhookSender

log = logging.getLogger(__name__)

T = TypeVar("T")
CLOCK_OFFSET = "clock_offset"
EventListener = Callable[[Obj], None]


@dataclass(frozen=True)
class RequestRecord:
    """One request as the sandbox saw it (faulted and refused ones included)."""

    method: str
    path: str
    status: int
    idempotency_key: str | None
    replayed: bool


@dataclass(frozen=True)
class Outcome:
    """An executed request: status, JSON body text, and whether it was an idempotent replay."""

    status: int
    body: str
    replayed: bool = False


def _fingerprint(method: str, path: str, form: Form) -> str:
    canonical = json.dumps([method, path, form], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class Sandbox:
    """A stateful Stripe stand-in. Thread-safe; one SQLite database per instance."""

    def __init__(self, db_path: str = ":memory:", api_keys: Iterable[str] = ()) -> None:
        self.store = Store(db_path)
        self.faults = FaultInjector()
        self.api_keys: frozenset[str] = frozenset(api_keys)
        self.request_log: list[RequestRecord] = []
        self._listeners: list[EventListener] = []
        self._listeners_lock = threading.Lock()
        self.meter_event_errors: list[Obj] = []  # v2 stream events dropped as invalid, oldest first
        self.webhooks = WebhookSender()
        self.webhooks.on_result = lambda record: events.record_delivery(self.store, record)
        self.add_event_listener(self.webhooks.enqueue)

    # -- the clock -------------------------------------------------------------------------------

    def now(self) -> int:
        """The sandbox's time: the wall clock plus the offset :meth:`advance` added (kept in the DB,
        so every process on the same file agrees)."""
        return int(time.time()) + int(self.store.state_get(CLOCK_OFFSET) or 0)

    # -- inspection ----------------------------------------------------------------------------

    def count(self, obj_type: str) -> int:
        """How many objects with ``object == obj_type`` are stored."""
        return self.store.count(obj_type)

    def get_object(self, obj_id: str) -> Obj | None:
        """Any stored object by id, as the API would render it."""
        found = self.store.get(obj_id)
        return None if found is None or found["object"] == "deleted_customer" else public(found)

    def add_event_listener(self, fn: EventListener) -> None:
        """Call ``fn`` with every Event recorded from now on (after its transaction commits)."""
        with self._listeners_lock:
            self._listeners.append(fn)

    def close(self) -> None:
        self.webhooks.close()
        self.store.close()

    # -- execution -----------------------------------------------------------------------------

    def run(
        self,
        fn: Callable[[Ctx], T],
        *,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        api_version: str = DEFAULT_API_VERSION,
        account: str | None = None,
    ) -> T:
        """Run ``fn`` in one transaction, then hand the events it recorded to the listeners."""
        ctx = Ctx(self.store, 0, api_version, request_id, idempotency_key,
                  pending_webhooks=1 if self.webhooks.enabled else 0, account=account)
        try:
            with self.store.transaction():
                ctx.now = self.now()
                result = fn(ctx)
        except StripeError as exc:
            if not exc.commit:
                raise
            self._notify(ctx.events)
            raise
        self._notify(ctx.events)
        return result

    def _notify(self, events: list[Obj]) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for event in events:
            for listener in listeners:
                try:
                    listener(event)
                except Exception:  # a broken listener must not fail the API request
                    log.exception("sandbox event listener failed for %s", event["id"])

    def execute(
        self,
        route: Route,
        form: Form,
        args: Mapping[str, str],
        *,
        method: str,
        path: str,
        api_key: str,
        idempotency_key: str | None,
        request_id: str,
        api_version: str,
        account: str | None = None,
    ) -> Outcome:
        """Run one API request with Stripe's idempotency semantics.

        Replays the stored response for a known key with identical params, refuses a known key
        with different ones, and otherwise stores executed results (2xx and 402) under the key.
        Validation errors roll back and are not stored, so a corrected retry may reuse the key.
        """
        scope = hashlib.sha256((api_key if account is None else f"{api_key}\x00{account}").encode()).hexdigest()
        fingerprint = _fingerprint(method, path, form)

        def work(ctx: Ctx) -> Outcome:
            if account is not None:
                connect.check_account_header(ctx, account)
            if idempotency_key is not None:
                prior = self.store.idempotency_get(scope, idempotency_key)
                if prior is not None:
                    if (prior.method, prior.path, prior.fingerprint) != (method, path, fingerprint):
                        raise idempotency_mismatch(idempotency_key)
                    return Outcome(prior.status, prior.body, replayed=True)
            try:
                status, body = 200, public(route.handler(ctx, Params(form), args))
            except StripeError as exc:
                if not exc.commit:
                    raise
                status, body = exc.status, exc.envelope(request_id)
            text = json.dumps(body)
            if idempotency_key is not None:
                record = IdempotencyRecord(method, path, fingerprint, status, text)
                self.store.idempotency_put(scope, idempotency_key, record, ctx.now)
            return Outcome(status, text)

        return self.run(
            work, request_id=request_id, idempotency_key=idempotency_key, api_version=api_version, account=account
        )

    # -- sandbox-only actions ------------------------------------------------------------------

    def complete_checkout_session(self, session_id: str) -> Obj:
        """Act as the customer paying an open Checkout Session; returns the completed session.

        Raises :class:`StripeError` (404 unknown id, 400 not open) like the HTTP route answers.
        """
        return public(self.run(lambda ctx: fulfilment.complete_session(ctx, session_id)))

    def complete_account_onboarding(self, account_id: str, *, onboarded: bool = True) -> Obj:
        """Act as the creator finishing an account link's onboarding (or, with ``onboarded=False``, Stripe asking
        for more): the account's transfers capability becomes active (restricted) and ``account.updated`` is sent;
        returns the account as v1 renders it."""
        return self.run(lambda ctx: connect.set_onboarded(ctx, account_id, onboarded))

    def pay_payment_link(self, link_id: str) -> Obj:
        """Act as a customer paying a Payment Link: a Checkout Session from the link, completed; returns it."""
        return public(self.run(lambda ctx: fulfilment.pay_link(ctx, link_id)))



    def expire_idempotency_keys(self) -> int:
        """Forget every idempotency key now (Stripe forgets each after 24 hours): a retry then creates anew,
        which is what a client must be ready for. Returns how many were forgotten."""
        return self.store.idempotency_forget()

    def fail_payments(self, customer_id: str, fail: bool = True) -> None:
        """Make the customer's renewal (and triggered) payments fail from now on, or succeed again.

        Kept on the customer in the DB, so another process on the same file sees it.
        """
        self.run(lambda ctx: lifecycle.set_fail(ctx, customer_id, fail))

    def advance(self, days: float = 0, hours: float = 0) -> list[Obj]:
        """Move the sandbox clock forward and do what Stripe would have done meanwhile (renewals,
        failed payments, scheduled cancellations, trials ending); returns the Events recorded."""
        seconds = round(days * 86400 + hours * 3600)
        if seconds < 0:
            raise ValueError("the sandbox clock only moves forward")

        def work(ctx: Ctx) -> list[Obj]:
            offset = int(self.store.state_get(CLOCK_OFFSET) or 0) + seconds
            self.store.state_set(CLOCK_OFFSET, str(offset))
            ctx.now = int(time.time()) + offset
            lifecycle.run_due(ctx)
            return list(ctx.events)

        return self.run(work)

    def trigger(self, event_type: str, *, customer: str | None = None, subscription: str | None = None) -> Obj:
        """Make ``event_type`` happen for the customer's (newest live) or the given subscription,
        with the state change behind it; returns the Event. Supported: ``lifecycle.TRIGGERS``.

        Raises ValueError for another type, :class:`StripeError` for an unknown id or a customer
        without a live subscription.
        """
        if event_type not in lifecycle.TRIGGERS:
            raise ValueError(f"cannot trigger {event_type!r}; supported: {', '.join(lifecycle.TRIGGERS)}")
        return self.run(lambda ctx: lifecycle.trigger(ctx, event_type, customer, subscription))
