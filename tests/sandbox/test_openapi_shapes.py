"""Every object the sandbox serves has the shape Stripe's API defines for it.

One scenario drives every route of the sandbox over its HTTP API (creates, retrieves, updates,
lists, deletes, a completed checkout, a renewal, a failed payment, refunds, meters and the v2
session) and keeps each JSON answer. Each answer, each list element and each event's
``data.object`` is validated against the JSON Schema of its resource, taken from Stripe's OpenAPI
spec for 2026-01-28.clover (``tests/data/stripe_openapi``, see its NOTE): every required field
present, every type right, ``null`` only where the spec allows it, expanded and nested objects
checked through their ``$ref``. A field added to one resource but forgotten in a handler fails here,
and so does a route added without being exercised.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from starlette.testclient import TestClient

from aims_billing_mcp.sandbox import create_app
from aims_billing_mcp.sandbox.app import ROUTES, V2_SESSION

from .conftest import AUTH

Obj = dict[str, Any]
SCHEMAS = json.loads((Path(__file__).parents[1] / "data" / "stripe_openapi" / "stripe_objects.schema.json")
                     .read_text())

# object type -> the spec's schema for it (a deleted object has its own schema)
RESOURCES = {
    "balance": "Balance",
    "billing.meter": "Billing.Meter",
    "billing.meter_event": "Billing.MeterEvent",
    "billing.meter_event_summary": "Billing.MeterEventSummary",
    "billing_portal.session": "BillingPortal.Session",
    "checkout.session": "Checkout.Session",
    "customer": "Customer",
    "customer_balance_transaction": "CustomerBalanceTransaction",
    "event": "EventBase",
    "invoice": "Invoice",
    "invoiceitem": "InvoiceItem",
    "item": "LineItem",
    "line_item": "InvoiceLineItem",
    "payment_intent": "PaymentIntent",
    "payment_link": "PaymentLink",
    "payment_method": "PaymentMethod",
    "plan": "Plan",
    "price": "Price",
    "product": "Product",
    "refund": "Refund",
    "subscription": "Subscription",
    "subscription_item": "SubscriptionItem",
    "v2.billing.meter_event_session": "V2.Billing.MeterEventSession",
    "transfer": "Transfer",
    "transfer_reversal": "TransferReversal",
    "application_fee": "ApplicationFee",
    "fee_refund": "FeeRefund",
    "account": "Account",
    "v2.core.account": "V2.Core.Account",
    "v2.core.account_link": "V2.Core.AccountLink",
    "balance_settings": "BalanceSettings",
}
DELETED = {"customer": "DeletedCustomer", "product": "DeletedProduct", "price": "DeletedPrice"}
LIST = {"type": "object", "required": ["object", "data", "has_more", "url"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array"}, "has_more": {"type": "boolean"},
                       "url": {"type": "string"}}}


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$defs": SCHEMAS["$defs"], "$ref": f"#/$defs/{name}"})


VALIDATORS = {name: validator(name) for name in {*RESOURCES.values(), *DELETED.values()}}


def schema_of(obj: Obj) -> str:
    kind = obj.get("object")
    assert isinstance(kind, str), f"no `object` in {obj!r:.200}"
    if obj.get("deleted") is True and kind in DELETED:
        return DELETED[kind]
    assert kind in RESOURCES, f"`{kind}` has no schema here: add it to RESOURCES and the extracted $defs"
    return RESOURCES[kind]


def describe(error: ValidationError) -> str:
    """Where and why, from the innermost reason (an ``anyOf`` failure names the alternative closest to valid)."""
    while error.context:  # prefer the alternative of the right type (its error is the real one), deepest first
        right_type = [e for e in error.context if e.validator not in ("type", "enum", "const")]
        error = max(right_type or error.context, key=lambda e: len(e.absolute_path))
    return f"{error.json_path}: {error.message[:300]}"


def violations(obj: Obj, where: str) -> Iterator[str]:
    """Each way ``obj`` (a list, a resource or an event, with what they contain) departs from the spec."""
    if obj.get("object") == "list" or ("object" not in obj and "next_page_url" in obj):  # a v1 or a v2 list
        if obj.get("object") == "list":
            for error in Draft202012Validator(LIST).iter_errors(obj):
                yield f"{where}: {error.message}"
        for i, item in enumerate(obj.get("data") or []):
            yield from violations(item, f"{where}.data[{i}]")
        return
    name = schema_of(obj)
    for error in VALIDATORS[name].iter_errors(obj):
        yield f"{where} ({name}) at {describe(error)}"
    if name == "EventBase":
        yield from violations(obj["data"]["object"], f"{where}.data.object")


@dataclass
class Recorder:
    """A client that keeps every 200 answer of the Stripe API (not the sandbox controls)."""

    client: TestClient
    answers: list[tuple[str, Obj]] = field(default_factory=list)

    def call(self, method: str, path: str, data: dict[str, str] | None = None) -> Obj:
        if method == "GET":
            response = self.client.get(path, params=data)
        elif method == "DELETE":
            response = self.client.delete(path)
        elif path.startswith("/v2/"):
            response = self.client.post(path, json=data or {})
        else:
            response = self.client.post(path, data=data or {})
        assert response.status_code == 200, f"{method} {path}: {response.text}"
        body: Obj = response.json()
        if not path.startswith("/_sandbox/"):
            self.answers.append((f"{method} {path}", body))
        return body

    def get(self, path: str, **params: str) -> Obj:
        return self.call("GET", path, params or None)

    def post(self, path: str, data: dict[str, str] | None = None) -> Obj:
        return self.call("POST", path, data)


def scenario(api: Recorder) -> None:
    """Every route of the sandbox, with the objects' optional parts filled in where it has them."""
    api.get("/v1/balance")
    product = api.post("/v1/products", {"name": "Pro", "description": "The pro plan", "metadata[k]": "v",
                                        "default_price_data[currency]": "usd",
                                        "default_price_data[unit_amount]": "900"})
    api.get(f"/v1/products/{product['id']}")
    api.post(f"/v1/products/{product['id']}", {"name": "Pro plan"})
    api.get("/v1/products")
    monthly = api.post("/v1/prices", {"product": product["id"], "currency": "usd", "unit_amount": "2000",
                                      "recurring[interval]": "month", "lookup_key": "pro_monthly"})
    one_time = api.post("/v1/prices", {"product": product["id"], "currency": "usd", "unit_amount": "1500"})
    meter = api.post("/v1/billing/meters", {"display_name": "API calls", "event_name": "api_call",
                                            "default_aggregation[formula]": "sum"})
    metered = api.post("/v1/prices", {
        "product": product["id"], "currency": "usd", "recurring[interval]": "month",
        "recurring[usage_type]": "metered", "recurring[meter]": meter["id"], "billing_scheme": "tiered",
        "tiers_mode": "graduated", "tiers[0][up_to]": "1000", "tiers[0][unit_amount]": "0",
        "tiers[1][up_to]": "inf", "tiers[1][unit_amount_decimal]": "0.5", "tiers[1][flat_amount]": "100"})
    api.get(f"/v1/prices/{monthly['id']}")
    api.post(f"/v1/prices/{one_time['id']}", {"nickname": "once", "metadata[k]": "v"})
    api.get("/v1/prices", lookup_keys="pro_monthly")

    customer = api.post("/v1/customers", {
        "email": "ann@example.com", "name": "Ann", "phone": "+15555550100", "description": "first",
        "address[line1]": "1 Main St", "address[city]": "Springfield", "address[country]": "US",
        "preferred_locales[0]": "en"})
    api.get(f"/v1/customers/{customer['id']}")
    api.post(f"/v1/customers/{customer['id']}", {"metadata[tier]": "gold"})
    api.get("/v1/customers")
    gone = api.post("/v1/customers", {"email": "gone@example.com"})
    api.call("DELETE", f"/v1/customers/{gone['id']}")
    api.get(f"/v1/customers/{gone['id']}")
    credit = api.post(f"/v1/customers/{customer['id']}/balance_transactions",
                      {"amount": "-500", "currency": "usd", "description": "goodwill"})
    api.get(f"/v1/customers/{customer['id']}/balance_transactions")
    api.get(f"/v1/customers/{customer['id']}/balance_transactions/{credit['id']}")
    api.post(f"/v1/customers/{customer['id']}/balance_transactions/{credit['id']}", {"metadata[k]": "v"})
    api.post("/v1/billing_portal/sessions", {"customer": customer["id"], "return_url": "https://example.com/a"})

    link = api.post("/v1/payment_links", {
        "line_items[0][price]": one_time["id"], "line_items[0][quantity]": "2",
        "after_completion[type]": "redirect", "after_completion[redirect][url]": "https://example.com/ok"})
    api.get(f"/v1/payment_links/{link['id']}")
    api.post(f"/v1/payment_links/{link['id']}", {"active": "false"})
    api.get("/v1/payment_links")
    api.get(f"/v1/payment_links/{link['id']}/line_items")

    success = "https://example.com/s?id={CHECKOUT_SESSION_ID}"
    paying = api.post("/v1/checkout/sessions", {
        "mode": "payment", "success_url": success, "customer": customer["id"],
        "line_items[0][price]": one_time["id"], "line_items[0][quantity]": "1"})
    api.post(f"/v1/checkout/sessions/{paying['id']}", {"metadata[k]": "v"})
    api.get(f"/v1/checkout/sessions/{paying['id']}/line_items")
    api.post(f"/_sandbox/checkout/sessions/{paying['id']}/complete")
    api.get(f"/v1/checkout/sessions/{paying['id']}")
    subscribing = api.post("/v1/checkout/sessions", {
        "mode": "subscription", "success_url": success, "customer_email": "sub@example.com",
        "line_items[0][price]": monthly["id"], "line_items[0][quantity]": "1",
        "line_items[1][price]": metered["id"], "subscription_data[metadata][plan]": "pro"})
    done = api.post(f"/_sandbox/checkout/sessions/{subscribing['id']}/complete")
    trial = api.post("/v1/checkout/sessions", {
        "mode": "subscription", "success_url": success, "customer": customer["id"],
        "line_items[0][price]": monthly["id"], "line_items[0][quantity]": "1",
        "subscription_data[trial_period_days]": "7"})
    api.post(f"/_sandbox/checkout/sessions/{trial['id']}/complete")
    expiring = api.post("/v1/checkout/sessions", {
        "mode": "payment", "success_url": success,
        "line_items[0][price_data][currency]": "eur", "line_items[0][price_data][unit_amount]": "700",
        "line_items[0][price_data][product_data][name]": "Sticker", "line_items[0][quantity]": "1"})
    api.post(f"/v1/checkout/sessions/{expiring['id']}/expire")
    api.get("/v1/checkout/sessions")

    api.post("/v1/billing/meter_events", {"event_name": "api_call", "payload[stripe_customer_id]": done["customer"],
                                          "payload[value]": "1500", "identifier": "use-1"})
    api.get(f"/v1/billing/meters/{meter['id']}")
    api.post(f"/v1/billing/meters/{meter['id']}", {"display_name": "Calls"})
    api.get("/v1/billing/meters")
    subscription = api.get(f"/v1/subscriptions/{done['subscription']}")
    period = subscription["items"]["data"][0]
    start, end = (period[f"current_period_{edge}"] // 60 * 60 for edge in ("start", "end"))
    api.get(f"/v1/billing/meters/{meter['id']}/event_summaries", customer=done["customer"],
            start_time=str(start), end_time=str(end + 60))
    api.post("/_sandbox/advance", {"days": "32"})  # a renewal: licensed and usage lines
    api.post(f"/v1/billing/meters/{meter['id']}/deactivate")
    api.post(f"/v1/billing/meters/{meter['id']}/reactivate")
    api.post(V2_SESSION)

    api.post(f"/v1/subscriptions/{done['subscription']}", {"cancel_at_period_end": "true", "metadata[k]": "v"})
    api.get("/v1/subscriptions", customer=done["customer"])
    direct = api.post("/v1/subscriptions", {"customer": customer["id"], "items[0][price]": monthly["id"],
                                            "items[0][quantity]": "2", "collection_method": "send_invoice",
                                            "days_until_due": "30"})
    api.call("DELETE", f"/v1/subscriptions/{direct['id']}")
    api.post("/_sandbox/fail_payments", {"customer": done["customer"]})
    api.post("/_sandbox/trigger", {"type": "invoice.payment_failed", "customer": done["customer"]})

    item = api.post("/v1/invoiceitems", {"customer": customer["id"], "amount": "1200", "currency": "usd",
                                         "description": "Setup"})
    api.get(f"/v1/invoiceitems/{item['id']}")
    api.get("/v1/invoiceitems", customer=customer["id"])
    invoice = api.post("/v1/invoices", {"customer": customer["id"], "description": "setup fee"})
    api.post(f"/v1/invoices/{invoice['id']}", {"footer": "Thanks", "metadata[k]": "v"})
    api.post(f"/v1/invoices/{invoice['id']}/finalize")
    api.post(f"/v1/invoices/{invoice['id']}/pay", {"paid_out_of_band": "true"})
    api.get(f"/v1/invoices/{invoice['id']}")
    api.get(f"/v1/invoices/{invoice['id']}/lines")
    api.post("/v1/invoiceitems", {"customer": customer["id"], "price": one_time["id"]})
    voided = api.post("/v1/invoices", {"customer": customer["id"]})
    api.post(f"/v1/invoices/{voided['id']}/finalize")
    api.post(f"/v1/invoices/{voided['id']}/void")
    api.get("/v1/invoices")

    intent = api.post("/v1/payment_intents", {"amount": "5000", "currency": "usd", "customer": customer["id"],
                                              "description": "order 1", "metadata[k]": "v"})
    api.post(f"/v1/payment_intents/{intent['id']}", {"description": "order #1"})
    paid = api.post(f"/v1/payment_intents/{intent['id']}/confirm", {"payment_method": "pm_card_visa"})
    api.get(f"/v1/payment_intents/{intent['id']}")
    declined = api.post("/v1/payment_intents", {"amount": "1000", "currency": "usd"})
    refused = api.client.post(f"/v1/payment_intents/{declined['id']}/confirm",
                              data={"payment_method": "pm_card_chargeDeclined"})
    assert refused.status_code == 402
    api.get(f"/v1/payment_intents/{declined['id']}")  # with its last_payment_error
    granted = api.post("/v1/payment_intents", {"amount": "2500", "currency": "usd"})
    api.post(f"/v1/payment_intents/{granted['id']}/confirm", {"shared_payment_granted_token": "spt_test_shapes"})
    canceled = api.post("/v1/payment_intents", {"amount": "1000", "currency": "usd"})
    api.post(f"/v1/payment_intents/{canceled['id']}/cancel")
    api.get("/v1/payment_intents")
    refund = api.post("/v1/refunds", {"payment_intent": paid["id"], "amount": "1000",
                                      "reason": "requested_by_customer"})
    api.post("/v1/refunds", {"charge": paid["latest_charge"]})
    api.get(f"/v1/refunds/{refund['id']}")
    api.get("/v1/refunds")
    api.get("/v1/balance")

    connect_scenario(api, one_time["id"])

    events = api.get("/v1/events", limit="100")
    api.get(f"/v1/events/{events['data'][0]['id']}")


def connect_scenario(api: Recorder, price: str) -> None:
    """Connect: a v2 account onboarded, its link, transfers and reversals, destination charges with fees."""
    account = api.call("POST", "/v2/core/accounts", {  # type: ignore[dict-item]
        "display_name": "Maker", "contact_email": "maker@example.com", "identity": {"country": "us"},
        "configuration": {"recipient": {"capabilities": {"stripe_balance": {"stripe_transfers": {"requested": True}}}}},
        "include": ["configuration.recipient", "requirements", "defaults", "identity"]})
    api.post("/v2/core/account_links", {"account": account["id"], "use_case": {  # type: ignore[dict-item]
        "type": "account_onboarding", "account_onboarding": {
            "configurations": ["recipient"], "refresh_url": "https://example.com/r", "return_url": "https://e.com"}}})
    api.post(f"/_sandbox/accounts/{account['id']}/complete_onboarding")
    api.post(f"/v2/core/accounts/{account['id']}", {"display_name": "Plug Maker"})
    api.get(f"/v2/core/accounts/{account['id']}", **{"include[0]": "configuration.recipient"})
    api.get("/v2/core/accounts")
    pi = api.post("/v1/payment_intents", {"amount": "4000", "currency": "usd", "payment_method": "pm_card_visa",
                                          "confirm": "true", "transfer_data[destination]": account["id"],
                                          "application_fee_amount": "1000"})
    api.post("/v1/refunds", {"payment_intent": pi["id"], "amount": "1000", "reverse_transfer": "true",
                             "refund_application_fee": "true"})
    transfer = api.post("/v1/transfers", {"amount": "500", "currency": "usd", "destination": account["id"],
                                          "transfer_group": "g1", "metadata[k]": "v"})
    api.get(f"/v1/transfers/{transfer['id']}")
    api.get("/v1/transfers", destination=account["id"])
    api.post(f"/v1/transfers/{transfer['id']}/reversals", {"amount": "100"})
    api.get(f"/v1/transfers/{transfer['id']}/reversals")
    fees = api.get("/v1/application_fees", charge=pi["latest_charge"])
    fee = fees["data"][0]["id"]
    api.get(f"/v1/application_fees/{fee}")
    api.post(f"/v1/application_fees/{fee}/refunds", {"amount": "10"})
    api.get(f"/v1/application_fees/{fee}/refunds")
    link = api.post("/v1/payment_links", {"line_items[0][price]": price, "line_items[0][quantity]": "1",
                                          "transfer_data[destination]": account["id"], "application_fee_amount": "100"})
    api.post(f"/_sandbox/payment_links/{link['id']}/pay")
    api.post("/v1/checkout/sessions", {"mode": "payment", "success_url": "https://example.com/ok",
                                       "line_items[0][price]": price, "line_items[0][quantity]": "1",
                                       "payment_intent_data[transfer_data][destination]": account["id"]})
    api.call("GET", "/v1/balance")
    response = api.client.get("/v1/balance", headers={"Stripe-Account": account["id"]})
    api.answers.append(("GET /v1/balance", response.json()))
    as_account = {"Stripe-Account": account["id"]}
    api.answers.append(("GET /v1/balance_settings", api.client.get("/v1/balance_settings", headers=as_account).json()))
    for form in ({"payments[payouts][schedule][interval]": "weekly",
                  "payments[payouts][schedule][weekly_payout_days][0]": "monday"},
                 {"payments[payouts][schedule][interval]": "monthly",
                  "payments[payouts][schedule][monthly_payout_days][0]": "15",
                  "payments[settlement_timing][delay_days_override]": "7"}):
        response = api.client.post("/v1/balance_settings", data=form, headers=as_account)
        assert response.status_code == 200, response.text
        api.answers.append(("POST /v1/balance_settings", response.json()))


@pytest.fixture(scope="module")
def answers() -> Iterator[list[tuple[str, Obj]]]:
    app = create_app(db_path=":memory:")
    api = Recorder(TestClient(app, headers=AUTH))
    scenario(api)
    yield api.answers
    app.state.sandbox.close()


def served(answers: list[tuple[str, Obj]]) -> dict[str, list[tuple[str, Obj]]]:
    """Every resource in the answers, at any depth (list elements, expanded and embedded objects,
    events' objects), by its schema."""
    found: dict[str, list[tuple[str, Obj]]] = {}

    def visit(value: Any, where: str) -> None:
        if isinstance(value, list):
            for i, item in enumerate(value):
                visit(item, f"{where}[{i}]")
        elif isinstance(value, dict):
            if isinstance(value.get("object"), str) and value["object"] != "list":
                found.setdefault(schema_of(value), []).append((where, value))
            for key, item in value.items():
                if key != "metadata":
                    visit(item, f"{where}.{key}")

    for where, obj in answers:
        visit(obj, where)
    return found


EXPECTED = sorted({*RESOURCES.values(), "DeletedCustomer"})


@pytest.mark.parametrize("schema", EXPECTED)
def test_every_object_the_sandbox_serves_matches_stripes_schema_for_its_resource(
    answers: list[tuple[str, Obj]], schema: str
) -> None:
    objects = served(answers).get(schema, [])
    assert objects, f"the scenario served no {schema}"
    problems = [problem for where, obj in objects for problem in violations(obj, where)]
    assert not problems, f"{len(problems)} departures from Stripe's {schema} schema:\n" + "\n".join(problems[:40])


def test_the_scenario_answers_every_route_of_the_sandbox(answers: list[tuple[str, Obj]]) -> None:
    called = [label.split(" ", 1) for label, _ in answers]
    missed = [f"{route.method} {route.pattern}" for route in ROUTES
              if not any(method == route.method and route.regex.match(path) for method, path in called)]
    assert not missed, f"routes no test validates against Stripe's schemas: {missed}"
    assert any(path == V2_SESSION for _, path in called)


def test_no_answer_carries_a_float(answers: list[tuple[str, Obj]]) -> None:
    """Amounts, counts and times are integers (the extracted schemas say `number` for both)."""
    def floats(value: Any, where: str) -> Iterator[str]:
        if isinstance(value, float):
            yield where
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from floats(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield from floats(item, f"{where}[{i}]")

    assert [where for label, obj in answers for where in floats(obj, label)] == []


def test_every_list_answer_has_stripes_list_envelope(answers: list[tuple[str, Obj]]) -> None:
    lists = [(where, obj) for where, obj in answers if obj.get("object") == "list"]
    assert len(lists) >= 15
    for where, obj in lists:
        assert obj["url"] == where.split(" ", 1)[1], where
        assert not list(Draft202012Validator(LIST).iter_errors(obj)), where


def test_a_deleted_customer_is_retrieved_as_stripes_deleted_customer(answers: list[tuple[str, Obj]]) -> None:
    deleted = [(where, obj) for where, obj in answers if where.startswith("GET /v1/customers/")
               and obj.get("deleted") is True]
    assert len(deleted) == 1
    where, obj = deleted[0]
    assert obj == {"id": where.rsplit("/", 1)[1], "object": "customer", "deleted": True}
