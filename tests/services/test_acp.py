"""The Agentic Commerce Protocol seller over REST (2026-04-17): a buyer agent checks out LUC packs with a Shared
Payment Token against the in-process sandbox. Every answer is validated against the published JSON Schema
(tests/data/acp/schema.agentic_checkout.json, copied from agentic-commerce-protocol/agentic-commerce-protocol
spec/2026-04-17/json-schema)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import jsonschema
import pytest
from starlette.applications import Starlette

from aims_billing_mcp.acp_http import acp_routes
from aims_billing_mcp.services.acp import AcpService
from aims_billing_mcp.services.acp_models import AcpError, AcpResponse
from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from tests.conftest import Clock, commerce_stack, serving_http
from tests.support.money_invariant import money_kept  # noqa: F401  (autouse: the money invariant after each test)

pytestmark = pytest.mark.anyio

KEY = "acp_test_key_1"
BUNDLE = json.loads((Path(__file__).parents[1] / "data" / "acp" / "schema.agentic_checkout.json").read_text("utf-8"))
_VALIDATOR = jsonschema.validators.validator_for(BUNDLE)


def conforms(body: Any, definition: str) -> None:
    schema = {**BUNDLE, "$ref": f"#/$defs/{definition}"}
    _VALIDATOR(schema, format_checker=_VALIDATOR.FORMAT_CHECKER).validate(body)


class Env:
    def __init__(self, http: httpx.AsyncClient, acp: AcpService, ledger: LedgerService, store: Store,
                 clock: Clock) -> None:
        self.http, self.acp, self.ledger, self.store, self.clock = http, acp, ledger, store, clock
        self.keys = 0

    async def post(self, path: str, body: Any, *, key: str | None = "auto", token: str | None = KEY,
                   expect: int | None = None) -> httpx.Response:
        headers = {"API-Version": "2026-04-17", "Content-Type": "application/json"}
        if key == "auto":
            self.keys += 1
            key = f"k-{self.keys}"
        if key is not None:
            headers["Idempotency-Key"] = key
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        response = await self.http.post(path, content=json.dumps(body) if body is not None else b"", headers=headers)
        return checked(response, path, expect)

    async def get(self, path: str, *, token: str | None = KEY, expect: int | None = 200) -> httpx.Response:
        headers = {"API-Version": "2026-04-17", **({"Authorization": f"Bearer {token}"} if token else {})}
        return checked(await self.http.get(path, headers=headers), path, expect)

    async def create(self, items: list[str], *, agent: str | None = "buyer", **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"currency": "usd", "line_items": [{"id": item} for item in items],
                                "capabilities": {}, **extra}
        if agent is not None:
            body["metadata"] = {"agent_id": agent}
        response = await self.post("/acp/checkout_sessions", body, expect=201)
        data: dict[str, Any] = response.json()
        return data


def checked(response: httpx.Response, path: str, expect: int | None) -> httpx.Response:
    """Every answer conforms: an Error for 4xx/5xx, CheckoutSessionWithOrder once completed, else CheckoutSession."""
    if expect is not None:
        assert response.status_code == expect, response.text
    body = response.json()
    if response.status_code >= 400:
        conforms(body, "Error")
    elif path.endswith("acp.json"):
        conforms(body, "DiscoveryResponse")
    else:
        conforms(body, "CheckoutSessionWithOrder" if body["status"] == "completed" else "CheckoutSession")
    assert response.headers["API-Version"] == "2026-04-17"
    return response


def spt(data: dict[str, Any]) -> dict[str, Any]:
    return {"payment_data": {"handler_id": "stripe_spt",
                             "instrument": {"type": "card", "credential": {"type": "spt", "token": data["token"]}}}}


def pay(token: str) -> dict[str, Any]:
    return spt({"token": token})


@pytest.fixture
async def env(make_settings: Callable[..., Settings], sandbox_app: Any, store: Store) -> AsyncIterator[Env]:
    clock = Clock()
    async with (commerce_stack(make_settings(), sandbox_app, store) as stack,
                stack.acp_seller(KEY, clock=clock, public_url="https://seller.test") as (http, acp)):
        yield Env(http, acp, stack.ledger, store, clock)


async def test_discovery_document(env: Env) -> None:
    body = (await env.get("/.well-known/acp.json", token=None)).json()
    assert body["protocol"]["version"] == "2026-04-17" and body["api_base_url"] == "https://seller.test/acp"
    assert body["capabilities"]["services"] == ["checkout"]


async def test_checkout_to_completed_with_a_shared_payment_token(env: Env) -> None:
    created = await env.create(["luc_10k"])
    assert created["status"] == "ready_for_payment" and created["id"].startswith("cs_")
    assert created["totals"][-1] == {"type": "total", "display_text": "Total", "amount": 1000}
    assert created["fulfillment_options"][0]["type"] == "digital"
    sid = created["id"]

    updated = (await env.post(f"/acp/checkout_sessions/{sid}", {
        "line_items": [{"id": "luc_10k"}, {"id": "luc_50k"}, {"id": "luc_10k"}],
        "buyer": {"email": "owner@example.com", "first_name": "Ada"}}, expect=200)).json()
    lines = {line["item"]["id"]: line["quantity"] for line in updated["line_items"]}
    total = 2 * env.acp._pricing.items["luc_10k"].unit_price + env.acp._pricing.items["luc_50k"].unit_price
    assert lines == {"luc_10k": 2, "luc_50k": 1} and updated["totals"][-1]["amount"] == total
    assert updated["buyer"]["email"] == "owner@example.com"

    assert (await env.get(f"/acp/checkout_sessions/{sid}")).json()["status"] == "ready_for_payment"
    before = env.ledger.get_wallet("buyer").balance
    done = (await env.post(f"/acp/checkout_sessions/{sid}/complete", pay("spt_test_visa_1"), key="pay-1",
                           expect=200)).json()
    assert done["status"] == "completed" and done["order"]["checkout_session_id"] == sid
    assert done["order"]["permalink_url"] == f"https://seller.test/acp/checkout_sessions/{sid}"
    luc = 2 * 10_000 + env.acp._pricing.items["luc_50k"].luc
    assert env.ledger.get_wallet("buyer").balance == before + luc

    # replay of the complete: the stored answer, no second charge or credit
    again = await env.post(f"/acp/checkout_sessions/{sid}/complete", pay("spt_test_visa_1"), key="pay-1",
                           expect=200)
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == done
    assert env.ledger.get_wallet("buyer").balance == before + luc
    # a new attempt on a finished session: 405; and so is cancel
    await env.post(f"/acp/checkout_sessions/{sid}/complete", pay("spt_test_visa_2"), expect=405)
    await env.post(f"/acp/checkout_sessions/{sid}/cancel", None, expect=405)
    await env.post(f"/acp/checkout_sessions/{sid}", {"order_notes": "late"}, expect=405)
    assert (await env.get(f"/acp/checkout_sessions/{sid}")).json()["status"] == "completed"


async def test_a_declined_token_leaves_the_session_payable(env: Env) -> None:
    sid = (await env.create(["luc_10k"]))["id"]
    declined = (await env.post(f"/acp/checkout_sessions/{sid}/complete", pay("spt_test_declined"),
                               expect=200)).json()
    assert declined["status"] == "ready_for_payment" and "order" not in declined
    assert [(m["type"], m["code"]) for m in declined["messages"]] == [("error", "payment_declined")]
    assert env.ledger.get_wallet("buyer").balance == 0
    done = (await env.post(f"/acp/checkout_sessions/{sid}/complete", pay("spt_test_ok_2"), expect=200)).json()
    assert done["status"] == "completed" and env.ledger.get_wallet("buyer").balance == 10_000


async def test_idempotency_key_rules(env: Env) -> None:
    body = {"currency": "usd", "line_items": [{"id": "luc_10k"}], "capabilities": {},
            "metadata": {"agent_id": "buyer"}}
    missing = (await env.post("/acp/checkout_sessions", body, key=None, expect=400)).json()
    assert missing["code"] == "idempotency_key_required"
    first = await env.post("/acp/checkout_sessions", body, key="same", expect=201)
    assert "Idempotent-Replayed" not in first.headers
    reordered = dict(reversed(list(body.items())))  # key order does not matter
    replay = await env.post("/acp/checkout_sessions", reordered, key="same", expect=201)
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.json()["id"] == first.json()["id"]
    conflict = (await env.post("/acp/checkout_sessions", {**body, "line_items": [{"id": "luc_50k"}]}, key="same",
                               expect=422)).json()
    assert conflict["code"] == "idempotency_conflict"
    # the same key on another endpoint is another request
    other = await env.post(f"/acp/checkout_sessions/{first.json()['id']}", {"order_notes": "hi"}, key="same",
                           expect=200)
    assert "Idempotent-Replayed" not in other.headers
    count = env.store.query_one("SELECT COUNT(*) AS n FROM acp_checkout_sessions")
    assert count is not None and count["n"] == 1


async def test_a_key_still_in_flight_is_409_with_retry_after(env: Env) -> None:
    release = anyio.Event()
    started = anyio.Event()

    async def slow() -> AcpResponse:
        started.set()
        await release.wait()
        return AcpResponse(200, {"ok": True})

    outcome: dict[str, AcpResponse] = {}

    async def first() -> None:
        outcome["first"] = await env.acp.idempotent("me", "/acp/x", "k", {"a": 1}, slow)

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await started.wait()
        with pytest.raises(AcpError) as caught:
            await env.acp.idempotent("me", "/acp/x", "k", {"a": 1}, slow)
        assert (caught.value.status, caught.value.code) == (409, "idempotency_in_flight")
        assert caught.value.headers["Retry-After"] == "1"
        conforms(caught.value.body(), "Error")
        release.set()
    assert outcome["first"].status == 200 and not outcome["first"].replayed
    replay = await env.acp.idempotent("me", "/acp/x", "k", {"a": 1.0}, slow)  # 1.0 is 1
    assert replay.replayed and replay.body == {"ok": True}


async def test_bad_bodies_are_400_with_the_offending_path(env: Env) -> None:
    url = "/acp/checkout_sessions"
    zero = (await env.post(url, {"currency": "usd", "line_items": [{"id": "luc_10k", "quantity": 0}],
                                 "capabilities": {}}, expect=400)).json()
    assert zero["param"] == "$.line_items[0].quantity"  # the 2026-04-17 Item has no quantity: repeat the id
    no_caps = (await env.post(url, {"currency": "usd", "line_items": [{"id": "luc_10k"}]}, expect=400)).json()
    assert no_caps["param"] == "$.capabilities" and no_caps["code"] == "missing_field"
    empty = (await env.post(url, {"currency": "usd", "line_items": [], "capabilities": {}}, expect=400)).json()
    assert empty["param"] == "$.line_items"
    unknown = (await env.post(url, {"currency": "usd", "line_items": [{"id": "luc_10k"}, {"id": "gold_bars"}],
                                    "capabilities": {}}, expect=400)).json()
    assert (unknown["code"], unknown["param"]) == ("invalid_item_id", "$.line_items[1].id")
    eur = (await env.post(url, {"currency": "eur", "line_items": [{"id": "luc_10k"}], "capabilities": {}},
                          expect=400)).json()
    assert (eur["code"], eur["param"]) == ("unsupported_currency", "$.currency")
    email = (await env.post(url, {"currency": "usd", "line_items": [{"id": "luc_10k"}], "capabilities": {},
                                  "buyer": {"email": 7}}, expect=400)).json()
    assert email["param"] == "$.buyer.email"
    not_json = await env.http.post(url, content=b"{nope", headers={"Authorization": f"Bearer {KEY}",
                                                                   "Idempotency-Key": "j", "API-Version": "2026-04-17"})
    assert checked(not_json, url, 400).json()["code"] == "invalid_json"
    sid = (await env.create(["luc_10k"]))["id"]
    bad_pay = (await env.post(f"{url}/{sid}/complete", {"payment_data": {"handler_id": "stripe_spt",
               "instrument": {"type": "card", "credential": {"type": "spt", "token": "tok_visa"}}}},
               expect=400)).json()
    assert bad_pay["param"] == "$.payment_data.instrument.credential"
    assert (await env.get(f"{url}/cs_nothing", expect=404)).json()["code"] == "not_found"


async def test_bearer_token_is_required(env: Env) -> None:
    body = {"currency": "usd", "line_items": [{"id": "luc_10k"}], "capabilities": {}}
    assert (await env.post("/acp/checkout_sessions", body, token=None, expect=401)).json()["code"] == "unauthorized"
    wrong = (await env.post("/acp/checkout_sessions", body, token="nope", expect=401)).json()
    assert wrong["code"] == "invalid_api_key"
    await env.get("/acp/checkout_sessions/cs_x", token="nope", expect=401)


async def test_cancel_then_complete_is_405(env: Env) -> None:
    sid = (await env.create(["luc_10k"]))["id"]
    canceled = (await env.post(f"/acp/checkout_sessions/{sid}/cancel",
                               {"intent_trace": {"reason_code": "timing_deferred"}}, expect=200)).json()
    assert canceled["status"] == "canceled"
    refused = (await env.post(f"/acp/checkout_sessions/{sid}/complete", pay("spt_test_ok"), expect=405)).json()
    assert refused["code"] == "session_not_completable"
    await env.post(f"/acp/checkout_sessions/{sid}/cancel", None, expect=405)


async def test_without_a_wallet_the_session_is_not_ready(env: Env) -> None:
    session = await env.create(["luc_10k"], agent=None)
    assert session["status"] == "not_ready_for_payment"
    assert [(m["code"], m["param"]) for m in session["messages"]] == [("missing", "$.metadata.agent_id")]
    refused = (await env.post(f"/acp/checkout_sessions/{session['id']}/complete", pay("spt_test_ok"),
                              expect=400)).json()
    assert (refused["code"], refused["param"]) == ("not_ready_for_payment", "$.metadata.agent_id")
    ghost = await env.create(["luc_10k"], agent="ghost")
    assert ghost["status"] == "not_ready_for_payment" and ghost["messages"][0]["code"] == "invalid"


async def test_an_expired_session_cannot_be_completed(env: Env) -> None:
    sid = (await env.create(["luc_10k"]))["id"]
    env.clock.advance(24 * 3600 + 1)
    assert (await env.get(f"/acp/checkout_sessions/{sid}")).json()["status"] == "expired"
    await env.post(f"/acp/checkout_sessions/{sid}/complete", pay("spt_test_ok"), expect=405)


async def test_the_server_serves_acp_with_its_own_keys_beside_the_mcp_token(make_server: Any) -> None:
    server = make_server(aims_billing_acp_api_keys=["platform-key"])
    async with serving_http(server, token="mcp-only") as base, httpx.AsyncClient(base_url=base) as http:
        found = await http.get("/acp/checkout_sessions/cs_none", headers={"Authorization": "Bearer platform-key",
                                                                         "API-Version": "2026-04-17"})
        refused = await http.get("/acp/checkout_sessions/cs_none", headers={"Authorization": "Bearer mcp-only",
                                                                           "API-Version": "2026-04-17"})
        discovery = await http.get("/.well-known/acp.json")
    assert found.status_code == 404 and found.headers["API-Version"] == "2026-04-17"
    conforms(found.json(), "Error")
    assert refused.status_code == 401
    assert discovery.status_code == 200


async def test_the_routes_answer_503_until_the_server_has_started() -> None:
    starting = Starlette(routes=acp_routes(lambda: None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=starting), base_url="http://x") as http:
        down = await http.get("/acp/checkout_sessions/cs_none", headers={"Authorization": "Bearer k2"})
    assert down.status_code == 503
    conforms(down.json(), "Error")
