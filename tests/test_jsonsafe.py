"""Untrusted JSON is parsed by one bounded parser: nesting that would overflow the C stack under the recursion limit
a dependency raises (py_ecc sets 100,000) is a ValueError, as are NaN, lone surrogates and numbers beyond range."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aims_billing_mcp import jsonsafe


def test_a_dependency_raises_the_recursion_limit_so_json_loads_is_not_safe_on_deep_input() -> None:
    import aims_billing_mcp.services.x402_signer  # noqa: F401  (the EVM stack, as the server imports it to verify)

    assert sys.getrecursionlimit() >= 100_000


@pytest.mark.parametrize("text", ["[" * 500_000 + "]" * 500_000, '{"a": NaN}', '{"a": Infinity}', '{"a": "\\ud800"}',
                                  '{"a": ' + "9" * 5000 + "}", "{", ""], ids=["deep", "nan", "inf", "surrogate",
                                                                            "huge-number", "truncated", "empty"])
def test_hostile_json_is_a_value_error_not_a_crash(text: str) -> None:
    with pytest.raises(ValueError):
        jsonsafe.loads(text)


def test_ordinary_json_parses_as_the_standard_library_would() -> None:
    assert jsonsafe.loads(b'{"id": "evt_1", "n": [1, 2.5, null, true], "s": "\\u00e9"}') == {
        "id": "evt_1", "n": [1, 2.5, None, True], "s": "é"}


_TEXTS = st.sampled_from(["", "plain", "é", "\ud800", "a\udfffb", "日本"])
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXTS,
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(_TEXTS, inner, max_size=3),
    max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(value=_VALUES, max_depth=st.integers(min_value=0, max_value=4))
def test_the_quick_walk_finds_something_exactly_when_the_walk_that_names_the_place_does(
        value: object, max_depth: int) -> None:
    """`first_unreadable` walks every call's arguments once without keeping paths, and names the place only when
    that walk finds something: both walks must agree on every value."""
    assert jsonsafe._readable(value, max_depth) == (jsonsafe._located(value, max_depth) is None)
