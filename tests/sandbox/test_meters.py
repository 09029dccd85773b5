"""Billing meters, v1 and v2 meter events, summaries, tiered metered prices and usage on renewal."""

from __future__ import annotations

from typing import Any

import pytest
import stripe
from starlette.applications import Starlette
from starlette.testclient import TestClient

from aims_billing_mcp.sandbox import SANDBOX_SECRET_KEY, Sandbox
from aims_billing_mcp.sandbox.meters import rfc3339
from aims_billing_mcp.sandbox.pricing import tiered_amount

from .conftest import ok_json, post
from .test_lifecycle import get, subscribe, types
from .test_sdk import SandboxHTTPClient

Obj = dict[str, Any]
DAY = 86400


@pytest.fixture
def meter(api: TestClient) -> Obj:
    return ok_json(post(api, "/v1/billing/meters", {
        "display_name": "API calls", "event_name": "api_call", "default_aggregation[formula]": "sum"}))


@pytest.fixture
def customer(api: TestClient) -> Obj:
    return ok_json(post(api, "/v1/customers", {"email": "m@example.com"}))


@pytest.fixture
def sdk(app: Starlette) -> stripe.StripeClient:
    return stripe.StripeClient(SANDBOX_SECRET_KEY, http_client=SandboxHTTPClient(app),
                               base_addresses={"api": "http://sandbox.test", "meter_events": "http://sandbox.test"})


def usage(api: TestClient, meter: Obj, customer: Obj, start: int, end: int, **extra: str) -> list[Obj]:
    data: list[Obj] = ok_json(api.get(f"/v1/billing/meters/{meter['id']}/event_summaries", params={
        "customer": customer["id"], "start_time": start, "end_time": end, **extra}))["data"]
    return data


def minute(ts: int) -> int:
    return ts - ts % 60


def send(api: TestClient, customer: Obj, value: str = "1", **extra: str) -> Any:
    return post(api, "/v1/billing/meter_events", {
        "event_name": "api_call", "payload[stripe_customer_id]": customer["id"], "payload[value]": value, **extra})


def test_a_meter_has_stripe_defaults_and_a_unique_active_event_name(api: TestClient, meter: Obj) -> None:
    assert meter["id"].startswith("mtr_") and meter["status"] == "active" and meter["object"] == "billing.meter"
    assert meter["customer_mapping"] == {"event_payload_key": "stripe_customer_id", "type": "by_id"}
    assert meter["value_settings"] == {"event_payload_key": "value"}
    data = {"display_name": "again", "event_name": "api_call", "default_aggregation[formula]": "sum"}
    assert post(api, "/v1/billing/meters", data).status_code == 400
    off = ok_json(api.post(f"/v1/billing/meters/{meter['id']}/deactivate"))
    assert off["status"] == "inactive" and off["status_transitions"]["deactivated_at"] is not None
    assert ok_json(post(api, "/v1/billing/meters", data))["event_name"] == "api_call"
    assert [m["id"] for m in ok_json(api.get("/v1/billing/meters?status=inactive"))["data"]] == [meter["id"]]
    assert ok_json(api.get(f"/v1/billing/meters/{meter['id']}"))["display_name"] == "API calls"


def test_v1_meter_events_count_once_per_identifier(
    api: TestClient, sandbox: Sandbox, meter: Obj, customer: Obj
) -> None:
    first = ok_json(send(api, customer, "25", identifier="req-1"))
    assert first["object"] == "billing.meter_event" and first["identifier"] == "req-1"
    assert first["payload"] == {"stripe_customer_id": customer["id"], "value": "25"}
    assert ok_json(send(api, customer, "25", identifier="req-1"))["identifier"] == "req-1"
    generated = ok_json(send(api, customer, "5"))["identifier"]
    assert generated and generated != "req-1"
    now = sandbox.now()
    [summary] = usage(api, meter, customer, minute(now) - 3600, minute(now) + 60)
    assert summary["aggregated_value"] == 30 and summary["object"] == "billing.meter_event_summary"
    assert summary["meter"] == meter["id"]


@pytest.mark.parametrize(("offset", "accepted", "code"), [
    (-35 * DAY + 60, True, None),
    (-35 * DAY - 60, False, "timestamp_too_far_in_past"),
    (290, True, None),
    (310, False, "timestamp_in_future"),
])
def test_meter_event_timestamps_must_be_within_35_days_back_and_5_minutes_ahead(
    api: TestClient, sandbox: Sandbox, meter: Obj, customer: Obj, offset: int, accepted: bool, code: str | None
) -> None:
    response = send(api, customer, timestamp=str(sandbox.now() + offset))
    assert (response.status_code == 200) is accepted
    if not accepted:
        assert response.status_code == 400 and response.json()["error"]["code"] == code


@pytest.mark.parametrize(("field", "value", "param"), [
    ("event_name", "nope", "event_name"),
    ("payload[stripe_customer_id]", "cus_missing", "payload[stripe_customer_id]"),
    ("payload[value]", "1.5x", "payload[value]"),
    ("identifier", "x" * 101, "identifier"),
])
def test_meter_events_for_unknown_meters_or_customers_or_bad_values_are_refused(
    api: TestClient, meter: Obj, customer: Obj, field: str, value: str, param: str
) -> None:
    response = send(api, customer, **{field: value})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


@pytest.mark.parametrize(("query", "param"), [
    ({"start_time": "61"}, "start_time"),
    ({"end_time": "7230"}, "end_time"),
    ({"value_grouping_window": "hour", "start_time": "60"}, "start_time"),
    ({"start_time": "7200", "end_time": "3600"}, "end_time"),
])
def test_summary_windows_must_align_like_stripes(
    api: TestClient, meter: Obj, customer: Obj, query: dict[str, str], param: str
) -> None:
    params = {"customer": customer["id"], "start_time": "0", "end_time": "7200", **query}
    response = api.get(f"/v1/billing/meters/{meter['id']}/event_summaries", params=params)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_summaries_group_by_hour_and_paginate(
    api: TestClient, sandbox: Sandbox, meter: Obj, customer: Obj
) -> None:
    now = sandbox.now()  # read once: two reads a second apart gave an hour that is not on a minute boundary
    hour = now - now % 3600
    for back, value in ((0, "1"), (1, "2"), (1, "3"), (2, "4")):
        ok_json(send(api, customer, value, timestamp=str(hour - back * 3600 + 5)))
    window = {"value_grouping_window": "hour", "limit": "2"}
    page = usage(api, meter, customer, hour - 2 * 3600, hour + 3600, **window)
    assert [s["aggregated_value"] for s in page] == [4, 5]
    rest = usage(api, meter, customer, hour - 2 * 3600, hour + 3600, starting_after=page[-1]["id"], **window)
    assert [(s["start_time"], s["aggregated_value"]) for s in rest] == [(hour, 1)]


def test_v2_session_and_stream_through_the_sdk_count_and_dedupe_with_v1(
    api: TestClient, sandbox: Sandbox, sdk: stripe.StripeClient, meter: Obj, customer: Obj
) -> None:
    session = sdk.v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session" and session.authentication_token
    assert session.expires_at > session.created and session.expires_at.endswith("Z")
    ok_json(send(api, customer, "10", identifier="shared-1"))
    events = [{"event_name": "api_call", "identifier": f"v2-{i}", "timestamp": rfc3339(sandbox.now()),
               "payload": {"stripe_customer_id": customer["id"], "value": "3"}} for i in range(4)]
    events.append({"event_name": "api_call", "identifier": "shared-1",
                   "payload": {"stripe_customer_id": customer["id"], "value": "10"}})
    events.append({"event_name": "api_call", "identifier": "bad-1",
                   "payload": {"stripe_customer_id": "cus_nobody", "value": "7"}})
    token = {"api_key": session.authentication_token}
    sdk.v2.billing.meter_event_stream.create({"events": events}, token)  # type: ignore[typeddict-item]
    sdk.v2.billing.meter_event_stream.create({"events": events[:2]}, token)  # type: ignore[typeddict-item]
    now = sandbox.now()
    [summary] = usage(api, meter, customer, minute(now) - 3600, minute(now) + 60)
    assert summary["aggregated_value"] == 10 + 4 * 3
    assert [(e["identifier"], e["code"]) for e in sandbox.meter_event_errors] == [("bad-1", "resource_missing")]
    found = sdk.v1.billing.meters.event_summaries.list(meter["id"], {
        "customer": customer["id"], "start_time": minute(now) - 3600, "end_time": minute(now) + 60})
    assert found.data[0].aggregated_value == 22


def test_v2_stream_refuses_an_expired_or_unknown_session_and_more_than_100_events(
    sandbox: Sandbox, sdk: stripe.StripeClient, meter: Obj, customer: Obj
) -> None:
    session = sdk.v2.billing.meter_event_session.create()
    one = {"event_name": "api_call", "payload": {"stripe_customer_id": customer["id"], "value": "1"}}
    token = {"api_key": session.authentication_token}
    with pytest.raises(stripe.InvalidRequestError) as too_many:
        sdk.v2.billing.meter_event_stream.create({"events": [one] * 101}, token)  # type: ignore[typeddict-item]
    assert too_many.value.http_status == 400
    with pytest.raises(stripe.TemporarySessionExpiredError) as unknown:
        sdk.v2.billing.meter_event_stream.create({"events": [one]}, {"api_key": "ek_test_nope"})  # type: ignore[typeddict-item]
    assert unknown.value.http_status == 401 and unknown.value.code == "billing_meter_event_session_expired"
    sdk.v2.billing.meter_event_stream.create({"events": [one]}, token)  # type: ignore[typeddict-item]
    sandbox.advance(hours=1)
    with pytest.raises(stripe.TemporarySessionExpiredError):
        sdk.v2.billing.meter_event_stream.create({"events": [one]}, token)  # type: ignore[typeddict-item]


def test_v2_errors_have_the_v2_shape(api: TestClient) -> None:
    response = api.post("/v2/billing/meter_event_stream", json={"events": []},
                           headers={"Authorization": "Bearer ek_test_unknown"})
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message"} and error["code"] == "billing_meter_event_session_expired"


TIERS = {
    "billing_scheme": "tiered", "tiers_mode": "graduated",
    "tiers[0][up_to]": "1000", "tiers[0][unit_amount]": "0",
    "tiers[1][up_to]": "10000", "tiers[1][unit_amount_decimal]": "0.5",
    "tiers[2][up_to]": "inf", "tiers[2][unit_amount_decimal]": "0.25", "tiers[2][flat_amount]": "100",
}


@pytest.fixture
def metered(api: TestClient, meter: Obj, product: Obj) -> Obj:
    return ok_json(post(api, "/v1/prices", {
        "product": product["id"], "currency": "usd", "recurring[interval]": "month",
        "recurring[usage_type]": "metered", "recurring[meter]": meter["id"], **TIERS}))


def test_a_tiered_metered_price_returns_its_tiers(metered: Obj, meter: Obj) -> None:
    assert metered["billing_scheme"] == "tiered" and metered["tiers_mode"] == "graduated"
    assert metered["unit_amount"] is None and metered["recurring"]["meter"] == meter["id"]
    assert [t["up_to"] for t in metered["tiers"]] == [1000, 10000, None]
    assert metered["tiers"][1]["unit_amount_decimal"] == "0.5" and metered["tiers"][2]["flat_amount"] == 100


@pytest.mark.parametrize(("change", "param"), [
    ({"tiers[2][up_to]": "20000"}, "tiers[2][up_to]"),
    ({"tiers[1][up_to]": "500"}, "tiers[1][up_to]"),
    ({"tiers_mode": ""}, "tiers_mode"),
    ({"recurring[meter]": "mtr_missing"}, "recurring[meter]"),
    ({"recurring[meter]": ""}, "recurring[meter]"),
])
def test_bad_tiered_prices_are_refused(api: TestClient, meter: Obj, product: Obj, change: dict[str, str],
                                       param: str) -> None:
    data = {"product": product["id"], "currency": "usd", "recurring[interval]": "month",
            "recurring[usage_type]": "metered", "recurring[meter]": meter["id"], **TIERS, **change}
    response = post(api, "/v1/prices", data)
    assert response.status_code in (400, 404) and response.json()["error"]["param"] == param


@pytest.mark.parametrize(("mode", "quantity", "expected"), [
    ("graduated", 0, 0),
    ("graduated", 1000, 0),
    ("graduated", 1003, 2),          # 3 x 0.5 = 1.5 -> rounded half up
    ("graduated", 12001, 4500 + 100 + 500),  # 9000 x 0.5 + flat 100 + 2001 x 0.25 (500.25)
    ("volume", 1003, 502),           # all 1003 at 0.5 = 501.5 -> 502
    ("volume", 12000, 3100),         # 12000 x 0.25 + flat 100
])
def test_tier_arithmetic(mode: str, quantity: int, expected: int) -> None:
    tiers = [{"up_to": 1000, "unit_amount": 0}, {"up_to": 10000, "unit_amount_decimal": "0.5"},
             {"up_to": None, "unit_amount_decimal": "0.25", "flat_amount": 100}]
    assert tiered_amount(tiers, mode, quantity) == expected


@pytest.mark.parametrize(("values", "expected_usage_amount"), [
    ([], 0),
    (["600", "403"], 2),
    (["12001"], 5100),
])
def test_renewal_invoice_bills_the_periods_metered_usage_through_graduated_tiers(
    api: TestClient, sandbox: Sandbox, monthly: Obj, metered: Obj, values: list[str], expected_usage_amount: int
) -> None:
    done = subscribe(api, sandbox, monthly, **{"line_items[1][price]": metered["id"]})
    sub = get(sandbox, done["subscription"])
    start, end = sub["items"]["data"][0]["current_period_start"], sub["items"]["data"][0]["current_period_end"]
    assert [("quantity" in item) for item in sub["items"]["data"]] == [True, False]
    assert get(sandbox, done["invoice"])["total"] == 2000
    customer = {"id": done["customer"]}
    for value in values:
        ok_json(send(api, customer, value))
    sandbox.advance(days=32)
    invoice = get(sandbox, get(sandbox, done["subscription"])["latest_invoice"])
    licensed, usage_line = invoice["lines"]["data"]
    assert licensed["amount"] == 2000 and licensed["period"]["start"] == end
    assert usage_line["amount"] == expected_usage_amount
    assert usage_line["quantity"] == sum(int(v) for v in values)
    assert usage_line["period"] == {"start": start, "end": end}
    assert invoice["total"] == invoice["amount_paid"] == 2000 + expected_usage_amount


def test_a_metered_line_item_takes_no_quantity(api: TestClient, metered: Obj) -> None:
    response = post(api, "/v1/checkout/sessions", {
        "mode": "subscription", "success_url": "https://example.com/ok",
        "line_items[0][price]": metered["id"], "line_items[0][quantity]": "1"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "line_items[0][quantity]"


@pytest.mark.parametrize("how", ["cancel_at_period_end", "cancel_at"])
def test_a_scheduled_cancellation_bills_the_last_periods_usage_on_a_final_invoice(
    api: TestClient, sandbox: Sandbox, monthly: Obj, metered: Obj, how: str
) -> None:
    done = subscribe(api, sandbox, monthly, **{"line_items[1][price]": metered["id"]})
    sub = get(sandbox, done["subscription"])
    start, end = sub["items"]["data"][0]["current_period_start"], sub["items"]["data"][0]["current_period_end"]
    change = {"cancel_at_period_end": "true"} if how == "cancel_at_period_end" else {"cancel_at": str(end)}
    ok_json(post(api, f"/v1/subscriptions/{sub['id']}", change))
    ok_json(send(api, {"id": done["customer"]}, "12001"))

    events = sandbox.advance(days=40)

    final = get(sandbox, get(sandbox, sub["id"])["latest_invoice"])
    [usage_line] = final["lines"]["data"]  # usage only: the licensed price is not billed for a period not served
    assert (usage_line["quantity"], usage_line["amount"], usage_line["period"]) == (
        12001, 5100, {"start": start, "end": end})
    assert final["status"] == "paid" and final["amount_paid"] == 5100
    assert types(events)[-1] == "customer.subscription.deleted" and "invoice.paid" in types(events)


def test_an_immediate_cancel_discards_the_periods_usage(
    api: TestClient, sandbox: Sandbox, monthly: Obj, metered: Obj
) -> None:
    done = subscribe(api, sandbox, monthly, **{"line_items[1][price]": metered["id"]})
    ok_json(send(api, {"id": done["customer"]}, "12001"))

    ok_json(api.delete(f"/v1/subscriptions/{done['subscription']}"))

    assert get(sandbox, done["subscription"])["latest_invoice"] == done["invoice"]


def test_an_immediate_cancel_with_invoice_now_bills_the_periods_usage_so_far_on_a_final_invoice(
    api: TestClient, sandbox: Sandbox, monthly: Obj, metered: Obj
) -> None:
    done = subscribe(api, sandbox, monthly, **{"line_items[1][price]": metered["id"]})
    start = get(sandbox, done["subscription"])["items"]["data"][0]["current_period_start"]
    ok_json(send(api, {"id": done["customer"]}, "12001"))
    sandbox.advance(days=3)

    canceled = ok_json(api.delete(f"/v1/subscriptions/{done['subscription']}", params={"invoice_now": "true"}))

    final = get(sandbox, canceled["latest_invoice"])
    [usage_line] = final["lines"]["data"]
    assert (usage_line["quantity"], usage_line["amount"]) == (12001, 5100)
    assert usage_line["period"] == {"start": start, "end": canceled["ended_at"]}
    assert final["status"] == "paid" and canceled["status"] == "canceled"
