"""Promise: every amount, unit count and integer id is a strict integer. JSON `true`, `"7"` and `3.0` are refused,
naming the field, before anything moves; the ledger and the usage record are unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from aims_billing_mcp.app import BillingServer
from tests.conftest import error_of, ok

pytestmark = pytest.mark.anyio

LOOSE_INTEGERS = [True, False, "7", 3.0, "3.0", 1e3]
TOOLS_JSON = json.loads((Path(__file__).parents[2] / "tools.json").read_text())["tools"]


@pytest.fixture
async def client(make_server: Any) -> Any:
    """A P2P customer may open one wallet here, so the tests need no subscription."""
    server: BillingServer = make_server(aims_billing_p2p_agents=1)
    async with Client(server) as connected:
        yield connected


async def funded_wallet(client: Client) -> None:
    ok(await client.call_tool("create_agent_wallet", {"agent_id": "alice", "customer": "cus_strict",
                                                      "idempotency_key": "open"}))
    ok(await client.call_tool("credit_agent_wallet", {"agent_id": "alice", "amount": 100, "reason": "seed",
                                                      "idempotency_key": "seed"}))


async def balance(client: Client) -> int:
    return int(ok(await client.call_tool("get_agent_wallet", {"agent_id": "alice"}))["balance"])


@pytest.mark.parametrize("amount", LOOSE_INTEGERS, ids=repr)
async def test_a_debit_amount_that_is_not_an_integer_is_refused_and_moves_nothing(client: Client,
                                                                                 amount: Any) -> None:
    await funded_wallet(client)
    result = await client.call_tool("debit_agent_wallet", {"agent_id": "alice", "amount": amount, "reason": "r",
                                                           "idempotency_key": f"d-{amount!r}"})
    error = error_of(result)
    assert error["code"] == "invalid_input"
    assert error["param"] == "amount"
    assert await balance(client) == 100


@pytest.mark.parametrize("usd_cents", LOOSE_INTEGERS, ids=repr)
async def test_a_credit_in_usd_cents_that_is_not_an_integer_is_refused(client: Client, usd_cents: Any) -> None:
    await funded_wallet(client)
    error = error_of(await client.call_tool("credit_agent_wallet", {
        "agent_id": "alice", "usd_cents": usd_cents, "reason": "r", "idempotency_key": f"c-{usd_cents!r}"}))
    assert error["param"] == "usd_cents"
    assert await balance(client) == 100


@pytest.mark.parametrize("units", LOOSE_INTEGERS, ids=repr)
async def test_usage_units_that_are_not_an_integer_are_refused(client: Client, units: Any) -> None:
    error = error_of(await client.call_tool("quote_usage", {"customer": "cus_strict", "units": units}))
    assert error["param"] == "units"


async def test_a_boolean_for_an_integer_choice_is_refused(client: Client) -> None:
    error = error_of(await client.call_tool("create_x402_payment_requirements", {
        "agent_id": "alice", "luc": 100, "x402_version": True}))
    assert error["param"] == "x402_version"


def integer_properties(schema: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every integer-typed property of a tool's input schema, nested objects and $defs included."""
    found: list[tuple[str, dict[str, Any]]] = []
    if schema.get("type") == "integer":
        found.append((path, schema))
    for key, value in schema.items():
        if isinstance(value, dict):
            found += integer_properties(value, f"{path}.{key}" if key not in ("properties",) else path)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    found += integer_properties(item, path)
    return found


@pytest.mark.parametrize("tool", TOOLS_JSON, ids=[tool["name"] for tool in TOOLS_JSON])
def test_every_integer_input_has_a_maximum_that_leaves_room_for_sums(tool: dict[str, Any]) -> None:
    """SQLite integers are 64-bit: a sum of amounts must still fit, so no single integer may exceed 10**15."""
    for path, schema in integer_properties(tool["inputSchema"], tool["name"]):
        limit = schema.get("maximum", schema.get("exclusiveMaximum"))
        if "enum" in schema:
            continue
        assert limit is not None and limit <= 10**15, f"{path} has no maximum (or one above 10**15): {schema}"


async def test_a_lone_surrogate_inside_an_argument_is_refused_naming_it(client: Client) -> None:
    error = error_of(await client.call_tool("create_product", {"name": "Pack", "metadata": {"note": "a\ud800b"}}))
    assert (error["code"], error["param"]) == ("invalid_input", "metadata")
    assert "lone surrogate" in error["message"]


async def test_a_tool_runs_on_the_strictly_parsed_arguments_without_a_second_lax_parse(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mcp.server.mcpserver.utilities.func_metadata import FuncMetadata

    def lax(self: Any, arguments: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError(f"the SDK's lax validation ran on {arguments}")

    monkeypatch.setattr(FuncMetadata, "validate_arguments", lax)  # the SDK's pass: never reached by a tool call
    await funded_wallet(client)
    ok(await client.call_tool("debit_agent_wallet", {"agent_id": "alice", "amount": 30, "reason": "task",
                                                     "idempotency_key": "once"}))
    assert await balance(client) == 70
    refused = error_of(await client.call_tool("debit_agent_wallet", {"agent_id": "alice", "amount": "7",
                                                                     "reason": "task", "idempotency_key": "loose"}))
    assert refused["param"] == "amount" and await balance(client) == 70
