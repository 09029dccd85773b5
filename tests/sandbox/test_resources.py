"""Endpoint behaviour: catalog, customers, checkout and its completion, billing, payments."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from aims_billing_mcp.sandbox import Sandbox, StripeError

from .conftest import ok_json, post

Obj = dict[str, Any]


def test_product_with_default_price_data_gets_a_default_price(api: TestClient, sandbox: Sandbox) -> None:
    product = ok_json(post(api, "/v1/products", {
        "name": "Pro", "default_price_data[currency]": "usd", "default_price_data[unit_amount]": "900",
    }))
    price = sandbox.get_object(product["default_price"])
    assert price is not None and price["unit_amount"] == 900 and price["product"] == product["id"]
    assert product["object"] == "product" and product["livemode"] is False and product["active"] is True


def test_product_list_filters_by_active_and_ids(api: TestClient) -> None:
    a = ok_json(post(api, "/v1/products", {"name": "a"}))
    b = ok_json(post(api, "/v1/products", {"name": "b", "active": "false"}))
    assert [p["id"] for p in ok_json(api.get("/v1/products?active=false"))["data"]] == [b["id"]]
    assert [p["id"] for p in ok_json(api.get(f"/v1/products?ids[0]={a['id']}"))["data"]] == [a["id"]]


def test_recurring_price_is_typed_recurring(monthly: Obj) -> None:
    assert monthly["type"] == "recurring"
    assert monthly["recurring"]["interval"] == "month" and monthly["recurring"]["interval_count"] == 1
    assert monthly["unit_amount_decimal"] == "2000"


@pytest.mark.parametrize(("data", "param", "fragment"), [
    ({"unit_amount": "-1"}, "unit_amount", "non-negative"),
    ({"unit_amount": "1", "currency": "xyz"}, "currency", "Invalid currency: xyz. Stripe currently supports"),
    ({"unit_amount": "1", "recurring[interval]": "fortnight"}, "recurring[interval]", "interval"),
])
def test_bad_price_values_are_refused(api: TestClient, product: Obj, data: dict[str, str], param: str,
                                      fragment: str) -> None:
    response = post(api, "/v1/prices", {"product": product["id"], "currency": "usd", **data})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param and fragment in response.json()["error"]["message"]


def test_lookup_key_moves_only_with_transfer(api: TestClient, product: Obj, monthly: Obj) -> None:
    data = {"product": product["id"], "currency": "usd", "unit_amount": "3000", "lookup_key": "pro_monthly"}
    refused = post(api, "/v1/prices", data)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "lookup_key"
    moved = ok_json(post(api, "/v1/prices", {**data, "transfer_lookup_key": "true"}))
    found = ok_json(api.get("/v1/prices", params={"lookup_keys[0]": "pro_monthly"}))["data"]
    assert [p["id"] for p in found] == [moved["id"]]
    assert ok_json(api.get(f"/v1/prices/{monthly['id']}"))["lookup_key"] is None


def test_price_list_filters_by_type_and_product(api: TestClient, monthly: Obj, one_time: Obj) -> None:
    assert [p["id"] for p in ok_json(api.get("/v1/prices?type=one_time"))["data"]] == [one_time["id"]]
    assert len(ok_json(api.get(f"/v1/prices?product={monthly['product']}"))["data"]) == 2


def test_customer_lifecycle_and_email_filter(api: TestClient) -> None:
    customer = ok_json(post(api, "/v1/customers", {"email": "Ann@example.com", "metadata[tier]": "gold"}))
    post(api, "/v1/customers", {"email": "bob@example.com"})
    found = ok_json(api.get("/v1/customers?email=Ann@example.com"))["data"]
    assert [c["id"] for c in found] == [customer["id"]]
    assert ok_json(api.get("/v1/customers?email=ann@example.com"))["data"] == []
    updated = ok_json(post(api, f"/v1/customers/{customer['id']}", {"name": "Ann", "metadata[tier]": ""}))
    assert updated["name"] == "Ann" and updated["metadata"] == {}
    deleted = ok_json(api.delete(f"/v1/customers/{customer['id']}"))
    assert deleted == {"id": customer["id"], "object": "customer", "deleted": True}


def test_a_deleted_customer_is_retrievable_as_deleted_and_unknown_to_every_other_call(api: TestClient) -> None:
    customer = ok_json(post(api, "/v1/customers", {"email": "gone@example.com"}))
    ok_json(api.delete(f"/v1/customers/{customer['id']}"))
    assert ok_json(api.get(f"/v1/customers/{customer['id']}")) == {"id": customer["id"], "object": "customer",
                                                                  "deleted": True}
    for response in (post(api, f"/v1/customers/{customer['id']}", {"name": "x"}),
                     api.delete(f"/v1/customers/{customer['id']}"),
                     post(api, "/v1/billing_portal/sessions", {"customer": customer["id"]})):
        assert response.status_code == 404 and response.json()["error"]["code"] == "resource_missing"
    assert ok_json(api.get("/v1/customers"))["data"] == []


def test_payment_link_has_url_and_line_items(api: TestClient, one_time: Obj) -> None:
    link = ok_json(post(api, "/v1/payment_links", {
        "line_items[0][price]": one_time["id"], "line_items[0][quantity]": "3",
        "after_completion[type]": "redirect", "after_completion[redirect][url]": "https://example.com/ok",
    }))
    assert link["url"].startswith("https://buy.sandbox.aims.invalid/test_")
    assert link["id"].startswith("plink_")
    assert link["after_completion"]["redirect"]["url"] == "https://example.com/ok"
    items = ok_json(api.get(f"/v1/payment_links/{link['id']}/line_items"))["data"]
    assert items[0]["quantity"] == 3 and items[0]["amount_total"] == 4500 and items[0]["id"].startswith("li_")


def test_unknown_line_item_price_is_404_naming_the_line(api: TestClient) -> None:
    response = post(api, "/v1/payment_links", {"line_items[0][price]": "price_x",
                                                  "line_items[0][quantity]": "1"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "line_items[0][price]"


def _session(api: TestClient, **data: str) -> Any:
    return post(api, "/v1/checkout/sessions",
                {"success_url": "https://example.com/s?id={CHECKOUT_SESSION_ID}", **data})


def test_payment_session_totals_and_defaults(api: TestClient, one_time: Obj) -> None:
    session = ok_json(_session(api, mode="payment", **{"line_items[0][price]": one_time["id"],
                                                     "line_items[0][quantity]": "2"}))
    assert (session["amount_subtotal"], session["amount_total"], session["currency"]) == (3000, 3000, "usd")
    assert session["status"] == "open" and session["payment_status"] == "unpaid"
    assert session["expires_at"] == session["created"] + 86400
    assert session["id"].startswith("cs_test_") and session["url"].endswith(session["id"])


def test_inline_price_data_is_accepted(api: TestClient) -> None:
    session = ok_json(_session(api, mode="payment", **{
        "line_items[0][price_data][currency]": "eur", "line_items[0][price_data][unit_amount]": "700",
        "line_items[0][price_data][product_data][name]": "Sticker", "line_items[0][quantity]": "1",
    }))
    assert session["amount_total"] == 700 and session["currency"] == "eur"
    items = ok_json(api.get(f"/v1/checkout/sessions/{session['id']}/line_items"))["data"]
    assert items[0]["description"] == "Sticker"


@pytest.mark.parametrize(("mode", "fixture", "fragment"), [
    ("payment", "monthly", "You specified `payment` mode but passed a recurring price"),
    ("subscription", "one_time", "You must provide at least one recurring price in `subscription` mode"),
])
def test_mode_and_price_type_must_agree(api: TestClient, request: pytest.FixtureRequest, mode: str,
                                        fixture: str, fragment: str) -> None:
    price = request.getfixturevalue(fixture)
    response = _session(api, mode=mode, **{"line_items[0][price]": price["id"],
                                              "line_items[0][quantity]": "1"})
    assert response.status_code == 400 and fragment in response.json()["error"]["message"]


@pytest.mark.parametrize("field", ["success_url", "cancel_url"])
def test_session_urls_must_be_http_urls(api: TestClient, one_time: Obj, field: str) -> None:
    response = _session(api, mode="payment", **{field: "notaurl", "line_items[0][price]": one_time["id"],
                                                   "line_items[0][quantity]": "1"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "url_invalid" and response.json()["error"]["param"] == field


def test_completing_a_subscription_session_creates_subscription_invoice_and_events(
    api: TestClient, sandbox: Sandbox, monthly: Obj, one_time: Obj
) -> None:
    seen: list[Obj] = []
    sandbox.add_event_listener(seen.append)
    session = ok_json(_session(api, mode="subscription", customer_email="buyer@example.com", **{
        "line_items[0][price]": monthly["id"], "line_items[0][quantity]": "2",
        "line_items[1][price]": one_time["id"], "line_items[1][quantity]": "1",
        "subscription_data[metadata][plan]": "pro",
    }))
    done = ok_json(api.post(f"/_sandbox/checkout/sessions/{session['id']}/complete"))
    assert done["status"] == "complete" and done["payment_status"] == "paid"
    sub = sandbox.get_object(done["subscription"])
    invoice = sandbox.get_object(done["invoice"])
    customer = sandbox.get_object(done["customer"])
    assert sub is not None and invoice is not None and customer is not None
    assert customer["email"] == "buyer@example.com"
    assert sub["status"] == "active" and sub["metadata"] == {"plan": "pro"}
    item = sub["items"]["data"][0]
    assert item["id"].startswith("si_") and item["current_period_end"] > item["current_period_start"]
    assert invoice["status"] == "paid" and invoice["total"] == invoice["amount_paid"] == 5500
    assert invoice["amount_remaining"] == 0 and len(invoice["lines"]["data"]) == 2
    types = {e["type"] for e in seen}
    assert {"checkout.session.completed", "customer.subscription.created", "invoice.paid",
            "payment_intent.succeeded"} <= types
    assert ok_json(api.get("/v1/balance"))["available"][0]["amount"] == 5500
    subs = ok_json(api.get(f"/v1/subscriptions?customer={customer['id']}"))["data"]
    assert [s["id"] for s in subs] == [sub["id"]]
    assert ok_json(api.get(f"/v1/invoices?subscription={sub['id']}"))["data"][0]["id"] == invoice["id"]


def test_completing_a_payment_session_creates_a_succeeded_payment(
    api: TestClient, sandbox: Sandbox, one_time: Obj
) -> None:
    customer = ok_json(post(api, "/v1/customers", {"email": "c@example.com"}))
    session = ok_json(_session(api, mode="payment", customer=customer["id"], **{
        "line_items[0][price]": one_time["id"], "line_items[0][quantity]": "1"}))
    done = sandbox.complete_checkout_session(session["id"])
    pi = sandbox.get_object(done["payment_intent"])
    assert pi is not None and pi["status"] == "succeeded" and pi["amount_received"] == 1500
    assert done["customer"] == customer["id"]
    with pytest.raises(StripeError) as info:
        sandbox.complete_checkout_session(session["id"])
    assert info.value.status == 400
    events = ok_json(api.get("/v1/events?type=checkout.session.completed"))["data"]
    assert events[0]["data"]["object"]["id"] == session["id"] and events[0]["object"] == "event"


def test_only_open_sessions_expire(api: TestClient, one_time: Obj) -> None:
    session = ok_json(_session(api, mode="payment", **{"line_items[0][price]": one_time["id"],
                                                     "line_items[0][quantity]": "1"}))
    assert ok_json(api.post(f"/v1/checkout/sessions/{session['id']}/expire"))["status"] == "expired"
    assert api.post(f"/v1/checkout/sessions/{session['id']}/expire").status_code == 400
    assert api.post(f"/_sandbox/checkout/sessions/{session['id']}/complete").status_code == 400
    assert len(ok_json(api.get("/v1/checkout/sessions?status=expired"))["data"]) == 1


def test_portal_session_needs_an_existing_customer(api: TestClient) -> None:
    assert post(api, "/v1/billing_portal/sessions", {"customer": "cus_x"}).status_code == 404
    customer = ok_json(post(api, "/v1/customers", {}))
    portal = ok_json(post(api, "/v1/billing_portal/sessions", {"customer": customer["id"],
                                                             "return_url": "https://example.com/account"}))
    assert portal["id"].startswith("bps_")
    assert portal["url"].startswith("https://billing.sandbox.aims.invalid/p/session/")


def test_invoice_pulls_pending_items_and_moves_through_its_states(api: TestClient) -> None:
    customer = ok_json(post(api, "/v1/customers", {}))
    ok_json(post(api, "/v1/invoiceitems", {"customer": customer["id"], "amount": "1200", "currency": "usd",
                                         "description": "Setup"}))
    invoice = ok_json(post(api, "/v1/invoices", {"customer": customer["id"]}))
    assert invoice["status"] == "draft" and invoice["total"] == invoice["amount_due"] == 1200
    opened = ok_json(api.post(f"/v1/invoices/{invoice['id']}/finalize"))
    assert opened["status"] == "open" and opened["number"]
    paid = ok_json(post(api, f"/v1/invoices/{invoice['id']}/pay", {"paid_out_of_band": "true"}))
    assert (paid["status"], paid["amount_paid"], paid["amount_remaining"]) == ("paid", 1200, 0)
    assert api.post(f"/v1/invoices/{invoice['id']}/void").status_code == 400


def test_open_invoice_can_be_voided(api: TestClient) -> None:
    customer = ok_json(post(api, "/v1/customers", {}))
    post(api, "/v1/invoiceitems", {"customer": customer["id"], "amount": "500", "currency": "usd"})
    invoice = ok_json(post(api, "/v1/invoices", {"customer": customer["id"]}))
    api.post(f"/v1/invoices/{invoice['id']}/finalize")
    assert ok_json(api.post(f"/v1/invoices/{invoice['id']}/void"))["status"] == "void"
    assert [i["id"] for i in ok_json(api.get("/v1/invoices?status=void"))["data"]] == [invoice["id"]]


def test_payment_intent_below_minimum_is_refused(api: TestClient) -> None:
    error = post(api, "/v1/payment_intents", {"amount": "49", "currency": "usd"}).json()["error"]
    assert error["message"] == "Amount must be at least $0.50 usd" and error["param"] == "amount"


def test_confirming_with_visa_succeeds_and_adds_to_balance(api: TestClient) -> None:
    pi = ok_json(post(api, "/v1/payment_intents", {"amount": "1000", "currency": "usd"}))
    assert pi["status"] == "requires_payment_method"
    done = ok_json(post(api, f"/v1/payment_intents/{pi['id']}/confirm", {"payment_method": "pm_card_visa"}))
    assert done["status"] == "succeeded" and done["amount_received"] == 1000
    assert ok_json(api.get("/v1/balance"))["available"] == [{"amount": 1000, "currency": "usd",
                                                           "source_types": {"card": 1000}}]


@pytest.mark.parametrize("token", ["pm_card_chargeDeclined", "pm_card_visa_chargeDeclined"])
def test_declined_card_is_402_and_leaves_the_intent_retryable(api: TestClient, token: str) -> None:
    pi = ok_json(post(api, "/v1/payment_intents", {"amount": "1000", "currency": "usd"}))
    response = post(api, f"/v1/payment_intents/{pi['id']}/confirm", {"payment_method": token})
    error = response.json()["error"]
    assert response.status_code == 402
    assert (error["type"], error["code"], error["decline_code"]) == ("card_error", "card_declined",
                                                                     "generic_decline")
    stored = ok_json(api.get(f"/v1/payment_intents/{pi['id']}"))
    assert stored["status"] == "requires_payment_method"
    assert stored["last_payment_error"]["code"] == "card_declined"
    assert ok_json(api.get("/v1/balance"))["available"][0]["amount"] == 0


def test_cancel_only_unfinished_payment_intents(api: TestClient) -> None:
    pi = ok_json(post(api, "/v1/payment_intents", {"amount": "1000", "currency": "usd", "confirm": "true",
                                                 "payment_method": "pm_card_visa"}))
    assert pi["status"] == "succeeded"
    assert api.post(f"/v1/payment_intents/{pi['id']}/cancel").status_code == 400
    other = ok_json(post(api, "/v1/payment_intents", {"amount": "1000", "currency": "usd"}))
    assert ok_json(api.post(f"/v1/payment_intents/{other['id']}/cancel"))["status"] == "canceled"


def test_subscription_cancel_at_period_end_and_cancel(api: TestClient, sandbox: Sandbox,
                                                      monthly: Obj) -> None:
    session = ok_json(_session(api, mode="subscription", **{"line_items[0][price]": monthly["id"],
                                                          "line_items[0][quantity]": "1"}))
    sub_id = sandbox.complete_checkout_session(session["id"])["subscription"]
    later = ok_json(post(api, f"/v1/subscriptions/{sub_id}", {"cancel_at_period_end": "true"}))
    assert later["cancel_at_period_end"] is True
    assert later["cancel_at"] == later["items"]["data"][0]["current_period_end"]
    assert ok_json(api.delete(f"/v1/subscriptions/{sub_id}"))["status"] == "canceled"
    assert ok_json(api.get("/v1/subscriptions"))["data"] == []
    assert len(ok_json(api.get("/v1/subscriptions?status=canceled"))["data"]) == 1
