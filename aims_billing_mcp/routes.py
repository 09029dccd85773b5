"""Every HTTP route served beside MCP, declared once; `serve --http` (http_transport.py: first in its top-level
app) and the companion app beside a stdio server (and the in-process target of the embedded sandbox's webhooks)
serve the same table (`starlette_routes`).

| route                                   | methods    | handler            | the caller proves who it is with       |
|-----------------------------------------|------------|--------------------|----------------------------------------|
| /webhooks/stripe                        | POST       | webhooks.py        | Stripe-Signature                       |
| /x402/credits                           | GET        | x402_http.py       | an x402 payment                        |
| /.well-known/acp.json, /acp/checkout_.. | GET, POST  | acp_http.py        | an ACP API key (discovery: nothing)    |
| /v1/usage/events                        | POST       | ingest_http.py     | an ingest key                          |
| /acp/mcp (ACP's MCP binding, mounted)   | GET, POST  | acp_mcp.py         | an ACP API key                         |

None of them takes the MCP bearer token (`AIMS_BILLING_HTTP_TOKEN`): `authenticates_itself(path)` is how the
token check in http_transport.py lets them through. Every app is wrapped in the HttpGuard (http_guard.py: limits,
read-only and the allow-list, audit).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, compile_path

from .acp_http import acp_routes
from .acp_mcp import MCP_PATH
from .http_guard import INGEST_PATH, HttpGuard, HttpPolicy
from .ingest_http import ingest_handler
from .webhooks import WEBHOOK_PATH, WebhookEndpoint, is_loopback
from .x402_http import CREDITS_PATH, credits_handler

if TYPE_CHECKING:
    from .state import AppState

GetState = Callable[[], "AppState | None"]
Endpoint = Callable[[Request], Awaitable[Response]]
Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HttpRoute:
    path: str
    methods: tuple[str, ...]
    endpoint: Endpoint | Asgi  # a function of a Request; with `direct`, an ASGI app (an object, not a function)
    auth: str  # what the caller proves itself with (never the MCP bearer token)
    direct: bool = False  # served by DirectRoutes, ahead of the Starlette app


def http_routes(get_state: GetState) -> list[HttpRoute]:
    """The routes over the state `get_state` returns when a request comes (503 while it is None: starting)."""
    return [
        HttpRoute(WEBHOOK_PATH, ("POST",), WebhookEndpoint(get_state), "Stripe-Signature", direct=True),
        HttpRoute(CREDITS_PATH, ("GET",), credits_handler(get_state), "x402 payment"),
        *(HttpRoute(route.path, tuple(sorted(route.methods or ())), route.endpoint, "ACP API key")
          for route in acp_routes(get_state)),
        HttpRoute(INGEST_PATH, ("POST",), ingest_handler(get_state), "ingest key"),
    ]


_SELF_AUTHENTICATED = (*(compile_path(route.path)[0] for route in http_routes(lambda: None)),
                       re.compile(f"^{re.escape(MCP_PATH)}/?$"))


def authenticates_itself(path: str) -> bool:
    """A route of the table (or ACP's MCP binding): served without the MCP bearer token."""
    return any(pattern.match(path) for pattern in _SELF_AUTHENTICATED)


def acp_mcp_app(get_state: GetState, policy: HttpPolicy, **options: Any) -> tuple[Any, Any]:
    """ACP's MCP binding on /acp/mcp (its write tools off where the policy says so): (server, its HTTP app). The
    server's session manager must run in the lifespan of the app it is mounted in."""
    from .acp_mcp import build_acp_mcp_server

    server = build_acp_mcp_server(get_state)
    for name in policy.acp_mcp_tools_off():
        server.remove_tool(name)
    return server, server.streamable_http_app(streamable_http_path=MCP_PATH, **options)


def starlette_routes(table: list[HttpRoute]) -> list[Route]:
    """The table as Starlette routes: the companion app's, and the first routes of `serve --http`'s top-level app
    (matched before the MCP app's mount, so a webhook is not routed through a second Starlette app)."""
    return [Route(route.path, route.endpoint, methods=list(route.methods)) for route in table]


class DirectRoutes:
    """The table's ASGI endpoints (the webhook's), served as soon as the method and exact path match, before the
    app: no router, Request, Response or exception middleware for the busiest route. Anything else (another
    method on the path: 405) goes to the app, which has the same routes."""

    def __init__(self, app: Asgi, table: list[HttpRoute]) -> None:
        self.app = app
        self._direct = {(method, route.path): cast(Asgi, route.endpoint)
                        for route in table if route.direct for method in route.methods}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        endpoint = self._direct.get((scope.get("method", ""), scope.get("path", ""))) if scope["type"] == "http" \
            else None
        await (endpoint or self.app)(scope, receive, send)


def build_companion_app(get_state: GetState, *, with_acp_mcp: bool = False, policy: HttpPolicy | None = None,
                        host: str = "127.0.0.1") -> Any:
    """The routes as an app of their own, behind the HttpGuard (`host` is where it listens): beside a stdio server
    (`with_acp_mcp` adds ACP's MCP binding, its session manager run in this app's lifespan), and as the target the
    embedded sandbox delivers its signed webhooks to."""
    policy = policy or HttpPolicy()
    table = http_routes(get_state)
    routes: list[Any] = starlette_routes(table)

    def guarded(app: Any) -> Any:
        return HttpGuard(DirectRoutes(app, table), get_state=get_state, policy=policy, loopback=is_loopback(host))

    if not with_acp_mcp:
        return guarded(Starlette(routes=routes))
    acp_server, acp_app = acp_mcp_app(get_state, policy)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        async with acp_server.session_manager.run():
            yield

    return guarded(Starlette(routes=[*routes, *acp_app.routes], lifespan=lifespan))
