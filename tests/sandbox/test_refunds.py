"""Refunds: whole or partial, never more than received, only of a succeeded PaymentIntent, found by payment intent
or charge, with the balance lowered and `refund.created` recorded."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from .conftest import ok_json, post


@pytest.fixture
def paid(api: TestClient) -> dict[str, Any]:
    pi = ok_json(post(api, "/v1/payment_intents", {"amount": "5997", "currency": "usd"}))
    return ok_json(post(api, f"/v1/payment_intents/{pi['id']}/confirm", {"payment_method": "pm_card_visa"}))


def available(api: TestClient) -> int:
    balance = ok_json(api.get("/v1/balance"))
    return sum(entry["amount"] for entry in balance["available"] if entry["currency"] == "usd")


def test_a_whole_refund_by_payment_intent(api: TestClient, paid: dict[str, Any]) -> None:
    before = available(api)

    refund = ok_json(post(api, "/v1/refunds", {"payment_intent": paid["id"], "reason": "requested_by_customer",
                                             "metadata[order]": "o1"}))

    assert (refund["object"], refund["status"], refund["amount"], refund["currency"]) == ("refund", "succeeded",
                                                                                         5997, "usd")
    assert refund["id"].startswith("re_") and refund["charge"] == paid["latest_charge"]
    assert refund["metadata"] == {"order": "o1"} and available(api) == before - 5997
    assert ok_json(api.get(f"/v1/refunds/{refund['id']}")) == refund
    listed = ok_json(api.get("/v1/refunds", params={"payment_intent": paid["id"]}))["data"]
    assert [r["id"] for r in listed] == [refund["id"]]
    events = ok_json(api.get("/v1/events", params={"type": "refund.created"}))["data"]
    assert events[0]["data"]["object"]["id"] == refund["id"]


def test_partial_refunds_add_up_to_what_was_received_and_no_more(api: TestClient, paid: dict[str, Any]) -> None:
    ok_json(post(api, "/v1/refunds", {"charge": paid["latest_charge"], "amount": "5000"}))

    too_much = post(api, "/v1/refunds", {"payment_intent": paid["id"], "amount": "998"})
    rest = ok_json(post(api, "/v1/refunds", {"payment_intent": paid["id"]}))
    again = post(api, "/v1/refunds", {"payment_intent": paid["id"]})

    assert too_much.status_code == 400 and too_much.json()["error"]["param"] == "amount"
    assert rest["amount"] == 997
    assert again.status_code == 400 and again.json()["error"]["code"] == "charge_already_refunded"


@pytest.mark.parametrize(("data", "status", "param"), [
    ({}, 400, "payment_intent"),
    ({"payment_intent": "pi_missing"}, 404, "payment_intent"),
    ({"charge": "ch_missing"}, 404, "charge"),
])
def test_a_refund_needs_a_payment_that_exists(api: TestClient, data: dict[str, str], status: int,
                                              param: str) -> None:
    response = post(api, "/v1/refunds", data)

    assert response.status_code == status and response.json()["error"]["param"] == param


def test_an_unpaid_payment_intent_has_nothing_to_refund(api: TestClient) -> None:
    pi = ok_json(post(api, "/v1/payment_intents", {"amount": "1000", "currency": "usd"}))

    response = post(api, "/v1/refunds", {"payment_intent": pi["id"]})

    assert response.status_code == 400 and "does not have a successful charge" in response.json()["error"]["message"]


def test_a_refund_of_the_refund_failing_test_card_fails_and_returns_nothing(api: TestClient) -> None:
    pi = ok_json(post(api, "/v1/payment_intents", {"amount": "1000", "currency": "usd"}))
    ok_json(post(api, f"/v1/payment_intents/{pi['id']}/confirm", {"payment_method": "pm_card_refundFail"}))
    before = available(api)

    refund = ok_json(post(api, "/v1/refunds", {"payment_intent": pi["id"]}))

    assert (refund["status"], refund["failure_reason"]) == ("failed", "declined")
    assert available(api) == before
    assert ok_json(post(api, "/v1/refunds", {"payment_intent": pi["id"]}))["amount"] == 1000  # nothing was taken


def test_a_charge_of_another_payment_intent_is_refused(api: TestClient, paid: dict[str, Any]) -> None:
    response = post(api, "/v1/refunds", {"payment_intent": paid["id"], "charge": "ch_other"})

    assert response.status_code == 400 and response.json()["error"]["param"] == "charge"
