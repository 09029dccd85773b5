"""The catalog and checkout tools, called by name through an in-memory MCP client, with the sandbox behind the real
gateway: happy paths, bad input, idempotency, dry runs."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp import Client

from aims_billing_mcp.sandbox import Sandbox
from tests.conftest import error_of, ok

pytestmark = pytest.mark.anyio


async def make_product(client: Client) -> str:
    return ok(await client.call_tool("create_product", {"name": "Widget"}))["product"]["id"]  # type: ignore[no-any-return]


async def make_price(client: Client, amount: int = 1999, **extra: Any) -> str:
    product = await make_product(client)
    args = {"product": product, "currency": "usd", "unit_amount": amount, **extra}
    return ok(await client.call_tool("create_price", args))["price"]["id"]  # type: ignore[no-any-return]


async def make_customer(client: Client, email: str = "ada@example.com") -> str:
    return ok(await client.call_tool("create_customer", {"email": email}))["customer"]["id"]  # type: ignore[no-any-return]


# --- happy paths ----------------------------------------------------------------------------------------------------


async def test_create_product_returns_a_prod_id_and_stores_it_in_stripe(client: Client, sandbox: Sandbox) -> None:
    out = ok(await client.call_tool("create_product", {"name": "Widget", "description": "A thing"}))
    assert out["product"]["id"].startswith("prod_")
    assert out["product"]["name"] == "Widget"
    assert out["replayed"] is False
    assert sandbox.get_object(out["product"]["id"])["description"] == "A thing"  # type: ignore[index]


async def test_create_price_one_time_shows_amount_in_minor_units_and_display(client: Client) -> None:
    product = await make_product(client)
    out = ok(await client.call_tool("create_price", {"product": product, "currency": "usd", "unit_amount": 1999}))
    assert out["price"]["unit_amount"] == 1999
    assert out["price"]["unit_amount_display"] == "19.99 USD"
    assert out["price"]["type"] == "one_time"


async def test_create_price_recurring_carries_the_interval(client: Client) -> None:
    product = await make_product(client)
    args = {"product": product, "currency": "usd", "unit_amount": 1799, "recurring": {"interval": "month"},
            "lookup_key": "pro_monthly"}
    out = ok(await client.call_tool("create_price", args))
    assert out["price"]["type"] == "recurring"
    assert out["price"]["recurring"] == {"interval": "month", "interval_count": 1}
    assert out["price"]["lookup_key"] == "pro_monthly"


async def test_create_customer_returns_a_cus_id(client: Client, sandbox: Sandbox) -> None:
    out = ok(await client.call_tool("create_customer", {"email": "ada@example.com", "name": "Ada"}))
    assert out["customer"]["id"].startswith("cus_")
    assert out["customer"]["email"] == "ada@example.com"
    assert sandbox.count("customer") == 1


async def test_create_payment_link_totals_its_line_items(client: Client) -> None:
    price = await make_price(client, 1500)
    out = ok(await client.call_tool("create_payment_link", {"line_items": [{"price": price, "quantity": 3}],
                                                            "after_completion_url": "https://example.com/thanks"}))
    link = out["payment_link"]
    assert link["id"].startswith("plink_")
    assert link["url"].startswith("https://")
    assert (link["amount_total"], link["currency"]) == (4500, "usd")


async def test_create_checkout_session_in_payment_mode_returns_an_open_session_url(client: Client) -> None:
    price = await make_price(client)
    customer = await make_customer(client)
    out = ok(await client.call_tool("create_checkout_session", {
        "line_items": [{"price": price}], "customer": customer,
        "success_url": "https://example.com/done?session={CHECKOUT_SESSION_ID}",
    }))
    session = out["checkout_session"]
    assert session["id"].startswith("cs_test_")
    assert (session["status"], session["mode"], session["amount_total"]) == ("open", "payment", 1999)
    assert session["url"].startswith("https://")


async def test_create_checkout_session_in_subscription_mode_needs_a_recurring_price(client: Client) -> None:
    monthly = await make_price(client, 1799, recurring={"interval": "month"})
    out = ok(await client.call_tool("create_checkout_session", {
        "mode": "subscription", "line_items": [{"price": monthly}], "customer_email": "bo@example.com",
        "success_url": "https://example.com/welcome"}))
    assert out["checkout_session"]["mode"] == "subscription"


async def test_subscription_checkout_with_a_one_time_price_is_refused_by_stripe(client: Client) -> None:
    one_time = await make_price(client)
    err = error_of(await client.call_tool("create_checkout_session", {
        "mode": "subscription", "line_items": [{"price": one_time}], "success_url": "https://example.com/x"}))
    assert err["code"] == "stripe_invalid_request"
    assert "recurring" in err["message"]


async def test_create_billing_portal_session_returns_a_url_for_the_customer(client: Client) -> None:
    customer = await make_customer(client)
    out = ok(await client.call_tool("create_billing_portal_session", {
        "customer": customer, "return_url": "https://example.com/account"}))
    assert out["portal_session"]["id"].startswith("bps_")
    assert out["portal_session"]["customer"] == customer


async def test_list_invoices_pages_with_next_cursor_until_the_last_page(client: Client, sandbox: Sandbox) -> None:
    customer = await make_customer(client)
    monthly = await make_price(client, 1000, recurring={"interval": "month"})
    for month in range(3):
        session = ok(await client.call_tool("create_checkout_session", {
            "mode": "subscription", "line_items": [{"price": monthly}], "customer": customer,
            "success_url": "https://example.com/ok", "idempotency_key": f"month-{month}"}))
        sandbox.complete_checkout_session(session["checkout_session"]["id"])

    first = ok(await client.call_tool("list_invoices", {"customer": customer, "limit": 2}))
    second = ok(await client.call_tool("list_invoices", {"customer": customer, "limit": 2,
                                                         "starting_after": first["next_cursor"]}))

    assert (len(first["invoices"]), first["has_more"]) == (2, True)
    assert (len(second["invoices"]), second["has_more"], second["next_cursor"]) == (1, False, None)
    ids = [i["id"] for i in first["invoices"] + second["invoices"]]
    assert len(set(ids)) == 3
    assert all(i["status"] == "paid" and i["total"] == 1000 for i in first["invoices"] + second["invoices"])


async def test_retrieve_balance_reports_sandbox_mode_and_paid_checkouts(client: Client, sandbox: Sandbox) -> None:
    price = await make_price(client, 2500)
    session = ok(await client.call_tool("create_checkout_session", {"line_items": [{"price": price}],
                                                                    "customer_email": "c@example.com"}))
    sandbox.complete_checkout_session(session["checkout_session"]["id"])

    out = ok(await client.call_tool("retrieve_balance", {}))

    assert out["mode"] == "sandbox"
    usd = [a for a in out["available"] if a["currency"] == "usd"]
    assert usd and usd[0]["amount"] == 2500 and usd[0]["display"] == "25.00 USD"


# --- bad input: an isError result naming the field, nothing written ------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "arguments", "field"),
    [
        ("create_product", {}, "name"),
        ("create_product", {"name": ""}, "name"),
        ("create_price", {"product": "prod_x", "currency": "usd"}, "unit_amount"),
        ("create_price", {"product": "prod_x", "currency": "usd", "unit_amount": 0}, "unit_amount"),
        ("create_price", {"product": "prod_x", "currency": "usd", "unit_amount": -5}, "unit_amount"),
        ("create_price", {"product": "prod_x", "currency": "xyz", "unit_amount": 100}, "currency"),
        ("create_price", {"product": "price_x", "currency": "usd", "unit_amount": 100}, "product"),
        ("create_customer", {"email": "not-an-email"}, "email"),
        ("create_customer", {}, "email"),
        ("create_payment_link", {"line_items": []}, "line_items"),
        ("create_payment_link", {"line_items": [{"price": "prod_123"}]}, "line_items.0.price"),
        ("create_checkout_session", {"line_items": [{"price": "price_1"}], "success_url": "not a url"},
         "success_url"),
        ("create_checkout_session", {"line_items": [{"price": "price_1"}], "customer": "ada@example.com"},
         "customer"),
        ("create_billing_portal_session", {"customer": "cus_1", "return_url": "ftp://x"}, "return_url"),
        ("create_billing_portal_session", {}, "customer"),
        ("list_invoices", {"limit": 0}, "limit"),
        ("create_customer", {"email": "a@example.com", "emial": "typo@example.com"}, "emial"),
    ],
)
async def test_bad_input_is_an_error_naming_the_field_and_sends_nothing(
    client: Client, sandbox: Sandbox, tool: str, arguments: dict[str, Any], field: str
) -> None:
    before = len(sandbox.request_log)

    err = error_of(await client.call_tool(tool, arguments))

    assert err["code"] == "invalid_input"
    assert field in err["text"]
    assert len(sandbox.request_log) == before


@pytest.mark.parametrize(
    ("tool", "arguments", "param"),
    [
        ("create_price", {"product": "prod_doesnotexist", "currency": "usd", "unit_amount": 100}, "product"),
        ("create_billing_portal_session", {"customer": "cus_doesnotexist"}, "customer"),
        ("create_payment_link", {"line_items": [{"price": "price_doesnotexist"}]}, "line_items[0][price]"),
        ("create_checkout_session", {"line_items": [{"price": "price_doesnotexist"}]}, "line_items[0][price]"),
    ],
)
async def test_unknown_ids_are_errors_naming_the_param_and_how_to_fix_it(
    client: Client, sandbox: Sandbox, tool: str, arguments: dict[str, Any], param: str
) -> None:
    err = error_of(await client.call_tool(tool, arguments))

    assert err["param"] == param
    assert err["stripe_code"] == "resource_missing"
    assert "create" in err["message"]  # says how to get a valid id
    assert err["request_id"].startswith("req_")
    assert sandbox.count("price") + sandbox.count("payment_link") + sandbox.count("checkout.session") == 0


async def test_checkout_for_an_unknown_customer_is_refused(client: Client) -> None:
    price = await make_price(client)
    err = error_of(await client.call_tool("create_checkout_session", {"line_items": [{"price": price}],
                                                                      "customer": "cus_nobody"}))
    assert err["param"] == "customer"


async def test_the_server_keeps_serving_after_bad_input(client: Client) -> None:
    error_of(await client.call_tool("create_product", {"name": ""}))
    assert ok(await client.call_tool("create_product", {"name": "Still here"}))["product"]["name"] == "Still here"


async def test_an_unknown_tool_is_an_error_not_a_crash(client: Client) -> None:
    result = await client.call_tool("refund_everything", {})
    assert result.is_error


# --- ceiling ------------------------------------------------------------------------------------------------------


async def test_price_above_the_ceiling_is_refused_with_both_numbers(client: Client, sandbox: Sandbox) -> None:
    product = await make_product(client)
    err = error_of(await client.call_tool("create_price", {"product": product, "currency": "usd",
                                                           "unit_amount": 1_000_001}))
    assert err["code"] == "amount_above_ceiling"
    assert "1000000" in err["message"] and "10,000.01 USD" in err["message"]
    assert sandbox.count("price") == 0


async def test_payment_link_whose_total_exceeds_the_ceiling_is_refused(client: Client, sandbox: Sandbox) -> None:
    price = await make_price(client, 600_000)
    err = error_of(await client.call_tool("create_payment_link", {"line_items": [{"price": price, "quantity": 2}]}))
    assert err["code"] == "amount_above_ceiling"
    assert sandbox.count("payment_link") == 0


# --- idempotency ----------------------------------------------------------------------------------------------------


async def test_same_idempotency_key_returns_the_first_customer_replayed(client: Client, sandbox: Sandbox) -> None:
    args = {"email": "ada@example.com", "idempotency_key": "signup-ada"}
    first = ok(await client.call_tool("create_customer", args))
    second = ok(await client.call_tool("create_customer", args))
    assert second["customer"] == first["customer"]
    assert (first["replayed"], second["replayed"]) == (False, True)
    assert sandbox.count("customer") == 1


async def test_same_arguments_without_a_key_within_the_window_are_replayed(client: Client, sandbox: Sandbox) -> None:
    first = ok(await client.call_tool("create_product", {"name": "Gadget"}))
    second = ok(await client.call_tool("create_product", {"name": "Gadget"}))
    assert second["product"]["id"] == first["product"]["id"]
    assert second["replayed"] is True
    assert sandbox.count("product") == 1


async def test_different_keys_create_different_objects(client: Client, sandbox: Sandbox) -> None:
    a = ok(await client.call_tool("create_customer", {"email": "a@example.com", "idempotency_key": "k1"}))
    b = ok(await client.call_tool("create_customer", {"email": "a@example.com", "idempotency_key": "k2"}))
    assert a["customer"]["id"] != b["customer"]["id"]
    assert sandbox.count("customer") == 2


async def test_same_key_with_different_arguments_is_a_clear_error(client: Client, sandbox: Sandbox) -> None:
    ok(await client.call_tool("create_customer", {"email": "a@example.com", "idempotency_key": "k"}))
    err = error_of(await client.call_tool("create_customer", {"email": "b@example.com", "idempotency_key": "k"}))
    assert err["code"] == "idempotency_conflict"
    assert err["param"] == "idempotency_key"
    assert sandbox.count("customer") == 1


async def test_replay_window_zero_turns_off_keyless_replay(make_server: Any, sandbox: Sandbox) -> None:
    async with Client(make_server(aims_billing_replay_window_seconds=0)) as client:
        ok(await client.call_tool("create_product", {"name": "Twice"}))
        ok(await client.call_tool("create_product", {"name": "Twice"}))
    assert sandbox.count("product") == 2


async def test_replay_survives_a_server_restart(make_server: Any, sandbox: Sandbox) -> None:
    args = {"email": "ada@example.com", "idempotency_key": "restart"}
    async with Client(make_server()) as client:
        first = ok(await client.call_tool("create_customer", args))
    async with Client(make_server()) as client:
        second = ok(await client.call_tool("create_customer", args))
    assert second["customer"]["id"] == first["customer"]["id"] and second["replayed"] is True


# --- dry run --------------------------------------------------------------------------------------------------------


async def test_dry_run_returns_the_exact_request_and_sends_nothing(client: Client, sandbox: Sandbox) -> None:
    before = len(sandbox.request_log)
    out = ok(await client.call_tool("create_customer", {"email": "ada@example.com", "metadata": {"tier": "pro"},
                                                        "dry_run": True}))
    assert out["dry_run"] is True and out["customer"] is None
    request = out["request"]
    assert (request["method"], request["url"].endswith("/v1/customers")) == ("POST", True)
    assert request["body"] == "email=ada%40example.com&metadata[tier]=pro"
    assert request["idempotency_key"].startswith("aims-create_customer-")
    assert request["stripe_version"] == "2026-01-28.clover"
    assert len(sandbox.request_log) == before


async def test_dry_run_then_real_call_creates_exactly_one_object(client: Client, sandbox: Sandbox) -> None:
    ok(await client.call_tool("create_product", {"name": "Dry", "dry_run": True}))
    out = ok(await client.call_tool("create_product", {"name": "Dry"}))
    assert out["replayed"] is False
    assert sandbox.count("product") == 1


async def test_concurrent_calls_with_one_key_create_one_object(client: Client, sandbox: Sandbox) -> None:
    results: list[dict[str, Any]] = []

    async def call() -> None:
        results.append(ok(await client.call_tool("create_customer", {"email": "c@example.com",
                                                                     "idempotency_key": "burst"})))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(call)

    assert sandbox.count("customer") == 1
    assert len({r["customer"]["id"] for r in results}) == 1
    assert sorted(r["replayed"] for r in results) == [False, True, True, True, True]
