"""What a tool reaches through its Context: the services the server's lifespan built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mcp.server.mcpserver import Context

if TYPE_CHECKING:
    from ..services.acp import AcpService
    from ..services.catalog import CatalogService
    from ..services.commerce import PaymentSessionService
    from ..services.connect import ConnectService
    from ..services.idempotency import IdempotencyService
    from ..services.ledger import LedgerService
    from ..services.meter_flusher import MeterFlusher
    from ..services.metering import MeteringService
    from ..services.subscriptions import SubscriptionService
    from ..services.tiers import Pricing
    from ..services.webhook_events import WebhookEventService
    from ..services.x402 import X402Service
    from ..settings import Settings
    from ..store import Store
    from ..stripe_gateway import StripeGateway


@dataclass
class AppState:
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
    commerce: PaymentSessionService
    acp: AcpService
    connect: ConnectService


ToolContext = Context[AppState, Any]


def services(ctx: ToolContext) -> AppState:
    return ctx.request_context.lifespan_context
