"""Customer balance transactions, the balance applied to invoices at finalization, and subscriptions created
through ``POST /v1/subscriptions`` (send_invoice or charge_automatically, trials, cancel_at), renewed by
advancing the sandbox clock."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import stripe
from starlette.applications import Starlette
from starlette.testclient import TestClient

import aims_billing_mcp.sandbox.sandbox as sandbox_module
from aims_billing_mcp.sandbox import SANDBOX_SECRET_KEY, Sandbox
from aims_billing_mcp.sandbox.core import add_interval

from .conftest import ok_json, post
from .test_lifecycle import get, types
from .test_sdk import SandboxHTTPClient

Obj = dict[str, Any]
DAY = 86400
PRICE = 2000  # the `monthly` fixture's unit_amount
FROZEN = 1_767_225_600  # 2026-01-01T00:00:00Z


@pytest.fixture
def customer(api: TestClient) -> Obj:
    return ok_json(post(api, "/v1/customers", {"email": "prepaid@example.com"}))


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> int:
    """Stop the sandbox's wall clock at FROZEN, so a timestamp computed in the test is the one the request
    sees (the clock still moves through the advance route)."""
    monkeypatch.setattr(sandbox_module, "time", SimpleNamespace(time=lambda: FROZEN))
    return FROZEN


@pytest.fixture
def meter(api: TestClient) -> Obj:
    return ok_json(post(api, "/v1/billing/meters", {
        "display_name": "API calls", "event_name": "api_call", "default_aggregation[formula]": "sum"}))


@pytest.fixture
def metered(api: TestClient, meter: Obj, product: Obj) -> Obj:
    """10 cents per metered unit."""
    return ok_json(post(api, "/v1/prices", {
        "product": product["id"], "currency": "usd", "unit_amount": "10", "recurring[interval]": "month",
        "recurring[usage_type]": "metered", "recurring[meter]": meter["id"]}))


def credit(api: TestClient, customer: Obj, amount: int, **extra: str) -> Obj:
    """Give the customer ``amount`` cents of credit (a negative balance transaction)."""
    return ok_json(post(api, f"/v1/customers/{customer['id']}/balance_transactions",
                   {"amount": str(-amount), "currency": "usd", **extra}))


def subscribe(api: TestClient, customer: Obj, price: Obj, **extra: str) -> Any:
    """POST /v1/subscriptions for one item of ``price``; returns the response."""
    return post(api, "/v1/subscriptions", {"customer": customer["id"], "items[0][price]": price["id"], **extra})


def send_invoice(days: int = 30) -> dict[str, str]:
    return {"collection_method": "send_invoice", "days_until_due": str(days)}


def advance(api: TestClient, days: float) -> list[Obj]:
    """Move the sandbox clock through the control route; returns the events it caused."""
    events: list[Obj] = ok_json(api.post("/_sandbox/advance", json={"days": days}))["events"]
    return events


def invoices(api: TestClient, sub: Obj) -> list[Obj]:
    """The subscription's invoices, oldest first."""
    found: list[Obj] = ok_json(api.get(f"/v1/invoices?subscription={sub['id']}&limit=100"))["data"]
    return found[::-1]


def balance(api: TestClient, customer: Obj) -> int:
    return int(ok_json(api.get(f"/v1/customers/{customer['id']}"))["balance"])


# -- balance transactions ---------------------------------------------------------------------------------------

def test_balance_transactions_move_the_customer_balance_and_are_listed_and_retrieved(
    api: TestClient, customer: Obj
) -> None:
    first = credit(api, customer, 5000, description="Prepaid", **{"metadata[order]": "7"})
    second = ok_json(post(api, f"/v1/customers/{customer['id']}/balance_transactions",
                     {"amount": "1000", "currency": "usd"}))
    assert first["id"].startswith("cbtxn_") and first["object"] == "customer_balance_transaction"
    assert (first["amount"], first["ending_balance"], first["type"]) == (-5000, -5000, "adjustment")
    assert (first["description"], first["metadata"], first["customer"]) == ("Prepaid", {"order": "7"}, customer["id"])
    assert first["invoice"] is None and first["credit_note"] is None and first["livemode"] is False
    assert second["ending_balance"] == -4000
    updated = ok_json(api.get(f"/v1/customers/{customer['id']}"))
    assert (updated["balance"], updated["currency"]) == (-4000, "usd")
    url = f"/v1/customers/{customer['id']}/balance_transactions"
    page = ok_json(api.get(f"{url}?limit=1"))
    assert [t["id"] for t in page["data"]] == [second["id"]] and page["has_more"] and page["url"] == url
    assert [t["id"] for t in ok_json(api.get(url))["data"]] == [second["id"], first["id"]]
    assert ok_json(api.get(f"{url}/{first['id']}")) == first


def test_a_balance_transaction_is_created_once_per_idempotency_key(api: TestClient, customer: Obj) -> None:
    url = f"/v1/customers/{customer['id']}/balance_transactions"
    data = {"amount": "-700", "currency": "usd"}
    first = post(api, url, data, **{"Idempotency-Key": "credit-1"})
    again = post(api, url, data, **{"Idempotency-Key": "credit-1"})
    assert again.headers["Idempotent-Replayed"] == "true" and again.json()["id"] == ok_json(first)["id"]
    assert balance(api, customer) == -700


@pytest.mark.parametrize(("data", "param"), [
    ({"currency": "usd"}, "amount"),
    ({"amount": "-500"}, "currency"),
    ({"amount": "0", "currency": "usd"}, "amount"),
    ({"amount": "1.5", "currency": "usd"}, "amount"),
    ({"amount": "-500", "currency": "usd", "color": "red"}, "color"),
])
def test_a_balance_transaction_needs_a_non_zero_integer_amount_and_a_currency(
    api: TestClient, customer: Obj, data: dict[str, str], param: str
) -> None:
    response = post(api, f"/v1/customers/{customer['id']}/balance_transactions", data)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert balance(api, customer) == 0


def test_a_balance_stays_in_the_customers_currency(api: TestClient, customer: Obj) -> None:
    credit(api, customer, 500)
    response = post(api, f"/v1/customers/{customer['id']}/balance_transactions", {"amount": "-5", "currency": "eur"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "currency"


def test_balance_transactions_of_an_unknown_customer_or_of_another_customer_are_not_found(
    api: TestClient, customer: Obj
) -> None:
    txn = credit(api, customer, 500)
    other = ok_json(post(api, "/v1/customers", {}))
    missing = api.get(f"/v1/customers/{other['id']}/balance_transactions/{txn['id']}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "resource_missing"
    unknown = post(api, "/v1/customers/cus_nope/balance_transactions", {"amount": "-5", "currency": "usd"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "id"


@pytest.mark.parametrize(("balance_before", "amount_due", "status", "ending_balance"), [
    (0, 1500, "open", 0),
    (-500, 1000, "open", 0),
    (-5000, 0, "paid", -3500),
    (300, 1800, "open", 0),
])
def test_finalizing_an_invoice_applies_the_customer_balance(
    api: TestClient, customer: Obj, balance_before: int, amount_due: int, status: str, ending_balance: int
) -> None:
    if balance_before:
        credit(api, customer, -balance_before)
    ok_json(post(api, "/v1/invoiceitems", {"customer": customer["id"], "amount": "1500", "currency": "usd"}))
    draft = ok_json(post(api, "/v1/invoices", {"customer": customer["id"]}))
    assert (draft["starting_balance"], draft["ending_balance"], draft["amount_due"]) == (balance_before, None, 1500)
    invoice = ok_json(post(api, f"/v1/invoices/{draft['id']}/finalize"))
    assert invoice["amount_due"] == invoice["amount_remaining"] == amount_due
    assert (invoice["status"], invoice["total"], invoice["starting_balance"], invoice["ending_balance"]) == (
        status, 1500, balance_before, ending_balance)
    assert balance(api, customer) == ending_balance


# -- prepaid subscriptions -----------------------------------------------------------------------------------------

def test_a_credit_of_three_periods_pays_three_send_invoice_invoices_and_the_fourth_stays_open(
    api: TestClient, customer: Obj, monthly: Obj
) -> None:
    credit(api, customer, 3 * PRICE)
    sub = ok_json(subscribe(api, customer, monthly, **send_invoice(30)))
    assert (sub["status"], sub["collection_method"], sub["days_until_due"]) == ("active", "send_invoice", 30)
    for expected_balance in (-2 * PRICE, -PRICE, 0):
        latest = invoices(api, sub)[-1]
        assert (latest["status"], latest["total"], latest["amount_due"], latest["amount_paid"]) == (
            "paid", PRICE, 0, 0)
        assert latest["ending_balance"] - latest["starting_balance"] == PRICE
        assert balance(api, customer) == expected_balance
        advance(api, 31)
    bills = invoices(api, sub)
    assert [i["billing_reason"] for i in bills] == ["subscription_create"] + ["subscription_cycle"] * 3
    fourth = bills[-1]
    assert (fourth["status"], fourth["amount_due"], fourth["amount_remaining"]) == ("open", PRICE, PRICE)
    assert fourth["collection_method"] == "send_invoice" and fourth["due_date"] == fourth["created"] + 30 * DAY
    assert fourth["starting_balance"] == fourth["ending_balance"] == 0 and fourth["attempt_count"] == 0
    assert ok_json(api.get(f"/v1/subscriptions/{sub['id']}"))["status"] == "active"


def test_each_invoice_the_balance_pays_is_an_applied_to_invoice_transaction(
    api: TestClient, customer: Obj, monthly: Obj
) -> None:
    top_up = credit(api, customer, 3 * PRICE)
    sub = ok_json(subscribe(api, customer, monthly, **send_invoice()))
    advance(api, 31)
    ledger = ok_json(api.get(f"/v1/customers/{customer['id']}/balance_transactions"))["data"][::-1]
    assert [(t["type"], t["amount"], t["ending_balance"]) for t in ledger] == [
        ("adjustment", -3 * PRICE, -3 * PRICE), ("applied_to_invoice", PRICE, -2 * PRICE),
        ("applied_to_invoice", PRICE, -PRICE)]
    assert [t["invoice"] for t in ledger] == [None] + [i["id"] for i in invoices(api, sub)]
    assert ledger[0]["id"] == top_up["id"]


def test_metered_usage_on_a_send_invoice_subscription_is_billed_on_renewal_and_paid_from_credit(
    api: TestClient, customer: Obj, monthly: Obj, metered: Obj
) -> None:
    credit(api, customer, 10_000)
    sub = ok_json(subscribe(api, customer, monthly, **send_invoice(), **{"items[1][price]": metered["id"]}))
    first = invoices(api, sub)[0]
    assert [(line["amount"], line["quantity"]) for line in first["lines"]["data"]] == [(PRICE, 1), (0, 0)]
    ok_json(post(api, "/v1/billing/meter_events", {
        "event_name": "api_call", "payload[stripe_customer_id]": customer["id"], "payload[value]": "150"}))
    advance(api, 31)
    renewal = invoices(api, sub)[-1]
    licensed, usage = renewal["lines"]["data"]
    assert (usage["quantity"], usage["amount"], licensed["amount"]) == (150, 1500, PRICE)
    assert (renewal["status"], renewal["total"], renewal["amount_due"]) == ("paid", PRICE + 1500, 0)
    assert balance(api, customer) == -10_000 + 2 * PRICE + 1500


@pytest.mark.parametrize("collection", [{}, send_invoice(7)])
def test_a_trial_starts_trialing_with_a_zero_first_invoice(
    api: TestClient, customer: Obj, monthly: Obj, collection: dict[str, str]
) -> None:
    sub = ok_json(subscribe(api, customer, monthly, trial_period_days="14", **collection))
    assert sub["status"] == "trialing" and sub["trial_end"] - sub["trial_start"] == 14 * DAY
    [invoice] = invoices(api, sub)
    assert (invoice["status"], invoice["total"], invoice["billing_reason"]) == ("paid", 0, "subscription_create")
    assert invoice["lines"]["data"][0]["description"] == "Trial period for Pro plan"


@pytest.mark.parametrize("before_boundary", [0, 10 * DAY])
def test_cancel_at_set_at_creation_ends_the_subscription_without_a_fourth_invoice(
    api: TestClient, frozen: int, customer: Obj, monthly: Obj, before_boundary: int
) -> None:
    cancel_at = add_interval(frozen, "month", 3) - before_boundary
    sub = ok_json(subscribe(api, customer, monthly, cancel_at=str(cancel_at), default_payment_method="pm_card_visa"))
    assert (sub["cancel_at"], sub["status"]) == (cancel_at, "active")
    events = advance(api, 100)
    assert types(events).count("invoice.created") == 2 and types(events)[-1] == "customer.subscription.deleted"
    ended = ok_json(api.get(f"/v1/subscriptions/{sub['id']}"))
    assert (ended["status"], ended["ended_at"]) == ("canceled", cancel_at)
    assert [i["status"] for i in invoices(api, sub)] == ["paid"] * 3
    assert advance(api, 40) == []


# -- charge_automatically -------------------------------------------------------------------------------------------

def test_a_partial_credit_lowers_the_charge(api: TestClient, customer: Obj, monthly: Obj) -> None:
    credit(api, customer, 500)
    sub = ok_json(subscribe(api, customer, monthly, default_payment_method="pm_card_visa"))
    [invoice] = invoices(api, sub)
    assert (invoice["status"], invoice["amount_due"], invoice["amount_paid"]) == ("paid", PRICE - 500, PRICE - 500)
    assert ok_json(api.get("/v1/payment_intents"))["data"][0]["amount"] == PRICE - 500
    assert sub["status"] == "active" and balance(api, customer) == 0


def test_a_credit_covering_the_first_invoice_needs_no_payment_method(
    api: TestClient, customer: Obj, monthly: Obj
) -> None:
    credit(api, customer, PRICE)
    sub = ok_json(subscribe(api, customer, monthly))
    assert sub["status"] == "active" and sub["default_payment_method"] is None
    assert invoices(api, sub)[0]["status"] == "paid" and ok_json(api.get("/v1/payment_intents"))["data"] == []


def test_without_a_payment_method_default_incomplete_leaves_the_subscription_incomplete(
    api: TestClient, customer: Obj, monthly: Obj
) -> None:
    sub = ok_json(subscribe(api, customer, monthly, payment_behavior="default_incomplete"))
    [invoice] = invoices(api, sub)
    assert sub["status"] == "incomplete" and sub["latest_invoice"] == invoice["id"]
    assert (invoice["status"], invoice["amount_due"], invoice["attempted"]) == ("open", PRICE, False)


@pytest.mark.parametrize("behavior", ["allow_incomplete", "error_if_incomplete"])
def test_without_a_payment_method_a_charging_behavior_is_refused(
    api: TestClient, sandbox: Sandbox, customer: Obj, monthly: Obj, behavior: str
) -> None:
    response = subscribe(api, customer, monthly, payment_behavior=behavior)
    assert response.status_code == 400 and "no attached payment source" in response.json()["error"]["message"]
    assert sandbox.count("subscription") == 0 and sandbox.count("invoice") == 0


@pytest.mark.parametrize("how", ["declining card", "failing customer"])
def test_a_failed_first_charge_leaves_the_subscription_incomplete(
    api: TestClient, sandbox: Sandbox, customer: Obj, monthly: Obj, how: str
) -> None:
    card = "pm_card_chargeDeclined" if how == "declining card" else "pm_card_visa"
    if how == "failing customer":
        sandbox.fail_payments(customer["id"])
    sub = ok_json(subscribe(api, customer, monthly, default_payment_method=card))
    [invoice] = invoices(api, sub)
    assert sub["status"] == "incomplete"
    assert (invoice["status"], invoice["attempt_count"], invoice["amount_remaining"]) == ("open", 1, PRICE)
    failed = ok_json(api.get("/v1/events?type=invoice.payment_failed"))["data"][0]
    assert failed["data"]["object"]["id"] == invoice["id"]


def test_error_if_incomplete_refuses_a_declined_first_charge_and_keeps_nothing(
    api: TestClient, sandbox: Sandbox, customer: Obj, monthly: Obj
) -> None:
    response = subscribe(api, customer, monthly, default_payment_method="pm_card_chargeDeclined",
                         payment_behavior="error_if_incomplete")
    assert response.status_code == 402 and response.json()["error"]["type"] == "card_error"
    assert sandbox.count("subscription") == 0 and sandbox.count("invoice") == 0


def test_paying_the_first_invoice_activates_an_incomplete_subscription(
    api: TestClient, customer: Obj, monthly: Obj
) -> None:
    sub = ok_json(subscribe(api, customer, monthly, payment_behavior="default_incomplete"))
    ok_json(post(api, f"/v1/invoices/{sub['latest_invoice']}/pay", {"payment_method": "pm_card_visa"}))
    assert ok_json(api.get(f"/v1/subscriptions/{sub['id']}"))["status"] == "active"
    updated = ok_json(api.get("/v1/events?type=customer.subscription.updated"))["data"][0]["data"]
    assert updated["previous_attributes"] == {"status": "incomplete"}


def test_an_unpaid_incomplete_subscription_expires_after_23_hours(
    api: TestClient, customer: Obj, monthly: Obj
) -> None:
    sub = ok_json(subscribe(api, customer, monthly, payment_behavior="default_incomplete"))
    assert advance(api, 0.5) == []
    events = advance(api, 1)
    assert types(events) == ["invoice.voided", "customer.subscription.updated"]
    expired = ok_json(api.get(f"/v1/subscriptions/{sub['id']}"))
    assert (expired["status"], expired["ended_at"]) == ("incomplete_expired", sub["created"] + 23 * 3600)
    assert advance(api, 40) == []


def test_voiding_an_invoice_gives_back_the_credit_it_used(api: TestClient, customer: Obj, monthly: Obj) -> None:
    credit(api, customer, 500)
    sub = ok_json(subscribe(api, customer, monthly, **send_invoice()))
    assert balance(api, customer) == 0
    ok_json(post(api, f"/v1/invoices/{sub['latest_invoice']}/void"))
    assert balance(api, customer) == -500
    latest = ok_json(api.get(f"/v1/customers/{customer['id']}/balance_transactions"))["data"][0]
    assert (latest["type"], latest["amount"], latest["invoice"]) == ("unapplied_from_invoice", -500,
                                                                     sub["latest_invoice"])


# -- validation and events --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "param"), [
    ({"customer": None}, "customer"),
    ({"items[0][price]": None, "items[0][quantity]": "2"}, "items[0][price]"),
    ({"customer": "cus_nope"}, "customer"),
    ({"items[0][price]": "price_nope"}, "items[0][price]"),
    ({"items[0][price]": "ONE_TIME"}, "items[0][price]"),
    ({"items[0][quantity]": "0"}, "items[0][quantity]"),
    ({"collection_method": "send_invoice"}, "days_until_due"),
    ({"days_until_due": "30"}, "days_until_due"),
    ({"cancel_at": "1"}, "cancel_at"),
    ({"trial_period_days": "731"}, "trial_period_days"),
    ({"payment_behavior": "pending_if_incomplete"}, "payment_behavior"),
])
def test_subscription_create_names_the_bad_param(
    api: TestClient, customer: Obj, monthly: Obj, one_time: Obj, change: dict[str, str | None], param: str
) -> None:
    data = {"customer": customer["id"], "items[0][price]": monthly["id"], **change}
    sent = {k: one_time["id"] if v == "ONE_TIME" else v for k, v in data.items() if v is not None}
    response = post(api, "/v1/subscriptions", sent)
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["param"] == param


def test_subscription_create_needs_items(api: TestClient, customer: Obj) -> None:
    response = post(api, "/v1/subscriptions", {"customer": customer["id"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "items"


def test_a_metered_item_takes_no_quantity(api: TestClient, customer: Obj, metered: Obj) -> None:
    response = subscribe(api, customer, metered, **{"items[0][quantity]": "1"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "items[0][quantity]"


def test_subscription_create_records_its_events(
    api: TestClient, sandbox: Sandbox, customer: Obj, monthly: Obj
) -> None:
    seen: list[Obj] = []
    sandbox.add_event_listener(seen.append)
    credit(api, customer, PRICE)
    sub = ok_json(subscribe(api, customer, monthly, **send_invoice(), **{"metadata[plan]": "prepaid"}))
    assert types(seen) == ["invoice.created", "invoice.finalized", "invoice.paid", "invoice.payment_succeeded",
                           "customer.subscription.created"]
    created = seen[-1]["data"]["object"]
    assert (created["id"], created["status"], created["latest_invoice"]) == (sub["id"], "active", sub["latest_invoice"])
    assert created["metadata"] == {"plan": "prepaid"} and get(sandbox, sub["id"])["metadata"] == {"plan": "prepaid"}
    assert seen[2]["data"]["object"]["id"] == sub["latest_invoice"]


# -- the stripe SDK ----------------------------------------------------------------------------------------------

def test_the_sdk_creates_balance_transactions_and_subscriptions(app: Starlette) -> None:
    sdk = stripe.StripeClient(SANDBOX_SECRET_KEY, http_client=SandboxHTTPClient(app),
                              base_addresses={"api": "http://sandbox.test"})
    price = sdk.v1.prices.create({"product_data": {"name": "Seat"}, "currency": "usd", "unit_amount": PRICE,
                                  "recurring": {"interval": "month"}})
    customer = sdk.v1.customers.create({"email": "sdk@example.com"})
    txn = sdk.v1.customers.balance_transactions.create(customer.id, {"amount": -PRICE, "currency": "usd"})
    assert isinstance(txn, stripe.CustomerBalanceTransaction) and txn.ending_balance == -PRICE
    sub = sdk.v1.subscriptions.create({"customer": customer.id, "items": [{"price": price.id}],
                                       "collection_method": "send_invoice", "days_until_due": 30})
    assert isinstance(sub, stripe.Subscription) and sub.status == "active"
    assert isinstance(sub.latest_invoice, str) and sdk.v1.invoices.retrieve(sub.latest_invoice).status == "paid"
    ledger = sdk.v1.customers.balance_transactions.list(customer.id)
    assert [t.type for t in ledger.data] == ["applied_to_invoice", "adjustment"]
    assert sdk.v1.customers.retrieve(customer.id).balance == 0
