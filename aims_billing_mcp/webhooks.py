"""`POST /webhooks/stripe`: verify the signature with the SDK, hand the event to the service, answer at once.

Nothing is stored unless the signature verifies (missing, forged or older than 300 s: 400). The same route is
served by `serve --http`, by the companion server `serve` runs beside stdio, and, in sandbox mode, is the
in-process target the embedded sandbox delivers its signed events to.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .services.webhook_events import parse_event
from .stripe_gateway import WebhookSignatureInvalid, verify_webhook_signature

if TYPE_CHECKING:
    from .tools.context import AppState

log = logging.getLogger(__name__)
WEBHOOK_PATH = "/webhooks/stripe"


def webhook_handler(get_state: Callable[[], AppState | None]) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def handle(request: Request) -> JSONResponse:
        state = get_state()
        if state is None:
            return JSONResponse({"error": "the server is starting: retry"}, status_code=503)
        secret = state.webhook_secret
        if secret is None:
            return JSONResponse({"error": "STRIPE_WEBHOOK_SECRET is not set: events cannot be verified"},
                                status_code=503)
        payload = await request.body()
        try:
            verify_webhook_signature(payload, request.headers.get("stripe-signature"), secret)
            event = parse_event(payload)
        except WebhookSignatureInvalid as exc:
            return JSONResponse({"error": f"signature check failed: {exc}"}, status_code=400)
        except ValueError as exc:
            return JSONResponse({"error": f"invalid payload: {exc}"}, status_code=400)
        result = await state.webhook_events.ingest(event, payload)
        return JSONResponse({"received": True, "id": result.event_id, "duplicate": result.duplicate})

    return handle


def webhook_route(get_state: Callable[[], AppState | None]) -> Route:
    return Route(WEBHOOK_PATH, webhook_handler(get_state), methods=["POST"])


def build_webhook_app(get_state: Callable[[], AppState | None], *, with_acp_mcp: bool = False) -> Any:
    """The companion app beside a stdio server: Stripe's webhooks, x402's paid route and the ACP seller (REST, and
    with `with_acp_mcp` its MCP binding on /acp/mcp, whose session manager runs in this app's lifespan)."""
    from .acp_http import acp_routes
    from .x402_http import credits_route

    routes: list[Any] = [webhook_route(get_state), credits_route(get_state), *acp_routes(get_state)]
    if not with_acp_mcp:
        return Starlette(routes=routes)
    from .acp_mcp import MCP_PATH, build_acp_mcp_server

    acp_server = build_acp_mcp_server(get_state)
    acp_app = acp_server.streamable_http_app(streamable_http_path=MCP_PATH)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        async with acp_server.session_manager.run():
            yield

    return Starlette(routes=[*routes, *acp_app.routes], lifespan=lifespan)
