"""routes.py: one table of HTTP routes, served the same by `serve --http` and the companion app beside stdio."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from aims_billing_mcp.app import BillingServer
from aims_billing_mcp.http_transport import build_http_app
from aims_billing_mcp.routes import authenticates_itself, build_companion_app, http_routes

pytestmark = pytest.mark.anyio

ROUTES = [(method, route.path.replace("{session_id}", "cs_x")) for route in http_routes(lambda: None)
          for method in route.methods if method != "HEAD"]


def test_the_table_declares_every_route_once() -> None:
    declared = [(method, route.path) for route in http_routes(lambda: None) for method in route.methods]
    assert len(declared) == len(set(declared))
    assert {path for _, path in ROUTES} >= {"/webhooks/stripe", "/x402/credits", "/v1/usage/events",
                                            "/.well-known/acp.json", "/acp/checkout_sessions/cs_x/complete"}


def apps(server: BillingServer) -> dict[str, Any]:
    return {"serve --http": build_http_app(server, host="127.0.0.1", token="operator-token"),
            "companion": build_companion_app(lambda: None)}


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_both_http_servers_serve_every_route_of_the_table_without_the_mcp_token(
        server: BillingServer, method: str, path: str) -> None:
    for name, app in apps(server).items():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
            answer = await http.request(method, path, content=b"{}" if method == "POST" else None)
        # the route's own handler answers (the state is not built: 503 starting, or its own refusal), never
        # "no such route" nor the MCP token's 401
        assert answer.status_code not in (401, 404, 405), (name, answer.status_code, answer.text)


@pytest.mark.parametrize(("path", "own"), [("/webhooks/stripe", True), ("/acp/checkout_sessions/cs_1/cancel", True),
                                           ("/acp/mcp", True), ("/x402/credits", True), ("/mcp", False),
                                           ("/x402/other", False), ("/acp/checkout_sessions/cs_1/refund", False)])
def test_only_the_routes_of_the_table_and_acps_mcp_binding_authenticate_themselves(path: str, own: bool) -> None:
    assert authenticates_itself(path) is own


async def test_a_path_outside_the_table_needs_the_mcp_token(server: BillingServer) -> None:
    app = build_http_app(server, host="127.0.0.1", token="operator-token")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
        assert (await http.get("/x402/other")).status_code == 401


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_a_method_the_table_does_not_declare_on_a_direct_route_goes_to_the_app_not_the_endpoint(
        server: BillingServer, method: str) -> None:
    assert next(route for route in http_routes(lambda: None) if route.path == "/webhooks/stripe").direct

    for name, app in apps(server).items():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
            answer = await http.request(method, "/webhooks/stripe")
        # the app's router answers (405; serve --http's MCP mount under "/" says 404), not the endpoint's 503
        assert answer.status_code in (404, 405), (name, answer.status_code, answer.text)
