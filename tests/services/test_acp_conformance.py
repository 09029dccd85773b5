"""The seller against the published ACP 2026-04-17 spec (tests/data/acp/: the JSON Schema bundle, the MCP binding's
OpenRPC document and docs, the spec's examples; Apache-2.0, see its NOTE). Every request a test sends is first
checked valid against the spec's schema, every answer validated against it: REST (API-Version on every operation,
every field the schemas allow accepted, a refused complete changes nothing) and the MCP binding (the `meta` and
`payload` schemas, output schemas, `param` on the tool arguments, JSON-RPC errors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
from mcp import MCPError

from aims_billing_mcp.services.acp_models import AcpError
from aims_billing_mcp.services.acp_protocol import check_cancel, check_complete, check_create, check_update
from tests.services.test_acp import BUNDLE, KEY, Env, checked, conforms, pay
from tests.services.test_acp import env as env  # the fixtures: a REST seller in process, the server over HTTP
from tests.test_acp_mcp import META, acp_client, body
from tests.test_acp_mcp import seller as seller

pytestmark = pytest.mark.anyio
DATA = Path(__file__).parents[1] / "data" / "acp"
OPENRPC = json.loads((DATA / "openrpc.agentic_checkout.json").read_text("utf-8"))
EXAMPLES = json.loads((DATA / "examples.agentic_checkout.json").read_text("utf-8"))
MCP_EXAMPLES = json.loads((DATA / "examples.mcp.agentic_checkout.json").read_text("utf-8"))
SESSIONS = "/acp/checkout_sessions"
REQUESTS = {"create": "CheckoutSessionCreateRequest", "update": "CheckoutSessionUpdateRequest",
            "complete": "CheckoutSessionCompleteRequest", "cancel": "CancelSessionRequest"}
PARSERS = {"create": check_create, "update": check_update, "complete": check_complete, "cancel": check_cancel}


def spec_valid(body: Any, definition: str) -> Any:
    """`body`, after checking it is valid for the spec (a test that sends an invalid body proves nothing)."""
    conforms(body, definition)
    return body


def every_field(schema: dict[str, Any]) -> Any:
    """An instance of `schema` (the spec bundle's, `$ref`s followed) that uses every property it allows."""
    if "$ref" in schema:
        return every_field(BUNDLE["$defs"][schema["$ref"].removeprefix("#/$defs/")])
    for key in ("oneOf", "anyOf"):
        if key in schema and "type" not in schema:
            return every_field(schema[key][0])
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        return {name: every_field(sub) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [every_field(schema["items"])]
    text = SAMPLES.get(schema.get("pattern") or schema.get("format") or "", "x" * schema.get("minLength", 1))
    return {"string": text, "integer": max(1, schema.get("minimum", 1)), "number": 1.5, "boolean": True,
            "null": None}[kind]


SAMPLES = {"email": "buyer@example.com", "date-time": "2026-04-17T10:30:00Z", "uri": "https://example.com/x",
           r"^\d{4}-\d{2}-\d{2}$": "2026-04-17", r"^[a-z]{3}$": "usd",
           r"^\$\.[A-Za-z][A-Za-z0-9]*(\.[A-Za-z][A-Za-z0-9_]*)*$": "$.line_items"}


def full(definition: str, **ours: Any) -> dict[str, Any]:
    """A `definition` request with every field the spec allows, `ours` replacing what this seller sells."""
    out: dict[str, Any] = every_field({"$ref": f"#/$defs/{definition}"})
    return spec_valid({**out, **ours}, definition)


def session_row(env: Env, sid: str) -> dict[str, Any] | None:
    return env.store.query_one("SELECT * FROM acp_checkout_sessions WHERE id = ?", (sid,))


# --- 1. API-Version is required on every operation --------------------------------------------------------------

OPERATIONS = {
    "create": ("POST", "", {"currency": "usd", "line_items": [{"id": "luc_10k"}], "capabilities": {}}),
    "get": ("GET", "/{sid}", None),
    "update": ("POST", "/{sid}", {"buyer": {"email": "owner@example.com"}}),
    "complete": ("POST", "/{sid}/complete", pay("spt_test_ok")),
    "cancel": ("POST", "/{sid}/cancel", None),
}


@pytest.mark.parametrize("version", [None, "2025-09-29", ""])
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
async def test_every_operation_without_a_supported_api_version_is_a_400_error_listing_the_versions_and_changes_nothing(
        env: Env, operation: str, version: str | None) -> None:
    sid = (await env.create(["luc_10k"]))["id"]
    before = env.store.query("SELECT * FROM acp_checkout_sessions ORDER BY id")
    method, path, payload = OPERATIONS[operation]
    headers = {"Authorization": f"Bearer {KEY}", "Idempotency-Key": f"v-{operation}",
               "Content-Type": "application/json", **({"API-Version": version} if version is not None else {})}
    url = SESSIONS + path.format(sid=sid)
    response = await env.http.request(method, url, headers=headers,
                                      content=json.dumps(payload) if payload is not None else b"")
    error = checked(response, url, 400).json()
    assert error["code"] == ("missing_api_version" if version is None else "unsupported_api_version")
    assert error["supported_versions"] == ["2026-04-17"] and error["type"] == "invalid_request"
    assert env.store.query("SELECT * FROM acp_checkout_sessions ORDER BY id") == before


# --- 2. every field the spec's schemas allow is accepted -----------------------------------------------------------

SPEC_REQUESTS = [(name, kind) for name in EXAMPLES for kind in REQUESTS
                 if name.startswith((f"{kind}_checkout_session_request", f"{kind}_session_with"))]


@pytest.mark.parametrize(("example", "kind"), SPEC_REQUESTS)
def test_every_request_example_of_the_spec_is_accepted_by_the_parser(example: str, kind: str) -> None:
    request = spec_valid(EXAMPLES[example], REQUESTS[kind])
    assert PARSERS[kind](request).model_dump(exclude_unset=True) == request  # read as given, nothing dropped


@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_a_request_using_every_field_of_its_schema_is_accepted_by_the_parser(kind: str) -> None:
    request = full(REQUESTS[kind])
    assert PARSERS[kind](request).model_dump(exclude_unset=True) == request  # read as given, nothing dropped


async def test_a_checkout_using_every_field_the_spec_allows_is_created_updated_and_completed(env: Env) -> None:
    create = full("CheckoutSessionCreateRequest", currency="usd", line_items=[{"id": "luc_10k"}],
                  metadata={"agent_id": "buyer"})
    assert create["fulfillment_details"]["address"]["company"]  # the field refused as unknown_field before
    created = (await env.post(SESSIONS, create, expect=201)).json()
    assert created["fulfillment_details"] == create["fulfillment_details"] and created["buyer"] == create["buyer"]
    sid = created["id"]
    selected = [{"type": "digital", "option_id": "digital_wallet_credit", "item_ids": ["li_luc_10k"]}]
    update = full("CheckoutSessionUpdateRequest", line_items=[{"id": "luc_10k"}], selected_fulfillment_options=selected)
    updated = (await env.post(f"{SESSIONS}/{sid}", update, expect=200)).json()
    assert updated["status"] == "ready_for_payment" and updated["buyer"] == update["buyer"]
    complete = full("CheckoutSessionCompleteRequest", payment_data={
        **full("PaymentData"), **pay("spt_test_every_field")["payment_data"]})
    done = (await env.post(f"{SESSIONS}/{sid}/complete", complete, expect=200)).json()
    assert done["status"] == "completed" and done["buyer"] == complete["buyer"]


async def test_a_cancel_with_every_intent_trace_field_and_an_unlisted_reason_is_accepted(env: Env) -> None:
    for reason in ("other", "buyer_cancelled"):  # the reason enum is extensible: an unlisted reason is accepted
        sid = (await env.create(["luc_10k"]))["id"]
        cancel = full("CancelSessionRequest")
        cancel["intent_trace"]["reason_code"] = reason
        canceled = (await env.post(f"{SESSIONS}/{sid}/cancel", cancel, expect=200)).json()
        assert canceled["status"] == "canceled"


CREATE = {"currency": "usd", "line_items": [{"id": "luc_10k"}], "capabilities": {}}
ADDRESS = {"name": "Ada", "line_one": "1 Main St", "city": "Paris", "state": "IDF", "country": "FR",
           "postal_code": "75001"}
REFUSED = [  # (body, code, param): what the spec's schema forbids, at any depth
    ({**CREATE, "fulfillment_details": {"address": {**ADDRESS, "zip": "75001"}}}, "unknown_field",
     "$.fulfillment_details.address.zip"),
    ({**CREATE, "fulfillment_details": {"address": {**ADDRESS, "city": None}}}, "invalid_field",
     "$.fulfillment_details.address.city"),
    ({**CREATE, "fulfillment_details": {"address": {"name": "Ada"}}}, "missing_field",
     "$.fulfillment_details.address.line_one"),
    ({**CREATE, "buyer": {"email": "a@example.com", "company": {"tax_id": "x"}}}, "missing_field",
     "$.buyer.company.name"),
    ({**CREATE, "buyer": {"email": "not-an-email"}}, "invalid_email", "$.buyer.email"),
    ({**CREATE, "buyer": {"email": "a@example.com", "account_type": "vip"}}, "invalid_field", "$.buyer.account_type"),
    ({**CREATE, "line_items": [{"id": "luc_10k", "quantity": 2}]}, "unknown_field", "$.line_items[0].quantity"),
    ({**CREATE, "order_notes": "x" * 5001}, "invalid_field", "$.order_notes"),
    ({**CREATE, "capabilities": {"interventions": {"supported": ["telepathy"]}}}, "invalid_field",
     "$.capabilities.interventions.supported[0]"),
    ({**CREATE, "odd key'\u0001": 1}, "unknown_field", "$['odd key\\'\\u0001']"),
    ([CREATE], "invalid_field", "$"),
]


@pytest.mark.parametrize(("request_body", "code", "param"), REFUSED)
async def test_what_the_schema_forbids_is_a_400_naming_the_field_and_creates_nothing(
        env: Env, request_body: Any, code: str, param: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        conforms(request_body, "CheckoutSessionCreateRequest")
    error = (await env.post(SESSIONS, request_body, expect=400)).json()
    assert (error["code"], error["param"]) == (code, param)
    assert env.store.query("SELECT id FROM acp_checkout_sessions") == []


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"k": value}
    return value


UNREADABLE = [  # (raw body, code, param): refused before the body is hashed, stored or echoed
    (json.dumps({**CREATE, "metadata": {"agent_id": "buyer", "x": nested(31)}}).encode(), "too_deeply_nested",
     "$.metadata.x" + ".k" * 30),
    (b"[" * 50_000 + b"]" * 50_000, "too_deeply_nested", "$"),  # refused unread: deeper than 128 levels
    (json.dumps({**CREATE, "buyer": {"email": "a@example.com", "first_name": "\ud800"}}).encode(), "invalid_text",
     "$.buyer.first_name"),
    (b'{"\\ud800": 1}', "invalid_text", "$['\\ud800']"),
]


@pytest.mark.parametrize(("raw", "code", "param"), UNREADABLE)
async def test_a_body_nested_too_deeply_or_not_valid_unicode_is_a_400_naming_where(
        env: Env, raw: bytes, code: str, param: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "API-Version": "2026-04-17", "Idempotency-Key": "deep",
               "Content-Type": "application/json"}
    error = checked(await env.http.post(SESSIONS, content=raw, headers=headers), SESSIONS, 400).json()
    assert (error["code"], error["param"]) == (code, param)
    assert env.store.query("SELECT key FROM acp_idempotency") == []


async def test_a_deep_body_is_refused_unread_even_after_a_dependency_raised_the_recursion_limit(env: Env) -> None:
    from aims_billing_mcp.services import x402_signer  # imports py_ecc, which sets the recursion limit to 100000

    assert x402_signer and sys.getrecursionlimit() >= 100_000  # json.loads would now overflow the C stack
    raw = b"[" * 130_000 + b"]" * 130_000  # under the 256 KB cap
    headers = {"Authorization": f"Bearer {KEY}", "API-Version": "2026-04-17", "Idempotency-Key": "deeper",
               "Content-Type": "application/json"}
    error = checked(await env.http.post(SESSIONS, content=raw, headers=headers), SESSIONS, 400).json()
    assert (error["code"], error["param"]) == ("too_deeply_nested", "$")


def test_a_parse_error_names_the_fields_the_object_has() -> None:
    with pytest.raises(AcpError) as caught:
        check_create({**CREATE, "fulfillment_details": {"address": {**ADDRESS, "zip": "1"}}})
    assert "company" in caught.value.message and "postal_code" in caught.value.message


@pytest.mark.parametrize(("kind", "body", "error"), [
    ("update", {"line_items": []},
     {"code": "invalid_field", "param": "$.line_items", "message": "$.line_items needs at least one item"}),
    ("create", {**CREATE, "line_items": [{"id": "luc_10k"}, {"id": " "}]},
     {"code": "invalid_field", "param": "$.line_items[1].id", "message": "$.line_items[1].id is empty"}),
    ("create", {**CREATE, "line_items": [{"id": "luc_10k", "unit_amount": 5.0}, {"id": ""}]},
     {"code": "invalid_field", "param": "$.line_items[0].unit_amount",
      "message": "$.line_items[0].unit_amount must be an integer (minor units)"}),
    ("complete", {"payment_data": {"handler_id": "stripe_spt"}},
     {"code": "invalid_field", "param": "$.payment_data",
      "message": "$.payment_data does not match the ACP 2026-04-17 schema (anyOf)"}),
    ("complete", {"payment_data": {"purchase_order_number": "po-1"}},
     {"code": "unsupported_payment", "param": "$.payment_data", "message": "purchase orders are not accepted: pay "
      "with the stripe_spt handler and a Shared Payment Token"}),
])
def test_what_the_seller_requires_beyond_the_schema_is_refused_naming_the_first_field(
        kind: str, body: dict[str, Any], error: dict[str, str]) -> None:
    with pytest.raises(AcpError) as caught:
        PARSERS[kind](body)
    assert (caught.value.status, caught.value.body()) == (400, {"type": "invalid_request", **error})


# --- 7. a refused complete changes nothing -------------------------------------------------------------------------

async def test_a_complete_refused_as_not_ready_for_payment_does_not_save_its_buyer(env: Env) -> None:
    no_wallet = (await env.create(["luc_10k"], agent=None))["id"]
    tier = (await env.create(["tier_3mo"], agent=None))["id"]
    for sid, buyer in ((no_wallet, {"email": "eve@example.com", "first_name": "Eve"}),
                       (tier, {"email": "eve@example.com", "customer_id": "cus_nobody"})):  # unknown to Stripe
        before = session_row(env, sid)
        request = spec_valid({**pay("spt_test_refused"), "buyer": buyer}, "CheckoutSessionCompleteRequest")
        refused = (await env.post(f"{SESSIONS}/{sid}/complete", request, expect=400)).json()
        assert refused["code"] == "not_ready_for_payment"
        assert session_row(env, sid) == before
        assert "buyer" not in (await env.get(f"{SESSIONS}/{sid}")).json()


# --- MCP binding (3-6, 8) ------------------------------------------------------------------------------------------

def methods() -> dict[str, dict[str, Any]]:
    return {method["name"]: method for method in OPENRPC["methods"]}


def inlined(schema: Any) -> Any:
    """The spec's schema with every `$ref` replaced by its target."""
    if isinstance(schema, list):
        return [inlined(value) for value in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = inlined(BUNDLE["$defs"][schema["$ref"].rsplit("/", 1)[1]])
        return {**target, **{key: inlined(value) for key, value in schema.items() if key != "$ref"}}
    return {key: inlined(value) for key, value in schema.items()}


def without(schema: Any, *keys: str) -> Any:
    """`schema` without the keys `keys` at any depth (no property of the request schemas has such a name)."""
    if isinstance(schema, list):
        return [without(value, *keys) for value in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: without(value, *keys) for key, value in schema.items() if key not in keys}


def refs(schema: Any) -> list[str]:
    if isinstance(schema, dict):
        return [ref for key, value in schema.items() for ref in ([value] if key == "$ref" else refs(value))]
    return [ref for value in schema for ref in refs(value)] if isinstance(schema, list) else []


@pytest.fixture
async def tools(seller: tuple[str, Any]) -> dict[str, Any]:
    async with acp_client(seller[0]) as client:
        return {tool.name: tool for tool in (await client.list_tools()).tools}


async def test_each_tool_takes_the_openrpc_meta_and_its_bundled_request_schema_as_payload(
        tools: dict[str, Any]) -> None:
    meta = OPENRPC["components"]["schemas"]["meta"]
    assert meta["required"] == ["api_version"] and "idempotency_key" in meta["properties"]
    for name, method in methods().items():
        schema = tools[name].input_schema
        assert refs(schema) == []  # every $ref resolved
        assert schema["properties"]["meta"] == meta
        assert set(schema["required"]) == {param["name"] for param in method["params"] if param["required"]}
        assert set(schema["properties"]) == {param["name"] for param in method["params"]}
        payload = next((param["schema"]["$ref"] for param in method["params"] if param["name"] == "payload"), None)
        if payload is not None:
            assert without(schema["properties"]["payload"], "example") == without(inlined({"$ref": payload}), "example")
        jsonschema.Draft202012Validator.check_schema(schema)
    create = tools["create_checkout_session"].input_schema["properties"]["payload"]
    assert create["properties"]["fulfillment_details"]["properties"]["address"]["properties"]["company"] == {
        "type": "string", "description": "Postal or ZIP code"}


async def test_each_tool_publishes_the_checkout_session_schemas_as_output(tools: dict[str, Any]) -> None:
    sessions = [body for name, body in EXAMPLES.items() if name.endswith("_response")]
    assert len(sessions) == 5
    broken = [{**sessions[0], "status": "lost"}, {k: v for k, v in sessions[0].items() if k != "id"},
              {**sessions[0], "surprise": 1}, {**sessions[2], "order": {"id": "ord_1"}}]
    for name, method in methods().items():
        output = tools[name].output_schema
        published = [method["result"]["schema"]["$ref"].rsplit("/", 1)[1]]
        if name == "complete_checkout_session":  # a declined payment answers the session, payable again
            published.append("CheckoutSession")
        assert output["type"] == "object" and "description" in output["$defs"]["Adjustment"]["properties"]
        ours = jsonschema.Draft202012Validator(output, registry=referencing.Registry())  # as the MCP client does
        spec = [jsonschema.Draft202012Validator({**BUNDLE, "$ref": f"#/$defs/{d}"}) for d in published]
        for session in sessions + broken:  # accepted exactly when the spec accepts it
            assert ours.is_valid(session) == any(v.is_valid(session) for v in spec), (name, session.get("status"))
        assert not any(ours.is_valid(session) for session in broken)


async def test_an_acp_error_over_mcp_names_the_tool_argument(seller: tuple[str, Any]) -> None:
    async with acp_client(seller[0]) as client:
        calls = [
            ("create_checkout_session", {"meta": META, "payload": {**body(["luc_10k"]), "currency": "eur"}},
             "unsupported_currency", "$.payload.currency"),
            ("create_checkout_session", {"meta": META, "payload": {k: v for k, v in body(["luc_10k"]).items()
                                                                   if k != "currency"}},
             "missing_field", "$.payload.currency"),
            ("create_checkout_session", {"meta": META, "payload": {**body(["luc_10k"]), "fulfillment_details": {
                "address": {**ADDRESS, "zip": "1"}}}}, "unknown_field", "$.payload.fulfillment_details.address.zip"),
            ("create_checkout_session", {"meta": META, "payload": {**body(["luc_10k"]), "surprise": 1}},
             "unknown_field", "$.payload.surprise"),
            ("get_checkout_session", {"meta": META, "id": "cs_nope"}, "not_found", "$.id"),
            ("update_checkout_session", {"meta": META, "id": "cs_nope", "payload": {}}, "not_found", "$.id"),
            ("cancel_checkout_session", {"meta": META, "id": "cs_nope", "payload": {"intent_trace": {}}},
             "missing_field", "$.payload.intent_trace.reason_code"),
            ("get_checkout_session", {"meta": {**META, "request_id": 7}, "id": "cs_nope"}, "invalid_field",
             "$.meta.request_id"),
            ("create_checkout_session", {"meta": META, "payload": {**body(["luc_10k"]), "metadata": nested(40)}},
             "too_deeply_nested", "$.payload.metadata" + ".k" * 31),
        ]
        for tool, arguments, code, param in calls:
            with pytest.raises(MCPError) as caught:
                await client.call_tool(tool, arguments)
            assert caught.value.code == -32000
            conforms(caught.value.data, "Error")
            assert (caught.value.data["code"], caught.value.data["param"]) == (code, param), tool


async def test_a_session_field_named_by_a_refused_complete_is_not_moved_under_the_payload(
        seller: tuple[str, Any]) -> None:
    async with acp_client(seller[0]) as client:
        created = await client.call_tool("create_checkout_session", {
            "meta": META, "payload": {k: v for k, v in body(["luc_10k"]).items() if k != "metadata"}})
        sid = created.structured_content["id"]
        with pytest.raises(MCPError) as caught:
            await client.call_tool("complete_checkout_session", {"meta": META, "id": sid,
                                                                 "payload": pay("spt_test_x")})
    assert (caught.value.data["code"], caught.value.data["param"]) == ("not_ready_for_payment", "$.metadata.agent_id")


MALFORMED = [  # a malformed envelope: JSON-RPC -32602 before anything runs
    ("get_checkout_session", {"id": "cs_x"}),
    ("get_checkout_session", {"meta": "2026-04-17", "id": "cs_x"}),
    ("get_checkout_session", {"meta": None, "id": "cs_x"}),
    ("get_checkout_session", {"meta": META}),
    ("get_checkout_session", {"meta": META, "id": 7}),
    ("get_checkout_session", {"meta": META, "id": "cs_x", "payload": {}}),
    ("create_checkout_session", {"meta": META}),
    ("create_checkout_session", {"meta": META, "payload": json.dumps(body(["luc_10k"]))}),
    ("create_checkout_session", {"payload": body(["luc_10k"])}),
    ("create_checkout_session", {"meta": META, "payload": body(["luc_10k"]), "api_version": "2026-04-17"}),
    ("complete_checkout_session", {"meta": META, "payload": pay("spt_x")}),
    ("cancel_checkout_session", {"meta": META, "id": "cs_x", "payload": []}),
]


@pytest.mark.parametrize(("tool", "arguments"), MALFORMED)
async def test_a_malformed_envelope_is_a_json_rpc_invalid_params_error(
        seller: tuple[str, Any], tool: str, arguments: dict[str, Any]) -> None:
    async with acp_client(seller[0]) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool(tool, arguments)
    assert caught.value.code == -32602 and caught.value.data["param"].startswith("$")
    assert seller[1].state.store.query("SELECT id FROM acp_checkout_sessions") == []


@pytest.mark.parametrize(("meta", "code"), [({}, "missing_api_version"),
                                            ({"idempotency_key": "k"}, "missing_api_version"),
                                            ({"api_version": "2025-09-29"}, "unsupported_api_version")])
async def test_meta_without_a_supported_api_version_is_an_acp_error_listing_the_versions(
        seller: tuple[str, Any], meta: dict[str, Any], code: str) -> None:
    async with acp_client(seller[0]) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("create_checkout_session", {"meta": meta, "payload": body(["luc_10k"])})
    assert caught.value.code == -32000
    conforms(caught.value.data, "Error")
    assert (caught.value.data["code"], caught.value.data["param"]) == (code, "$.meta.api_version")
    assert caught.value.data["supported_versions"] == ["2026-04-17"]
    assert seller[1].state.store.query("SELECT id FROM acp_checkout_sessions") == []


async def test_the_spec_examples_run_over_mcp_with_unknown_meta_fields_ignored(seller: tuple[str, Any]) -> None:
    example = MCP_EXAMPLES["create_checkout_session_request"]["params"]["arguments"]
    payload = spec_valid({**example["payload"], "line_items": [{"id": "luc_10k"}], "metadata": {"agent_id": "buyer"}},
                         "CheckoutSessionCreateRequest")
    cancel = MCP_EXAMPLES["cancel_checkout_session_request"]["params"]["arguments"]
    async with acp_client(seller[0]) as client:
        for how in ({**cancel}, {"meta": META, "payload": None}, {"meta": META}):
            created = await client.call_tool("create_checkout_session", {
                "meta": {**example["meta"], "idempotency_key": str(how), "x_future_header": 1}, "payload": payload})
            assert not created.is_error, created.content
            conforms(created.structured_content, "CheckoutSession")
            sid = created.structured_content["id"]
            canceled = await client.call_tool("cancel_checkout_session", {**how, "id": sid})
            assert canceled.structured_content["status"] == "canceled"


@pytest.mark.parametrize("name", ["schema.agentic_checkout.json", "openrpc.agentic_checkout.json"])
def test_the_runtime_copy_of_the_spec_is_the_published_one(name: str) -> None:
    shipped = Path(__file__).parents[2] / "aims_billing_mcp" / "acp_spec" / "2026-04-17" / name
    assert shipped.read_bytes() == (DATA / name).read_bytes()
