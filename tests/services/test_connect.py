"""Marketplace splits (issue 17) end to end: MCP tools, the server's webhook endpoint and the sandbox's Connect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from aims_billing_mcp.sandbox import Sandbox
from tests.conftest import error_of, ok, table_digests

pytestmark = pytest.mark.anyio


async def _drained(sandbox: Sandbox) -> None:
    assert await anyio.to_thread.run_sync(lambda: sandbox.webhooks.drain(10))


async def creator(client: Client, sandbox: Sandbox, *, onboard: bool = True, country: str = "US",
                  name: str = "Plug Maker") -> str:
    made = ok(await client.call_tool("create_connected_account", {
        "display_name": name, "country": country, "email": "maker@example.com"}))
    account: str = made["account"]["id"]
    if onboard:
        sandbox.complete_account_onboarding(account)
        await _drained(sandbox)
    return account


async def price(client: Client, amount: int = 2000, currency: str = "usd", **extra: Any) -> str:
    product = ok(await client.call_tool("create_product", {"name": "SEO audit plug"}))["product"]["id"]
    made = ok(await client.call_tool("create_price", {"product": product, "unit_amount": amount,
                                                      "currency": currency, **extra}))
    return str(made["price"]["id"])


async def plug(client: Client, account: str, price_id: str, plug_id: str = "seo-audit", **terms: int) -> str:
    ok(await client.call_tool("create_plug", {"plug_id": plug_id, "price": price_id, "account": account,
                                              **(terms or {"creator_share_bp": 7000})}))
    return plug_id


async def sold_plug(client: Client, sandbox: Sandbox) -> tuple[str, dict[str, Any]]:
    """A creator's plug (price 1000, their share 70%) sold through a completed checkout, its events stored: the
    creator's account and the completed Checkout Session."""
    account = await creator(client, sandbox)
    price_id = await price(client, 1000)
    await plug(client, account, price_id)
    session = ok(await client.call_tool("create_checkout_session", {
        "line_items": [{"price": price_id}], "customer_email": "b@example.com"}))["checkout_session"]["id"]
    done = sandbox.complete_checkout_session(session)
    await _drained(sandbox)
    return account, done


async def test_a_creator_registers_onboards_through_a_link_and_can_then_receive_transfers(
        client: Client, sandbox: Sandbox) -> None:
    made = ok(await client.call_tool("create_connected_account", {
        "display_name": "Plug Maker", "country": "US", "email": "maker@example.com", "idempotency_key": "maker-1"}))
    account = made["account"]
    assert (account["status"], account["can_receive_transfers"], account["currency"]) == ("onboarding", False, "usd")
    assert account["requirements_due"]
    again = ok(await client.call_tool("create_connected_account", {
        "display_name": "Plug Maker", "country": "US", "email": "maker@example.com", "idempotency_key": "maker-1"}))
    assert again["replayed"] and again["account"]["id"] == account["id"] and sandbox.count("v2.core.account") == 1

    link = ok(await client.call_tool("create_account_link", {
        "account": account["id"], "refresh_url": "https://aims.example/refresh", "return_url": "https://aims.example/ok"}))
    assert link["url"].startswith("https://") and link["expires_at"]

    sandbox.complete_account_onboarding(account["id"])  # the creator finished the link: Stripe sends account.updated
    await _drained(sandbox)
    listed = ok(await client.call_tool("list_connected_accounts", {"status": "active"}))["accounts"]
    assert [(a["id"], a["can_receive_transfers"], a["requirements_due"]) for a in listed] == [(account["id"], True, [])]
    live = ok(await client.call_tool("get_connected_account", {"account": account["id"]}))
    assert (live["status"], live["payouts"]) == ("active", "active")

    sandbox.complete_account_onboarding(account["id"], onboarded=False)  # Stripe asks for more later
    await _drained(sandbox)
    listed = ok(await client.call_tool("list_connected_accounts", {}))["accounts"]
    assert [(a["status"], bool(a["requirements_due"])) for a in listed] == [("restricted", True)]


async def test_an_account_link_for_an_unknown_account_is_not_found(client: Client) -> None:
    err = error_of(await client.call_tool("create_account_link", {
        "account": "acct_unknown", "refresh_url": "https://a.example/r", "return_url": "https://a.example/o"}))
    assert err["code"] == "not_found" and err["param"] == "account"


@pytest.mark.parametrize(("terms", "param", "says"), [
    ({"creator_share_bp": 10_001}, "creator_share_bp", "less than or equal to 10000"),
    ({"creator_share_bp": -1}, "creator_share_bp", "greater than or equal to 0"),
    ({"platform_fee": 2001}, "platform_fee", "larger than the price"),
    ({"platform_fee": -5}, "platform_fee", "greater than or equal to 0"),
    ({"platform_fee": 100, "creator_share_bp": 5000}, "creator_share_bp", "exactly one"),
    ({}, "creator_share_bp", "exactly one"),
])
async def test_a_plug_with_a_share_outside_0_to_100_percent_or_a_fee_above_the_price_is_refused_writing_nothing(
        client: Client, sandbox: Sandbox, tmp_path: Path, terms: dict[str, int], param: str, says: str) -> None:
    account = await creator(client, sandbox)
    price_id = await price(client, 2000)
    await _drained(sandbox)  # every event so far stored: a late one is no write of ours
    before = table_digests(tmp_path / "billing.db")
    err = error_of(await client.call_tool("create_plug", {"plug_id": "p1", "price": price_id, "account": account,
                                                          **terms}))
    assert err["code"] == "invalid_input" and err["param"] == param and says in err["message"]
    assert table_digests(tmp_path / "billing.db") == before


@pytest.mark.parametrize("case", ["unknown_account", "other_currency", "recurring_price"])
async def test_a_plug_for_an_unknown_account_a_currency_it_cannot_receive_or_a_recurring_price_is_refused(
        client: Client, sandbox: Sandbox, tmp_path: Path, case: str) -> None:
    account = await creator(client, sandbox, country="GB" if case == "other_currency" else "US")
    price_id = await price(client, 2000, **({"recurring": {"interval": "month"}} if case == "recurring_price" else {}))
    await _drained(sandbox)  # every event so far stored: a late one is no write of ours
    before = table_digests(tmp_path / "billing.db")
    err = error_of(await client.call_tool("create_plug", {
        "plug_id": "p1", "price": price_id, "creator_share_bp": 7000,
        "account": "acct_nobodyhere" if case == "unknown_account" else account}))
    assert err["param"] == {"unknown_account": "account", "other_currency": "price",
                            "recurring_price": "price"}[case], err
    if case == "other_currency":
        assert "gbp" in err["message"] and "usd" in err["message"]
    assert table_digests(tmp_path / "billing.db") == before


async def test_a_checkout_of_a_plug_whose_creator_cannot_receive_transfers_is_refused_before_any_charge(
        client: Client, sandbox: Sandbox, tmp_path: Path) -> None:
    account = await creator(client, sandbox)
    price_id = await price(client)
    await plug(client, account, price_id)
    sandbox.complete_account_onboarding(account, onboarded=False)  # Stripe now requires more
    await _drained(sandbox)
    await _drained(sandbox)  # every event so far stored: a late one is no write of ours
    before = table_digests(tmp_path / "billing.db")
    for tool, args in (("create_checkout_session", {"customer_email": "b@example.com"}), ("create_payment_link", {})):
        err = error_of(await client.call_tool(tool, {"line_items": [{"price": price_id}], **args}))
        assert err["code"] == "refused" and account in err["message"] and "requires" in err["message"]
        assert err["requirements_due"]
    assert sandbox.count("checkout.session") == 0 and sandbox.count("payment_link") == 0
    assert table_digests(tmp_path / "billing.db") == before


async def test_a_checkout_of_a_plug_pays_the_creator_their_share_and_the_platform_its_fee(
        client: Client, sandbox: Sandbox) -> None:
    account = await creator(client, sandbox)
    plug_price, other = await price(client, 2000), await price(client, 500)
    await plug(client, account, plug_price, creator_share_bp=7000)
    session = ok(await client.call_tool("create_checkout_session", {
        "line_items": [{"price": plug_price, "quantity": 2}, {"price": other}], "customer_email": "b@example.com"}))
    done = sandbox.complete_checkout_session(session["checkout_session"]["id"])
    await _drained(sandbox)
    pi = sandbox.get_object(done["payment_intent"])
    assert pi is not None and pi["transfer_data"] == {"destination": account}
    assert pi["application_fee_amount"] == 4500 - 2800  # the whole cart less the creator's 70% of the plug lines
    report = ok(await client.call_tool("get_creator_earnings", {"account": account}))
    assert [(e["sales"], e["gross"], e["platform_fees"], e["transferred"], e["pending"])
            for e in report["earnings"]] == [(1, 4000, 1200, 2800, 0)]
    assert [(s["path"], s["status"], s["payment_intent"]) for s in report["splits"]] == [
        ("checkout", "transferred", pi["id"])]
    live = ok(await client.call_tool("get_connected_account", {"account": account}))
    assert live["balance"] == {"usd": 2800}  # read from Stripe with the Stripe-Account header


async def test_each_payment_of_a_plugs_payment_link_is_a_split_sale(client: Client, sandbox: Sandbox) -> None:
    account = await creator(client, sandbox)
    price_id = await price(client, 1000)
    await plug(client, account, price_id, platform_fee=150)
    link = ok(await client.call_tool("create_payment_link", {"line_items": [{"price": price_id}]}))["payment_link"]
    for _ in range(2):
        sandbox.pay_payment_link(link["id"])
    await _drained(sandbox)
    report = ok(await client.call_tool("get_creator_earnings", {}))
    assert [(e["account"], e["sales"], e["gross"], e["platform_fees"], e["transferred"])
            for e in report["earnings"]] == [(account, 2, 2000, 300, 1700)]
    assert {s["path"] for s in report["splits"]} == {"payment_link"}


async def test_a_payment_session_for_a_plug_is_a_destination_charge_split_once_paid(
        client: Client, sandbox: Sandbox) -> None:
    account = await creator(client, sandbox)
    await plug(client, account, await price(client, 1000), platform_fee=250)
    made = ok(await client.call_tool("create_payment_session", {"item": "plug:seo-audit", "idempotency_key": "buy-1"}))
    session = made["session"]
    assert (session["amount"], session["currency"], session["item"]) == (1000, "usd", None)
    paid = ok(await client.call_tool("confirm_payment_session", {
        "session_id": session["id"], "payment_method": "pm_card_visa", "idempotency_key": "pay-1"}))
    await _drained(sandbox)
    pi = sandbox.get_object(paid["payment_intent"])
    assert pi is not None and pi["transfer_data"] == {"destination": account} and pi["application_fee_amount"] == 250
    report = ok(await client.call_tool("get_creator_earnings", {"account": account}))
    assert [(s["path"], s["sale"], s["status"], s["creator_amount"]) for s in report["splits"]] == [
        ("payment_session", session["id"], "transferred", 750)]


async def test_a_payment_session_for_a_plug_of_a_creator_not_onboarded_is_refused_before_any_payment_intent(
        client: Client, sandbox: Sandbox, tmp_path: Path) -> None:
    account = await creator(client, sandbox)
    await plug(client, account, await price(client, 1000))
    sandbox.complete_account_onboarding(account, onboarded=False)
    await _drained(sandbox)
    await _drained(sandbox)  # every event so far stored: a late one is no write of ours
    before = table_digests(tmp_path / "billing.db")
    err = error_of(await client.call_tool("create_payment_session", {"item": "plug:seo-audit"}))
    assert err["code"] == "refused" and err["param"] == "item" and account in err["message"]
    assert sandbox.count("payment_intent") == 0 and table_digests(tmp_path / "billing.db") == before


async def test_partial_refunds_reverse_the_creators_transfer_and_the_platform_fee_in_proportion(
        client: Client, sandbox: Sandbox) -> None:
    account, done = await sold_plug(client, sandbox)
    session = done["id"]
    first = ok(await client.call_tool("refund_split_sale", {"sale": session, "amount": 333, "idempotency_key": "r1"}))
    assert (first["amount"], first["reversed"], first["fee_refunded"]) == (333, 333 - 99, 99)
    again = ok(await client.call_tool("refund_split_sale", {"sale": session, "amount": 333, "idempotency_key": "r1"}))
    assert again["replayed"] and again["refund"] == first["refund"] and sandbox.count("refund") == 1
    rest = ok(await client.call_tool("refund_split_sale", {"sale": session, "amount": 667, "idempotency_key": "r2"}))
    assert rest["reversed"] + first["reversed"] == 700 and rest["fee_refunded"] + first["fee_refunded"] == 300
    (earned,) = ok(await client.call_tool("get_creator_earnings", {"account": account}))["earnings"]
    assert (earned["transferred"], earned["reversed"], earned["fee_refunded"], earned["net_to_creator"]) == (
        700, 700, 300, 0)
    pi = sandbox.get_object(done["payment_intent"])
    assert pi is not None
    transfers = [t for t in _list(sandbox, "transfer") if t["transfer_group"] == f"group_{pi['id']}"]
    fees = [f for f in _list(sandbox, "application_fee") if f["charge"] == pi["latest_charge"]]
    assert [(t["amount"], t["amount_reversed"]) for t in transfers] == [(1000, 1000)]
    assert [(f["amount"], f["amount_refunded"]) for f in fees] == [(300, 300)]


def _list(sandbox: Sandbox, kind: str) -> list[dict[str, Any]]:
    found, _ = sandbox.store.page(kind, {}, limit=100)
    return found


async def test_a_refund_larger_than_what_is_left_is_refused_writing_nothing_and_sending_nothing(
        client: Client, sandbox: Sandbox, tmp_path: Path) -> None:
    _, done = await sold_plug(client, sandbox)
    session = done["id"]
    ok(await client.call_tool("refund_split_sale", {"sale": session, "amount": 600, "idempotency_key": "r1"}))
    await _drained(sandbox)  # every event so far stored: a late one is no write of ours
    before = table_digests(tmp_path / "billing.db", skip=("audit_log", "sqlite_sequence", "idempotency_keys"))
    err = error_of(await client.call_tool("refund_split_sale", {"sale": session, "amount": 401,
                                                                "idempotency_key": "r2"}))
    assert err["code"] == "invalid_input" and err["param"] == "amount" and "400" in err["message"]
    assert sandbox.count("refund") == 1
    assert table_digests(tmp_path / "billing.db", skip=("audit_log", "sqlite_sequence", "idempotency_keys")) == before


async def test_two_refunds_racing_for_the_rest_of_a_sale_refund_and_reverse_once(
        client: Client, sandbox: Sandbox) -> None:
    account, done = await sold_plug(client, sandbox)
    session = done["id"]
    results: list[Any] = []

    async def refund(key: str) -> None:
        results.append(await client.call_tool("refund_split_sale", {"sale": session, "amount": 1000,
                                                                    "idempotency_key": key}))

    async with anyio.create_task_group() as tg:
        for key in ("a", "b"):
            tg.start_soon(refund, key)
    assert sorted(r.is_error for r in results) == [False, True]
    assert sandbox.count("refund") == 1 and sandbox.count("transfer_reversal") == 1
    (earned,) = ok(await client.call_tool("get_creator_earnings", {"account": account}))["earnings"]
    assert earned["reversed"] == 700


# --- x402: a plug's resource paid in USDC, the creator paid by a separate transfer ---------------------------------


def _fund_platform(sandbox_app: Any, amount: int = 10_000) -> None:
    """The platform's Stripe balance the x402 transfers come from (a paid card charge, available at once)."""
    from starlette.testclient import TestClient

    from aims_billing_mcp.sandbox import SANDBOX_SECRET_KEY

    http = TestClient(sandbox_app, headers={"Authorization": f"Bearer {SANDBOX_SECRET_KEY}"})
    paid = http.post("/v1/payment_intents", data={"amount": str(amount), "currency": "usd",
                                                  "payment_method": "pm_card_visa", "confirm": "true"})
    assert paid.status_code == 200, paid.text


async def _x402_plug(client: Client, sandbox: Sandbox, *, onboard: bool = True) -> str:
    account = await creator(client, sandbox)
    await plug(client, account, await price(client, 1000), creator_share_bp=7000)
    if not onboard:
        sandbox.complete_account_onboarding(account, onboarded=False)
        await _drained(sandbox)
    return account


def _transfers(sandbox: Sandbox) -> list[dict[str, Any]]:
    return [t for t in _list(sandbox, "transfer") if str(t["transfer_group"]).startswith("x402_")]


@pytest.mark.parametrize("lost_answer", [False, True])
async def test_an_x402_payment_for_a_plug_transfers_the_creators_share_once_even_after_a_lost_answer(
        client: Client, sandbox: Sandbox, sandbox_app: Any, lost_answer: bool) -> None:

    from tests.support.x402_worker import Payer, header

    account = await _x402_plug(client, sandbox)
    _fund_platform(sandbox_app)
    quote = ok(await client.call_tool("create_x402_payment_requirements", {
        "description": "SEO audit", "resource": "plug:seo-audit", "amount_usd": "10.00"}))
    if lost_answer:  # Stripe makes the transfer but its answer is lost: the retry carries the same key
        sandbox.faults.inject(status=500, mode="after", path_prefix="/v1/transfers")
    receipt = ok(await client.call_tool("verify_x402_receipt", {
        "payment": header(Payer().pay(quote["payment_required"]))}))
    [transfer] = _transfers(sandbox)
    assert (transfer["amount"], transfer["destination"], transfer["transfer_group"]) == (
        700, account, f"x402_{receipt['receipt_id']}")
    report = ok(await client.call_tool("get_creator_earnings", {"account": account}))
    assert [(s["path"], s["status"], s["creator_amount"], s["platform_fee"], s["transfer"])
            for s in report["splits"]] == [("x402", "transferred", 700, 300, transfer["id"])]


async def test_the_same_x402_plug_payment_presented_four_times_at_once_transfers_once(
        client: Client, sandbox: Sandbox, sandbox_app: Any) -> None:

    from tests.support.x402_worker import Payer, header

    await _x402_plug(client, sandbox)
    _fund_platform(sandbox_app)
    quote = ok(await client.call_tool("create_x402_payment_requirements", {
        "description": "SEO audit", "resource": "plug:seo-audit", "amount_usd": "10.00"}))
    payment = header(Payer().pay(quote["payment_required"]))
    results: list[Any] = []

    async def present() -> None:
        results.append(await client.call_tool("verify_x402_receipt", {"payment": payment}))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(present)
    assert sorted(r.is_error for r in results) == [False, True, True, True]
    assert len(_transfers(sandbox)) == 1


@pytest.mark.parametrize(("case", "param"), [("wrong_price", "amount_usd"), ("not_onboarded", "resource"),
                                             ("unknown_plug", "resource")])
async def test_an_x402_quote_for_a_plug_at_another_price_or_whose_creator_cannot_be_paid_is_refused_storing_nothing(
        client: Client, sandbox: Sandbox, tmp_path: Path, case: str, param: str) -> None:
    await _x402_plug(client, sandbox, onboard=case != "not_onboarded")
    await _drained(sandbox)  # every event so far stored: a late one is no write of ours
    before = table_digests(tmp_path / "billing.db")
    err = error_of(await client.call_tool("create_x402_payment_requirements", {
        "description": "SEO audit", "resource": "plug:nope" if case == "unknown_plug" else "plug:seo-audit",
        "amount_usd": "9.99" if case == "wrong_price" else "10.00"}))
    assert err["param"] == param, err
    assert table_digests(tmp_path / "billing.db") == before


async def test_check_splits_reconciles_checkout_and_x402_sales_and_names_a_drifted_one(
        make_server: Any, sandbox: Sandbox, sandbox_app: Any, tmp_path: Path) -> None:
    import sqlite3

    from tests.support.x402_worker import Payer, header

    server = make_server()
    async with Client(server) as client:
        await _x402_plug(client, sandbox)
        _fund_platform(sandbox_app)
        quote = ok(await client.call_tool("create_x402_payment_requirements", {
            "description": "SEO audit", "resource": "plug:seo-audit", "amount_usd": "10.00"}))
        ok(await client.call_tool("verify_x402_receipt", {"payment": header(Payer().pay(quote["payment_required"]))}))
        assert await server.state.connect.check_splits() == (1, [])
        with sqlite3.connect(tmp_path / "billing.db") as conn:
            conn.execute("UPDATE splits SET creator_amount = creator_amount - 1, platform_fee = platform_fee + 1")
        checked, problems = await server.state.connect.check_splits()
        assert checked == 1 and len(problems) == 1 and "expected transfer" in problems[0]


async def test_get_connected_account_shows_the_creators_payout_schedule_as_stripe_has_it(
        client: Client, sandbox: Sandbox, sandbox_app: Any) -> None:
    from starlette.testclient import TestClient

    from aims_billing_mcp.sandbox import SANDBOX_SECRET_KEY

    account = await creator(client, sandbox)
    live = ok(await client.call_tool("get_connected_account", {"account": account}))
    assert live["payout_schedule"] == {"interval": "daily", "weekly_payout_days": None, "monthly_payout_days": None,
                                       "delay_days": 2, "status": "enabled"}
    http = TestClient(sandbox_app, headers={"Authorization": f"Bearer {SANDBOX_SECRET_KEY}", "Stripe-Account": account})
    changed = http.post("/v1/balance_settings", data={"payments[payouts][schedule][interval]": "monthly",
                                                      "payments[payouts][schedule][monthly_payout_days][0]": "15"})
    assert changed.status_code == 200, changed.text  # the creator changed it in their Express dashboard
    live = ok(await client.call_tool("get_connected_account", {"account": account}))
    assert (live["payout_schedule"]["interval"], live["payout_schedule"]["monthly_payout_days"]) == ("monthly", [15])


async def test_the_embedded_sandbox_sends_only_the_events_the_endpoint_enables_so_a_split_sale_costs_no_more_events(
        make_server: Any, sandbox: Sandbox) -> None:
    from aims_billing_mcp.services.webhook_events import ENABLED_EVENTS

    server = make_server()
    async with Client(server) as client:
        account = await creator(client, sandbox)
        plug_price, plain = await price(client, 1000), await price(client, 1001)
        await plug(client, account, plug_price)
        for line in (plain, plug_price):
            session = ok(await client.call_tool("create_checkout_session", {
                "line_items": [{"price": line}], "customer_email": "b@example.com"}))
            sandbox.complete_checkout_session(session["checkout_session"]["id"])
        await _drained(sandbox)
        received = [e.type for e in server.state.webhook_events.recent(100)]
        assert received.count("checkout.session.completed") == 2 and "transfer.created" not in received
        assert "application_fee.created" not in received and "customer.created" not in received
        assert not [kind for kind in received if not any(
            kind == enabled or kind.startswith(enabled[:-1]) for enabled in ENABLED_EVENTS)]
        (earned,) = ok(await client.call_tool("get_creator_earnings", {"account": account}))["earnings"]
        assert (earned["sales"], earned["transferred"]) == (1, 700)
