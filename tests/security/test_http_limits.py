"""Security promises of the HTTP side (issue 12 items 7, 10 and F; issue 18 item 7), one test per promise:
every route has a body cap answered 413 before the rest is read, signed events of odd shape are refused, the
sandbox's public webhook secret is refused off loopback, and read-only mode holds on every HTTP surface."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from aims_billing_mcp.http_guard import LIMITS, limit_for
from aims_billing_mcp.http_transport import build_http_app
from aims_billing_mcp.routes import build_companion_app
from aims_billing_mcp.sandbox import SANDBOX_WEBHOOK_SECRET, call_asgi
from aims_billing_mcp.store import Store
from aims_billing_mcp.webhooks import sign_webhook_payload
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
        await build_companion_app(lambda: None)(scope, endless_body, send)
    assert sent[0]["status"] == 413
    assert read == cap // len(chunk) + 1  # one chunk past the cap, not one more


async def test_every_capped_route_keeps_its_cap_under_a_few_mebibytes() -> None:
    assert all(limit.body <= MIB and limit.headers <= 16 * 1024 for limit in LIMITS)
    assert limit_for("/some/new/route").body <= 64 * 1024


async def test_a_signed_event_above_the_webhook_cap_is_refused_and_not_stored(served: tuple[str, Any]) -> None:
    _, server = served
    payload = json.dumps({"id": "evt_big", "type": "invoice.paid", "created": 1, "data": {"object": {
        "customer": "cus_A", "padding": "x" * (2 * MIB)}}})
    app = build_companion_app(lambda: server.state)
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
    app = build_companion_app(lambda: server.state)
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
        app = build_companion_app(lambda: server.state, host=host)
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
        _, status, _ = await call_asgi(build_companion_app(lambda: server.state), "POST",
                                       "http://127.0.0.1/webhooks/stripe", headers, payload)
    assert status == 200


# --- read-only mode and the allow-list on every HTTP surface (issue 18 item 7), and their audit rows -------------

ACP_KEY = "platform-key"
CART = {"currency": "usd", "line_items": [{"id": "luc_10k"}], "capabilities": {}, "metadata": {"agent_id": "buyer"}}


def acp_headers(idempotency_key: str = "k-1", key: str | None = ACP_KEY) -> dict[str, str]:
    headers = {"API-Version": "2026-04-17", "Content-Type": "application/json", "Idempotency-Key": idempotency_key}
    return {**headers, "Authorization": f"Bearer {key}"} if key else headers


def table(path: Any, sql: str) -> list[dict[str, Any]]:
    """Rows read after the server stopped (every queued audit row committed)."""
    store = Store(path)
    try:
        return store.query(sql)
    finally:
        store.close()


@pytest.fixture
def read_only_server(make_server: Callable[..., Any]) -> Any:
    return make_server(aims_billing_read_only=True, aims_billing_acp_api_keys=[ACP_KEY])


@pytest.fixture
async def read_only(read_only_server: Any) -> AsyncIterator[str]:
    async with serving_http(read_only_server, token="mcp-token") as base:
        yield base


async def committed(server: Any) -> None:
    """Until the writes the server queued so far (its audit rows, queued without waiting) are committed: the writer
    takes jobs in order, so an empty job answered after them."""
    await server.state.store.write(lambda tx: None)


async def test_read_only_refuses_x402_credits_with_and_without_a_payment_and_credits_nothing(
    read_only: str, read_only_server: Any, make_settings: Callable[..., Any]
) -> None:
    async with httpx.AsyncClient(base_url=read_only) as http:
        anonymous = await http.get("/x402/credits", params={"agent_id": "a", "luc": 5000})
        paying = await http.get("/x402/credits", params={"agent_id": "a", "luc": 5000},
                                headers={"PAYMENT-SIGNATURE": "eyJ4NDAyVmVyc2lvbiI6Mn0="})
    await committed(read_only_server)
    db = make_settings().aims_billing_db
    assert (anonymous.status_code, paying.status_code) == (403, 403)
    assert anonymous.json()["error"] == "read_only" and "AIMS_BILLING_READ_ONLY" in anonymous.json()["message"]
    assert table(db, "SELECT id FROM x402_quotes") == [] and table(db, "SELECT id FROM x402_receipts") == []
    rows = table(db, "SELECT tool, outcome, error_code FROM audit_log")
    assert rows == [{"tool": "http:GET /x402/credits", "outcome": "error", "error_code": "read_only"}]


async def test_read_only_refuses_acp_writes_in_acps_error_shape_and_keeps_reads_open(
    read_only: str, read_only_server: Any, make_settings: Callable[..., Any]
) -> None:
    async with httpx.AsyncClient(base_url=read_only) as http:
        create = await http.post("/acp/checkout_sessions", json=CART, headers=acp_headers())
        cancel = await http.post("/acp/checkout_sessions/cs_x/cancel", json={}, headers=acp_headers("k-2"))
        stranger = await http.post("/acp/checkout_sessions", json=CART, headers=acp_headers("k-3", key="wrong"))
        read = await http.get("/acp/checkout_sessions/cs_nope", headers=acp_headers())
    await committed(read_only_server)
    db = make_settings().aims_billing_db
    assert (create.status_code, cancel.status_code, stranger.status_code) == (403, 403, 401)
    assert create.json()["type"] == "invalid_request" and create.json()["code"] == "read_only"
    assert read.status_code == 404  # a read is served (the session does not exist)
    assert table(db, "SELECT id FROM acp_checkout_sessions") == []
    assert table(db, "SELECT id FROM payment_sessions") == []
    tools = [row["tool"] for row in table(db, "SELECT tool FROM audit_log ORDER BY id")]
    assert "http:POST /acp/checkout_sessions" in tools and "http:POST /acp/checkout_sessions/{id}/cancel" in tools
    assert len([t for t in tools if t == "http:POST /acp/checkout_sessions"]) == 1  # the stranger left no row


async def test_read_only_acp_mcp_binding_serves_only_its_read_tool(read_only: str) -> None:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {ACP_KEY}"})
    async with Client(streamable_http_client(f"{read_only}/acp/mcp", http_client=http)) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
    assert names == {"get_checkout_session"}


async def test_read_only_keeps_accepting_stripe_webhooks(read_only: str) -> None:
    payload = json.dumps({"id": "evt_ro", "type": "invoice.paid", "created": 1, "data": {"object": {}}})
    async with httpx.AsyncClient(base_url=read_only) as http:
        response = await http.post("/webhooks/stripe", content=payload, headers={
            "Stripe-Signature": sign_webhook_payload(payload, SANDBOX_WEBHOOK_SECRET)})
    assert response.status_code == 200


async def test_an_allow_list_without_the_governing_tools_turns_x402_and_the_acp_seller_off(
    make_server: Callable[..., Any]
) -> None:
    server = make_server(aims_billing_tools=["list_tiers", "get_agent_wallet"], aims_billing_acp_api_keys=[ACP_KEY])
    async with serving_http(server, token="mcp-token") as base, httpx.AsyncClient(base_url=base) as http:
        x402 = await http.get("/x402/credits", params={"agent_id": "a", "luc": 5000})
        acp = await http.post("/acp/checkout_sessions", json=CART, headers=acp_headers())
        binding = await http.post("/acp/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "initialize"},
                                  headers={"Authorization": f"Bearer {ACP_KEY}"})
    assert (x402.status_code, acp.status_code, binding.status_code) == (403, 403, 403)
    assert "purchase_luc_credits" in x402.json()["message"]
    assert "create_payment_session" in acp.json()["message"]


async def test_acp_requests_leave_audit_rows_redacted_and_truncated_and_anonymous_ones_none(
    make_server: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    server = make_server(aims_billing_acp_api_keys=[ACP_KEY])
    cart = {**CART, "metadata": {"agent_id": "buyer", "note": "n" * 10_000,
                                 "leak": "sk_test_4eC39HqLyjWDarjtT1zdp7dcAAAA"}}
    async with serving_http(server, token="mcp-token") as base, httpx.AsyncClient(base_url=base) as http:
        await http.post("/acp/checkout_sessions", json=cart, headers=acp_headers())
        await http.post("/acp/checkout_sessions", json=cart, headers=acp_headers("k-2", key=None))
        binding = httpx2.AsyncClient(headers={"Authorization": f"Bearer {ACP_KEY}"})
        async with Client(streamable_http_client(f"{base}/acp/mcp", http_client=binding)) as client:
            with pytest.raises(MCPError, match="no checkout session"):
                await client.call_tool("get_checkout_session", {"meta": {"api_version": "2026-04-17"}, "id": "cs_x"})
    rows = table(make_settings().aims_billing_db, "SELECT * FROM audit_log")
    [call] = [r for r in rows if r["tool"] == "http:POST /acp/mcp"]
    assert '"get_checkout_session"' in call["arguments"] and call["caller"].startswith("acp:")
    [row] = [r for r in rows if r["tool"].startswith("http:") and r is not call]
    assert row["tool"] == "http:POST /acp/checkout_sessions" and row["caller"].startswith("acp:")
    assert ACP_KEY not in row["caller"] and ACP_KEY not in row["arguments"]
    assert "[truncated: 10,000 characters]" in row["arguments"]
    assert "n" * 5000 not in row["arguments"]
    assert "sk_test_4eC39HqLyjWDarjtT1zdp7dc" not in row["arguments"]


@pytest.mark.parametrize(("length", "status"), [("9" * 5000, 413), ("12abc", 400)])
async def test_an_absurd_content_length_is_answered_4xx_not_500(length: str, status: int) -> None:
    _, answered, _ = await call_asgi(build_companion_app(lambda: None), "POST", "http://127.0.0.1/webhooks/stripe",
                                     {"Content-Length": length}, b"")
    assert answered == status
