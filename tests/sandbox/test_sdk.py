"""The real ``stripe.StripeClient`` against the sandbox, through a tiny HTTP client adapter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import stripe
from starlette.applications import Starlette
from starlette.testclient import TestClient

from aims_billing_mcp.sandbox import SANDBOX_SECRET_KEY, Sandbox


class SandboxHTTPClient(stripe.HTTPClient):
    """Routes the SDK's already-encoded requests into the app via starlette's TestClient."""

    name = "aims-sandbox-test"

    def __init__(self, app: Starlette) -> None:
        super().__init__()
        self._client = TestClient(app)

    def request(self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
                ) -> tuple[bytes, int, Mapping[str, str]]:
        response = self._client.request(method, url, headers=dict(headers), content=post_data)
        return response.content, response.status_code, response.headers

    def close(self) -> None:
        self._client.close()


def _client(app: Starlette, key: str = SANDBOX_SECRET_KEY, retries: int = 0) -> stripe.StripeClient:
    return stripe.StripeClient(key, http_client=SandboxHTTPClient(app), max_network_retries=retries,
                               base_addresses={"api": "http://sandbox.test"})


@pytest.fixture
def sdk(app: Starlette) -> stripe.StripeClient:
    return _client(app)


def test_sdk_creates_and_lists_catalog_objects(sdk: stripe.StripeClient) -> None:
    product = sdk.v1.products.create({"name": "Pro", "metadata": {"tier": "pro"}})
    price = sdk.v1.prices.create({"product": product.id, "currency": "usd", "unit_amount": 2000,
                                  "recurring": {"interval": "month"}, "lookup_key": "pro_m"})
    assert isinstance(product, stripe.Product) and product.metadata["tier"] == "pro"
    assert price.recurring is not None and price.recurring.interval == "month"
    found = sdk.v1.prices.list({"lookup_keys": ["pro_m"], "active": True})
    assert [p.id for p in found.data] == [price.id]


def test_sdk_maps_sandbox_errors_to_its_exception_classes(app: Starlette, sdk: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as missing:
        sdk.v1.customers.retrieve("cus_nope")
    assert missing.value.param == "id" and missing.value.code == "resource_missing"
    assert missing.value.request_id is not None and missing.value.request_id.startswith("req_")
    with pytest.raises(stripe.AuthenticationError):
        _client(app, key="sk_test_wrong_key_1234").v1.customers.list()
    pi = sdk.v1.payment_intents.create({"amount": 1000, "currency": "usd"})
    with pytest.raises(stripe.CardError) as declined:
        sdk.v1.payment_intents.confirm(pi.id, {"payment_method": "pm_card_chargeDeclined"})
    assert declined.value.code == "card_declined"


def test_sdk_idempotency_error_and_rate_limit_classes(sandbox: Sandbox, sdk: stripe.StripeClient) -> None:
    sdk.v1.customers.create({"email": "a@example.com"}, {"idempotency_key": "k"})
    with pytest.raises(stripe.IdempotencyError):
        sdk.v1.customers.create({"email": "b@example.com"}, {"idempotency_key": "k"})
    sandbox.faults.inject(status=429)
    with pytest.raises(stripe.RateLimitError):
        sdk.v1.balance.retrieve()


def test_sdk_retry_after_a_lost_response_creates_one_customer(app: Starlette, sandbox: Sandbox) -> None:
    sandbox.faults.inject(status=500, mode="after")
    customer = _client(app, retries=2).v1.customers.create({"email": "once@example.com"})
    assert customer.email == "once@example.com"
    assert sandbox.count("customer") == 1
    assert [(r.status, r.replayed) for r in sandbox.request_log] == [(500, False), (200, True)]


def test_sdk_checkout_flow_reads_clover_shapes(sandbox: Sandbox, sdk: stripe.StripeClient) -> None:
    price = sdk.v1.prices.create({"product_data": {"name": "Seat"}, "currency": "usd", "unit_amount": 1000,
                                  "recurring": {"interval": "year"}})
    session = sdk.v1.checkout.sessions.create({
        "mode": "subscription", "line_items": [{"price": price.id, "quantity": 3}],
        "success_url": "https://example.com/ok?cs={CHECKOUT_SESSION_ID}", "customer_email": "x@example.com",
    })
    assert session.amount_total == 3000 and session.url is not None
    sandbox.complete_checkout_session(session.id)
    done = sdk.v1.checkout.sessions.retrieve(session.id)
    assert done.status == "complete" and isinstance(done.subscription, str)
    sub = sdk.v1.subscriptions.retrieve(done.subscription)
    item = sub["items"].data[0]
    assert item.current_period_end > item.current_period_start
    assert sdk.v1.balance.retrieve().available[0].amount == 3000
