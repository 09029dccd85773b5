"""Meters beyond LUC tokens (issue 16 part 3): the pricing file declares them, events name them, and what each
meter's summary says is what Stripe (the sandbox) invoices on that meter's line: sum, count and last aggregations,
on a subscription and pay per use."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from pydantic import ValidationError

from aims_billing_mcp.errors import ConfigurationError, IdempotencyConflict, InvalidInput
from aims_billing_mcp.services.stripe_setup import setup_stripe
from aims_billing_mcp.services.tiers import Pricing
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from aims_billing_mcp.stripe_gateway import StripeRequest, build_gateway
from tests.conftest import error_of, ok
from tests.services.test_metering_billing import Billing, billing_on
from tests.test_ingest_http import AUTH, CE, KEY, over_http

pytestmark = pytest.mark.anyio

PRICING_TOML = (Path(__file__).parents[2] / "aims_billing_mcp" / "pricing.toml").read_text("utf-8")


@pytest.fixture
async def billing(make_settings: Callable[..., Settings], sandbox_app: Any, store: Store) -> AsyncIterator[Billing]:
    async with billing_on(make_settings(), sandbox_app, store) as env:
        yield env


# --- the pricing file ---------------------------------------------------------------------------------------------

def test_the_pricing_file_declares_four_meters_each_with_its_stripe_event_name_aggregation_and_tier_terms() -> None:
    pricing = Pricing.load()
    meters = {m.id: (m.event_name, m.aggregation, m.unit) for m in pricing.meters.values()}
    three = pricing.tiers["3mo"]

    assert meters == {"luc_tokens": ("aims_luc_units", "sum", "weighted LUC unit"),
                      "compute_seconds": ("aims_compute_seconds", "sum", "second"),
                      "api_calls": ("aims_api_calls", "count", "call"),
                      "storage_gb_hours": ("aims_storage_gb_hours", "last", "GB-hour")}
    assert pricing.meters["luc_tokens"].terms(three) is three  # LUC's terms are the tier's own
    compute = pricing.meters["compute_seconds"].terms(three)
    assert (compute.tokens_per_month, compute.overage_rate) == (36_000, 8)


@pytest.mark.parametrize(("change", "words"), [
    ('[meters.gpu_hours]\nevent_name = "aims_gpu"\nunit = "hour"\ntiers.p2p = { included = 0, rate = 5 }\n',
     "meters.gpu_hours.tiers must give included and rate for every tier"),
    ('[meters.gpu_hours]\nevent_name = "aims_compute_seconds"\nunit = "hour"\n'
     'tiers = { p2p = { included = 0, rate = 1 }, 3mo = { included = 0, rate = 1 }, '
     '6mo = { included = 0, rate = 1 }, 9mo = { included = 0, rate = 1 } }\n', "share the Stripe event name"),
    ('[meters.gpu_hours]\nevent_name = "aims_gpu"\nunit = "hour"\naggregation = "max"\n', "aggregation"),
    ('[meters.gpu_hours]\nevent_name = "aims_gpu"\nunit = "hour"\nweighted = true\n'
     'tiers = { p2p = { included = 0, rate = 1 }, 3mo = { included = 0, rate = 1 }, '
     '6mo = { included = 0, rate = 1 }, 9mo = { included = 0, rate = 1 } }\n', "only luc_tokens is weighted"),
    ('[meters.gpu_hours]\nevent_name = "aims_gpu"\nunit = "hour"\n'
     'tiers = { p2p = { included = 0, rate = -1 }, 3mo = { included = 0, rate = 1 }, '
     '6mo = { included = 0, rate = 1 }, 9mo = { included = 0, rate = 1 } }\n', "rate"),
], ids=["a tier without terms", "a shared event name", "an unknown aggregation", "a weighted meter",
        "a negative rate"])
def test_a_pricing_file_with_a_bad_meter_is_refused_at_start_up_naming_it(
        tmp_path: Path, change: str, words: str) -> None:
    path = tmp_path / "pricing.toml"
    path.write_text(PRICING_TOML + "\n" + change, "utf-8")

    with pytest.raises(ValidationError) as caught:
        Pricing.load(path)

    assert words in str(caught.value)


def test_a_pricing_file_from_before_meters_has_luc_tokens_on_its_metering_event_name(tmp_path: Path) -> None:
    old = PRICING_TOML.split("# Usage meters.")[0] + '[metering]\nevent_name = "old_luc"\n' + "[multipliers]" + \
        PRICING_TOML.split("[multipliers]")[1]
    path = tmp_path / "pricing.toml"
    path.write_text(old, "utf-8")

    pricing = Pricing.load(path)

    assert list(pricing.meters) == ["luc_tokens"] and pricing.meters["luc_tokens"].event_name == "old_luc"
    assert pricing.meter_event_name == "old_luc"


# --- setup-stripe -------------------------------------------------------------------------------------------------

async def test_setup_stripe_creates_each_meter_with_its_aggregation_and_a_metered_price_per_tier(
        make_settings: Any, sandbox_app: Any) -> None:
    gateway = build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)
    pricing = Pricing.load()
    try:
        setup = await setup_stripe(gateway, pricing)
        meters = (await gateway.send(StripeRequest("get", "/v1/billing/meters", {"limit": 100}))).data["data"]
        calls = (await gateway.send(StripeRequest("get", f"/v1/prices/{setup.tiers[1].metered_prices['api_calls']}"))
                 ).data
    finally:
        await gateway.close()

    assert {m["event_name"]: m["default_aggregation"]["formula"] for m in meters} == {
        "aims_luc_units": "sum", "aims_compute_seconds": "sum", "aims_api_calls": "count",
        "aims_storage_gb_hours": "last"}
    assert all(set(t.metered_prices) == set(pricing.meters) for t in setup.tiers)
    assert calls["recurring"]["meter"] == setup.meters["api_calls"]
    assert calls["lookup_key"] == "aims_tier_3mo_api_calls_overage"
    assert [t["up_to"] for t in calls["tiers"]] == [10_000, None]  # 3mo includes 10,000 calls
    assert calls["tiers"][1]["unit_amount_decimal"] == "0.04"  # 40 cents per 1,000


async def test_setup_stripe_refuses_an_active_meter_whose_aggregation_differs_from_the_file(
        make_settings: Any, sandbox_app: Any) -> None:
    gateway = build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)
    try:
        await gateway.send(StripeRequest("post", "/v1/billing/meters", {
            "display_name": "calls", "event_name": "aims_api_calls", "default_aggregation": {"formula": "sum"}}))
        with pytest.raises(ConfigurationError) as caught:
            await setup_stripe(gateway, Pricing.load())
    finally:
        await gateway.close()

    assert "aims_api_calls" in caught.value.message and "count" in caught.value.message


# --- the invoice matches each meter's summary -----------------------------------------------------------------------

async def test_a_subscriptions_invoice_bills_each_meter_what_its_summary_said(billing: Billing) -> None:
    customer = await billing.subscribe("3mo")
    start, end = await billing.period(customer)
    billing.advance(hours=2)
    now = billing.sandbox.now()
    await billing.record(customer, 150_000)  # LUC: 100,000 included, then 150 cents per 1,000
    for seconds in (25_000, 15_001):  # 36,000 included, then 8 cents per 1,000
        await billing.record(customer, seconds, meter="compute_seconds")
    calls = [await billing.record(customer, 1, meter="api_calls") for _ in range(12)]
    first = await billing.record(customer, 5_000, meter="storage_gb_hours", timestamp=int(now) - 3600)
    latest = await billing.record(customer, 9_000, meter="storage_gb_hours", timestamp=int(now))
    older = await billing.record(customer, 20_000, meter="storage_gb_hours", timestamp=int(now) - 1800)
    summaries = {meter: billing.metering.summary(customer, meter=meter) for meter in billing.metering.meters()}
    await billing.flusher.flush_once()
    billing.advance(days=32)
    await billing.deliver()

    assert {m: (s.weighted_units, s.overage_cost_cents) for m, s in summaries.items()} == {
        "luc_tokens": (150_000, 7500), "compute_seconds": (40_001, 32),
        "api_calls": (12, 0), "storage_gb_hours": (9_000, 20)}  # the latest value by time: 1,700 over at 12
    assert calls[-1].period_usage == 12 and calls[-1].meter == "api_calls"
    assert (first.period_usage, latest.period_usage, older.period_usage, older.cost_cents) == (5_000, 9_000, 9_000, 0)
    for meter, summary in summaries.items():
        assert await billing.usage_lines(customer, meter) == [
            (start, end, summary.weighted_units, summary.overage_cost_cents)], meter


async def test_pay_per_use_meters_are_each_invoiced_once_the_month_ends_for_what_their_summary_said(
        billing: Billing) -> None:
    customer = await billing.subscribe("p2p")
    await billing.record(customer, 1_000, operation="code")  # 1,500 weighted at 200 cents per 1,000: 300
    await billing.record(customer, 7_777, meter="compute_seconds")  # at 10 cents per 1,000: 78
    for _ in range(30):
        await billing.record(customer, 1, meter="api_calls")  # 30 at 50 cents per 1,000: 2 (1.5, half up)
    await billing.record(customer, 3_000, meter="storage_gb_hours")  # the latest value at 15 per 1,000: 45
    summaries = {meter: billing.metering.summary(customer, meter=meter) for meter in billing.metering.meters()}
    billing.advance(hours=(summaries["luc_tokens"].period_end + 60 - billing.sandbox.now()) / 3600)

    report = await billing.flusher.flush_once()
    again = await billing.flusher.flush_once()

    assert {m: s.overage_cost_cents for m, s in summaries.items()} == {
        "luc_tokens": 300, "compute_seconds": 78, "api_calls": 2, "storage_gb_hours": 45}
    assert (report.invoiced, again.invoiced) == (4, 0)
    for meter, summary in summaries.items():
        assert [amount for *_, amount in await billing.usage_lines(customer, meter)] == [summary.overage_cost_cents]


async def test_a_failed_last_value_gives_the_period_back_its_previous_latest_value(billing: Billing) -> None:
    customer = await billing.subscribe("3mo")
    billing.advance(hours=1)
    now = int(billing.sandbox.now())
    await billing.record(customer, 8_000, meter="storage_gb_hours", timestamp=now - 60, identifier="s1")
    await billing.record(customer, 9_000, meter="storage_gb_hours", timestamp=now, identifier="s2")
    store = billing.stack.store
    [row] = store.query("SELECT id FROM meter_events WHERE identifier = 's2'")

    await store.write(lambda tx: store.metering.mark_failed(tx, [(row["id"], "refused")], now, attempted=True))
    summary = billing.metering.summary(customer, meter="storage_gb_hours")

    assert (summary.weighted_units, summary.events.failed, summary.overage_cost_cents) == (8_000, 1, 8)


async def test_a_last_meters_month_summary_is_its_latest_value_and_ties_go_to_the_later_recorded(
        billing: Billing) -> None:
    customer = await billing.subscribe("p2p")
    now = int(billing.sandbox.now())
    await billing.record(customer, 5_000, meter="storage_gb_hours", timestamp=now)
    tied = await billing.record(customer, 3_000, meter="storage_gb_hours", timestamp=now)
    month = time.strftime("%Y-%m", time.gmtime(now))

    summary = billing.metering.summary(customer, month, meter="storage_gb_hours")
    current = billing.metering.summary(customer, meter="storage_gb_hours")

    assert tied.period_usage == 3_000
    assert (summary.weighted_units, summary.raw_units, summary.events.pending, summary.overage_cost_cents) == (
        3_000, 3_000, 2, 45)  # P2P: 15 cents per 1,000 GB-hours
    assert (current.weighted_units, current.raw_units, current.overage_cost_cents) == (3_000, 3_000, 45)


# --- bad input ----------------------------------------------------------------------------------------------------

async def test_an_unknown_meter_is_refused_naming_the_field_and_the_known_meters(billing: Billing) -> None:
    customer = await billing.subscribe("p2p")

    with pytest.raises(InvalidInput) as caught:
        await billing.metering.record(customer, 5, meter="gpu_hours")

    assert caught.value.param == "meter"
    assert all(name in caught.value.message for name in ("gpu_hours", "luc_tokens", "compute_seconds", "api_calls",
                                                         "storage_gb_hours"))


@pytest.mark.parametrize(("event", "field", "words"), [
    ({"meter": "storage_gb_hours", "units": -5}, "units", "cannot be negative"),
    ({"meter": "api_calls", "units": 3}, "units", "counts events"),
    ({"meter": "compute_seconds", "units": 0}, "units", "positive"),
    ({"meter": "compute_seconds", "units": 5, "operation": "code"}, "operation", "not weighted"),
    ({"meter": "nope", "units": 5}, "meter", "unknown meter"),
    ({"meter": 7, "units": 5}, "meter", "meter"),
], ids=["last negative", "count above 1", "sum zero", "operation on an unweighted meter", "unknown meter",
        "meter not a string"])
async def test_a_batch_refuses_each_bad_meter_event_by_index_and_accepts_the_rest(
        billing: Billing, event: dict[str, Any], field: str, words: str) -> None:
    customer = await billing.subscribe("p2p")
    batch = [{"customer": customer, "units": 10, "identifier": "a"},
             {"customer": customer, "identifier": "bad", **event},
             {"customer": customer, "units": 0, "meter": "storage_gb_hours", "identifier": "c"},
             {"customer": customer, "units": 1, "meter": "api_calls", "identifier": "d"}]

    result = await billing.metering.record_many(batch)

    assert [r.status for r in result.results] == ["accepted", "refused", "accepted", "accepted"]
    refused = result.results[1]
    assert refused.index == 1 and refused.error is not None and refused.error.field == field
    assert words in refused.error.message
    assert [row["identifier"] for row in billing.stack.store.query(
        "SELECT identifier FROM meter_events ORDER BY id")] == ["a", "c", "d"]


async def test_an_identifier_resent_on_another_meter_is_a_conflict_not_new_usage(billing: Billing) -> None:
    customer = await billing.subscribe("p2p")
    await billing.metering.record(customer, 10, identifier="same")

    with pytest.raises(IdempotencyConflict) as caught:
        await billing.metering.record(customer, 10, identifier="same", meter="compute_seconds")

    assert "meter luc_tokens vs compute_seconds" in caught.value.message


async def test_the_tools_take_meters_and_answer_per_meter_summaries_and_quotes(make_server: Any) -> None:
    server = make_server()
    async with Client(server) as client:
        customer = ok(await client.call_tool("create_customer", {"email": "m@example.com"}))["customer"]["id"]
        one = ok(await client.call_tool("create_meter_event", {"customer": customer, "units": 90,
                                                                "meter": "compute_seconds"}))
        batch = ok(await client.call_tool("create_meter_events", {"events": [
            {"customer": customer, "units": 1, "meter": "api_calls"},
            {"customer": customer, "units": 1, "meter": "aims_api_calls"},  # by its Stripe event name
            {"customer": customer, "units": 1, "meter": "gpu_hours"}]}))
        unknown = error_of(await client.call_tool("create_meter_event", {"customer": customer, "units": 1,
                                                                          "meter": "gpu_hours"}))
        calls = ok(await client.call_tool("get_usage_summary", {"customer": customer, "meter": "api_calls"}))
        quote = ok(await client.call_tool("quote_usage", {"units": 1000, "meter": "compute_seconds"}))

    assert one["meter"] == "compute_seconds" and one["weighted_units"] == 90 and one["cost_cents"] == 1
    assert [r["status"] for r in batch["results"]] == ["accepted", "accepted", "refused"]
    assert batch["results"][2]["error"]["field"] == "meter"
    assert unknown["param"] == "meter" and "storage_gb_hours" in unknown["message"]
    assert (calls["meter"], calls["aggregation"], calls["weighted_units"], calls["unit"]) == (
        "api_calls", "count", 2, "call")
    assert (quote["meter"], quote["cost_cents"]) == ("compute_seconds", 10)  # P2P: 10 cents per 1,000 seconds


async def test_http_takes_json_events_naming_their_meter_and_cloudevents_naming_it_in_type(
        make_server: Callable[..., Any]) -> None:
    async with over_http(make_server) as (http, server):
        assert server.state is not None and KEY
        customer = (await server.state.gateway.send(StripeRequest("post", "/v1/customers", {}))).data["id"]
        plain = await http.post("/v1/usage/events", headers=AUTH, json=[
            {"customer": customer, "units": 60, "meter": "compute_seconds", "identifier": "j1"},
            {"customer": customer, "units": 4_000, "meter": "storage_gb_hours", "identifier": "j2"},
            {"customer": customer, "units": -1, "meter": "storage_gb_hours", "identifier": "j3"}])
        base = {"specversion": "1.0", "source": "/svc", "subject": customer}
        cloud = await http.post("/v1/usage/events", headers=CE, json=[
            {**base, "id": "c1", "type": "api_calls", "data": {"units": 1}},
            {**base, "id": "c2", "type": "aims_api_calls", "data": {"units": 1}},
            {**base, "id": "c3", "type": "aims_api_calls", "data": {"units": 1, "meter": "luc_tokens"}},
            {**base, "id": "c4", "type": "gpu_hours", "data": {"units": 1}},
            {**base, "id": "c5", "type": None, "data": {"units": 1}},  # a null type names no meter, not LUC's
            {**base, "id": "c6", "data": {"units": 1}}])
        stored = server.state.store.query("SELECT identifier, meter, event_name FROM meter_events ORDER BY id")

    assert [r["status"] for r in plain.json()["results"]] == ["accepted", "accepted", "refused"]
    assert plain.json()["results"][2]["error"]["field"] == "units"
    assert [(r["status"], r["error"] and r["error"]["field"]) for r in cloud.json()["results"]] == [
        ("accepted", None), ("accepted", None), ("refused", "data.meter"), ("refused", "type"), ("refused", "type"),
        ("refused", "type")]
    assert [(r["identifier"], r["meter"], r["event_name"]) for r in stored] == [
        ("j1", "compute_seconds", "aims_compute_seconds"), ("j2", "storage_gb_hours", "aims_storage_gb_hours"),
        ("c1", "api_calls", "aims_api_calls"), ("c2", "api_calls", "aims_api_calls")]


async def test_report_usage_has_a_row_per_customer_and_meter_used_this_period(billing: Billing) -> None:
    from aims_billing_mcp.services.reports import usage_report

    customer = await billing.subscribe("p2p")
    await billing.record(customer, 1_000)
    await billing.record(customer, 2_500, meter="compute_seconds")

    lines = usage_report(billing.stack.store, billing.metering)

    rows = [line.split() for line in lines if line.startswith(customer)]
    assert [(row[2], row[3]) for row in rows] == [("luc_tokens", "1,000"), ("compute_seconds", "2,500")]
