"""POST /webhooks/stripe over real HTTP with real signatures: verification, exactly-once storage, and provisions
that converge to Stripe's state whatever the order or number of deliveries."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

from aims_billing_mcp.errors import DatabaseBusy
from aims_billing_mcp.sandbox import SANDBOX_WEBHOOK_SECRET
from aims_billing_mcp.services.webhook_events import InvalidEvent, parse_event
from aims_billing_mcp.state import build_state
from aims_billing_mcp.store import Store, refused_write
from aims_billing_mcp.webhooks import sign_webhook_payload
from tests.conftest import ok, serving_http

pytestmark = pytest.mark.anyio
DAY = 86400


@pytest.fixture
async def endpoint(make_server: Callable[..., Any]) -> AsyncIterator[tuple[str, Any]]:
    """The webhook URL of a running `serve --http` app (bearer token set: webhooks must not need it)."""
    server = make_server()
    async with serving_http(server, token="mcp-only-token") as base:
        yield f"{base}/webhooks/stripe", server


def event(kind: str, obj: dict[str, Any], *, created: int | None = None, event_id: str | None = None) -> str:
    return json.dumps({
        "id": event_id or f"evt_{kind.replace('.', '_')}_{obj.get('status', '')}_{created}",
        "object": "event", "type": kind, "created": created or int(time.time()), "api_version": "2026-01-28.clover",
        "livemode": False, "data": {"object": obj},
    })


def subscription(status: str = "active", *, customer: str = "cus_A", sub_id: str = "sub_A", tier: str = "6mo",
                 start: int = 1_790_000_000, **extra: Any) -> dict[str, Any]:
    return {"id": sub_id, "object": "subscription", "customer": customer, "status": status, "start_date": start,
            "metadata": {"aims_tier": tier}, "cancel_at": None, "cancel_at_period_end": False,
            "items": {"object": "list", "data": [{"id": "si_1", "price": {"id": "price_tier"},
                                                  "current_period_start": start,
                                                  "current_period_end": start + 30 * DAY}]}, **extra}


async def post(url: str, payload: str, *, secret: str = SANDBOX_WEBHOOK_SECRET, timestamp: int | None = None,
               signature: str | bytes | None = None) -> httpx.Response:
    header = signature if signature is not None else sign_webhook_payload(payload, secret, timestamp)
    async with httpx.AsyncClient() as http:
        return await http.post(url, content=payload, headers={"Stripe-Signature": header,
                                                              "Content-Type": "application/json"})


def rows(server: Any, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    store: Store = server.state.store
    return store.query(sql, params)


def provision(server: Any, customer: str = "cus_A") -> dict[str, Any] | None:
    found = rows(server, "SELECT * FROM billing_provisions WHERE customer_id = ?", (customer,))
    return found[0] if found else None


async def test_a_signed_subscription_event_provisions_the_tier(endpoint: tuple[str, Any]) -> None:
    url, server = endpoint
    response = await post(url, event("customer.subscription.created", subscription("active"), created=100))
    assert response.status_code == 200 and response.json()["duplicate"] is False
    row = provision(server)
    assert row is not None
    assert (row["tier"], row["status"], row["subscription_id"]) == ("6mo", "active", "sub_A")
    assert row["commitment_end"] > row["current_period_end"]


@pytest.mark.parametrize("kind", ["customer.subscription.created", "payment_intent.succeeded"])
async def test_an_event_the_database_refuses_is_answered_503_so_stripe_delivers_it_again(
    endpoint: tuple[str, Any], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    url, server = endpoint
    obj = subscription() if kind.startswith("customer.") else {"id": "pi_1", "object": "payment_intent",
                                                               "status": "succeeded", "amount_received": 100}
    payload = event(kind, obj, created=100, event_id="evt_refused")
    db = sqlite3.connect(server.state.store.path)
    db.execute("CREATE TRIGGER refuse BEFORE INSERT ON webhook_events BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    db.commit()

    refused = await post(url, payload)

    assert refused.status_code == 503 and "evt_refused was not stored" in refused.json()["error"]
    assert rows(server, "SELECT id FROM webhook_events") == [] and provision(server) is None
    assert "webhook event evt_refused was not stored" in caplog.text
    db.execute("DROP TRIGGER refuse")
    db.commit()
    assert (await post(url, payload)).json() == {"received": True, "id": "evt_refused", "duplicate": False}


def _postgres_disk_full() -> Exception:
    return pytest.importorskip("psycopg").errors.DiskFull("no space left on device")  # type: ignore[no-any-return]


@pytest.mark.parametrize(("make", "refused"), [
    (lambda: sqlite3.OperationalError("database or disk is full"), True),
    (lambda: DatabaseBusy("the database connection was lost"), True),
    (_postgres_disk_full, True),
    (lambda: KeyError("data"), False),  # a bug: answered 500 with its traceback, not "deliver it again"
], ids=["sqlite", "database-busy", "postgres", "a-bug"])
def test_only_the_database_refusing_the_write_is_answered_as_not_stored(
    make: Callable[[], Exception], refused: bool
) -> None:
    assert refused_write(make()) is refused


@pytest.mark.parametrize(
    ("case", "signature", "timestamp", "secret"),
    [
        ("missing", "", None, SANDBOX_WEBHOOK_SECRET),
        ("forged", None, None, "whsec_not_the_right_secret"),
        ("stale", None, int(time.time()) - 301, SANDBOX_WEBHOOK_SECRET),
        ("garbage", "t=abc,v1=zzz", None, SANDBOX_WEBHOOK_SECRET),
        ("non-ascii", f"t={int(time.time())},v1=\u00e9".encode("latin-1"), None, SANDBOX_WEBHOOK_SECRET),
    ],
    # not the clock: every xdist worker must collect the same ids
    ids=["missing", "forged", "stale", "garbage", "non-ascii"],
)
async def test_a_bad_signature_is_refused_with_400_and_nothing_is_stored(
    endpoint: tuple[str, Any], case: str, signature: str | bytes | None, timestamp: int | None, secret: str
) -> None:
    url, server = endpoint
    response = await post(url, event("customer.subscription.created", subscription()), secret=secret,
                          timestamp=timestamp, signature=signature)
    assert response.status_code == 400, case
    assert "signature" in response.json()["error"]
    assert rows(server, "SELECT id FROM webhook_events") == []
    assert provision(server) is None


def _headers_of_every_shape() -> list[tuple[str, Callable[[Callable[[int], str], int], str]]]:
    """(case, header of (the signature for a time, now)): what a sender, a forger or a broken proxy may send."""
    other = sign_webhook_payload("{}", SANDBOX_WEBHOOK_SECRET, 1).split("v1=")[1]
    return [
        ("valid", lambda sig, now: f"t={now},v1={sig(now)}"),
        ("valid among others", lambda sig, now: f"t={now},v0=x,v1={other},v1={sig(now)}"),
        ("valid, spaces around t", lambda sig, now: f"t= {now} ,v1={sig(now)}"),
        ("future timestamp", lambda sig, now: f"t={now + 3600},v1={sig(now + 3600)}"),
        ("stale", lambda sig, now: f"t={now - 301},v1={sig(now - 301)}"),
        ("other signature", lambda sig, now: f"t={now},v1={other}"),
        ("signature of another time", lambda sig, now: f"t={now - 1},v1={sig(now)}"),
        ("only v0", lambda sig, now: f"t={now},v0={sig(now)}"),
        ("no timestamp", lambda sig, now: f"v1={sig(now)}"),
        ("timestamp not a number", lambda sig, now: f"t=abc,v1={sig(now)}"),
        ("t without a value", lambda sig, now: f"t,v1={sig(now)}"),
        ("v1 without a value", lambda sig, now: f"t={now},v1"),
        ("valid, an item without =", lambda sig, now: f"t={now},junk,v1={sig(now)}"),
        ("valid, a tail after the signature", lambda sig, now: f"t={now},v1={sig(now)}=x"),
        ("upper-case hex", lambda sig, now: f"t={now},v1={sig(now).upper()}"),
        ("non-ascii", lambda sig, now: f"t={now},v1=\u00e9{sig(now)[1:]}"),
        ("4,400-digit timestamp", lambda sig, now: f"t={'9' * 4400},v1={sig(now)}"),
    ]


@pytest.mark.parametrize(("case", "shape"), _headers_of_every_shape(), ids=[c for c, _ in _headers_of_every_shape()])
def test_the_signature_check_gives_the_sdks_verdict_and_reason_on_every_header_shape(
    case: str, shape: Callable[[Callable[[int], str], int], str]
) -> None:
    import stripe  # the reference: our check runs over the raw bytes, the SDK's over a decoded string

    from aims_billing_mcp.webhooks import WebhookSignatureInvalid, verify_webhook_signature

    payload = event("customer.subscription.updated", subscription(name="caf\u00e9 \u2603"))
    now = int(time.time())
    header = shape(lambda at: sign_webhook_payload(payload, SANDBOX_WEBHOOK_SECRET, at).split("v1=")[1], now)
    try:
        stripe.WebhookSignature.verify_header(payload, header, SANDBOX_WEBHOOK_SECRET, 300)  # type: ignore[no-untyped-call]
        sdk = None
    except stripe.SignatureVerificationError as exc:
        sdk = str(exc.user_message)
    except TypeError:  # the SDK compares str: a non-ASCII signature raised here (a 500 at the endpoint), not a refusal
        sdk = "No signatures found matching the expected signature for payload"
    try:
        verify_webhook_signature(payload.encode(), header, SANDBOX_WEBHOOK_SECRET)
        ours = None
    except WebhookSignatureInvalid as exc:
        ours = str(exc)
    assert ours == sdk, case
    assert (ours is None) == case.startswith(("valid", "future")), case


async def test_a_signed_body_that_is_not_json_is_refused_with_400(endpoint: tuple[str, Any]) -> None:
    url, server = endpoint
    response = await post(url, "this is not json")
    assert response.status_code == 400
    assert rows(server, "SELECT id FROM webhook_events") == []


async def test_the_same_event_delivered_five_times_at_once_is_applied_once(endpoint: tuple[str, Any]) -> None:
    url, server = endpoint
    payload = event("customer.subscription.created", subscription(), created=100, event_id="evt_once")
    responses: list[httpx.Response] = []

    async def deliver() -> None:
        responses.append(await post(url, payload))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(deliver)

    assert all(r.status_code == 200 for r in responses)
    assert sorted(r.json()["duplicate"] for r in responses) == [False, True, True, True, True]
    assert len(rows(server, "SELECT id FROM webhook_events")) == 1
    assert provision(server)["last_event_id"] == "evt_once"  # type: ignore[index]


async def test_updated_before_completed_ends_in_the_newest_state(endpoint: tuple[str, Any]) -> None:
    url, server = endpoint
    session = {"id": "cs_1", "object": "checkout.session", "mode": "subscription", "customer": "cus_A",
               "subscription": "sub_A", "payment_status": "paid", "metadata": {"aims_tier": "6mo"}}
    await post(url, event("customer.subscription.updated", subscription("past_due"), created=200))
    await post(url, event("checkout.session.completed", session, created=100))
    await post(url, event("customer.subscription.created", subscription("active"), created=100))
    row = provision(server)
    assert (row["status"], row["tier"], row["last_event_created"]) == ("past_due", "6mo", 200)  # type: ignore[index]


async def test_completed_alone_provisions_the_tier_from_the_session_metadata(endpoint: tuple[str, Any]) -> None:
    url, server = endpoint
    session = {"id": "cs_1", "object": "checkout.session", "mode": "subscription", "customer": "cus_B",
               "subscription": "sub_B", "payment_status": "paid", "metadata": {"aims_tier": "3mo"}}
    await post(url, event("checkout.session.completed", session, created=100))
    row = provision(server, "cus_B")
    assert (row["tier"], row["status"], row["subscription_id"]) == ("3mo", "active", "sub_B")  # type: ignore[index]


async def test_deleted_falls_back_to_p2p_and_a_late_update_does_not_revive_it(endpoint: tuple[str, Any]) -> None:
    url, server = endpoint
    await post(url, event("customer.subscription.created", subscription("active"), created=100))
    await post(url, event("customer.subscription.deleted", subscription("canceled"), created=300))
    await post(url, event("customer.subscription.updated", subscription("active"), created=200))
    assert provision(server)["status"] == "canceled"  # type: ignore[index]
    status = await server.state.subscriptions.get_billing_status("cus_A")
    assert (status.tier, status.subscribed_tier, status.entitlements.agents) == ("p2p", "6mo", 0)


async def test_payment_failed_marks_the_customer_past_due_keeping_the_tier(endpoint: tuple[str, Any]) -> None:
    url, server = endpoint
    await post(url, event("customer.subscription.created", subscription("active"), created=100))
    invoice = {"id": "in_1", "object": "invoice", "customer": "cus_A", "status": "open",
               "parent": {"subscription_details": {"subscription": "sub_A"}}}
    await post(url, event("invoice.payment_failed", invoice, created=200))
    status = await server.state.subscriptions.get_billing_status("cus_A")
    assert (status.status, status.tier, status.entitlements.tokens_per_month) == ("past_due", "6mo", 250_000)
    await post(url, event("invoice.paid", {**invoice, "status": "paid"}, created=300))
    assert provision(server)["status"] == "active"  # type: ignore[index]


async def test_an_event_for_an_unknown_customer_is_stored_and_flagged(endpoint: tuple[str, Any]) -> None:
    url, server = endpoint
    invoice = {"id": "in_9", "object": "invoice", "customer": "cus_nobody", "status": "open"}
    response = await post(url, event("invoice.payment_failed", invoice, created=100))
    assert response.status_code == 200
    stored = rows(server, "SELECT customer_id, processed, error FROM webhook_events")
    assert stored == [{"customer_id": "cus_nobody", "processed": 1,
                       "error": "unknown customer cus_nobody: no provision to update (flagged)"}]


async def test_an_unknown_event_type_is_stored_and_acknowledged(endpoint: tuple[str, Any]) -> None:
    url, server = endpoint
    response = await post(url, event("radar.early_fraud_warning.created", {"id": "issfr_1"}, created=100))
    assert response.status_code == 200
    assert rows(server, "SELECT type, processed FROM webhook_events") == [
        {"type": "radar.early_fraud_warning.created", "processed": 1}]


async def test_the_end_of_an_old_subscription_does_not_downgrade_a_newer_live_one(endpoint: tuple[str, Any]) -> None:
    url, server = endpoint
    await post(url, event("customer.subscription.created", subscription("active", sub_id="sub_new", tier="9mo"),
                          created=500))
    await post(url, event("customer.subscription.deleted", subscription("canceled", sub_id="sub_old"), created=600))
    row = provision(server)
    assert (row["subscription_id"], row["status"], row["tier"]) == ("sub_new", "active", "9mo")  # type: ignore[index]


async def test_a_status_read_just_before_an_event_is_not_served_stale_after_it(endpoint: tuple[str, Any]) -> None:
    url, server = endpoint
    await post(url, event("customer.subscription.created", subscription("active"), created=100))
    before = await server.state.subscriptions.get_billing_status("cus_A")  # now cached
    await post(url, event("customer.subscription.deleted", subscription("canceled"), created=200))
    after = await server.state.subscriptions.get_billing_status("cus_A")
    assert (before.tier, after.tier, after.status) == ("6mo", "p2p", "canceled")


def odd(**changes: Any) -> str:
    """A subscription event with some fields replaced by odd shapes (json.dumps writes NaN and big integers)."""
    base = {"id": "evt_odd", "object": "event", "type": "customer.subscription.created", "created": 100,
            "livemode": False, "data": {"object": subscription()}}
    return json.dumps({**base, **changes})


def set_object(obj: Any) -> dict[str, Any]:
    return {"object": obj}


@pytest.mark.parametrize(("case", "payload"), [
    ("type is a number", odd(type=123)),
    ("created is text", odd(created="abc")),
    ("created is 2**70", odd(created=2**70)),
    ("created is NaN", odd(created=float("nan"))),
    ("created is a float", odd(created=1.5)),
    ("created is a boolean", odd(created=True)),
    ("id is an object", odd(id={"a": 1})),
    ("id is null", odd(id=None)),
    ("id is empty", odd(id="")),
    ("data is a string", odd(data="x")),
    ("data.object is a list", odd(data=set_object([1, 2]))),
    ("data.object.id is a number", odd(data=set_object({**subscription(), "id": 7}))),
    ("data.object.customer is an object", odd(data=set_object({**subscription(), "customer": {"id": "cus_A"}}))),
    ("data.object.items is a string", odd(data=set_object({**subscription(), "items": "x"}))),
    ("data.object.status is null", odd(data=set_object({**subscription(), "status": None}))),
    ("data.object.metadata months is text", odd(data=set_object(
        {**subscription(), "metadata": {"aims_tier": "6mo", "aims_delivered_months": "lots"}}))),
    ("invoice parent is a list", odd(type="invoice.paid", data=set_object({"customer": "cus_A", "parent": [1]}))),
    ("payment intent amount is text", odd(type="payment_intent.succeeded", data=set_object(
        {"id": "pi_1", "status": "succeeded", "amount_received": "1000"}))),
    ("customer has a lone surrogate", odd(type="invoice.paid", data=set_object({"customer": "cus_\ud800"}))),
    ("nested 50,000 deep", '{"id": "evt_deep", "type": "invoice.paid", "created": 1, "data": {"object": '
     + "[" * 50_000 + "]" * 50_000 + "}}"),
    ("an array", "[1, 2, 3]"),
])
async def test_a_signed_event_of_odd_shape_is_refused_with_400_and_not_stored(
    endpoint: tuple[str, Any], case: str, payload: str
) -> None:
    url, server = endpoint
    response = await post(url, payload)
    assert response.status_code == 400, (case, response.text)
    assert "invalid payload" in response.json()["error"]
    assert rows(server, "SELECT id FROM webhook_events") == []
    assert provision(server) is None


async def test_an_event_with_a_null_id_is_never_stored_so_it_cannot_be_stored_twice(endpoint: tuple[str, Any]) -> None:
    url, server = endpoint
    payload = odd(id=None)
    answers = [(await post(url, payload)).status_code for _ in range(2)]
    assert answers == [400, 400]
    assert rows(server, "SELECT id FROM webhook_events") == []


async def test_in_sandbox_mode_the_sandbox_signs_with_a_configured_webhook_secret(
    make_server: Callable[..., Any], sandbox: Any
) -> None:
    server = make_server(stripe_webhook_secret="whsec_operator_own_secret")
    async with Client(server) as client:
        product = ok(await client.call_tool("create_product", {"name": "Pack"}))["product"]["id"]
        price = ok(await client.call_tool("create_price", {"product": product, "unit_amount": 2500,
                                                           "currency": "usd"}))["price"]["id"]
        session = ok(await client.call_tool("create_checkout_session", {
            "line_items": [{"price": price}], "customer_email": "c@example.com"}))
        sandbox.complete_checkout_session(session["checkout_session"]["id"])
        assert await anyio.to_thread.run_sync(lambda: sandbox.webhooks.drain(10))
        stored = rows(server, "SELECT type FROM webhook_events")
    assert sandbox.webhooks.deliveries and all(d.delivered for d in sandbox.webhooks.deliveries)
    assert {"type": "checkout.session.completed"} in stored


async def test_a_signature_mismatch_is_logged_in_one_line_naming_the_fix(
    make_server: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server(stripe_webhook_secret="whsec_operator_own_secret")
    async with serving_http(server) as base:
        with caplog.at_level(logging.WARNING, logger="aims_billing_mcp.webhooks"):
            response = await post(f"{base}/webhooks/stripe", event("invoice.paid", {"customer": "cus_A"}))
    assert response.status_code == 400
    [line] = [r.getMessage() for r in caplog.records if "signature check failed" in r.getMessage()]
    assert "\n" not in line
    assert "sandbox's public secret" in line and "STRIPE_WEBHOOK_SECRET" in line
    assert "whsec_operator_own_secret" not in line


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
SHAPES = [
    ("customer.subscription.updated", subscription()),
    ("checkout.session.completed", {"id": "cs_1", "customer": "cus_A", "subscription": "sub_A", "mode": "subscription",
                                    "payment_status": "paid", "metadata": {"aims_tier": "3mo"}}),
    ("invoice.payment_failed", {"id": "in_1", "customer": "cus_A", "subscription": "sub_A",
                                "parent": {"subscription_details": {"subscription": "sub_A"}}}),
    ("payment_intent.succeeded", {"id": "pi_1", "status": "succeeded", "amount_received": 100, "currency": "usd",
                                  "customer": "cus_A", "last_payment_error": {"message": "declined"}}),
]


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in `value` a fuzzed value can go (dict keys and list positions), the root excluded."""
    found: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append((*prefix, key))
        found.extend(paths(child, (*prefix, key)))
    return found


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    copy = json.loads(json.dumps(value))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return copy


@pytest.fixture
def services(make_settings: Callable[..., Any], sandbox_app: Any) -> Iterator[Any]:
    """The service graph without a transport (one for every example of a hypothesis test)."""
    state = build_state(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)
    yield state
    anyio.run(state.gateway.close)
    state.store.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_signed_event_shape_is_stored_and_applied_or_refused_as_invalid_never_a_crash(
    data: st.DataObject, services: Any
) -> None:
    kind, obj = data.draw(st.sampled_from(SHAPES))
    event = {"id": f"evt_fuzz_{data.draw(st.integers(0, 10**9))}", "object": "event", "type": kind,
             "created": 100, "livemode": False, "data": {"object": obj}}
    path = data.draw(st.sampled_from(paths(event)))
    mutated = replaced(event, path, data.draw(JSON_VALUES))
    payload = json.dumps(mutated)
    try:
        checked = parse_event(payload.encode())
    except InvalidEvent:
        return
    result = anyio.run(services.webhook_events.ingest, checked, payload)
    assert result.event_id == mutated["id"]
