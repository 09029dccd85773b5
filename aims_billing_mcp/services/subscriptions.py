"""Subscriptions on the 3-6-9 tiers: the checkout that starts one, the provision webhooks keep in step with Stripe,
the status and entitlements agents ask for, and cancellation that honours the commitment.

How events converge: each applied event leaves its `created` time on the provision; an older event for the same
customer is stored but not applied, so duplicates and out-of-order deliveries end in the state of the newest event,
which is Stripe's current state. Within one second (Stripe's resolution) the later status in a subscription's life
wins (incomplete < trialing < active < past_due < unpaid < canceled). A cancellation of an old subscription never
downgrades a customer whose newer subscription is live.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, InvalidInput, InvalidState, StripeInvalidRequest
from ..models import format_amount
from ..settings import Settings
from ..store import Store, Tx, utc_iso
from ..store.webhooks import LIVE, EventRef, Provision, can_move
from ..store.webhooks import SubscriptionStatus as S
from ..stripe_gateway import StripeGateway, StripeRequest
from .ceiling import Ceiling
from .mutations import StripeMutations, compact
from .subscriptions_models import (
    BillingStatus,
    CancellationResult,
    Entitlements,
    LastEvent,
    SubscriptionCheckoutResult,
    TierInfo,
    TierList,
)
from .tiers import (
    LUC_METER,
    TIER_METADATA,
    Pricing,
    Tier,
    UsagePeriod,
    add_months,
    calendar_month_of,
    trial_days,
)

PROVISION_CACHE_SECONDS = 5.0
PROVISION_CACHE_SIZE = 10_000
STATUS_RANK: dict[str, int] = {S.INCOMPLETE: 0, S.TRIALING: 1, S.ACTIVE: 2, S.PAST_DUE: 3, S.UNPAID: 4, S.PAUSED: 4,
                               S.CANCELED: 5, S.INCOMPLETE_EXPIRED: 5}


@dataclass(frozen=True)
class Applied:
    """What applying one event did: the customer it concerned, and a note when it was not applied."""

    customer_id: str | None
    note: str | None = None


class SubscriptionService:
    def __init__(self, mutations: StripeMutations, store: Store, pricing: Pricing, settings: Settings, *,
                 gateway: StripeGateway, ceiling: Ceiling | None = None) -> None:
        self._mutations = mutations
        self._ceiling = ceiling or Ceiling.from_settings(settings)
        self._gateway = gateway
        self._store = store
        self._pricing = pricing
        self._settings = settings
        self._cache: dict[str, tuple[float, Provision | None]] = {}

    # --- tiers ---------------------------------------------------------------------------------------------------

    def entitlements(self, tier: Tier) -> Entitlements:
        return Entitlements(tokens_per_month=tier.tokens_per_month, agents=tier.agents, concurrent=tier.concurrent)

    async def _found_prices(self, tiers: list[Tier], *, overage: bool = False) -> dict[str, str]:
        """Price ids by lookup key: the monthly prices of tiers whose STRIPE_PRICE_* is not set (setup-stripe ran,
        .env not updated), and with `overage` their metered overage prices (one per meter)."""
        keys = [tier.lookup_key for tier in tiers] + ([meter.overage_lookup_key(tier) for tier in tiers
                                                       for meter in self._pricing.meters.values()] if overage else [])
        if not keys:
            return {}
        page = await self._gateway.send(StripeRequest("get", "/v1/prices", {"lookup_keys": keys, "active": True,
                                                                            "limit": 100}))
        return {p["lookup_key"]: p["id"] for p in page.data.get("data", []) if p.get("lookup_key")}

    async def prices_for(self, tier: Tier) -> tuple[str, dict[str, str]]:
        """The tier's monthly price and its metered overage prices by meter id (those setup-stripe created: none
        when it predates metering, LUC's alone when it predates meters)."""
        found = await self._found_prices([tier], overage=True)
        monthly = self._settings.price_id_for(tier.price_env) or found.get(tier.lookup_key)
        if monthly:
            return monthly, {meter.id: found[meter.overage_lookup_key(tier)] for meter in self._pricing.meters.values()
                             if meter.overage_lookup_key(tier) in found}
        raise ConfigurationError(
            f"tier {tier.id} has no Stripe price: run `aims-billing-mcp setup-stripe` (it creates the prices and "
            f"prints {tier.price_env}=price_...), then set {tier.price_env}",
            param="tier",
        )

    async def list_tiers(self) -> TierList:
        unset = [t for t in self._pricing.paid_tiers() if not self._settings.price_id_for(t.price_env)]
        found = await self._found_prices(unset) if unset else {}
        infos = []
        for tier in self._pricing.tiers.values():
            price = self._settings.price_id_for(tier.price_env) or found.get(tier.lookup_key) if tier.paid else None
            infos.append(TierInfo(
                id=tier.id, name=tier.name, description=tier.description, monthly_price=tier.monthly_price,
                monthly_price_display=format_amount(tier.monthly_price, self._pricing.currency),
                commitment_months=tier.commitment_months, delivered_months=tier.delivered_months,
                entitlements=self.entitlements(tier), stripe_price=price, aliases=tier.aliases,
            ))
        return TierList(tiers=infos, mode=self._gateway.mode.value)

    # --- checkout ----------------------------------------------------------------------------------------------------

    async def create_subscription_checkout(
        self, *, tier: str, customer: str | None, customer_email: str | None, success_url: str | None,
        cancel_url: str | None, idempotency_key: str | None, dry_run: bool,
    ) -> SubscriptionCheckoutResult:
        chosen = self._pricing.tier(tier)
        if not chosen.paid:
            raise InvalidInput(
                f"tier {chosen.id} has no subscription: every customer without one is on {chosen.id}; choose one of "
                + ", ".join(t.id for t in self._pricing.paid_tiers()), param="tier")
        if bool(customer) == bool(customer_email):
            raise InvalidInput("give exactly one of customer (cus_...) or customer_email", param="customer")
        live = self.provision(customer) if customer else None
        if live is not None and live.status in LIVE and live.subscription_id:
            # two live subscriptions would both bill the customer's metered usage; a period keeps the tier it began on
            raise InvalidState(
                f"customer {customer} already has tier {live.tier} ({live.subscription_id}, {live.status}): "
                "a tier changes between periods, not within one: cancel_subscription with immediately=true (the "
                f"usage so far is invoiced at {live.tier} terms) or wait until it ends, then start this checkout",
                param="customer")
        price, overage = await self.prices_for(chosen)
        metadata = compact({TIER_METADATA: chosen.id, "aims_customer": customer,
                            "aims_commitment_months": str(chosen.commitment_months),
                            "aims_delivered_months": str(chosen.delivered_months)})
        trial = trial_days(int(time.time()), chosen.free_months) if chosen.free_months else None
        params = compact({
            "mode": "subscription",
            "line_items": [{"price": price, "quantity": 1}] + [{"price": metered} for metered in overage.values()],
            "customer": customer, "customer_email": customer_email, "client_reference_id": customer,
            "success_url": success_url, "cancel_url": cancel_url, "metadata": metadata,
            "subscription_data": compact({"metadata": metadata, "trial_period_days": trial}),
        })

        def project(session: dict[str, Any]) -> dict[str, Any]:
            return {"checkout_session": {
                "id": session["id"], "url": session.get("url"), "tier": chosen.id, "customer": customer,
                "customer_email": customer_email, "price": price, "overage_price": overage.get(LUC_METER),
                "trial_days": trial or 0,
                "expires_at": session.get("expires_at")}}

        await self._ceiling.check_line_items(self._gateway, params["line_items"], "tier")
        return await self._mutations.run(
            "create_subscription_checkout", "/v1/checkout/sessions", params, SubscriptionCheckoutResult, project,
            idempotency_key=idempotency_key, dry_run=dry_run, owner=customer or customer_email,
        )

    # --- status ------------------------------------------------------------------------------------------------------

    def provision(self, customer: str) -> Provision | None:
        """The customer's provision row, cached: every meter event asks for the tier and period, and provisions
        change only when an event is applied, which `forget`s the customer after its COMMIT. The TTL bounds
        staleness when another server instance applied the event (several instances behind one database)."""
        now = time.monotonic()
        cached = self._cache.get(customer)
        if cached is not None and cached[0] > now:
            return cached[1]
        row = self._store.webhooks.provision_for(customer)
        if len(self._cache) >= PROVISION_CACHE_SIZE:
            self._cache.clear()
        self._cache[customer] = (now + PROVISION_CACHE_SECONDS, row)
        return row

    def forget(self, customer: str | None) -> None:
        """Drop a customer's cached provision (call after the COMMIT that changed it)."""
        if customer is not None:
            self._cache.pop(customer, None)

    async def get_billing_status(self, customer: str) -> BillingStatus:
        row = self.provision(customer)
        if row is None:
            try:  # an unknown id is a typo worth reporting; a known customer without a subscription is simply P2P
                await self._gateway.send(StripeRequest("get", f"/v1/customers/{customer}"))
            except StripeInvalidRequest as exc:
                if exc.details.get("stripe_code") == "resource_missing":
                    raise StripeInvalidRequest(
                        f"no such customer {customer!r}: check the id, or create one with create_customer",
                        param="customer", **exc.details) from None
                raise
            p2p = self._pricing.p2p
            return BillingStatus(customer=customer, tier=p2p.id, subscribed_tier=None, status=S.NONE,
                                 entitlements=self.entitlements(p2p))
        return self._status_from_row(row)

    def entitled_tier(self, customer: str) -> Tier:
        """The tier a customer is entitled to now: their subscription's while it is live, P2P otherwise."""
        return self.tier_of(self.provision(customer))

    def tier_of(self, provision: Provision | Mapping[str, Any] | None) -> Tier:
        """The tier a provision entitles to (a `Provision`, or a row with its `tier` and `status` columns)."""
        if provision is None:
            return self._pricing.p2p
        if isinstance(provision, Provision):
            status, tier = provision.status, provision.tier
        else:
            status, tier = provision["status"], provision["tier"]
        if status in LIVE and tier in self._pricing.tiers:
            return self._pricing.tiers[tier]
        return self._pricing.p2p

    def usage_period(self, customer: str, timestamp: int) -> UsagePeriod:
        """The usage period containing `timestamp`, and its terms: the subscription period that contains it, so the
        local record predicts the invoice Stripe makes for that period.

        - within the subscription's current period: that period, on the subscription's tier (a trial is one period,
          free: Stripe bills no usage in it);
        - at or after its end while the subscription is live (the renewal webhook not yet here): the next period,
          [end, end + 1 month), unless the subscription is scheduled to end by then: P2P from its end;
        - before the current period's start: the calendar month, on P2P terms (`MeteringService` refuses usage
          before the current period: that period is closed);
        - without a live subscription: P2P, the UTC calendar month, starting at the subscription's end if it ended
          in that month (usage before it belonged to the subscription)."""
        row = self.provision(customer)
        p2p = self._pricing.p2p
        month = calendar_month_of(timestamp)
        if row is None:
            return UsagePeriod(*month, tier=p2p)
        tier = self._pricing.tiers.get(row.tier or "", p2p)
        end = row.current_period_end
        if row.status in LIVE and not end:  # provisioned by its checkout; the subscription's own event is due
            return UsagePeriod(*month, tier=tier)
        if row.status in LIVE:
            assert end is not None
            start = row.current_period_start or add_months(end, -1)
            ends = row.cancel_at or (end if row.cancel_at_period_end else None)
            if ends is not None and ends <= timestamp:
                return UsagePeriod(max(month[0], int(ends)), month[1], tier=p2p)
            if start <= timestamp < end:
                return UsagePeriod(start, end, tier=tier, free=row.status == S.TRIALING)
            if timestamp >= end:  # periods roll on at the end as Stripe renews, before its webhook arrives
                while timestamp >= end:
                    start, end = end, add_months(end, 1)
                return UsagePeriod(start, end, tier=tier)
            return UsagePeriod(*month, tier=p2p)
        ended = row.ended_at or (row.cancel_at if row.status == S.CANCELED else None)
        if ended and month[0] <= ended <= timestamp:
            return UsagePeriod(int(ended), month[1], tier=p2p)
        return UsagePeriod(*month, tier=p2p)

    async def customer_exists(self, customer: str) -> bool:
        if self.provision(customer) is not None:
            return True
        try:
            await self._gateway.send(StripeRequest("get", f"/v1/customers/{customer}"))
        except StripeInvalidRequest as exc:
            if exc.details.get("stripe_code") == "resource_missing":
                return False
            raise
        return True

    def _status_from_row(self, row: Provision) -> BillingStatus:
        subscribed = self._pricing.tiers.get(row.tier)
        effective = subscribed if subscribed is not None and row.status in LIVE else self._pricing.p2p
        last = (LastEvent(id=row.last_event_id, type=row.last_event_type or "", created=row.last_event_created or 0)
                if row.last_event_id else None)
        return BillingStatus(
            customer=row.customer_id, tier=effective.id, subscribed_tier=row.tier, status=row.status,
            entitlements=self.entitlements(effective), subscription=row.subscription_id,
            current_period_end=row.current_period_end, current_period_end_iso=_iso(row.current_period_end),
            commitment_end=row.commitment_end, commitment_end_iso=_iso(row.commitment_end),
            cancel_at=row.cancel_at, cancel_at_period_end=row.cancel_at_period_end, last_event=last,
        )

    # --- cancellation ------------------------------------------------------------------------------------------------

    async def cancel_subscription(
        self, *, customer: str | None, subscription: str | None, immediately: bool, idempotency_key: str | None,
        dry_run: bool,
    ) -> CancellationResult:
        if not (customer or subscription):
            raise InvalidInput("give customer (cus_...) or subscription (sub_...)", param="customer")
        row = self.provision(customer) if customer else self._store.webhooks.by_subscription(subscription or "")
        sub_id = subscription or (row.subscription_id if row else None)
        if not sub_id:
            raise InvalidInput(f"customer {customer!r} has no subscription to cancel (they are on P2P)",
                               param="customer")
        current = (await self._gateway.send(StripeRequest("get", f"/v1/subscriptions/{sub_id}"))).data
        commitment_end = _commitment_end(current, self._pricing)
        period_end = _period_end(current)
        params: dict[str, Any]
        if immediately:  # the period's metered usage so far is billed now, on a final invoice (Stripe's invoice_now)
            method, path, params = "delete", f"/v1/subscriptions/{sub_id}", {"invoice_now": True}
        elif commitment_end and period_end and commitment_end > period_end:
            method, path, params = "post", f"/v1/subscriptions/{sub_id}", {"cancel_at": commitment_end}
        else:
            method, path, params = "post", f"/v1/subscriptions/{sub_id}", {"cancel_at_period_end": True}

        def project(sub: dict[str, Any]) -> dict[str, Any]:
            ends = sub.get("ended_at") if sub.get("status") == "canceled" else (
                sub.get("cancel_at") or (period_end if sub.get("cancel_at_period_end") else None))
            return {"cancellation": {
                "subscription": sub["id"], "status": sub.get("status", "unknown"), "ends_at": ends,
                "ends_at_iso": _iso(ends), "cancel_at_period_end": bool(sub.get("cancel_at_period_end")),
                "commitment_end": commitment_end,
                "commitment_waived": bool(immediately and commitment_end and commitment_end > int(time.time())),
            }}

        async def record(sub: dict[str, Any]) -> None:
            """Apply Stripe's answer now, as a synthetic event, so status is right before the webhook arrives."""
            at = int(sub.get("canceled_at") or time.time())  # Stripe's clock: the state is as new as Stripe says
            event = {"id": f"api_cancel_{sub['id']}_{at}", "type": "customer.subscription.updated",
                     "created": at, "data": {"object": sub}}
            applied = await self._store.write(lambda conn: self.apply_event(conn, event))
            self.forget(applied.customer_id)

        return await self._mutations.run(
            "cancel_subscription", path, params, CancellationResult, project, method=method,
            idempotency_key=idempotency_key, dry_run=dry_run, after=record, owner=sub_id,
        )

    # --- applying events (inside the writer's transaction) -----------------------------------------------------------

    def apply_event(self, tx: Tx, event: dict[str, Any]) -> Applied:
        """Apply `event` to its customer's provision inside the writer's transaction `tx`."""
        kind = event.get("type", "")
        obj = (event.get("data") or {}).get("object") or {}
        if kind.startswith("customer.subscription."):
            return self._apply_subscription(tx, event, obj)
        if kind == "checkout.session.completed":
            return self._apply_checkout(tx, event, obj)
        if kind in ("invoice.paid", "invoice.payment_failed"):
            return self._apply_invoice(tx, event, obj)
        customer = obj.get("customer") if isinstance(obj.get("customer"), str) else None
        if kind.startswith("invoice."):
            return Applied(customer, "recorded")
        return Applied(customer, "not handled: stored and acknowledged")

    def _apply_subscription(self, tx: Tx, event: dict[str, Any], sub: dict[str, Any]) -> Applied:
        customer = sub.get("customer")
        if not isinstance(customer, str):
            return Applied(None, "subscription without a customer")
        status = S.CANCELED if event["type"] == "customer.subscription.deleted" else sub.get("status", S.INCOMPLETE)
        row = self._store.webhooks.load_provision(tx, customer)
        tier = self._tier_of(sub) or (row.tier if row and row.subscription_id == sub["id"] else None)
        if tier is None:
            return Applied(customer, "not a tier subscription (no aims_tier metadata and no tier price): ignored")
        if row is not None and not _supersedes(row, event["created"], status, sub["id"]):
            return Applied(customer, "older than the state already applied: stored, not applied")
        self._store.webhooks.apply(tx, customer, {
            "tier": tier, "status": status, "subscription_id": sub["id"], "price_id": _price_of(sub),
            "current_period_end": _period_end(sub), "current_period_start": _period_start(sub),
            "ended_at": sub.get("ended_at"), "commitment_end": _commitment_end(sub, self._pricing),
            "cancel_at": sub.get("cancel_at"), "cancel_at_period_end": bool(sub.get("cancel_at_period_end")),
        }, _ref(event))
        return Applied(customer)

    def _apply_checkout(self, tx: Tx, event: dict[str, Any], session: dict[str, Any]) -> Applied:
        customer, sub_id = session.get("customer"), session.get("subscription")
        if session.get("mode") != "subscription" or not isinstance(customer, str) or not isinstance(sub_id, str):
            return Applied(customer if isinstance(customer, str) else None, "not a subscription checkout: recorded")
        tier = (session.get("metadata") or {}).get(TIER_METADATA)
        if tier not in self._pricing.tiers:
            return Applied(customer, "checkout without a known aims_tier: recorded")
        row = self._store.webhooks.load_provision(tx, customer)
        if row is not None and row.subscription_id == sub_id:
            return Applied(customer, "subscription already provisioned by its own events")
        if row is not None and row.status in LIVE and (row.last_event_created or 0) > event["created"]:
            return Applied(customer, "a newer subscription is live: stored, not applied")
        paid = session.get("payment_status")
        status = S.ACTIVE if paid == "paid" else S.TRIALING if paid == "no_payment_required" else S.INCOMPLETE
        self._store.webhooks.apply(tx, customer, {"tier": tier, "status": status, "subscription_id": sub_id},
                                   _ref(event))
        return Applied(customer)

    def _apply_invoice(self, tx: Tx, event: dict[str, Any], invoice: dict[str, Any]) -> Applied:
        customer = invoice.get("customer")
        if not isinstance(customer, str):
            return Applied(None, "invoice without a customer")
        row = self._store.webhooks.load_provision(tx, customer)
        if row is None:
            return Applied(customer, f"unknown customer {customer}: no provision to update (flagged)")
        sub_id = invoice.get("subscription") or (
            ((invoice.get("parent") or {}).get("subscription_details") or {}).get("subscription"))
        if sub_id and sub_id != row.subscription_id:
            return Applied(customer, "invoice of another subscription: recorded")
        if (row.last_event_created or 0) > event["created"]:
            return Applied(customer, "older than the state already applied: stored, not applied")
        target = S.PAST_DUE if event["type"] == "invoice.payment_failed" else S.ACTIVE
        if not can_move(row.status, target):
            return Applied(customer, "no change")
        self._store.webhooks.apply(tx, customer, {"status": target}, _ref(event))
        return Applied(customer)

    def _tier_of(self, sub: dict[str, Any]) -> str | None:
        tier = (sub.get("metadata") or {}).get(TIER_METADATA)
        if tier in self._pricing.tiers:
            return str(tier)
        price = _price_of(sub)
        for candidate in self._pricing.paid_tiers():
            if price and price == self._settings.price_id_for(candidate.price_env):
                return candidate.id
        lookup = (((sub.get("items") or {}).get("data") or [{}])[0].get("price") or {}).get("lookup_key")
        return next((t.id for t in self._pricing.paid_tiers() if t.lookup_key == lookup), None)


def _supersedes(row: Provision, created: int, status: str, sub_id: str) -> bool:
    last = row.last_event_created or 0
    if row.subscription_id not in (None, sub_id) and row.status in LIVE and status not in LIVE:
        return False  # the end of an old subscription must not downgrade a live newer one
    if created != last:
        return created > last
    return row.subscription_id != sub_id or STATUS_RANK.get(status, 0) >= STATUS_RANK.get(row.status, 0)


def _ref(event: dict[str, Any]) -> EventRef:
    return EventRef(event["id"], event["type"], event["created"])


def _price_of(sub: dict[str, Any]) -> str | None:
    items = (sub.get("items") or {}).get("data") or []
    price = (items[0].get("price") or {}) if items else {}
    return price.get("id") if isinstance(price, dict) else price


def _period_end(sub: dict[str, Any]) -> int | None:
    ends = [item.get("current_period_end") for item in (sub.get("items") or {}).get("data") or []]
    ends = [end for end in ends if end] or ([sub["current_period_end"]] if sub.get("current_period_end") else [])
    return max(ends) if ends else None


def _period_start(sub: dict[str, Any]) -> int | None:
    starts = [item.get("current_period_start") for item in (sub.get("items") or {}).get("data") or []]
    starts = [start for start in starts if start] or (
        [sub["current_period_start"]] if sub.get("current_period_start") else [])
    return max(starts) if starts else None


def _commitment_end(sub: dict[str, Any], pricing: Pricing) -> int | None:
    metadata = sub.get("metadata") or {}
    tier = pricing.tiers.get(metadata.get(TIER_METADATA, ""))
    start = sub.get("start_date") or sub.get("created")
    months = int(metadata.get("aims_delivered_months") or (tier.delivered_months if tier else 0))
    return add_months(int(start), months) if start and months else None


def _iso(epoch: int | None) -> str | None:
    return utc_iso(epoch) if epoch else None
