"""Money rules, as properties: minor units display exactly (integer arithmetic, no floats) and a call's identity
does not depend on argument order."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from aims_billing_mcp.models import THREE_DECIMAL, ZERO_DECIMAL, format_amount
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
