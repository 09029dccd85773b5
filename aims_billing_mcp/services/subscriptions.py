"""Subscriptions on the 3-6-9 tiers: the checkout that starts one, the status and entitlements agents ask for, and
cancellation that honours the commitment. The provision Stripe's events keep in step is applied by ProvisionEvents
(services/webhook_events.py, beside the endpoint's other work); `apply_event` hands it synthetic events too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..errors import ConfigurationError, InvalidInput, InvalidState, StripeInvalidRequest
from ..models import format_amount
from ..settings import Settings
from ..store import Store, Tx, utc_iso
from ..store.webhooks import LIVE, Provision
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
from .webhook_events import Applied, ProvisionEvents, commitment_end_of, period_end_of

PROVISION_CACHE_SECONDS = 5.0
PROVISION_CACHE_SIZE = 10_000

class SubscriptionService:
    def __init__(self, mutations: StripeMutations, store: Store, pricing: Pricing, settings: Settings, *,
                 gateway: StripeGateway, ceiling: Ceiling | None = None) -> None:
        self._mutations = mutations
        self._ceiling = ceiling or Ceiling.from_settings(settings)
        self._gateway = gateway
        self._store = store
        self._pricing = pricing
        self._settings = settings
        self.provisions = ProvisionEvents(store, pricing, settings)  # also what the webhook endpoint applies
        self._cache: dict[str, tuple[float, Provision | None]] = {}
        self._placements = 0  # see placement_version

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
        if cached is not None and cached[1] != row:  # changed by another instance: periods and tiers may differ
            self._placements += 1
        if len(self._cache) >= PROVISION_CACHE_SIZE:
            self._cache.clear()
            self._placements += 1
        self._cache[customer] = (now + PROVISION_CACHE_SECONDS, row)
        return row

    def forget(self, customer: str | None) -> None:
        """Drop a customer's cached provision (call after the COMMIT that changed it)."""
        if customer is not None:
            self._cache.pop(customer, None)
            self._placements += 1

    def placement_version(self) -> int:
        """A number that changes whenever `entitled_tier` or `usage_period` may answer otherwise than before for a
        customer they answered because a provision changed: one forgotten after a change, one found changed when
        read again, the cache emptied. (What time alone changes, `usage_period` says in its answer's `until`.)
        Metering reuses a customer's period and terms across batches while it stays the same."""
        return self._placements

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
          in that month (usage before it belonged to the subscription).

        The answer changes at those moments without the provision changing (a cancellation taking effect, the
        period starting): the first of them after `timestamp` inside the period is its `until`."""
        row = self.provision(customer)
        period = self._usage_period(row, timestamp)
        if row is None:
            return period
        moments = (row.cancel_at, row.current_period_start, row.current_period_end, row.ended_at)
        changes = [int(m) for m in moments if m is not None and timestamp < m < period.end]
        return replace(period, until=min(changes)) if changes else period

    def _usage_period(self, row: Provision | None, timestamp: int) -> UsagePeriod:
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
        commitment_end = commitment_end_of(current, self._pricing)
        period_end = period_end_of(current)
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

    # --- applying events (inside the writer's transaction): services/webhook_events.py ProvisionEvents -----------

    def apply_event(self, tx: Tx, event: dict[str, Any]) -> Applied:
        """Apply `event` to its customer's provision inside the writer's transaction `tx` (a synthetic event after
        an API call, or a webhook's: see ProvisionEvents)."""
        return self.provisions.apply(tx, event)


def _iso(epoch: int | None) -> str | None:
    return utc_iso(epoch) if epoch else None
