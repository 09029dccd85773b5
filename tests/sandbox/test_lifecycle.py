"""The subscription lifecycle: trials, the sandbox clock, renewals, failures, cancellation, triggers,
and two processes on one sandbox file."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from aims_billing_mcp.sandbox import Sandbox, StripeError, create_app
from aims_billing_mcp.sandbox.customers import new_customer
from aims_billing_mcp.sandbox.subscriptions import period_end_after

from .conftest import AUTH, ok_json, post

Obj = dict[str, Any]
DAY = 86400


def subscribe(api: TestClient, sandbox: Sandbox, price: Obj, *, trial_days: int | None = None,
              **extra: str) -> Obj:
    """Complete a subscription checkout for ``price``; returns the completed session."""
    data = {"mode": "subscription", "success_url": "https://example.com/ok", "customer_email": "s@example.com",
            "line_items[0][price]": price["id"], "line_items[0][quantity]": "1", **extra}
    if trial_days is not None:
        data["subscription_data[trial_period_days]"] = str(trial_days)
    session = ok_json(post(api, "/v1/checkout/sessions", data))
    return sandbox.complete_checkout_session(session["id"])


def get(sandbox: Sandbox, obj_id: str) -> Obj:
    found = sandbox.get_object(obj_id)
    assert found is not None
    return found


def types(events: list[Obj]) -> list[str]:
    return [e["type"] for e in events]


@pytest.mark.parametrize(("trial_days", "status", "invoice_total", "payment_status"), [
    (None, "active", 2000, "paid"),
    (14, "trialing", 0, "no_payment_required"),
])
def test_completing_a_subscription_checkout_with_or_without_a_trial(
    api: TestClient, sandbox: Sandbox, monthly: Obj, trial_days: int | None, status: str, invoice_total: int,
    payment_status: str,
) -> None:
    seen: list[Obj] = []
    sandbox.add_event_listener(seen.append)
    done = subscribe(api, sandbox, monthly, trial_days=trial_days, **{
        "subscription_data[metadata][tier]": "pro", "metadata[order]": "42"})
    sub, invoice = get(sandbox, done["subscription"]), get(sandbox, done["invoice"])
    item = sub["items"]["data"][0]
    assert sub["status"] == status and sub["metadata"] == {"tier": "pro"}
    assert (invoice["status"], invoice["total"], invoice["amount_paid"]) == ("paid", invoice_total, invoice_total)
    assert invoice["billing_reason"] == "subscription_create" and done["payment_status"] == payment_status
    if trial_days:
        assert sub["trial_end"] - sub["trial_start"] == trial_days * DAY
        assert (item["current_period_start"], item["current_period_end"]) == (sub["trial_start"], sub["trial_end"])
        assert invoice["lines"]["data"][0]["description"].startswith("Trial period for")
    else:
        assert sub["trial_start"] is None and item["current_period_end"] - item["current_period_start"] >= 28 * DAY
    completed = next(e for e in seen if e["type"] == "checkout.session.completed")["data"]["object"]
    assert (completed["subscription"], completed["customer"], completed["metadata"]) == (
        sub["id"], sub["customer"], {"order": "42"})
    assert types(seen)[0] == "customer.created"
    assert {"invoice.created", "invoice.finalized", "invoice.paid", "customer.subscription.created"} <= set(types(seen))


@pytest.mark.parametrize("days", ["0", "-1", "x"])
def test_trial_period_days_must_be_a_positive_integer(api: TestClient, monthly: Obj, days: str) -> None:
    response = post(api, "/v1/checkout/sessions", {
        "mode": "subscription", "success_url": "https://example.com/ok", "line_items[0][price]": monthly["id"],
        "line_items[0][quantity]": "1", "subscription_data[trial_period_days]": days})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "subscription_data[trial_period_days]"


def test_the_clock_moves_only_forward_and_is_shared_through_the_file(tmp_path: Path) -> None:
    db = str(tmp_path / "sandbox.db")
    first, second = Sandbox(db), Sandbox(db)
    try:
        before = first.now()
        assert first.advance(days=2, hours=3) == []
        assert 2 * DAY + 3 * 3600 <= second.now() - before <= 2 * DAY + 3 * 3600 + 5
        with pytest.raises(ValueError):
            first.advance(days=-1)
    finally:
        first.close()
        second.close()


def test_advance_renews_with_a_paid_cycle_invoice_for_the_next_period(
    api: TestClient, sandbox: Sandbox, monthly: Obj
) -> None:
    sub_id = subscribe(api, sandbox, monthly)["subscription"]
    start, end = (get(sandbox, sub_id)["items"]["data"][0][k] for k in ("current_period_start", "current_period_end"))
    assert sandbox.advance(days=1) == []
    events = sandbox.advance(days=31)
    assert types(events)[0] == "invoice.created" and types(events)[-1] == "customer.subscription.updated"
    assert [t for t in types(events) if t.startswith("invoice.")] == [
        "invoice.created", "invoice.finalized", "invoice.paid", "invoice.payment_succeeded"]
    sub = get(sandbox, sub_id)
    item = sub["items"]["data"][0]
    assert item["current_period_start"] == end and item["current_period_end"] == period_end_after(sub, end)
    invoice = get(sandbox, sub["latest_invoice"])
    assert (invoice["billing_reason"], invoice["status"], invoice["total"]) == ("subscription_cycle", "paid", 2000)
    assert invoice["lines"]["data"][0]["period"] == {"start": end, "end": item["current_period_end"]}
    assert invoice["created"] == end and events[0]["created"] == end
    updated = events[-1]["data"]
    assert updated["previous_attributes"]["items"]["data"][0]["current_period_start"] == start
    assert ok_json(api.get(f"/v1/invoices?subscription={sub_id}&status=paid"))["data"][0]["id"] == invoice["id"]


def test_advance_over_several_periods_bills_each_one(api: TestClient, sandbox: Sandbox, monthly: Obj) -> None:
    sub_id = subscribe(api, sandbox, monthly)["subscription"]
    events = sandbox.advance(days=95)
    assert types(events).count("invoice.paid") == 3
    assert len(ok_json(api.get(f"/v1/invoices?subscription={sub_id}"))["data"]) == 4


def test_a_failing_customer_renewal_stays_open_and_the_subscription_goes_past_due(
    api: TestClient, sandbox: Sandbox, monthly: Obj
) -> None:
    done = subscribe(api, sandbox, monthly)
    sandbox.fail_payments(done["customer"], True)
    events = sandbox.advance(days=32)
    assert [t for t in types(events) if t.startswith("invoice.")] == [
        "invoice.created", "invoice.finalized", "invoice.payment_failed"]
    sub = get(sandbox, done["subscription"])
    invoice = get(sandbox, sub["latest_invoice"])
    assert sub["status"] == "past_due"
    assert (invoice["status"], invoice["attempt_count"], invoice["amount_remaining"]) == ("open", 1, 2000)
    assert invoice["next_payment_attempt"] > invoice["created"]
    assert events[-1]["data"]["previous_attributes"]["status"] == "active"
    sandbox.fail_payments(done["customer"], False)
    sandbox.advance(days=31)
    assert get(sandbox, done["subscription"])["status"] == "active"


def test_a_trial_ends_into_an_active_paid_period(api: TestClient, sandbox: Sandbox, monthly: Obj) -> None:
    sub_id = subscribe(api, sandbox, monthly, trial_days=7)["subscription"]
    trial_end = get(sandbox, sub_id)["trial_end"]
    events = sandbox.advance(days=7, hours=1)
    sub = get(sandbox, sub_id)
    assert sub["status"] == "active" and sub["items"]["data"][0]["current_period_start"] == trial_end
    assert get(sandbox, sub["latest_invoice"])["amount_paid"] == 2000
    assert events[-1]["data"]["previous_attributes"]["status"] == "trialing"


@pytest.mark.parametrize("how", ["cancel_at_period_end", "cancel_at"])
def test_advance_cancels_at_the_scheduled_time(api: TestClient, sandbox: Sandbox, monthly: Obj, how: str) -> None:
    sub_id = subscribe(api, sandbox, monthly)["subscription"]
    period_end = get(sandbox, sub_id)["items"]["data"][0]["current_period_end"]
    when = period_end if how == "cancel_at_period_end" else sandbox.now() + 10 * DAY
    data = {"cancel_at_period_end": "true"} if how == "cancel_at_period_end" else {"cancel_at": str(when)}
    updated = ok_json(post(api, f"/v1/subscriptions/{sub_id}", data))
    assert updated["cancel_at"] == when and updated["status"] == "active"
    events = ok_json(api.get("/v1/events?type=customer.subscription.updated"))["data"]
    assert events[0]["data"]["previous_attributes"]["cancel_at"] is None
    assert sandbox.advance(days=5) == []
    events = sandbox.advance(days=40)
    assert types(events) == ["customer.subscription.deleted"]
    sub = get(sandbox, sub_id)
    assert (sub["status"], sub["ended_at"]) == ("canceled", when) and sub["canceled_at"] is not None
    assert sandbox.advance(days=40) == []


def test_cancel_at_can_be_unset_with_an_empty_string(api: TestClient, sandbox: Sandbox, monthly: Obj) -> None:
    sub_id = subscribe(api, sandbox, monthly)["subscription"]
    ok_json(post(api, f"/v1/subscriptions/{sub_id}", {"cancel_at": str(sandbox.now() + 3 * DAY)}))
    cleared = ok_json(post(api, f"/v1/subscriptions/{sub_id}", {"cancel_at": ""}))
    assert cleared["cancel_at"] is None and cleared["canceled_at"] is None
    sandbox.advance(days=40)
    assert get(sandbox, sub_id)["status"] == "active"
    past = post(api, f"/v1/subscriptions/{sub_id}", {"cancel_at": str(sandbox.now() - 60)})
    assert past.status_code == 400 and past.json()["error"]["param"] == "cancel_at"


def test_delete_cancels_now_and_lists_filter_by_status_and_price(
    api: TestClient, sandbox: Sandbox, monthly: Obj, product: Obj
) -> None:
    other = ok_json(post(api, "/v1/prices", {"product": product["id"], "currency": "usd", "unit_amount": "500",
                                           "recurring[interval]": "month"}))
    kept = subscribe(api, sandbox, monthly)["subscription"]
    gone = subscribe(api, sandbox, other)["subscription"]
    canceled = ok_json(api.request("DELETE", f"/v1/subscriptions/{gone}", params={"invoice_now": "true",
                                                                                 "prorate": "false"}))
    assert canceled["status"] == "canceled" and canceled["ended_at"] == canceled["canceled_at"]
    assert ok_json(api.get("/v1/events?type=customer.subscription.deleted"))["data"][0]["data"]["object"]["id"] == gone

    def ids(query: str) -> list[str]:
        return [s["id"] for s in ok_json(api.get(f"/v1/subscriptions?{query}"))["data"]]

    assert ids("") == [kept]
    assert ids("status=all") == [gone, kept]
    assert ids(f"status=all&price={other['id']}") == [gone]
    assert ids(f"price={monthly['id']}") == [kept]


def test_trigger_payment_failed_then_paid_moves_the_subscription_past_due_and_back(
    api: TestClient, sandbox: Sandbox, monthly: Obj
) -> None:
    done = subscribe(api, sandbox, monthly)
    failed = sandbox.trigger("invoice.payment_failed", customer=done["customer"])
    assert failed["type"] == "invoice.payment_failed"
    invoice = get(sandbox, failed["data"]["object"]["id"])
    assert invoice["status"] == "open" and invoice["attempt_count"] == 1
    assert get(sandbox, done["subscription"])["status"] == "past_due"
    again = sandbox.trigger("invoice.payment_failed", subscription=done["subscription"])
    assert again["data"]["object"]["id"] == invoice["id"] and again["data"]["object"]["attempt_count"] == 2
    paid = sandbox.trigger("invoice.paid", customer=done["customer"])
    assert paid["data"]["object"]["id"] == invoice["id"] and paid["data"]["object"]["status"] == "paid"
    assert get(sandbox, done["subscription"])["status"] == "active"
    fresh = sandbox.trigger("invoice.paid", customer=done["customer"])
    assert fresh["data"]["object"]["id"] != invoice["id"] and fresh["data"]["object"]["amount_paid"] == 2000


@pytest.mark.parametrize(("event_type", "status"), [
    ("customer.subscription.deleted", "canceled"),
    ("customer.subscription.updated", "active"),
])
def test_trigger_subscription_events(api: TestClient, sandbox: Sandbox, monthly: Obj, event_type: str,
                                     status: str) -> None:
    done = subscribe(api, sandbox, monthly)
    event = sandbox.trigger(event_type, customer=done["customer"])
    assert event["type"] == event_type and event["data"]["object"]["status"] == status
    assert get(sandbox, done["subscription"])["status"] == status


def test_trigger_refuses_unknown_types_and_customers_without_a_subscription(
    api: TestClient, sandbox: Sandbox
) -> None:
    with pytest.raises(ValueError, match=r"invoice\.payment_failed"):
        sandbox.trigger("charge.refunded", customer="cus_x")
    customer = ok_json(post(api, "/v1/customers", {}))
    with pytest.raises(StripeError, match="no subscription"):
        sandbox.trigger("invoice.paid", customer=customer["id"])


def test_http_control_routes_fail_payments_trigger_and_advance(
    api: TestClient, sandbox: Sandbox, monthly: Obj
) -> None:
    done = subscribe(api, sandbox, monthly)
    assert ok_json(api.post("/_sandbox/fail_payments", json={"customer": done["customer"], "fail": True}))["fail"]
    clock = ok_json(api.post("/_sandbox/advance", json={"days": 31, "hours": 2}))
    assert "invoice.payment_failed" in types(clock["events"]) and clock["now"] >= sandbox.now() - 5
    ok_json(api.post("/_sandbox/fail_payments", json={"customer": done["customer"], "fail": False}))
    event = ok_json(api.post("/_sandbox/trigger", json={"type": "invoice.paid", "customer": done["customer"]}))
    assert event["type"] == "invoice.paid" and get(sandbox, done["subscription"])["status"] == "active"
    unknown = api.post("/_sandbox/trigger", json={"type": "nope", "customer": done["customer"]})
    assert unknown.status_code == 400 and "customer.subscription.deleted" in unknown.json()["error"]["message"]
    assert api.post("/_sandbox/advance", json={"days": -1}).status_code == 400
    assert api.post("/_sandbox/fail_payments", json={"customer": "cus_nope"}).status_code == 404


@pytest.mark.parametrize(("anchor", "expected"), [
    ("2025-01-31", ["2025-02-28", "2025-03-31", "2025-04-30"]),
    ("2024-01-31", ["2024-02-29", "2024-03-31", "2024-04-30"]),
    ("2025-03-15", ["2025-04-15", "2025-05-15", "2025-06-15"]),
])
def test_monthly_periods_follow_the_anchor_and_clamp_the_day(anchor: str, expected: list[str]) -> None:
    def ts(day: str) -> int:
        return int(dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp())

    sub = {"billing_cycle_anchor": ts(anchor),
           "items": {"data": [{"price": {"recurring": {"interval": "month", "interval_count": 1}}}]}}
    ends, end = [], ts(anchor)
    for _ in expected:
        end = period_end_after(sub, end)
        ends.append(end)
    assert ends == [ts(day) for day in expected]


CHILD = textwrap.dedent("""
    import sys
    from aims_billing_mcp.sandbox import Sandbox
    from aims_billing_mcp.sandbox.customers import new_customer
    sandbox = Sandbox(sys.argv[1])
    for _ in range(40):
        sandbox.run(lambda ctx: new_customer(ctx, email="child@example.com"))
    events = sandbox.advance(days=40)
    assert "invoice.paid" in [e["type"] for e in events], events
    sandbox.close()
""")


def test_two_processes_write_the_same_sandbox_file(tmp_path: Path) -> None:
    db = str(tmp_path / "shared.db")
    app = create_app(db_path=db)
    here: Sandbox = app.state.sandbox
    try:
        api = TestClient(app, headers=AUTH)
        price = ok_json(post(api, "/v1/prices", {"product_data[name]": "Pro", "currency": "usd", "unit_amount": "900",
                                               "recurring[interval]": "month"}))
        sub_id = subscribe(api, here, price)["subscription"]
        child = subprocess.Popen([sys.executable, "-c", CHILD, db], stderr=subprocess.PIPE, text=True)
        errors: list[BaseException] = []

        def write() -> None:
            try:
                for _ in range(40):
                    here.run(lambda ctx: new_customer(ctx, email="parent@example.com"))
            except BaseException as exc:  # reported below
                errors.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(20)
        _, stderr = child.communicate(timeout=30)
        assert child.returncode == 0, stderr
        assert errors == []
        assert here.count("customer") == 81
        assert here.now() >= time.time() + 40 * DAY - 5  # the child's clock move is seen here
        sub = get(here, sub_id)  # and so is the renewal it ran
        assert get(here, sub["latest_invoice"])["billing_reason"] == "subscription_cycle"
        assert ok_json(api.get(f"/v1/subscriptions/{sub_id}"))["latest_invoice"] == sub["latest_invoice"]
    finally:
        here.close()
