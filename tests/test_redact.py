"""Redaction: Stripe-secret shapes masked wherever they stand in a string, configured secrets masked by value, a
setting shown masked, and a call's arguments bounded before they are stored in audit_log."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp.types import CallToolResult, TextContent
from pydantic import SecretStr

from aims_billing_mcp.redact import (
    AUDIT_MAX_ROW,
    AUDIT_MAX_STRING,
    SECRET_FIELD,
    _bounded,
    _masks_nothing,
    _says_secret,
    audit_arguments,
    display,
    may_hold_secret,
    redact,
    redact_text,
    redact_values,
    register_secrets,
)
from aims_billing_mcp.shaping import masked_result

KEY_BODY = "51AbCdEfGhIjKlMnOpQrSt9876"


@pytest.mark.parametrize(
    "text",
    [
        f"pi_sk_test_{KEY_BODY}",  # glued to a prefix: `\b` does not match after `_`
        f"sk_live_{KEY_BODY} at the start",
        f"description=a+rk_test_{KEY_BODY}+b",  # URL-encoded form body, as a dry run shows it
        f'{{"note": "key:rk_live_{KEY_BODY}"}}',
        f"xwhsec_{KEY_BODY}",
        f"Invalid API Key provided: sk_test_{KEY_BODY}.",
    ],
)
def test_a_stripe_secret_shape_is_masked_wherever_it_stands(text: str) -> None:
    masked = redact_text(text)
    assert KEY_BODY not in masked
    assert "****9876" in masked


@pytest.mark.parametrize("text", ["task_test_run", "sk_test_****9876", "pk_test_" + KEY_BODY, "cus_test_12345678"])
def test_text_that_is_no_secret_is_kept_as_it_is(text: str) -> None:
    assert redact_text(text) == text


def test_a_configured_secret_is_masked_by_value_in_its_plain_url_and_json_forms() -> None:
    secret = "acp key/with+odd=chars\"QuietMarker42"
    register_secrets([secret])
    forms = [secret, "key=acp+key%2Fwith%2Bodd%3Dchars%22QuietMarker42", json.dumps({"k": secret})]
    for form in forms:
        assert "QuietMarker" not in redact_text(form), form


def test_a_result_is_masked_in_its_values_and_keys_but_keeps_its_shape() -> None:
    result = {"request": {"params": {"description": f"pi_sk_test_{KEY_BODY}"}}, f"sk_test_{KEY_BODY}": 1, "n": 3}
    masked = redact_values(result)
    assert KEY_BODY not in json.dumps(masked)
    assert masked["n"] == 3 and set(masked["request"]["params"]) == {"description"}


def test_fields_named_as_secrets_are_masked_whatever_their_value_but_idempotency_keys_are_kept() -> None:
    masked = redact({"api_key": "plain-value-abcd", "idempotency_key": "task-1",
                     "nested": [{"token": "t0ken-xyz-1234"}]})
    assert masked == {"api_key": "****abcd", "idempotency_key": "task-1", "nested": [{"token": "****1234"}]}


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (SecretStr(f"sk_test_{KEY_BODY}"), "sk_test_****9876"),
        ([SecretStr("platform-key-one-0001"), SecretStr("platform-key-two-0002")], "****0001, ****0002"),
        ("https://user:hunter2pass@facilitator.example/x", "https://user:****@facilitator.example/x"),
        (None, "-"),
        ([], "-"),
        (5000, "5000"),
    ],
)
def test_a_setting_is_displayed_with_its_secrets_masked(value: object, shown: str) -> None:
    assert display(value) == shown


def test_a_10_mb_argument_is_stored_as_4_kb_with_its_original_length() -> None:
    row = audit_arguments({"name": "x" * 10_000_000, "amount": 7})
    assert len(row) < 2 * AUDIT_MAX_STRING
    stored = json.loads(row)
    assert stored["amount"] == 7
    assert stored["name"].startswith("x" * AUDIT_MAX_STRING) and "10,000,000 characters" in stored["name"]


def test_a_secret_cut_by_the_truncation_is_masked_before_the_cut() -> None:
    secret = "QuietTruncationMarker-0001"
    register_secrets([secret])
    stored = json.loads(audit_arguments({"name": "x" * (AUDIT_MAX_STRING - 10) + secret}))
    assert "QuietTrunc" not in stored["name"]


def nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "arguments",
    [
        {"items": list(range(100_000))},
        {f"key{i}": i for i in range(100_000)},
        {"deep": nested(5000)},
        {"big": 10**5000},
        {"many": ["y" * 4000] * 60, "more": ["z" * 4000] * 60},
    ],
    ids=["long list", "many keys", "deep nesting", "huge integer", "many long strings"],
)
def test_every_stored_row_is_bounded_and_valid_json(arguments: dict[str, object]) -> None:
    row = audit_arguments(arguments)
    assert len(row) <= AUDIT_MAX_ROW
    json.loads(row)


def test_a_published_credential_is_kept_while_other_keys_of_its_shape_are_masked() -> None:
    from aims_billing_mcp.redact import keep_public
    from aims_billing_mcp.sandbox import SANDBOX_SECRET_KEY

    keep_public([SANDBOX_SECRET_KEY])
    assert redact_text(f"api key: {SANDBOX_SECRET_KEY} or sk_test_{KEY_BODY}") == (
        f"api key: {SANDBOX_SECRET_KEY} or sk_test_****9876")


_PLAIN_TEXTS = st.sampled_from(["cus_a", "chat", "ev-1", f"sk_test_{KEY_BODY}", f"pi_rk_live_{KEY_BODY}",
                                f"whsec_{KEY_BODY}", "configured-secret-value", "my token", "API_KEY"])
_NAMES = st.sampled_from(["customer", "units", "operation", "identifier", "token", "password", "note",
                          "idempotency_key", "card_number"])


_EVENTS = st.dictionaries(_NAMES, st.none() | st.integers(-10**6, 10**6) | st.booleans() | _PLAIN_TEXTS, max_size=6)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_EVENTS, max_size=4))
def test_objects_of_plain_values_are_stored_as_masking_each_name_and_text_stores_them(
        events: list[dict[str, object]]) -> None:
    """Objects of plain values with nothing to mask skip the masks text by text (`_masks_nothing`), alone or as a
    list: whichever way they go, they are stored as masking each name and each text (by its field name, shape and
    value) stores them."""
    register_secrets(["configured-secret-value"])
    masked = [{redact_text(name): redact(value, name) for name, value in event.items()} for event in events]
    assert [_bounded(event, None, 1) for event in events] == masked
    assert _bounded(events, "events", 0) == masked


def test_a_plain_meter_event_is_stored_without_passing_its_texts_through_the_masks() -> None:
    event = {"customer": "cus_a", "units": 12, "operation": "chat", "identifier": "ev-1"}
    assert _masks_nothing([event])
    assert json.loads(audit_arguments({"events": [event]})) == {"events": [event]}


@settings(max_examples=500, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("aAeEiIkKnNoOpPrRsStTvVcCwWdDyY_ 0\u017f\u212a"), max_size=40)
       | st.sampled_from(["ApiKey", "API_KEY", "x-Authorization", "CardNumber", "card_no", "tokens", "\u017fecret"]))
def test_the_quick_secret_name_test_agrees_with_the_field_pattern(text: str) -> None:
    assert _says_secret(text) == (SECRET_FIELD.search(text) is not None)


@pytest.mark.parametrize("note", [f"key sk_test_{KEY_BODY}", "a configured sécret-válue", "configured-secret-value",
                                  f"\ud800 then sk_live_{KEY_BODY}", 'echoed: pässwört"2024x', "naïve\\pass99"],
                         ids=["shape", "configured non-ascii", "configured", "lone surrogate",
                              "non-ascii and a quote", "non-ascii and a backslash"])
def test_a_secret_only_in_a_results_structured_content_is_masked(note: str) -> None:
    register_secrets(["configured-secret-value", "a configured sécret-válue", 'pässwört"2024x', "naïve\\pass99"])
    result = CallToolResult(content=[TextContent(type="text", text="done")],
                            structured_content={"results": [{"note": note}]})

    masked = masked_result(result)

    assert masked.structured_content is not None
    shown = masked.structured_content["results"][0]["note"]
    assert shown != note and "****" in shown


def test_a_value_under_a_secret_name_longer_than_a_stored_name_is_masked() -> None:
    name = "x" * 300 + "_password"  # cut to AUDIT_MAX_KEY characters when stored: the cut drops the word

    stored = audit_arguments({name: "hunter2-correct-horse"})

    assert "hunter2" not in stored


@pytest.mark.parametrize("padding", [0, 2000], ids=["short text", "long text"])
@pytest.mark.parametrize("secret", [f"sk_test_{KEY_BODY}", f"whsec_{KEY_BODY}", "configured-secret-value"])
def test_a_hint_is_found_in_short_and_long_texts_alike(padding: int, secret: str) -> None:
    register_secrets(["configured-secret-value"])
    text = "x" * padding + f"[{secret}]" + "y" * padding

    assert may_hold_secret(text)
    assert not may_hold_secret(text.replace(secret, "nothing-here"))
