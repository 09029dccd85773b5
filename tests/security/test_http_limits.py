"""Security promises of the HTTP side (issue 12 items 7, 10 and F; issue 18 item 7), one test per promise:
every route has a body cap answered 413 before the rest is read, signed events of odd shape are refused, the
sandbox's public webhook secret is refused off loopback, and read-only mode holds on every HTTP surface."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from aims_billing_mcp.http_guard import LIMITS, limit_for
from aims_billing_mcp.http_transport import build_http_app
from aims_billing_mcp.sandbox import SANDBOX_WEBHOOK_SECRET, call_asgi
from aims_billing_mcp.stripe_gateway import sign_webhook_payload
from aims_billing_mcp.webhooks import build_webhook_app
from tests.conftest import serving_http

pytestmark = pytest.mark.anyio
MIB = 1024 * 1024


@pytest.fixture
async def served(make_server: Callable[..., Any]) -> AsyncIterator[tuple[str, Any]]:
    """`serve --http` on a free loopback port (bearer token set, as a deployment would)."""
    server = make_server()
    async with serving_http(server, token="mcp-token") as base:
        yield base, server


async def raw_exchange(base: str, head: str, body_prefix: bytes = b"") -> tuple[int, bytes]:
    """Send a request head and only `body_prefix` of its body, then read the answer: an answer that arrives proves
    the server did not wait for (read) the rest."""
    host, port = base.removeprefix("http://").split(":")
    with anyio.fail_after(10):
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(head.replace("\n", "\r\n").encode() + b"\r\n" + body_prefix)
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            head_bytes, _, rest = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head_bytes.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(rest) < length:
                rest += await stream.receive()
    return int(head_bytes.split(b" ")[1]), rest


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/webhooks/stripe"),
    ("POST", "/acp/checkout_sessions"),
    ("POST", "/acp/checkout_sessions/cs_1/complete"),
    ("POST", "/acp/mcp"),
    ("POST", "/mcp"),
    ("GET", "/x402/credits?agent_id=a&luc=5"),
    ("POST", "/anything/else"),
])
async def test_a_body_declared_above_the_route_cap_is_answered_413_before_the_body_is_read(
    served: tuple[str, Any], method: str, path: str
) -> None:
    base, server = served
    declared = 64 * MIB
    status, body = await raw_exchange(
        base, f"{method} {path} HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
              f"Content-Length: {declared}\n", b"{")
    assert status == 413
    assert "request_too_large" in body.decode() or "above" in body.decode()
    assert server.state.store.query("SELECT COUNT(*) AS n FROM webhook_events") == [{"n": 0}]


async def test_a_body_without_length_is_read_only_up_to_the_cap_then_answered_413() -> None:
    cap = limit_for("/webhooks/stripe").body
    chunk = b"x" * (64 * 1024)
    read = 0

    async def endless_body() -> dict[str, Any]:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/webhooks/stripe", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    with anyio.fail_after(10):
        await build_webhook_app(lambda: None)(scope, endless_body, send)
    assert sent[0]["status"] == 413
    assert read == cap // len(chunk) + 1  # one chunk past the cap, not one more


async def test_every_capped_route_keeps_its_cap_under_a_few_mebibytes() -> None:
    assert all(limit.body <= MIB and limit.headers <= 16 * 1024 for limit in LIMITS)
    assert limit_for("/some/new/route").body <= 64 * 1024


async def test_a_signed_event_above_the_webhook_cap_is_refused_and_not_stored(served: tuple[str, Any]) -> None:
    _, server = served
    payload = json.dumps({"id": "evt_big", "type": "invoice.paid", "created": 1, "data": {"object": {
        "customer": "cus_A", "padding": "x" * (2 * MIB)}}})
    app = build_webhook_app(lambda: server.state)
    _, status, _ = await call_asgi(app, "POST", "http://127.0.0.1/webhooks/stripe", {
        "Stripe-Signature": sign_webhook_payload(payload, SANDBOX_WEBHOOK_SECRET),
        "Content-Type": "application/json"}, payload)
    assert status == 413
    assert server.state.store.query("SELECT COUNT(*) AS n FROM webhook_events") == [{"n": 0}]


@pytest.mark.parametrize(("case", "headers", "query"), [
    ("a 20 KiB payment header", {"PAYMENT-SIGNATURE": "x" * 20_000}, "agent_id=a&luc=5"),
    ("a 5,000-digit luc", {}, "agent_id=a&luc=" + "9" * 5000),
])
async def test_oversized_x402_headers_and_queries_are_refused_before_the_handler(
    served: tuple[str, Any], case: str, headers: dict[str, str], query: str
) -> None:
    _, server = served
    app = build_webhook_app(lambda: server.state)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
        response = await http.get(f"/x402/credits?{query}", headers=headers)
    assert response.status_code in (414, 431), case
    assert response.json()["error"] in ("uri_too_long", "request_headers_too_large")
    assert server.state.store.query("SELECT COUNT(*) AS n FROM x402_quotes") == [{"n": 0}]


def signed_event(secret: str = SANDBOX_WEBHOOK_SECRET) -> tuple[str, dict[str, str]]:
    payload = json.dumps({"id": "evt_free_money", "type": "payment_intent.succeeded", "created": 1, "data": {
        "object": {"id": "pi_1", "status": "succeeded", "amount_received": 100, "currency": "usd"}}})
    return payload, {"Stripe-Signature": sign_webhook_payload(payload, secret), "Content-Type": "application/json"}


@pytest.mark.parametrize(("case", "host", "peer"), [
    ("companion app bound off loopback", "0.0.0.0", "127.0.0.1"),
    ("a peer from another host", "127.0.0.1", "203.0.113.9"),
])
async def test_the_companion_endpoint_refuses_sandbox_signed_events_off_loopback(
    make_server: Callable[..., Any], case: str, host: str, peer: str
) -> None:
    server = make_server()
    async with Client(server):
        app = build_webhook_app(lambda: server.state, host=host)
        payload, headers = signed_event()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(peer, 4000)),
                                     base_url="http://h") as http:
            response = await http.post("/webhooks/stripe", content=payload, headers=headers)
        stored = server.state.store.query("SELECT id FROM webhook_events")
    assert response.status_code == 403, case
    assert "STRIPE_WEBHOOK_SECRET" in response.json()["error"]
    assert stored == []


async def test_serve_http_bound_off_loopback_refuses_sandbox_signed_events_and_takes_its_own_secret(
    make_server: Callable[..., Any]
) -> None:
    results = []
    for secret in (None, "whsec_operator_own_secret"):
        server = make_server(**({"stripe_webhook_secret": secret} if secret else {}))
        async with Client(server):
            app = build_http_app(server, host="0.0.0.0", token="mcp-token")
            payload, headers = signed_event(secret or SANDBOX_WEBHOOK_SECRET)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://h") as http:
                results.append((await http.post("/webhooks/stripe", content=payload, headers=headers)).status_code)
    assert results == [403, 200]


async def test_a_sandbox_signed_event_from_loopback_is_accepted(make_server: Callable[..., Any]) -> None:
    server = make_server()
    async with Client(server):
        payload, headers = signed_event()
        _, status, _ = await call_asgi(build_webhook_app(lambda: server.state), "POST",
                                       "http://127.0.0.1/webhooks/stripe", headers, payload)
    assert status == 200
