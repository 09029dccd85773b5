"""Test Shared Payment Tokens: granted tokens confirm a PaymentIntent like the buyer's card, by outcome name, once."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.sandbox.conftest import post


def intent(api: TestClient) -> str:
    response = post(api, "/v1/payment_intents", {"amount": "1000", "currency": "usd"})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def confirm(api: TestClient, pi: str, spt: str) -> Any:
    return post(api, f"/v1/payment_intents/{pi}/confirm", {"shared_payment_granted_token": spt})


def test_a_granted_token_confirms_the_payment(api: TestClient) -> None:
    response = confirm(api, intent(api), "spt_test_granted_1")
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"


@pytest.mark.parametrize(
    ("token", "decline_code"),
    [("spt_test_declined_1", "generic_decline"), ("spt_test_insufficient_funds_1", "insufficient_funds")],
)
def test_a_declining_token_is_a_card_error_and_leaves_the_intent_payable(
    api: TestClient, token: str, decline_code: str
) -> None:
    pi = intent(api)
    response = confirm(api, pi, token)
    assert response.status_code == 402
    assert response.json()["error"]["decline_code"] == decline_code
    retried = api.get(f"/v1/payment_intents/{pi}")
    assert retried.json()["status"] == "requires_payment_method"


def test_an_expired_token_is_refused_naming_the_param(api: TestClient) -> None:
    response = confirm(api, intent(api), "spt_test_expired_1")
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("shared_payment_granted_token_expired", "shared_payment_granted_token")


def test_a_token_is_single_use(api: TestClient) -> None:
    assert confirm(api, intent(api), "spt_test_once").status_code == 200
    again = confirm(api, intent(api), "spt_test_once")
    assert again.status_code == 400
    assert again.json()["error"]["code"] == "shared_payment_granted_token_used"


def test_a_token_that_is_not_an_spt_is_unknown(api: TestClient) -> None:
    response = confirm(api, intent(api), "tok_visa")
    assert response.status_code == 404
