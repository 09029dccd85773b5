"""Stripe's own error reports (issue 16 part 4): the v2 meter event stream validates asynchronously, and an event it
took and then found invalid comes back as a thin `v1.billing.meter.error_report_triggered` event; the events it
names are marked failed with Stripe's reason, visible and counted in get_metering_status and the usage summary."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from aims_billing_mcp.routes import build_companion_app
from aims_billing_mcp.sandbox import SANDBOX_WEBHOOK_SECRET
from aims_billing_mcp.services.meter_flusher import ERROR_REPORT
from aims_billing_mcp.services.tiers import Pricing
from aims_billing_mcp.stripe_gateway import StripeRequest, build_gateway
from aims_billing_mcp.webhooks import sign_webhook_payload
from tests.conftest import ok

pytestmark = pytest.mark.anyio

PRICING = Pricing.load()


async def drained(sandbox: Any) -> None:
    assert await anyio.to_thread.run_sync(lambda: sandbox.webhooks.drain(10))


async def subscribed(client: Client, sandbox: Any, email: str) -> str:
    customer = ok(await client.call_tool("create_customer", {"email": email}))["customer"]["id"]
    checkout = ok(await client.call_tool("create_subscription_checkout", {"tier": "3mo", "customer": customer}))
    sandbox.complete_checkout_session(checkout["checkout_session"]["id"])
    await drained(sandbox)
    return str(customer)


@asynccontextmanager
async def webhook_endpoint(server: Any) -> AsyncIterator[Callable[[str], Any]]:
    """POST a body to the server's webhook route, signed as the sandbox signs."""
    app = build_companion_app(lambda: server.state)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
        async def post(body: str) -> httpx.Response:
            return await http.post("/webhooks/stripe", content=body, headers={
                "Stripe-Signature": sign_webhook_payload(body, SANDBOX_WEBHOOK_SECRET), "Content-Type":
                "application/json"})

        yield post


async def stream_one(gateway: Any, event: dict[str, Any]) -> None:
    token = (await gateway.send(StripeRequest("post", "/v2/billing/meter_event_session", {}))).data
    await gateway.send(StripeRequest("post", "/v2/billing/meter_event_stream", {"events": [event]},
                                     base="meter_events", api_key=token["authentication_token"]))


@pytest.mark.parametrize(("payload", "code"), [
    ({"stripe_customer_id": "cus_gone", "value": "5"}, "meter_event_customer_not_found"),
    ({"value": "5"}, "meter_event_no_customer_defined"),
    ({"stripe_customer_id": "CUSTOMER", "value": "five"}, "meter_event_invalid_value"),
])
async def test_a_stream_event_the_meter_drops_is_reported_in_a_thin_event_whose_full_form_names_it(
        make_settings: Callable[..., Any], sandbox_app: Any, sandbox: Any, prices: dict[str, str],
        payload: dict[str, str], code: str) -> None:
    gateway = build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)
    if payload.get("stripe_customer_id") == "CUSTOMER":
        payload = {**payload, "stripe_customer_id": (await gateway.send(StripeRequest(
            "post", "/v1/customers", {"name": "A"}))).data["id"]}
    seen: list[dict[str, Any]] = []
    sandbox.add_event_listener(seen.append)
    await stream_one(gateway, {"event_name": PRICING.meter_event_name, "identifier": "ghost-1", "payload": payload})

    [thin] = [event for event in seen if event["type"] == ERROR_REPORT]
    full = (await gateway.send(StripeRequest("get", f"/v2/core/events/{thin['id']}"))).data
    await gateway.close()

    assert thin["object"] == "v2.core.event" and "data" not in thin  # thin: what happened, no snapshot
    assert thin["related_object"]["type"] == "billing.meter"
    [kind] = full["data"]["reason"]["error_types"]
    assert kind["code"] == code
    assert [sample["request"]["identifier"] for sample in kind["sample_errors"]] == ["ghost-1"]


async def test_a_stream_event_for_no_meter_is_not_a_meter_error_report(
        make_settings: Callable[..., Any], sandbox_app: Any, sandbox: Any, prices: dict[str, str]) -> None:
    gateway = build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)
    seen: list[dict[str, Any]] = []
    sandbox.add_event_listener(seen.append)
    await stream_one(gateway, {"event_name": "no_such_meter", "payload": {"stripe_customer_id": "cus_x", "value": "1"}})
    await gateway.close()
    assert sandbox.meter_event_errors and not [event for event in seen if event["type"] == ERROR_REPORT]


async def test_events_stripe_reports_invalid_after_taking_them_are_failed_with_its_reason_and_counted(
        make_server: Callable[..., Any], sandbox: Any, prices: dict[str, str]) -> None:
    server = make_server()
    async with Client(server) as client:
        kept = await subscribed(client, sandbox, "kept@example.com")
        gone = await subscribed(client, sandbox, "gone@example.com")
        ok(await client.call_tool("create_meter_event", {"customer": kept, "units": 1000, "identifier": "k-1"}))
        ok(await client.call_tool("create_meter_event", {"customer": gone, "units": 2000, "identifier": "g-1"}))
        ok(await client.call_tool("create_meter_event", {"customer": gone, "units": 300, "identifier": "g-2"}))
        await server.state.gateway.send(StripeRequest("delete", f"/v1/customers/{gone}"))  # after recording

        report = await server.state.flusher.flush_once()  # the v2 stream takes all three; validation comes later
        await drained(sandbox)

        status = ok(await client.call_tool("get_metering_status", {}))
        summary = ok(await client.call_tool("get_usage_summary", {"customer": gone}))
        kept_summary = ok(await client.call_tool("get_usage_summary", {"customer": kept}))

    assert (report.sent, report.failed, report.transport) == (3, 0, "v2")
    assert (status["sent"], status["failed"], status["pending"]) == (1, 2, 0)
    [failure] = status["recent_failures"]
    assert failure["events"] == 2
    assert failure["reason"].startswith("refused by Stripe (meter_event_customer_not_found): ")
    assert gone in failure["reason"]
    assert summary["events"] == {"pending": 0, "sent": 0, "failed": 2}
    assert (summary["weighted_units"], summary["overage_cost_cents"]) == (0, 0)  # nothing Stripe will bill
    assert kept_summary["events"] == {"pending": 0, "sent": 1, "failed": 0}
    assert kept_summary["weighted_units"] == 1000


async def test_the_same_error_report_delivered_again_changes_nothing(
        make_server: Callable[..., Any], sandbox: Any, prices: dict[str, str]) -> None:
    server = make_server()
    reports: list[dict[str, Any]] = []
    sandbox.add_event_listener(lambda event: reports.append(event) if event["type"] == ERROR_REPORT else None)
    async with Client(server) as client:
        gone = await subscribed(client, sandbox, "gone@example.com")
        ok(await client.call_tool("create_meter_event", {"customer": gone, "units": 2000, "identifier": "g-1"}))
        await server.state.gateway.send(StripeRequest("delete", f"/v1/customers/{gone}"))
        await server.state.flusher.flush_once()
        await drained(sandbox)
        before = ok(await client.call_tool("get_usage_summary", {"customer": gone}))

        async with webhook_endpoint(server) as post:
            answer = await post(json.dumps(reports[0]))

        after = ok(await client.call_tool("get_usage_summary", {"customer": gone}))
        status = ok(await client.call_tool("get_metering_status", {}))

    assert answer.status_code == 200 and answer.json() == {"received": True, "id": reports[0]["id"], "failed": 0}
    assert before == after and before["events"]["failed"] == 1
    assert status["failed"] == 1


THIN = {"id": "evt_test_61Thin", "object": "v2.core.event", "created": "2026-12-06T04:00:00.000Z",
        "livemode": False, "context": None, "reason": None,
        "related_object": {"id": "mtr_x", "type": "billing.meter", "url": "/v1/billing/meters/mtr_x"}}


async def test_an_error_report_stripe_cannot_show_now_is_answered_503_so_it_is_delivered_again(
        make_server: Callable[..., Any], sandbox: Any) -> None:
    server = make_server()
    sandbox.faults.inject(status=500, count=10, path_prefix="/v2/core/events")
    async with Client(server), webhook_endpoint(server) as post:
        answer = await post(json.dumps({**THIN, "type": ERROR_REPORT}))
    assert answer.status_code == 503
    assert "deliver it again" in answer.json()["error"]


@pytest.mark.parametrize(("body", "status"), [
    ({**THIN, "type": "v1.billing.meter.no_meter_found"}, 200),  # another thin event: acknowledged, ignored
    ({**THIN, "type": ERROR_REPORT, "id": None}, 400),  # says it is thin, is not one we can read
    ({**THIN, "type": "Not A Type"}, 400),
])
async def test_a_thin_event_other_than_an_error_report_changes_nothing(
        make_server: Callable[..., Any], sandbox: Any, body: dict[str, Any], status: int) -> None:
    server = make_server()
    async with Client(server), webhook_endpoint(server) as post:
        answer = await post(json.dumps(body))
    assert answer.status_code == status
    assert not [r for r in sandbox.request_log if r.path.startswith("/v2/core/events")]
