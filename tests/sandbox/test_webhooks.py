"""Signed webhook delivery: signatures the SDK accepts, order, retries, giving up, drain, targets."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from aims_billing_mcp.sandbox import SANDBOX_WEBHOOK_SECRET, Sandbox, call_asgi, create_app, signature_header

from .conftest import AUTH, ok_json, post

Obj = dict[str, Any]


class Receiver:
    """A webhook endpoint (ASGI) that verifies each delivery with the SDK, answering ``statuses`` in turn
    (then 200); ``gate`` holds every answer until set."""

    def __init__(self, statuses: list[int] | None = None, secret: str = SANDBOX_WEBHOOK_SECRET) -> None:
        self.statuses = list(statuses or [])
        self.secret = secret
        self.events: list[Obj] = []
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        self.app = Starlette(routes=[Route("/webhooks/stripe", self.handle, methods=["POST"])])

    async def handle(self, request: Request) -> Response:
        self.gate.wait(5)
        self.calls += 1
        status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            return PlainTextResponse("no", status_code=status)
        body = await request.body()
        assert request.headers["content-type"] == "application/json"
        event = stripe.Webhook.construct_event(body.decode(), request.headers["stripe-signature"], self.secret)
        assert event.id == json.loads(body)["id"]
        self.events.append(json.loads(body))
        return JSONResponse({"received": True})


@pytest.fixture
def receiver(sandbox: Sandbox) -> Receiver:
    found = Receiver()
    sandbox.webhooks.configure(found.app, retry_delay_scale=0.01)
    return found


def _customer(api: TestClient, **data: str) -> Obj:
    return ok_json(post(api, "/v1/customers", {"email": "w@example.com", **data}))


def _expire_a_session(api: TestClient, monthly: Obj) -> Obj:
    session = ok_json(post(api, "/v1/checkout/sessions", {
        "mode": "subscription", "success_url": "https://example.com/ok",
        "line_items[0][price]": monthly["id"], "line_items[0][quantity]": "1"}))
    return ok_json(api.post(f"/v1/checkout/sessions/{session['id']}/expire"))


def test_a_delivered_event_verifies_with_the_sdk_and_the_sandbox_secret(
    api: TestClient, sandbox: Sandbox, receiver: Receiver, monthly: Obj
) -> None:
    session = _expire_a_session(api, monthly)
    assert sandbox.webhooks.drain(5)
    [event] = receiver.events
    assert event["type"] == "checkout.session.expired" and event["data"]["object"]["id"] == session["id"]
    assert event["id"].startswith("evt_") and event["object"] == "event"
    assert event["api_version"] == "2026-01-28.clover" and event["livemode"] is False
    assert event["pending_webhooks"] == 1 and event["request"]["id"].startswith("req_")
    [record] = sandbox.webhooks.deliveries
    assert (record.event_id, record.attempts, record.last_status, record.delivered) == (event["id"], 1, 200, True)


@pytest.mark.parametrize(("secret", "accepted"), [(SANDBOX_WEBHOOK_SECRET, True), ("whsec_other", False)])
def test_signature_header_is_what_the_sdk_verifies(secret: str, accepted: bool) -> None:
    payload = '{"id": "evt_1", "object": "event"}'
    header = signature_header(payload, secret, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    if accepted:
        assert stripe.WebhookSignature.verify_header(payload, header, SANDBOX_WEBHOOK_SECRET)
    else:
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.WebhookSignature.verify_header(payload, header, SANDBOX_WEBHOOK_SECRET)


def test_events_are_delivered_in_the_order_they_were_recorded(
    api: TestClient, sandbox: Sandbox, receiver: Receiver
) -> None:
    customer = _customer(api)
    session = ok_json(post(api, "/v1/checkout/sessions", {"mode": "setup", "customer": customer["id"],
                                                         "success_url": "https://example.com/ok",
                                                         "currency": "usd"}))
    sandbox.complete_checkout_session(session["id"])
    recorded = [e["id"] for e in reversed(ok_json(api.get("/v1/events"))["data"])]
    assert sandbox.webhooks.drain(5)
    assert [e["id"] for e in receiver.events] == recorded and recorded


@pytest.mark.parametrize(("statuses", "attempts", "delivered", "last_status"), [
    ([500, 503], 3, True, 200),
    ([500, 500, 500], 3, False, 500),
    ([400, 400, 400], 3, False, 400),
])
def test_a_failing_target_is_retried_then_delivered_or_given_up(
    api: TestClient, sandbox: Sandbox, statuses: list[int], attempts: int, delivered: bool,
    last_status: int, monthly: Obj,
) -> None:
    receiver = Receiver(statuses)
    sandbox.webhooks.configure(receiver.app, retry_delay_scale=0.01, max_attempts=3)
    _expire_a_session(api, monthly)
    assert sandbox.webhooks.drain(5)
    [record] = sandbox.webhooks.deliveries
    assert (record.attempts, record.delivered, record.last_status) == (attempts, delivered, last_status)
    assert receiver.calls == attempts


def test_an_unreachable_url_is_given_up_with_no_status(api: TestClient, sandbox: Sandbox, monthly: Obj) -> None:
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler) as probe:
        port = probe.server_address[1]  # free now that the server is closed below
    sandbox.webhooks.configure(f"http://127.0.0.1:{port}/hook", retry_delay_scale=0.01, max_attempts=2)
    _expire_a_session(api, monthly)
    assert sandbox.webhooks.drain(5)
    [record] = sandbox.webhooks.deliveries
    assert (record.attempts, record.delivered, record.last_status) == (2, False, None)


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, list[tuple[bytes, str]]]]:
    """A real HTTP endpoint on loopback that keeps each body and its Stripe-Signature header."""
    seen: list[tuple[bytes, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((body, self.headers["Stripe-Signature"]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", seen
    server.shutdown()
    server.server_close()


def test_a_url_target_gets_a_signed_post(
    http_receiver: tuple[str, list[tuple[bytes, str]]], monthly: Obj
) -> None:
    url, seen = http_receiver
    app = create_app(webhook_target=url)
    try:
        api = TestClient(app, headers=AUTH)
        ok_json(post(api, "/v1/products", {"name": "x"}))  # no event
        customer = _customer(api)
        session = ok_json(post(api, "/v1/checkout/sessions", {"mode": "setup", "customer": customer["id"],
                                                             "success_url": "https://example.com/ok",
                                                             "currency": "usd"}))
        app.state.sandbox.complete_checkout_session(session["id"])
        assert app.state.sandbox.webhooks.drain(5)
    finally:
        app.state.sandbox.close()
    [(body, header)] = seen
    event = stripe.Webhook.construct_event(body.decode(), header, SANDBOX_WEBHOOK_SECRET)
    assert event.type == "checkout.session.completed"


def test_drain_waits_for_a_slow_target_and_times_out_meanwhile(
    api: TestClient, sandbox: Sandbox, receiver: Receiver, monthly: Obj
) -> None:
    receiver.gate.clear()
    _expire_a_session(api, monthly)
    assert sandbox.webhooks.drain(0.05) is False
    receiver.gate.set()
    assert sandbox.webhooks.drain(5) is True
    assert len(receiver.events) == 1


def test_delivery_turned_off_queues_nothing_and_marks_no_pending_webhook(
    api: TestClient, sandbox: Sandbox, receiver: Receiver, monthly: Obj
) -> None:
    sandbox.webhooks.configure(None)
    _expire_a_session(api, monthly)
    assert sandbox.webhooks.drain(1) and receiver.events == [] and sandbox.webhooks.deliveries == []
    assert ok_json(api.get("/v1/events"))["data"][0]["pending_webhooks"] == 0


@pytest.mark.parametrize("target", ["ftp://example.com/hook", "example.com", 42])
def test_a_target_that_is_neither_url_nor_app_is_refused(sandbox: Sandbox, target: Any) -> None:
    with pytest.raises(ValueError):
        sandbox.webhooks.configure(target)


def test_create_app_passes_the_webhook_target_through() -> None:
    receiver = Receiver()
    app = create_app(webhook_target=receiver.app)
    try:
        sandbox: Sandbox = app.state.sandbox
        sandbox.run(lambda ctx: ctx.record_event("customer.updated", {"id": "cus_x", "object": "customer"}))
        assert sandbox.webhooks.drain(5)
        assert [e["type"] for e in receiver.events] == ["customer.updated"]
    finally:
        sandbox.close()


@pytest.mark.anyio
async def test_call_asgi_sends_method_path_query_headers_and_body_and_collects_the_answer() -> None:
    async def echo(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({"method": request.method, "path": request.url.path, "q": request.query_params["q"],
                             "h": request.headers["x-test"], "body": body.decode(), "host": request.url.hostname},
                            status_code=201, headers={"X-Answer": "yes"})

    app = Starlette(routes=[Route("/a b/c", echo, methods=["POST"])])
    body, status, headers = await call_asgi(app, "POST", "https://api.test/a%20b/c?q=1", {"X-Test": "v"}, "hi")
    assert status == 201 and (b"x-answer", b"yes") in headers
    assert json.loads(body) == {"method": "POST", "path": "/a b/c", "q": "1", "h": "v", "body": "hi",
                                "host": "api.test"}


@pytest.mark.parametrize(("statuses", "pending"), [([], 0), ([500, 500], 1)])
def test_an_event_stays_pending_until_delivered_and_is_listed_as_undelivered(
    api: TestClient, sandbox: Sandbox, monthly: Obj, statuses: list[int], pending: int
) -> None:
    from aims_billing_mcp.sandbox.events import undelivered

    receiver = Receiver(statuses)
    sandbox.webhooks.configure(receiver.app, retry_delay_scale=0.01, max_attempts=2)
    _expire_a_session(api, monthly)
    assert sandbox.webhooks.drain(5)
    [record] = sandbox.webhooks.deliveries
    assert ok_json(api.get(f"/v1/events/{record.event_id}"))["pending_webhooks"] == pending
    assert [e["id"] for e in undelivered(sandbox.store)] == ([record.event_id] if pending else [])


@pytest.mark.parametrize(("enabled", "delivered"), [
    (("*",), ["payment_intent.succeeded", "refund.created"]),
    (("payment_intent.*",), ["payment_intent.succeeded"]),
    (("refund.created", "invoice.paid"), ["refund.created"]),
])
def test_only_the_enabled_events_are_delivered_the_others_are_still_recorded(
        sandbox: Sandbox, api: TestClient, enabled: tuple[str, ...], delivered: list[str]) -> None:
    receiver = Receiver()
    sandbox.webhooks.configure(receiver.app, retry_delay_scale=0.01, enabled_events=enabled)
    paid = ok_json(post(api, "/v1/payment_intents", {"amount": "500", "currency": "usd",
                                                     "payment_method": "pm_card_visa", "confirm": "true"}))
    ok_json(post(api, "/v1/refunds", {"payment_intent": paid["id"], "amount": "100"}))
    assert sandbox.webhooks.drain(10)
    assert [e["type"] for e in receiver.events] == delivered
    recorded = {e["type"] for e in ok_json(api.get("/v1/events", params={"limit": "100"}))["data"]}
    assert recorded >= {"payment_intent.succeeded", "refund.created"}
