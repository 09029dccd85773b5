"""Batch usage ingestion: `create_meter_events` (MCP, up to 100 events) and `POST /v1/usage/events` (HTTP, up to
1,000, JSON or a CloudEvents batch) on the one code path (MeteringService.record_many). Each event accepted, replayed
or refused on its own with its index, field and reason; the accepted ones written together, or none of them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from mcp import Client

from aims_billing_mcp.app import BillingServer
from aims_billing_mcp.errors import InvalidInput
from aims_billing_mcp.routes import build_companion_app
from aims_billing_mcp.shaping import refuse_loose_arguments
from aims_billing_mcp.store import Store
from tests.conftest import error_of, ok, serving_http
from tests.tools.test_wallets import give_tier

pytestmark = pytest.mark.anyio

KEY = "ingest-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
CE = {"Content-Type": "application/cloudevents-batch+json", **AUTH}


def events_in(store: Store) -> list[tuple[str, str, int]]:
    return [(r["customer_id"], r["identifier"], r["raw_units"])
            for r in store.query("SELECT customer_id, identifier, raw_units FROM meter_events ORDER BY id")]


def statuses(answer: dict[str, Any]) -> list[tuple[int, str, str | None]]:
    return [(r["index"], r["status"], r["error"]["field"] if r["error"] else None) for r in answer["results"]]


MIXED: list[Any] = [
    {"customer": "cus_team", "units": 1000, "operation": "code", "identifier": "a"},  # accepted
    {"customer": "cus_team", "units": 1000, "operation": "code", "identifier": "a"},  # duplicate: replayed
    {"customer": "cus_team", "units": 999, "operation": "code", "identifier": "a"},  # conflicting
    {"customer": "cus_team", "units": -5, "identifier": "b"},  # invalid value
    {"customer": "cus_team", "units": "12", "identifier": "c"},  # a string is not a number of units
    {"customer": "cus_team", "units": 10, "colour": "red"},  # unknown field
    {"units": 10},  # no customer
    {"customer": "cus_team", "units": 10, "operation": "dance"},  # unknown operation
    {"customer": "cus_team", "units": 10, "timestamp": int(time.time()) - 90 * 86400},  # outside Stripe's window
    "not an object",
    {"customer": "cus_nobody", "units": 10},  # a customer Stripe does not know
    {"customer": "cus_team", "units": 500, "multiplier": 2.0, "identifier": "d", "metadata": {"run": "7"}},  # accepted
]
MIXED_EXPECTED = [(0, "accepted", None), (1, "replayed", None), (2, "refused", "identifier"),
                  (3, "refused", "units"), (4, "refused", "units"), (5, "refused", "colour"),
                  (6, "refused", "customer"), (7, "refused", "operation"), (8, "refused", "timestamp"),
                  (9, "refused", None), (10, "refused", "customer"), (11, "accepted", None)]


async def test_a_mixed_batch_accepts_the_valid_events_and_refuses_each_other_one_with_its_index_and_field(
        server: BillingServer) -> None:
    async with Client(server) as client:
        assert server.state is not None
        await give_tier(server, "cus_team", "3mo")
        answer = ok(await client.call_tool("create_meter_events", {"events": MIXED}))
        assert statuses(answer) == MIXED_EXPECTED
        assert answer["totals"] == {"events": 12, "accepted": 2, "replayed": 1, "refused": 9,
                                    "weighted_units": 2500, "cost_cents": 0}
        assert answer["results"][1] == {**answer["results"][0], "index": 1, "status": "replayed"}
        assert answer["results"][0] == {"index": 0, "status": "accepted", "identifier": "a", "weighted_units": 1500,
                                        "cost_cents": 0, "period_usage": 1500, "remaining": 100_000 - 1500,
                                        "error": None}
        assert answer["results"][2]["error"]["code"] == "idempotency_conflict"
        assert "units" in answer["results"][3]["error"]["message"]
        assert events_in(server.state.store) == [("cus_team", "a", 1000), ("cus_team", "d", 500)]
        # the period's running total counts the accepted events once each
        summary = ok(await client.call_tool("get_usage_summary", {"customer": "cus_team"}))
        assert summary["weighted_units"] == 2500 and summary["events"]["pending"] == 2

        again = ok(await client.call_tool("create_meter_events", {"events": MIXED}))  # a retry of the whole batch
        assert [s for _, s, _ in statuses(again)] == ["replayed", "replayed"] + ["refused"] * 9 + ["replayed"]
        assert len(events_in(server.state.store)) == 2


@pytest.mark.parametrize("events, field", [
    ([{"customer": "cus_team", "units": 1}] * 101, "events"),
    ([], "events"),
    ({"customer": "cus_team", "units": 1}, "events"),
])
async def test_a_batch_the_tool_cannot_take_is_refused_whole_and_writes_nothing(
        server: BillingServer, events: Any, field: str) -> None:
    async with Client(server) as client:
        assert server.state is not None
        await give_tier(server, "cus_team", "3mo")
        error = error_of(await client.call_tool("create_meter_events", {"events": events}))
        assert error["code"] == "invalid_input" and error["param"] == field
        assert events_in(server.state.store) == []


async def test_a_batch_whose_write_fails_writes_none_of_its_events(server: BillingServer) -> None:
    async with Client(server) as client:
        assert server.state is not None
        await give_tier(server, "cus_team", "3mo")
        # the write fails at its last event (a trigger stands for a full disk or a broken database)
        await server.state.store.write(lambda conn: conn.execute(
            "CREATE TRIGGER fail_last BEFORE INSERT ON meter_events WHEN NEW.identifier = 'e99' "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"))
        batch = [{"customer": "cus_team", "units": 10, "identifier": f"e{n}"} for n in range(100)]
        result = await client.call_tool("create_meter_events", {"events": batch})
        assert result.is_error
        assert events_in(server.state.store) == []
        assert server.state.store.query("SELECT COUNT(*) AS n FROM meter_usage_totals")[0]["n"] == 0


async def test_a_batch_of_100_is_one_writer_job_and_answers_after_its_commit(server: BillingServer) -> None:
    async with Client(server) as client:
        assert server.state is not None
        await give_tier(server, "cus_team", "3mo")
        await server.state.store.write(lambda conn: conn.execute(  # counts the writer jobs that insert events
            "CREATE TABLE jobs (n INTEGER)"))
        for when in ("INSERT", "UPDATE"):  # each job writes the period's total once (an upsert)
            await server.state.store.write(lambda conn, when=when: conn.execute(
                f"CREATE TRIGGER count_{when} AFTER {when} ON meter_usage_totals BEGIN INSERT INTO jobs VALUES (1); "
                "END"))
        batch = [{"customer": "cus_team", "units": 10 + n, "identifier": f"j{n}"} for n in range(100)]
        answer = ok(await client.call_tool("create_meter_events", {"events": batch}))
        assert answer["totals"]["accepted"] == 100
        # one write of the period's total per job: 100 events, one job
        assert server.state.store.query("SELECT COUNT(*) AS n FROM jobs")[0]["n"] == 1
        assert len(events_in(server.state.store)) == 100
        assert [r["period_usage"] for r in answer["results"]][-1] == sum(10 + n for n in range(100))


# --- HTTP ---------------------------------------------------------------------------------------------------------


@asynccontextmanager
async def over_http(make_server: Callable[..., BillingServer], **settings: Any) -> AsyncIterator[
        tuple[httpx.AsyncClient, BillingServer]]:
    server = make_server(aims_billing_ingest_keys=KEY, **settings)
    async with serving_http(server, token="mcp-token") as base, httpx.AsyncClient(base_url=base) as http:
        await give_tier(server, "cus_team", "3mo")
        yield http, server


async def test_http_takes_a_json_array_with_the_tools_semantics(make_server: Callable[..., BillingServer]) -> None:
    async with over_http(make_server) as (http, server):
        assert server.state is not None
        answer = await http.post("/v1/usage/events", json=MIXED, headers=AUTH)  # no MCP token needed
        assert answer.status_code == 200, answer.text
        assert statuses(answer.json()) == MIXED_EXPECTED
        assert events_in(server.state.store) == [("cus_team", "a", 1000), ("cus_team", "d", 500)]


async def test_http_takes_a_cloudevents_batch_and_names_cloudevents_attributes_in_refusals(
        make_server: Callable[..., BillingServer]) -> None:
    now = int(time.time())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60))
    base = {"specversion": "1.0", "source": "/agents/a1", "type": "aims_luc_units", "time": stamp}
    batch = [
        {**base, "id": "ce-1", "subject": "cus_team", "data": {"units": 400, "operation": "research"}},
        {**base, "id": "ce-2", "type": "luc_tokens", "subject": "cus_team", "data": {"units": 100}},
        {**base, "id": "ce-3", "data": {"units": 1}},  # no subject
        {**base, "subject": "cus_team", "data": {"units": 1}},  # no id
        {**base, "id": "ce-5", "type": "gpu_hours", "subject": "cus_team", "data": {"units": 1}},  # unknown meter
        {**base, "id": "ce-6", "subject": "cus_team", "data": {"units": 0}},
        {**base, "id": "ce-7", "subject": "cus_team", "time": "yesterday", "data": {"units": 1}},
        {**base, "id": "ce-8", "subject": "cus_team", "data": {"units": 1, "customer": "cus_other"}},
        {**base, "id": "x" * 101, "subject": "cus_team", "data": {"units": 1}},
        {**base, "id": "ce-10", "subject": "cus team", "data": {"units": 1}},
        {**base, "id": "ce-11", "subject": "cus_team", "data": {"units": 1}, "tenant": "t1"},
        {**base, "id": None, "subject": "cus_team", "data": {"units": 1}},  # a null id is no id
        {**base, "id": "ce-13", "specversion": "0.3", "subject": "cus_team", "data": {"units": 1}},
        {**base, "id": "ce-14", "subject": "cus_team", "data": [1]},
    ]
    async with over_http(make_server) as (http, server):
        assert server.state is not None
        answer = await http.post("/v1/usage/events", json=batch, headers=CE)
        assert answer.status_code == 200, answer.text
        assert statuses(answer.json()) == [
            (0, "accepted", None), (1, "accepted", None), (2, "refused", "subject"), (3, "refused", "id"),
            (4, "refused", "type"), (5, "refused", "data.units"), (6, "refused", "time"),
            (7, "refused", "data.customer"), (8, "refused", "id"), (9, "refused", "subject"),
            (10, "refused", "tenant"), (11, "refused", "id"), (12, "refused", "specversion"), (13, "refused", "data")]
        assert answer.json()["results"][0]["weighted_units"] == 800
        stored = server.state.store.query("SELECT identifier, timestamp, operation FROM meter_events ORDER BY id")
        assert stored == [{"identifier": "ce-1", "timestamp": now - 60, "operation": "research"},
                          {"identifier": "ce-2", "timestamp": now - 60, "operation": None}]


@pytest.mark.parametrize("body, headers, status, code", [
    (b"[" + b",".join([b'{"customer":"cus_team","units":1}'] * 1001) + b"]", {}, 413, "too_many_events"),
    (b'{"customer": "cus_team", "units": 1}', {}, 400, "invalid_body"),
    (b"[]", {}, 400, "invalid_body"),
    (b"customer=cus_team&units=1", {}, 400, "invalid_json"),
    (b"[1, 2", {}, 400, "invalid_json"),
    (b'[{"customer": "cus_team", "units": 1}]', {"Content-Type": "text/csv"}, 415, "unsupported_media_type"),
    (b"[" + b" " * (1024 * 1024) + b"]", {}, 413, "request_too_large"),
])
async def test_http_refuses_a_body_it_cannot_take_whole_and_writes_nothing(
        make_server: Callable[..., BillingServer], body: bytes, headers: dict[str, str], status: int,
        code: str) -> None:
    async with over_http(make_server) as (http, server):
        assert server.state is not None
        answer = await http.post("/v1/usage/events", content=body,
                                 headers={"Content-Type": "application/json", **AUTH, **headers})
        assert (answer.status_code, answer.json()["code"]) == (status, code), answer.text
        assert events_in(server.state.store) == []


async def test_http_takes_1000_events_in_one_request(make_server: Callable[..., BillingServer]) -> None:
    batch = [{"customer": "cus_team", "units": 1, "identifier": f"k{n}"} for n in range(1000)]
    async with over_http(make_server) as (http, server):
        assert server.state is not None
        answer = await http.post("/v1/usage/events", json=batch, headers=AUTH)
        assert answer.status_code == 200 and answer.json()["totals"]["accepted"] == 1000
        assert len(events_in(server.state.store)) == 1000


async def test_http_answers_503_and_writes_nothing_when_the_batch_cannot_be_written(
        make_server: Callable[..., BillingServer]) -> None:
    batch = [{"customer": "cus_team", "units": 1, "identifier": f"e{n}"} for n in range(100)]
    async with over_http(make_server) as (http, server):
        assert server.state is not None
        await server.state.store.write(lambda conn: conn.execute(
            "CREATE TRIGGER fail_last BEFORE INSERT ON meter_events WHEN NEW.identifier = 'e99' "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"))
        answer = await http.post("/v1/usage/events", json=batch, headers=AUTH)
        assert (answer.status_code, answer.json()["code"]) == (503, "write_failed")
        assert events_in(server.state.store) == []


@pytest.mark.parametrize("settings, code", [
    ({"aims_billing_read_only": True}, "read_only"),
    ({"aims_billing_tools": "get_usage_summary"}, "surface_not_allowed"),
])
async def test_read_only_mode_and_the_allow_list_govern_http_ingestion_as_create_meter_events(
        make_server: Callable[..., BillingServer], settings: dict[str, Any], code: str) -> None:
    async with over_http(make_server, **settings) as (http, server):
        assert server.state is not None
        answer = await http.post("/v1/usage/events", json=[{"customer": "cus_team", "units": 1}], headers=AUTH)
        assert (answer.status_code, answer.json()["code"]) == (403, code)
        assert events_in(server.state.store) == []


async def test_the_stdio_companion_app_serves_ingestion_too(make_server: Callable[..., BillingServer]) -> None:
    server = make_server(aims_billing_ingest_keys=KEY)
    async with Client(server):
        assert server.state is not None
        await give_tier(server, "cus_team", "3mo")
        app = build_companion_app(lambda: server.state, policy=server.http_policy)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
            answer = await http.post("/v1/usage/events", json=[{"customer": "cus_team", "units": 7}], headers=AUTH)
        assert answer.status_code == 200 and answer.json()["totals"]["accepted"] == 1
        assert len(events_in(server.state.store)) == 1


@pytest.mark.parametrize(("events", "passes"), [
    ([{"customer": "cus_team", "units": 1}] * 100, True),
    ([{"customer": "cus_team", "units": 1}] * 101, False),
    ([], False),
    ({"customer": "cus_team", "units": 1}, False),
])
def test_the_strict_check_takes_a_batch_as_it_came_or_refuses_it_as_before(
        server: BillingServer, events: Any, passes: bool) -> None:
    """The strict argument check writes and reads back a stand-in of the events list (its length), not the events:
    a list it passes reaches the tool as the very list sent; one it refuses is refused naming `events`."""
    tool = server._tool_manager.get_tool("create_meter_events")
    assert tool is not None
    if passes:
        assert refuse_loose_arguments(tool, {"events": events})["events"] is events
    else:
        with pytest.raises(InvalidInput) as refused:
            refuse_loose_arguments(tool, {"events": events})
        assert refused.value.param == "events"


def test_a_batch_sent_as_a_json_string_is_checked_for_unreadable_text_once_parsed(server: BillingServer) -> None:
    """Some clients send a list argument as JSON inside a string; once parsed, a lone surrogate in it (which cannot
    be stored) is refused naming `events`, as the strict check of the parsed list refused it before."""
    tool = server._tool_manager.get_tool("create_meter_events")
    assert tool is not None

    with pytest.raises(InvalidInput) as refused:
        refuse_loose_arguments(tool, {"events": '[{"customer": "cus_team", "units": 1, "identifier": "\\ud800"}]'})

    assert refused.value.param == "events"
