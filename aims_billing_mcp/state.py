"""The composition root: the one place the service graph is built, from the settings plus a few overrides.

The server's lifespan (app.py), every CLI command (cli.py) and the tests (tests/conftest.py) build their graph here,
so the wiring exists once. Every service gets its dependencies as constructor arguments; none reaches through
another for them, and none registers callbacks on another: what happens when a payment succeeds (credit a pack,
start a tier, settle an ACP order) is the fulfilment registry (services/fulfilment.py), built and filled here.

    with open_state(settings) as state:        # a CLI command (sync); `async with` inside a running loop
        ...

Overrides, for tests and tools: `store` and `gateway` (taken as given, and then not closed here), `sandbox_app` (the
embedded sandbox to talk to), `clock` (every service's time), `retry_delay_scale` (0: no waiting between retries),
`agent_limit` (wallets a customer may hold; by default its tier's). Anything else is a setting: build the settings
with it (`Settings(aims_billing_db=..., stripe_api_base=...)`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .sandbox import SANDBOX_WEBHOOK_SECRET
from .services.acp import AcpService
from .services.catalog import CatalogService
from .services.ceiling import Ceiling
from .services.commerce import PaymentSessionService
from .services.connect import ConnectService
from .services.fulfilment import Fulfilment
from .services.idempotency import IdempotencyService
from .services.ledger import LedgerService
from .services.meter_flusher import MeterFlusher
from .services.metering import MeteringService
from .services.mutations import StripeMutations
from .services.prepaid import PrepaidSubscriptions
from .services.subscriptions import SubscriptionService
from .services.tiers import Pricing
from .services.webhook_events import WebhookEventService
from .services.x402 import X402Service
from .settings import Settings, StripeMode
from .store import Store, open_store
from .stripe_gateway import StripeGateway, build_gateway


@dataclass
class AppState:
    """The built graph: what a tool reaches through its Context, and what HTTP routes and CLI commands use."""

    settings: Settings
    store: Store
    gateway: StripeGateway
    idempotency: IdempotencyService
    catalog: CatalogService
    pricing: Pricing
    subscriptions: SubscriptionService
    webhook_events: WebhookEventService
    webhook_secret: str | None
    ledger: LedgerService
    metering: MeteringService
    flusher: MeterFlusher
    x402: X402Service
    prepaid: PrepaidSubscriptions
    fulfilment: Fulfilment
    commerce: PaymentSessionService
    acp: AcpService
    connect: ConnectService
    owns_store: bool = True  # built here (closed with the state), not handed in
    owns_gateway: bool = True


def build_state(
    settings: Settings, *, sandbox_app: Any = None, retry_delay_scale: float = 1.0, store: Store | None = None,
    gateway: StripeGateway | None = None, clock: Callable[[], float] = time.time,
    agent_limit: Callable[[str], int | None] | None = None,
) -> AppState:
    """The whole graph (see the module docstring for the overrides). Nothing talks to Stripe yet."""
    pricing = Pricing.load(settings.aims_billing_pricing)
    owns_store, owns_gateway = store is None, gateway is None
    store = store if store is not None else open_store(settings.aims_billing_db, settings.database_url,
                                                      writers=settings.aims_billing_database_writers)
    gateway = gateway if gateway is not None else build_gateway(settings, sandbox_app=sandbox_app,
                                                                retry_delay_scale=retry_delay_scale)
    idempotency = IdempotencyService(store, replay_window_seconds=settings.aims_billing_replay_window_seconds)
    mutations = StripeMutations(gateway, idempotency)
    ceiling = Ceiling.from_settings(settings)  # one per-call money ceiling for every path (services/ceiling.py)
    subscriptions = SubscriptionService(mutations, store, pricing, settings, gateway=gateway, ceiling=ceiling)

    def tier_agents(customer: str) -> int | None:
        tier = subscriptions.entitled_tier(customer)
        return settings.aims_billing_p2p_agents if tier.id == pricing.p2p.id else tier.agents

    ledger = LedgerService(store, luc_per_usd=pricing.luc_per_usd, agent_limit=agent_limit or tier_agents,
                           ceiling=ceiling, clock=clock)
    connect = ConnectService(store, mutations, gateway=gateway, idempotency=idempotency)  # marketplace splits
    fulfilment = Fulfilment()
    prepaid = PrepaidSubscriptions(store, gateway, subscriptions, pricing, fulfilment=fulfilment, clock=clock,
                                   retry_delay_scale=retry_delay_scale)
    commerce = PaymentSessionService(store, mutations, ledger, pricing, gateway=gateway, idempotency=idempotency,
                                     ceiling=ceiling, prepaid=prepaid, fulfilment=fulfilment, clock=clock,
                                     connect=connect)
    fulfilment.register("payment_session", commerce.seller())
    fulfilment.register("connect", connect.seller())  # creators' separate transfers after a sale's COMMIT
    acp = _acp_seller(
        store, commerce, pricing, ledger, prepaid, gateway, fulfilment,
        api_keys={key.get_secret_value() for key in settings.aims_billing_acp_api_keys},
        public_url=settings.aims_billing_public_url, signing_secret=settings.aims_billing_acp_signing_secret,
        order_webhook_url=settings.aims_billing_acp_order_webhook_url,
        order_webhook_secret=settings.aims_billing_acp_order_webhook_secret, retry_delay_scale=retry_delay_scale,
        clock=clock)
    return AppState(
        settings=settings, store=store, gateway=gateway, idempotency=idempotency, pricing=pricing,
        catalog=CatalogService(mutations, gateway=gateway, ceiling=ceiling, connect=connect),
        subscriptions=subscriptions, webhook_events=WebhookEventService(store, subscriptions, commerce, connect),
        webhook_secret=_webhook_secret(settings, gateway),
        ledger=ledger,
        metering=MeteringService(store, pricing, tier_of=subscriptions.entitled_tier,
                                 period_of=subscriptions.usage_period, customer_exists=subscriptions.customer_exists,
                                 ceiling=ceiling, clock=clock, placements=subscriptions.placement_version),
        flusher=MeterFlusher(store, gateway, retry_delay_scale=retry_delay_scale, currency=pricing.currency,
                             clock=clock),
        x402=X402Service.from_settings(store, ledger, gateway, pricing, settings, clock=clock, ceiling=ceiling,
                                       connect=connect),
        prepaid=prepaid, fulfilment=fulfilment, commerce=commerce, acp=acp, connect=connect,
        owns_store=owns_store, owns_gateway=owns_gateway,
    )


def acp_seller(state: AppState, **options: Any) -> AcpService:
    """Another ACP seller over the state's payment sessions (tests build sellers with their own keys, clocks and
    order webhooks), registered as the `acp` source of fulfilment in place of the state's own."""
    return _acp_seller(state.store, state.commerce, state.pricing, state.ledger, state.prepaid, state.gateway,
                       state.fulfilment, **options)


def _acp_seller(store: Store, commerce: PaymentSessionService, pricing: Pricing, ledger: LedgerService,
                prepaid: PrepaidSubscriptions, gateway: StripeGateway, fulfilment: Fulfilment, *,
                api_keys: set[str], **options: Any) -> AcpService:
    acp = AcpService(store, commerce, pricing, ledger=ledger, prepaid=prepaid, gateway=gateway, api_keys=api_keys,
                     **options)
    fulfilment.register("acp", acp.seller())
    return acp


def _webhook_secret(settings: Settings, gateway: StripeGateway) -> str | None:
    """What Stripe's webhooks are verified with: STRIPE_WEBHOOK_SECRET, or the sandbox's own in sandbox mode."""
    if settings.stripe_webhook_secret is not None:
        return settings.stripe_webhook_secret.get_secret_value()
    return SANDBOX_WEBHOOK_SECRET if gateway.mode is StripeMode.SANDBOX else None


async def close_state(state: AppState) -> None:
    """Close what the state opened (not what it was handed)."""
    try:
        if state.owns_gateway:
            await state.gateway.close()
    finally:
        if state.owns_store:
            state.store.close()


def _run_alone(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` to the end on a loop of its own: here, or, when this thread already runs a loop (a command called
    from async code, as tests do), in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(work)
        return
    failed: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(work)
        except BaseException as exc:  # handed back to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="close-state")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def open_state(settings: Settings, **overrides: Any) -> OpenState:
    """The graph for the length of a block, closed after it: `with` in synchronous code (a CLI command), `async
    with` on a running loop (the server's lifespan, tests). `overrides` are build_state's."""
    return OpenState(settings, **overrides)


class OpenState:
    """What open_state returns: builds the graph on entering, closes it on leaving."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self._settings = settings
        self._overrides = overrides
        self._state: AppState | None = None

    def _open(self) -> AppState:
        self._state = build_state(self._settings, **self._overrides)
        return self._state

    def __enter__(self) -> AppState:
        return self._open()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._state is not None:
            _run_alone(close_state(self._state))

    async def __aenter__(self) -> AppState:
        return self._open()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        if self._state is not None:
            await close_state(self._state)
