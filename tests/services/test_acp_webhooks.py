"""ACP order webhooks: completing a checkout sends `order_create` to the platform's URL (a real loopback receiver),
signed with `Merchant-Signature: t=<unix>,v1=<hex HMAC-SHA256(t.body)>` as openapi.agentic_checkout_webhook.yaml
says, its payload the spec's WebhookEvent; a failing receiver is retried with backoff, then recorded undelivered."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aims_billing_mcp.services.acp import AcpService
from aims_billing_mcp.services.acp_webhooks import OrderWebhooks, verify_merchant_signature
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from tests.conftest import Clock, commerce_stack, serving_app
from tests.services.test_acp import _VALIDATOR, BUNDLE, KEY, pay
from tests.support.money_invariant import money_kept  # noqa: F401  (autouse: the money invariant after each test)

pytestmark = pytest.mark.anyio

SECRET = "whsec_order_events"
# The WebhookEvent / EventDataOrder schemas of spec/2026-04-17/openapi/openapi.agentic_checkout_webhook.yaml,
# transcribed; EventDataOrder composes the checkout spec's Order (the bundle's $defs/Order).
WEBHOOK_EVENT = {
    **BUNDLE,
    "type": "object", "additionalProperties": False, "required": ["type", "data"],
    "properties": {
        "type": {"type": "string"},
        "data": {"allOf": [{"$ref": "#/$defs/Order"}],
                 "required": ["type", "checkout_session_id", "permalink_url", "status"]},
    },
}


class Receiver:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.requests: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: Request) -> JSONResponse:
        self.requests.append((dict(request.headers), await request.body()))
        if self.fail:
            return JSONResponse({"type": "processing_error", "code": "down", "message": "down"}, status_code=503)
        return JSONResponse({"received": True, "request_id": request.headers.get("request-id")})


@asynccontextmanager
async def receiving(*, fail: bool = False) -> AsyncIterator[tuple[str, Receiver]]:
    receiver = Receiver(fail)
    app = Starlette(routes=[Route("/agentic_checkout/webhooks/order_events", receiver.handle, methods=["POST"])])
    async with serving_app(app, start_within=10) as base:
        yield f"{base}/agentic_checkout/webhooks/order_events", receiver


@asynccontextmanager
async def seller(make_settings: Callable[..., Settings], sandbox_app: Any, store: Store,
                 url: str) -> AsyncIterator[tuple[httpx.AsyncClient, AcpService]]:
    async with (commerce_stack(make_settings(), sandbox_app, store) as stack,
                stack.acp_seller(KEY, clock=Clock(), public_url="https://seller.test", order_webhook_url=url,
                                 order_webhook_secret=SECRET, retry_delay_scale=0.0) as (http, acp)):
        yield http, acp


async def checkout(http: httpx.AsyncClient) -> dict[str, Any]:
    headers = {"API-Version": "2026-04-17", "Authorization": f"Bearer {KEY}"}
    created = await http.post("/acp/checkout_sessions", headers={**headers, "Idempotency-Key": "c1"}, json={
        "currency": "usd", "line_items": [{"id": "luc_10k"}], "capabilities": {}, "metadata": {"agent_id": "buyer"}})
    assert created.status_code == 201, created.text
    done = await http.post(f"/acp/checkout_sessions/{created.json()['id']}/complete",
                           headers={**headers, "Idempotency-Key": "p1"}, json=pay("spt_test_success"))
    assert done.status_code == 200 and done.json()["status"] == "completed", done.text
    body: dict[str, Any] = done.json()
    return body


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.01)


async def test_complete_sends_a_signed_order_create_to_the_platform(
    make_settings: Callable[..., Settings], sandbox_app: Any, store: Store,
) -> None:
    async with receiving() as (url, receiver), seller(make_settings, sandbox_app, store, url) as (http, acp):
        session = await checkout(http)
        await until(lambda: bool(receiver.requests))
        assert acp.order_webhooks is not None
        await acp.order_webhooks.drain()

    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    assert headers["content-type"] == "application/json"
    assert verify_merchant_signature(SECRET, headers["merchant-signature"], body)
    assert not verify_merchant_signature("other-secret", headers["merchant-signature"], body)
    assert not verify_merchant_signature(SECRET, headers["merchant-signature"], body + b" ")
    event = json.loads(body)
    _VALIDATOR(WEBHOOK_EVENT, format_checker=_VALIDATOR.FORMAT_CHECKER).validate(event)
    assert event["type"] == "order_create"
    assert event["data"]["type"] == "order"
    assert event["data"] == {**session["order"], "type": "order"}
    assert event["data"]["checkout_session_id"] == session["id"]
    row = store.query_one("SELECT * FROM acp_order_events WHERE id = ?", (headers["request-id"],))
    assert row is not None
    assert (row["type"], row["order_id"], row["attempts"], row["delivered"], row["gave_up"], row["last_status"]) == (
        "order_create", session["order"]["id"], 1, 1, 0, 200)


async def test_a_failing_receiver_is_retried_then_recorded_undelivered(
    make_settings: Callable[..., Settings], sandbox_app: Any, store: Store,
) -> None:
    async with receiving(fail=True) as (url, receiver), seller(make_settings, sandbox_app, store, url) as (http, acp):
        session = await checkout(http)  # the answer does not wait for the platform
        assert session["status"] == "completed"
        assert acp.order_webhooks is not None
        await until(lambda: bool(store.query_one("SELECT 1 AS x FROM acp_order_events WHERE gave_up = 1")))
        await acp.order_webhooks.drain()

    assert len(receiver.requests) == 4
    assert len({headers["request-id"] for headers, _ in receiver.requests}) == 1  # one event, four attempts
    for headers, body in receiver.requests:
        assert verify_merchant_signature(SECRET, headers["merchant-signature"], body)
    row = store.query_one("SELECT * FROM acp_order_events WHERE order_id = ?", (session["order"]["id"],))
    assert row is not None
    assert (row["type"], row["attempts"], row["delivered"], row["gave_up"], row["last_status"]) == (
        "order_create", 4, 0, 1, 503)
    assert row["delivered_at"] is None and "503" in row["last_error"]


async def test_an_unreachable_platform_is_retried_and_recorded(
    make_settings: Callable[..., Settings], sandbox_app: Any, store: Store,
) -> None:
    async with receiving() as (url, receiver):
        pass  # the port is closed again: nothing listens there
    async with seller(make_settings, sandbox_app, store, url) as (http, acp):
        session = await checkout(http)
        assert acp.order_webhooks is not None
        await until(lambda: bool(store.query_one("SELECT 1 AS x FROM acp_order_events WHERE gave_up = 1")))
        await acp.order_webhooks.drain()
    row = store.query_one("SELECT * FROM acp_order_events WHERE order_id = ?", (session["order"]["id"],))
    assert row is not None and (row["attempts"], row["delivered"], row["last_status"]) == (4, 0, None)
    assert not receiver.requests


async def test_a_webhook_url_without_a_secret_is_refused(store: Store, make_settings: Callable[..., Settings],
                                                         sandbox_app: Any) -> None:
    async with commerce_stack(make_settings(), sandbox_app, store, buyer_wallet=False) as stack:
        with pytest.raises(ValueError, match="MUST be signed"):
            stack.seller({KEY}, order_webhook_url="http://127.0.0.1:9/x")


async def test_an_event_committed_but_not_delivered_is_sent_when_the_server_starts(
    make_settings: Callable[..., Settings], sandbox_app: Any,
) -> None:
    from mcp import Client

    from aims_billing_mcp.app import build_server

    async with receiving() as (url, receiver):
        settings = make_settings(aims_billing_acp_order_webhook_url=url, aims_billing_acp_order_webhook_secret=SECRET)
        pending = Store(settings.aims_billing_db)  # as a crash would leave it: committed, never sent
        outbox = OrderWebhooks(pending, url, SECRET)
        event_id = pending.write_sync(lambda conn: outbox.enqueue(conn, "order_create", {
            "id": "ord_restart", "type": "order", "checkout_session_id": "cs_restart", "permalink_url": url}))
        pending.close()

        async with Client(build_server(settings, sandbox_app=sandbox_app)) as client:
            await client.list_tools()
            await until(lambda: len(receiver.requests) == 1)

    headers, raw = receiver.requests[0]
    assert headers["request-id"] == event_id and json.loads(raw)["data"]["id"] == "ord_restart"


async def test_an_event_another_instance_holds_is_not_sent_until_its_lease_ends_and_its_late_outcome_is_dropped(
    store: Store,
) -> None:
    now = 1_800_000_000.0
    async with receiving() as (url, receiver):
        ours = OrderWebhooks(store, url, SECRET, clock=lambda: now)
        event_id = await store.write(lambda tx: ours.enqueue(tx, "order_create", {
            "id": "ord_1", "type": "order", "checkout_session_id": "cs_1", "permalink_url": url}))
        # the other instance's sender took it first (and then was paused)
        assert await store.write(lambda tx: store.acp.lease_order_events(tx, "other", now, now + 60)) == [event_id]

        assert ours.kick() == [event_id]
        await ours.drain()
        assert receiver.requests == []  # held by the other sender: not sent twice
        now += 60  # the other sender's lease ended: taken over
        ours.kick()
        await ours.drain()

    assert [headers["request-id"] for headers, _ in receiver.requests] == [event_id]
    late = await store.write(lambda tx: store.acp.record_delivery(
        tx, event_id, attempts=1, status=500, error="HTTP 500", delivered=False, gave_up=True, at="late",
        lease="other"))
    row = ours.event(event_id)
    assert late is False and row is not None and (row.delivered, row.gave_up, row.attempts) == (True, False, 1)
