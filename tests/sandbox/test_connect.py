"""Stripe Connect in the sandbox: v2 accounts and account links through the real SDK, onboarding by control
endpoint with its account.updated Event, transfers and reversals, destination charges with application fees on
PaymentIntents, Checkout Sessions and Payment Links, proportional refunds, Stripe-Account balances."""

from __future__ import annotations

from typing import Any

import pytest
import stripe
from starlette.applications import Starlette
from starlette.testclient import TestClient

from aims_billing_mcp.sandbox import Sandbox

from .conftest import ok_json, post
from .test_sdk import _client

RECIPIENT = {"recipient": {"capabilities": {"stripe_balance": {"stripe_transfers": {"requested": True}}}}}


@pytest.fixture
def sdk(app: Starlette) -> stripe.StripeClient:
    return _client(app)


def _account(sdk: stripe.StripeClient, *, onboard: bool, sandbox: Sandbox | None = None, country: str = "us") -> str:
    account = sdk.v2.core.accounts.create({
        "contact_email": "maker@example.com", "display_name": "Plug Maker", "dashboard": "express",
        "identity": {"country": country}, "configuration": RECIPIENT,  # type: ignore[typeddict-item]
        "include": ["configuration.recipient", "requirements"],
    })
    if onboard:
        assert sandbox is not None
        sandbox.complete_account_onboarding(account.id)
    return str(account.id)


def _pi(api: TestClient, destination: str, amount: int = 10000, **extra: str) -> dict[str, Any]:
    return ok_json(post(api, "/v1/payment_intents", {
        "amount": str(amount), "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true",
        "transfer_data[destination]": destination, **extra}))


def _platform(api: TestClient, currency: str = "usd") -> int:
    rows = ok_json(api.get("/v1/balance"))["available"]
    return next((int(r["amount"]) for r in rows if r["currency"] == currency), 0)


def _connected(api: TestClient, account: str) -> int:
    rows = ok_json(api.get("/v1/balance", headers={"Stripe-Account": account}))["available"]
    return next((int(r["amount"]) for r in rows if r["currency"] == "usd"), 0)


def test_a_v2_account_with_the_recipient_configuration_is_restricted_until_onboarding_completes(
        sdk: stripe.StripeClient, sandbox: Sandbox) -> None:
    account = sdk.v2.core.accounts.create({
        "display_name": "Plug Maker", "contact_email": "maker@example.com", "identity": {"country": "us"},
        "configuration": RECIPIENT,  # type: ignore[typeddict-item]
        "include": ["configuration.recipient", "requirements", "defaults"],
    })
    assert account.object == "v2.core.account" and account.id.startswith("acct_")
    assert account.configuration is not None and account.configuration.recipient is not None
    transfers = account.configuration.recipient.capabilities.stripe_balance.stripe_transfers  # type: ignore[union-attr]
    assert transfers is not None and transfers.status == "restricted"
    assert account.requirements is not None and account.requirements.entries
    assert account.defaults is not None and account.defaults.currency == "usd"
    bare = sdk.v2.core.accounts.retrieve(account.id)
    assert "configuration" not in bare and "requirements" not in bare  # only what `include` asks for

    seen: list[dict[str, Any]] = []
    sandbox.add_event_listener(seen.append)
    v1 = sandbox.complete_account_onboarding(account.id)
    assert v1["capabilities"] == {"transfers": "active"} and v1["requirements"]["currently_due"] == []
    assert [e["type"] for e in seen] == ["account.updated"]
    assert seen[0]["data"]["previous_attributes"]["capabilities"] == {"transfers": "inactive"}
    after = sdk.v2.core.accounts.retrieve(account.id, {"include": ["configuration.recipient", "requirements"]})
    assert after.configuration.recipient.capabilities.stripe_balance.stripe_transfers.status == "active"  # type: ignore[union-attr]
    assert after.requirements is not None and not after.requirements.entries


def test_an_account_link_for_onboarding_has_a_url_and_an_expiry(sdk: stripe.StripeClient) -> None:
    account = _account(sdk, onboard=False)
    link = sdk.v2.core.account_links.create({"account": account, "use_case": {
        "type": "account_onboarding", "account_onboarding": {
            "configurations": ["recipient"], "refresh_url": "https://example.com/refresh",
            "return_url": "https://example.com/done"}}})
    assert link.object == "v2.core.account_link" and link.account == account
    assert link.url.startswith("https://") and link.expires_at > link.created


def test_v2_errors_name_the_param(sdk: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        sdk.v2.core.accounts.retrieve("acct_doesnotexist0000")
    assert caught.value.http_status == 404
    with pytest.raises(stripe.InvalidRequestError):
        sdk.v2.core.account_links.create({"account": "acct_nope", "use_case": {"type": "account_onboarding"}})


def test_a_transfer_moves_money_from_the_platform_to_the_account_and_a_reversal_moves_it_back(
        api: TestClient, sdk: stripe.StripeClient, sandbox: Sandbox) -> None:
    account = _account(sdk, onboard=True, sandbox=sandbox)
    ok_json(post(api, "/v1/payment_intents", {"amount": "5000", "currency": "usd", "payment_method": "pm_card_visa",
                                            "confirm": "true"}))
    transfer = ok_json(post(api, "/v1/transfers", {"amount": "1200", "currency": "usd", "destination": account,
                                                 "transfer_group": "order_1"}))
    assert (_platform(api), _connected(api, account)) == (3800, 1200)
    assert ok_json(api.get("/v1/transfers", params={"transfer_group": "order_1"}))["data"][0]["id"] == transfer["id"]
    reversal = ok_json(post(api, f"/v1/transfers/{transfer['id']}/reversals", {"amount": "200"}))
    assert reversal["object"] == "transfer_reversal" and reversal["transfer"] == transfer["id"]
    again = ok_json(api.get(f"/v1/transfers/{transfer['id']}"))
    assert again["amount_reversed"] == 200 and not again["reversed"]
    assert (_platform(api), _connected(api, account)) == (4000, 1000)
    too_much = post(api, f"/v1/transfers/{transfer['id']}/reversals", {"amount": "1001"})
    assert too_much.status_code == 400 and too_much.json()["error"]["param"] == "amount"


@pytest.mark.parametrize(("case", "code", "param"), [
    ("not_onboarded", "insufficient_capabilities_for_transfer", "destination"),
    ("unknown", "resource_missing", "destination"),
    ("other_currency", "transfers_not_allowed", "currency"),
    ("no_funds", "balance_insufficient", "amount"),
])
def test_a_transfer_is_refused_with_stripes_error_and_moves_nothing(
        api: TestClient, sdk: stripe.StripeClient, sandbox: Sandbox, case: str, code: str, param: str) -> None:
    account = _account(sdk, onboard=case != "not_onboarded", sandbox=sandbox)
    if case != "no_funds":
        ok_json(post(api, "/v1/payment_intents", {"amount": "5000", "currency": "usd",
                                                "payment_method": "pm_card_visa", "confirm": "true"}))
    before = _platform(api)
    data = {"amount": "100", "currency": "eur" if case == "other_currency" else "usd",
            "destination": "acct_unknown000000000" if case == "unknown" else account}
    refused = post(api, "/v1/transfers", data)
    assert refused.status_code == 400, refused.text
    assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == (code, param)
    assert _platform(api) == before and sandbox.count("transfer") == 0


def test_a_destination_charge_transfers_the_charge_and_takes_the_application_fee(
        api: TestClient, sdk: stripe.StripeClient, sandbox: Sandbox) -> None:
    account = _account(sdk, onboard=True, sandbox=sandbox)
    pi = _pi(api, account, application_fee_amount="3000")
    assert pi["status"] == "succeeded" and pi["transfer_group"] == f"group_{pi['id']}"
    assert pi["transfer_data"] == {"destination": account} and pi["application_fee_amount"] == 3000
    transfers = ok_json(api.get("/v1/transfers", params={"transfer_group": pi["transfer_group"]}))["data"]
    assert [(t["amount"], t["source_transaction"]) for t in transfers] == [(10000, pi["latest_charge"])]
    fees = ok_json(api.get("/v1/application_fees", params={"charge": pi["latest_charge"]}))["data"]
    assert [(f["amount"], f["account"]) for f in fees] == [(3000, account)]
    assert (_platform(api), _connected(api, account)) == (3000, 7000)


@pytest.mark.parametrize(("refunds", "reversed_total", "fee_refunded"), [
    ([10000], 10000, 3000),
    ([3333, 3333, 3334], 10000, 3000),
    ([2500], 2500, 750),
])
def test_refunds_reverse_the_transfer_and_refund_the_fee_in_proportion(
        api: TestClient, sdk: stripe.StripeClient, sandbox: Sandbox, refunds: list[int], reversed_total: int,
        fee_refunded: int) -> None:
    account = _account(sdk, onboard=True, sandbox=sandbox)
    pi = _pi(api, account, application_fee_amount="3000")
    for amount in refunds:
        ok_json(post(api, "/v1/refunds", {"payment_intent": pi["id"], "amount": str(amount),
                                        "reverse_transfer": "true", "refund_application_fee": "true"}))
    transfer = ok_json(api.get("/v1/transfers", params={"transfer_group": pi["transfer_group"]}))["data"][0]
    fee = ok_json(api.get("/v1/application_fees", params={"charge": pi["latest_charge"]}))["data"][0]
    assert (transfer["amount_reversed"], fee["amount_refunded"]) == (reversed_total, fee_refunded)
    refunded = sum(refunds)
    assert _platform(api) == 3000 - fee_refunded + reversed_total - refunded
    assert _connected(api, account) == 7000 - reversed_total + fee_refunded


@pytest.mark.parametrize(("extra", "param"), [
    ({"application_fee_amount": "10001"}, "application_fee_amount"),
    ({"transfer_data[amount]": "10001"}, "transfer_data[amount]"),
    ({"application_fee_amount": "10", "transfer_data[amount]": "10"}, "application_fee_amount"),
])
def test_a_destination_charge_with_a_fee_or_amount_above_the_charge_is_refused(
        api: TestClient, sdk: stripe.StripeClient, sandbox: Sandbox, extra: dict[str, str], param: str) -> None:
    account = _account(sdk, onboard=True, sandbox=sandbox)
    refused = post(api, "/v1/payment_intents", {"amount": "10000", "currency": "usd",
                                                   "transfer_data[destination]": account, **extra})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    assert sandbox.count("payment_intent") == 0


def test_a_destination_charge_to_an_account_not_onboarded_is_refused_before_the_charge(
        api: TestClient, sdk: stripe.StripeClient, sandbox: Sandbox) -> None:
    account = _account(sdk, onboard=False)
    refused = post(api, "/v1/payment_intents", {"amount": "10000", "currency": "usd",
                                                   "payment_method": "pm_card_visa", "confirm": "true",
                                                   "transfer_data[destination]": account})
    assert refused.json()["error"]["code"] == "insufficient_capabilities_for_transfer"
    assert sandbox.count("payment_intent") == 0 and _platform(api) == 0


def test_a_checkout_session_and_a_payment_link_make_destination_charges(
        api: TestClient, sdk: stripe.StripeClient, sandbox: Sandbox, one_time: dict[str, Any]) -> None:
    account = _account(sdk, onboard=True, sandbox=sandbox)
    session = ok_json(post(api, "/v1/checkout/sessions", {
        "mode": "payment", "line_items[0][price]": one_time["id"], "line_items[0][quantity]": "2",
        "success_url": "https://example.com/ok", "payment_intent_data[transfer_data][destination]": account,
        "payment_intent_data[application_fee_amount]": "600"}))
    done = sandbox.complete_checkout_session(session["id"])
    pi = ok_json(api.get(f"/v1/payment_intents/{done['payment_intent']}"))
    assert pi["transfer_data"]["destination"] == account and pi["application_fee_amount"] == 600
    link = ok_json(post(api, "/v1/payment_links", {
        "line_items[0][price]": one_time["id"], "line_items[0][quantity]": "1",
        "transfer_data[destination]": account, "application_fee_amount": "150"}))
    assert link["transfer_data"] == {"destination": account, "amount": None} and link["application_fee_amount"] == 150
    paid = ok_json(api.post(f"/_sandbox/payment_links/{link['id']}/pay"))
    assert paid["payment_link"] == link["id"] and paid["status"] == "complete"
    assert _connected(api, account) == (3000 - 600) + (1500 - 150)


def test_an_unknown_stripe_account_header_is_refused(api: TestClient) -> None:
    refused = api.get("/v1/balance", headers={"Stripe-Account": "acct_nobody00000000"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "account_invalid"


def test_a_connected_accounts_balance_settings_give_its_payout_schedule_and_take_a_new_one_through_the_sdk(
        sdk: stripe.StripeClient, sandbox: Sandbox) -> None:
    account = _account(sdk, onboard=False)
    before = sdk.v1.balance_settings.retrieve(options={"stripe_account": account})
    assert before.object == "balance_settings" and before.payments.payouts is not None
    schedule = before.payments.payouts.schedule
    assert schedule is not None and schedule.interval == "daily" and "weekly_payout_days" not in schedule
    assert (before.payments.payouts.status, before.payments.settlement_timing.delay_days) == ("disabled", 2)
    sandbox.complete_account_onboarding(account)
    after = sdk.v1.balance_settings.update({"payments": {"payouts": {"schedule": {
        "interval": "weekly", "weekly_payout_days": ["monday", "thursday"]}}}}, options={"stripe_account": account})
    assert after.payments.payouts is not None and after.payments.payouts.schedule is not None
    schedule = after.payments.payouts.schedule
    assert (schedule.interval, schedule.weekly_payout_days) == ("weekly", ["monday", "thursday"])
    assert after.payments.payouts.status == "enabled"


@pytest.mark.parametrize(("form", "param"), [
    ({"payments[payouts][schedule][interval]": "hourly"}, "payments[payouts][schedule][interval]"),
    ({"payments[payouts][schedule][interval]": "weekly",
      "payments[payouts][schedule][weekly_payout_days][0]": "sunday"},
     "payments[payouts][schedule][weekly_payout_days]"),
    ({"payments[payouts][schedule][interval]": "daily",
      "payments[payouts][schedule][monthly_payout_days][0]": "3"}, "payments[payouts][schedule][interval]"),
    ({"payments[payouts][schedule][interval]": "monthly",
      "payments[payouts][schedule][monthly_payout_days][0]": "32"},
     "payments[payouts][schedule][monthly_payout_days]"),
])
def test_a_payout_schedule_stripe_would_refuse_is_refused_naming_the_param(
        sdk: stripe.StripeClient, api: TestClient, form: dict[str, str], param: str) -> None:
    account = _account(sdk, onboard=False)
    refused = api.post("/v1/balance_settings", data=form, headers={"Stripe-Account": account})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
    schedule = ok_json(api.get("/v1/balance_settings", headers={"Stripe-Account": account}))
    assert schedule["payments"]["payouts"]["schedule"] == {"interval": "daily"}


def test_balance_settings_without_a_stripe_account_header_are_refused(api: TestClient) -> None:
    refused = api.get("/v1/balance_settings")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "Stripe-Account"
