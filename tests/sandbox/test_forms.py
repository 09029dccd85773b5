"""Decoding the SDK's nested form encoding."""

from __future__ import annotations

import pytest

from aims_billing_mcp.sandbox.errors import StripeError
from aims_billing_mcp.sandbox.forms import decode
from aims_billing_mcp.sandbox.params import Params


def test_nested_keys_become_nested_dicts() -> None:
    form = decode("line_items[0][price]=price_1&line_items[0][quantity]=2&metadata[plan]=pro&mode=payment")
    assert form == {
        "line_items": {"0": {"price": "price_1", "quantity": "2"}},
        "metadata": {"plan": "pro"},
        "mode": "payment",
    }


def test_empty_brackets_append_in_order() -> None:
    assert Params(decode("lookup_keys[]=a&lookup_keys[]=b")).strings("lookup_keys") == ["a", "b"]


def test_indexed_lists_are_read_in_index_order() -> None:
    items = Params(decode("li[1][price]=b&li[0][price]=a&li[10][price]=c")).items("li")
    assert [i.string("price") for i in items] == ["a", "b", "c"]
    assert items[2].name("price") == "li[2][price]"


def test_blank_metadata_value_unsets_the_key() -> None:
    p = Params(decode("metadata[keep]=1&metadata[drop]="))
    assert p.metadata({"drop": "x", "other": "y"}) == {"keep": "1", "other": "y"}


@pytest.mark.parametrize(("body", "param", "code"), [
    ("unit_amount=abc", "unit_amount", "parameter_invalid_integer"),
    ("unit_amount=1.5", "unit_amount", "parameter_invalid_integer"),
])
def test_unparseable_integer_names_the_param(body: str, param: str, code: str) -> None:
    with pytest.raises(StripeError) as info:
        Params(decode(body)).integer("unit_amount")
    assert (info.value.status, info.value.param, info.value.code) == (400, param, code)


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False)])
def test_booleans_are_spelled_like_the_sdk(text: str, expected: bool) -> None:
    assert Params(decode(f"active={text}")).boolean("active") is expected


def test_malformed_key_is_refused() -> None:
    with pytest.raises(StripeError):
        decode("a[b=1")
