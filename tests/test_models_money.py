"""Money rules, as properties: minor units display exactly (integer arithmetic, no floats) and a call's identity
does not depend on argument order; the ceiling bounds what a price asks for and compares currencies exactly."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aims_billing_mcp.errors import AmountAboveCeiling
from aims_billing_mcp.models import THREE_DECIMAL, ZERO_DECIMAL, format_amount
from aims_billing_mcp.services.ceiling import Ceiling, display
from aims_billing_mcp.services.idempotency import request_hash


@given(st.integers(min_value=-(10**15), max_value=10**15), st.sampled_from(["usd", "eur", "jpy", "kwd"]))
def test_a_formatted_amount_parses_back_to_the_same_minor_units(amount: int, currency: str) -> None:
    text = format_amount(amount, currency)
    number, code = text.rsplit(" ", 1)
    digits = 0 if currency in ZERO_DECIMAL else 3 if currency in THREE_DECIMAL else 2
    assert code == currency.upper()
    assert Decimal(number.replace(",", "")) * 10**digits == amount


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.integers() | st.text(max_size=8), max_size=6))
def test_the_request_hash_ignores_argument_order(arguments: dict[str, object]) -> None:
    reordered = dict(reversed(list(arguments.items())))
    assert request_hash("create_customer", arguments) == request_hash("create_customer", reordered)


TIERS = [{"up_to": 10, "unit_amount": 1000, "flat_amount": 500}, {"up_to": None, "unit_amount": 1500}]


@pytest.mark.parametrize(("price", "quantity", "cost"), [
    ({"unit_amount": 1999}, 3, 5997),
    ({"unit_amount": None, "unit_amount_decimal": "0.25"}, 3, 1),           # 0.75 cents: rounded up, never down
    ({"billing_scheme": "tiered", "tiers_mode": "graduated", "tiers": TIERS}, 4, 4500),
    ({"billing_scheme": "tiered", "tiers_mode": "graduated", "tiers": TIERS}, 12, 10_500 + 3000),
    ({"billing_scheme": "tiered", "tiers_mode": "volume", "tiers": TIERS}, 10, 10_500),
    ({"billing_scheme": "tiered", "tiers_mode": "volume", "tiers": TIERS}, 11, 16_500),
    ({"unit_amount": None, "custom_unit_amount": {"maximum": 5000}}, 1, 5000),
    ({"unit_amount": 10**9, "recurring": {"usage_type": "metered"}}, 1, 0),  # charged on invoices, per meter event
])
def test_what_a_price_asks_for_is_its_worst_case_at_the_quantity(price: dict[str, Any], quantity: int,
                                                                  cost: int) -> None:
    assert Ceiling.price_cost({"id": "price_x", "currency": "usd", **price}, quantity, "line_items") == cost


@pytest.mark.parametrize("price", [
    {"unit_amount": None, "custom_unit_amount": {"maximum": None}},
    {"unit_amount": None, "billing_scheme": "tiered", "tiers_mode": "volume"},
    {"unit_amount": None},
])
def test_a_price_the_ceiling_cannot_bound_is_refused(price: dict[str, Any]) -> None:
    with pytest.raises(AmountAboveCeiling) as caught:
        Ceiling.price_cost({"id": "price_x", "currency": "usd", **price}, 1, "line_items")
    assert caught.value.param == "line_items"


@given(st.integers(min_value=1, max_value=10**15), st.sampled_from(["usd", "eur", "jpy", "kwd", "usdc", "bhd"]),
       st.integers(min_value=0, max_value=10**18))
def test_the_ceiling_compares_major_units_exactly_in_every_currency(ceiling: int, currency: str, amount: int) -> None:
    exponent = {"jpy": 0, "kwd": 3, "bhd": 3, "usdc": 6}.get(currency, 2)
    allowed = Decimal(amount) / 10**exponent <= Decimal(ceiling) / 100
    try:
        Ceiling(ceiling).check(amount, currency, "amount")
        refused = False
    except AmountAboveCeiling:
        refused = True
    assert refused is not allowed


def test_a_currency_of_unknown_minor_unit_is_refused_unless_it_has_its_own_ceiling() -> None:
    with pytest.raises(AmountAboveCeiling) as caught:
        Ceiling().check(1, "xyz", "amount")
    assert "AIMS_BILLING_MAX_AMOUNTS=xyz=" in caught.value.message
    Ceiling(per_currency={"xyz": 5}).check(5, "xyz", "amount")
    assert display(5_000_001, "usdc") == "5.000001 USDC"
