"""Serving over HTTP: `serve --http` (the MCP app and the routes.py table behind a bearer-token check, served by
uvicorn on loopback by default), and the companion server beside a stdio server (the routes.py table alone on
127.0.0.1:AIMS_BILLING_WEBHOOK_PORT).

A plain ASGI middleware rather than the SDK's OAuth resource-server machinery: an operator's static token is what
ACHEEVY and scripts have, and the check (constant-time compare) is short enough to read in one go. The HttpGuard
(http_guard.py: body and header caps, read-only mode and the allow-list on the HTTP surfaces, audit rows) wraps it.
"""

from __future__ import annotations

import hmac
import json
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.routing import Mount

from .http_guard import HttpGuard, HttpPolicy
from .routes import (
    DirectRoutes,
    acp_mcp_app,
    authenticates_itself,
    build_companion_app,
    http_routes,
    starlette_routes,
)
from .settings import LOOPBACK_HOSTS
from .webhooks import WEBHOOK_PATH

if TYPE_CHECKING:
    from .state import AppState


class BearerTokenMiddleware:
    """The MCP bearer token on every path but the routes that authenticate themselves (routes.py): Stripe signs its
    webhooks, an x402 payment is its own credential, ACP callers and usage ingestion present their own keys."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self._token = token.encode() if token else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(OAUTH_DISCOVERY):
            await _answer(send, 404, {"error": "not_found", "message": NO_OAUTH})
            return
        if scope["type"] != "http" or self._token is None or authenticates_itself(path):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        supplied = headers.get(b"authorization", b"")
        scheme, _, value = supplied.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self._token):
            await self.app(scope, receive, send)
            return
        await _answer(send, 401, {"error": "unauthorized", "message": NO_OAUTH}, [(b"www-authenticate", CHALLENGE)])


# MCP clients that meet a 401 look for OAuth (RFC 9728 / RFC 8414 discovery) unless told otherwise: the challenge
# names the static token, and discovery answers 404, so Inspector and remote connectors ask for a header instead of
# starting an interactive OAuth flow.
OAUTH_DISCOVERY = ("/.well-known/oauth-protected-resource", "/.well-known/oauth-authorization-server",
                   "/.well-known/openid-configuration")
NO_OAUTH = ("this server takes a static bearer token, not OAuth: send Authorization: Bearer <AIMS_BILLING_HTTP_TOKEN> "
            "(Inspector: --header \"Authorization: Bearer $TOKEN\")")
CHALLENGE = (b'Bearer realm="aims-billing-mcp", error="invalid_token", '
             b'error_description="send Authorization: Bearer <AIMS_BILLING_HTTP_TOKEN>; no OAuth"')


async def _answer(send: Any, status: int, body: dict[str, str], headers: list[tuple[bytes, bytes]] = []) -> None:  # noqa: B006
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def build_http_app(server: Any, *, host: str, token: str | None) -> Any:
    if host not in LOOPBACK_HOSTS and not token:
        raise ValueError(f"refusing to serve on {host} without a bearer token: set AIMS_BILLING_HTTP_TOKEN")
    security = None
    if host not in LOOPBACK_HOSTS:  # a real hostname: the token, not the Host header, is the guard
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    bind = host if host in LOOPBACK_HOSTS else "127.0.0.1"
    main = server.streamable_http_app(host=bind, transport_security=security)
    policy: HttpPolicy = getattr(server, "http_policy", None) or HttpPolicy()
    acp_server, acp_app = acp_mcp_app(lambda: server.state, policy, host=bind, transport_security=security)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        # mounted apps' lifespans do not run: run both session managers here (the first enters our lifespan)
        async with server.session_manager.run(), acp_server.session_manager.run():
            yield

    # the routes.py table at the top level, beside the ACP binding: a webhook goes through one router, not a mount
    # into the MCP app's own Starlette app as well
    table = http_routes(lambda: server.state)
    app = Starlette(routes=[*acp_app.routes, *starlette_routes(table), Mount("/", app=main)], lifespan=lifespan)
    return HttpGuard(DirectRoutes(BearerTokenMiddleware(app, token), table), lambda: server.state, policy,
                     loopback=host in LOOPBACK_HOSTS)


def uvicorn_server(server: Any, *, host: str, port: int, token: str | None) -> Any:
    import uvicorn

    app = build_http_app(server, host=host, token=token)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))


async def serve_http(server: Any, *, host: str, port: int, token: str | None) -> None:
    await uvicorn_server(server, host=host, port=port, token=token).serve()


def loopback_socket(port: int) -> socket.socket:
    """A TCP socket bound to 127.0.0.1:port (0: any free port) for uvicorn to serve on. Its protocol is named
    (IPPROTO_TCP, not 0) because asyncio sets TCP_NODELAY only on connections of a socket that says TCP: without it
    every answer, written as headers then body, waited for the client's delayed ACK (Nagle): ~40 ms a request."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


@asynccontextmanager
async def companion_server(get_state: Callable[[], AppState | None], port: int, *,
                           policy: HttpPolicy | None = None) -> AsyncIterator[None]:
    """The routes (routes.py: Stripe's webhooks first) on 127.0.0.1:port beside a stdio server. A taken port is
    reported on stderr and the MCP server keeps serving: tools work, events wait in Stripe's retry queue until the
    endpoint is reachable.
    Only the bind happens before MCP serves (so a taken port is reported at once); uvicorn loads in the background,
    off the time to the first tools/list (the kernel queues connections on the bound socket meanwhile)."""
    try:
        sock = loopback_socket(port)
    except OSError as exc:
        print(f"aims-billing-mcp: webhook port {port} is taken ({exc.strerror}): set AIMS_BILLING_WEBHOOK_PORT to a "
              "free port, or run `serve --no-webhooks`; continuing without the webhook endpoint", file=sys.stderr)
        yield
        return
    sock.listen(128)
    print(f"aims-billing-mcp: webhooks on http://127.0.0.1:{sock.getsockname()[1]}{WEBHOOK_PATH}", file=sys.stderr)
    servers: list[Any] = []

    async def serve() -> None:
        import uvicorn

        web = uvicorn.Server(uvicorn.Config(build_companion_app(get_state, with_acp_mcp=True, policy=policy),
                                            log_level="warning", lifespan="on"))
        servers.append(web)
        await web.serve(sockets=[sock])

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        try:
            yield
        finally:
            for web in servers:
                web.should_exit = True
            if not servers:
                tg.cancel_scope.cancel()
