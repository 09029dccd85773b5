"""The gateway against the sandbox: Stripe's failures (401, 429, 500, lost responses) become one clear tool error or,
where retrying is safe, one object and no duplicate."""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client

from aims_billing_mcp.errors import StripeCardDeclined, StripeInvalidRequest
from aims_billing_mcp.sandbox import Sandbox
from aims_billing_mcp.settings import StripeMode
from aims_billing_mcp.stripe_gateway import StripeRequest, build_gateway, encode_form, stripe_idempotency_key
from tests.conftest import error_of, ok

pytestmark = pytest.mark.anyio


def posts(sandbox: Sandbox, path: str) -> list[Any]:
    return [r for r in sandbox.request_log if r.method == "POST" and r.path == path]


async def test_a_500_then_success_creates_exactly_one_object(client: Client, sandbox: Sandbox) -> None:
    sandbox.faults.inject(status=500, count=1, path_prefix="/v1/customers")

    out = ok(await client.call_tool("create_customer", {"email": "ada@example.com"}))

    assert sandbox.count("customer") == 1
    assert [r.status for r in posts(sandbox, "/v1/customers")] == [500, 200]
    assert out["customer"]["id"].startswith("cus_")


async def test_a_lost_response_is_retried_with_the_same_key_and_replayed_by_stripe(
    client: Client, sandbox: Sandbox
) -> None:
    sandbox.faults.inject(status=500, count=1, mode="after", path_prefix="/v1/customers")

    out = ok(await client.call_tool("create_customer", {"email": "ada@example.com"}))

    attempts = posts(sandbox, "/v1/customers")
    assert sandbox.count("customer") == 1
    assert len({r.idempotency_key for r in attempts}) == 1
    assert attempts[-1].replayed is True
    assert sandbox.get_object(out["customer"]["id"]) is not None


async def test_a_429_is_retried_by_the_gateway_and_succeeds(client: Client, sandbox: Sandbox) -> None:
    sandbox.faults.inject(status=429, count=1, path_prefix="/v1/products")

    ok(await client.call_tool("create_product", {"name": "Widget"}))

    assert [r.status for r in posts(sandbox, "/v1/products")] == [429, 200]
    assert sandbox.count("product") == 1


async def test_persistent_429_is_a_retryable_rate_limit_error(client: Client, sandbox: Sandbox) -> None:
    sandbox.faults.inject(status=429, count=10, path_prefix="/v1/products")

    err = error_of(await client.call_tool("create_product", {"name": "Widget"}))

    assert (err["code"], err["retryable"]) == ("stripe_rate_limited", True)
    assert len(posts(sandbox, "/v1/products")) == 3  # the first try and two retries
    assert sandbox.count("product") == 0


async def test_persistent_500_is_a_retryable_unavailable_error(client: Client, sandbox: Sandbox) -> None:
    sandbox.faults.inject(status=500, count=10, path_prefix="/v1/balance")
    err = error_of(await client.call_tool("retrieve_balance", {}))
    assert (err["code"], err["retryable"]) == ("stripe_unavailable", True)


async def test_an_invalid_key_is_a_401_error_that_names_the_setting_and_hides_the_key(
    make_server: Any, sandbox: Sandbox
) -> None:
    secret = "sk_test_wrongwrongwrong1234567890abcd"
    async with Client(make_server(stripe_secret_key=secret)) as client:
        result = await client.call_tool("retrieve_balance", {})
    err = error_of(result)
    assert err["code"] == "stripe_authentication_failed"
    assert err["http_status"] == 401
    assert "STRIPE_SECRET_KEY" in err["message"]
    assert secret not in str(result.model_dump()) and "abcd" in err["message"]


@pytest.mark.parametrize("key", ["sk_live_abcdefghijklmnop1234", "rk_live_abcdefghijklmnop1234"])
async def test_a_live_key_without_opt_in_refuses_every_stripe_call(
    make_server: Any, sandbox: Sandbox, key: str
) -> None:
    async with Client(make_server(stripe_secret_key=key)) as client:
        result = await client.call_tool("create_customer", {"email": "a@example.com"})
    err = error_of(result)
    assert err["code"] == "configuration_error"
    assert "AIMS_BILLING_ALLOW_LIVE" in err["message"]
    assert key not in str(result.model_dump())
    assert sandbox.request_log == []


def test_a_live_key_with_opt_in_is_allowed(make_settings: Any, sandbox_app: Any) -> None:
    settings = make_settings(stripe_secret_key="sk_live_abcdefghijklmnop1234", aims_billing_allow_live=True)
    assert settings.live_key_problem() is None
    assert build_gateway(settings, sandbox_app=sandbox_app).mode is StripeMode.SANDBOX


def test_no_key_means_the_embedded_sandbox(make_settings: Any) -> None:
    gateway = build_gateway(make_settings())
    assert gateway.mode is StripeMode.SANDBOX


def test_a_test_key_means_stripe_test_mode(make_settings: Any) -> None:
    gateway = build_gateway(make_settings(stripe_secret_key="sk_test_51abcdefghijklmnop"))
    assert gateway.mode is StripeMode.TEST
    assert gateway.base_url == "https://api.stripe.com"


def test_form_encoding_matches_the_sdk_nested_keys() -> None:
    body = encode_form({"line_items": [{"price": "price_1", "quantity": 2}], "metadata": {"a": "b"}, "x": True})
    assert body == "line_items[0][price]=price_1&line_items[0][quantity]=2&metadata[a]=b&x=true"


def test_stripe_idempotency_keys_are_deterministic_per_tool_and_key() -> None:
    assert stripe_idempotency_key("create_customer", "k") == stripe_idempotency_key("create_customer", "k")
    assert stripe_idempotency_key("create_customer", "k") != stripe_idempotency_key("create_product", "k")
    assert stripe_idempotency_key("create_customer", "k") != stripe_idempotency_key("create_customer", "k2")


async def test_unknown_id_maps_to_invalid_request_with_param_and_request_id(
    make_settings: Any, sandbox_app: Any
) -> None:
    gateway = build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)
    with pytest.raises(StripeInvalidRequest) as caught:
        await gateway.send(StripeRequest("post", "/v1/billing_portal/sessions", {"customer": "cus_nope"}, "k1"))
    await gateway.close()
    assert caught.value.param == "customer"
    assert caught.value.details["stripe_code"] == "resource_missing"
    assert caught.value.details["request_id"].startswith("req_")
    assert "create_customer" in caught.value.message


async def test_a_declined_card_maps_to_card_declined_with_the_decline_code(
    make_settings: Any, sandbox_app: Any
) -> None:
    gateway = build_gateway(make_settings(), sandbox_app=sandbox_app, retry_delay_scale=0)
    create = StripeRequest("post", "/v1/payment_intents", {"amount": 500, "currency": "usd"}, "pi-1")
    intent = await gateway.send(create)
    with pytest.raises(StripeCardDeclined) as caught:
        await gateway.send(StripeRequest("post", f"/v1/payment_intents/{intent.data['id']}/confirm",
                                         {"payment_method": "pm_card_chargeDeclined"}, "pi-1-confirm"))
    await gateway.close()
    assert caught.value.details["decline_code"] == "generic_decline"
    assert "another payment method" in caught.value.message


async def test_sandbox_objects_persist_across_runs_in_its_own_file(make_settings: Any) -> None:
    settings = make_settings()
    first = build_gateway(settings, retry_delay_scale=0)
    created = await first.send(StripeRequest("post", "/v1/customers", {"email": "kept@example.com"}, "keep-1"))
    await first.close()

    second = build_gateway(settings, retry_delay_scale=0)
    again = await second.send(StripeRequest("get", f"/v1/customers/{created.data['id']}"))
    await second.close()

    assert again.data["email"] == "kept@example.com"
    assert settings.sandbox_db_path.exists() and settings.sandbox_db_path != settings.aims_billing_db
