"""Policy: which tools exist (allow-list, read-only), and the audit row every call leaves, with secrets masked."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.types import Tool

from aims_billing_mcp.app import build_server
from aims_billing_mcp.errors import ConfigurationError
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from aims_billing_mcp.tools import TOOLS, ToolSpec, select_tools
from tests.conftest import error_of, ok

pytestmark = pytest.mark.anyio

WRITE_TOOLS = {spec.name for spec in TOOLS if spec.permission == "write"}
READ_TOOLS = {spec.name for spec in TOOLS if spec.permission == "read"}


async def tool_names(make_server: Any, **settings: Any) -> set[str]:
    async with Client(make_server(**settings)) as client:
        return {tool.name for tool in (await client.list_tools()).tools}


async def test_every_tool_is_registered_by_default(make_server: Any) -> None:
    assert await tool_names(make_server) == WRITE_TOOLS | READ_TOOLS


async def test_read_only_mode_registers_only_read_tools(make_server: Any) -> None:
    assert await tool_names(make_server, aims_billing_read_only=True) == READ_TOOLS


async def test_allow_list_registers_only_the_named_tools(make_server: Any) -> None:
    names = await tool_names(make_server, aims_billing_tools=["create_customer", "retrieve_balance"])
    assert names == {"create_customer", "retrieve_balance"}


async def test_read_only_wins_over_an_allow_list_naming_a_write_tool(make_server: Any) -> None:
    names = await tool_names(make_server, aims_billing_tools=["create_customer", "list_invoices"],
                             aims_billing_read_only=True)
    assert names == {"list_invoices"}


async def test_a_removed_tool_cannot_be_called(make_server: Any, sandbox: Any) -> None:
    async with Client(make_server(aims_billing_read_only=True)) as client:
        result = await client.call_tool("create_customer", {"email": "a@example.com"})
    assert result.is_error
    assert sandbox.count("customer") == 0


def test_an_unknown_name_in_the_allow_list_is_a_startup_error(make_settings: Any) -> None:
    with pytest.raises(ConfigurationError, match="create_custmer"):
        select_tools(make_settings(aims_billing_tools=["create_custmer"]))


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tool]:
    """Every tool as tools/list publishes it, read from one server object: static data, so nothing is booted (no
    lifespan, no store) and the module's tests share it."""
    settings = Settings(_env_file=None, aims_billing_db=tmp_path_factory.mktemp("policy") / "unused.db")  # type: ignore[call-arg]
    server = build_server(settings, tools=list(TOOLS))
    return {tool.name: tool for tool in anyio.run(server.list_tools)}


@pytest.mark.parametrize("spec", TOOLS, ids=[spec.name for spec in TOOLS])
def test_every_tool_declares_its_annotations(published: dict[str, Tool], spec: ToolSpec) -> None:
    tool = published[spec.name]
    assert tool.annotations is not None
    assert tool.annotations.read_only_hint is (spec.permission == "read")
    assert tool.annotations.destructive_hint is spec.destructive
    assert tool.annotations.open_world_hint is spec.open_world  # Stripe-backed tools reach outside; the ledger does not
    assert tool.output_schema is not None and tool.description


def audit_rows(path: Any) -> list[dict[str, Any]]:
    store = Store(path)
    try:
        return store.query("SELECT * FROM audit_log ORDER BY id")
    finally:
        store.close()


async def test_every_call_leaves_an_audit_row_with_outcome_duration_and_request_id(
    make_server: Any, make_settings: Any
) -> None:
    async with Client(make_server()) as client:
        ok(await client.call_tool("create_customer", {"email": "a@example.com", "idempotency_key": "k"}))
        ok(await client.call_tool("create_customer", {"email": "a@example.com", "idempotency_key": "k"}))
        error_of(await client.call_tool("create_product", {"name": ""}))
        ok(await client.call_tool("create_product", {"name": "P", "dry_run": True}))

    rows = audit_rows(make_settings().aims_billing_db)
    assert [(r["tool"], r["outcome"]) for r in rows] == [
        ("create_customer", "ok"), ("create_customer", "replayed"), ("create_product", "error"),
        ("create_product", "dry_run"),
    ]
    assert rows[0]["request_id"].startswith("req_")
    assert rows[2]["error_code"] == "invalid_input"
    assert all(r["duration_ms"] >= 0 for r in rows)
    assert json.loads(rows[0]["arguments"])["email"] == "a@example.com"


async def test_secrets_in_arguments_are_masked_in_the_audit_log(make_server: Any, make_settings: Any) -> None:
    secret = "sk_test_supersecretvalue0000000001234"
    async with Client(make_server()) as client:
        error_of(await client.call_tool("create_customer", {"email": "a@example.com", "api_key": secret}))
        ok(await client.call_tool("create_customer", {"email": "b@example.com", "description": f"key {secret}"}))

    text = json.dumps(audit_rows(make_settings().aims_billing_db))
    assert secret not in text
    assert "sk_test_****1234" in text
