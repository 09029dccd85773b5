"""Tool sets: a client loads only the families it uses (AIMS_BILLING_TOOLSETS), combined with the allow-list and
read-only mode; an unknown set stops start-up; published schemas carry no redundant per-property titles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from aims_billing_mcp.errors import ConfigurationError
from aims_billing_mcp.tools import TOOLS, TOOLSETS, select_tools
from aims_billing_mcp.tools.docs import tool_sizes

pytestmark = pytest.mark.anyio


def names(make_settings: Any, **settings: Any) -> set[str]:
    return {spec.name for spec in select_tools(make_settings(**settings))}


@pytest.mark.parametrize("toolset", TOOLSETS)
def test_a_tool_set_selects_exactly_its_family(make_settings: Any, toolset: str) -> None:
    expected = {spec.name for spec in TOOLS if spec.fn.__module__.endswith(f".{toolset}")}
    assert expected and names(make_settings, aims_billing_toolsets=[toolset]) == expected


def test_tool_sets_combine_with_read_only_and_the_allow_list(make_settings: Any) -> None:
    read_tools = {spec.name for spec in TOOLS if spec.toolset in ("wallets", "catalog") and spec.permission == "read"}
    assert {"get_agent_wallet", "list_invoices"} <= read_tools
    assert names(make_settings, aims_billing_toolsets=["wallets", "catalog"], aims_billing_read_only=True) == read_tools
    assert names(make_settings, aims_billing_toolsets=["wallets"],
                 aims_billing_tools=["get_agent_wallet", "list_invoices"]) == {"get_agent_wallet"}


def test_tool_sets_are_read_from_a_comma_separated_variable(make_settings: Any, monkeypatch: Any) -> None:
    from aims_billing_mcp.settings import Settings

    monkeypatch.setenv("AIMS_BILLING_TOOLSETS", "x402, commerce")
    assert Settings(_env_file=None).aims_billing_toolsets == ["x402", "commerce"]  # type: ignore[call-arg]


def test_an_unknown_tool_set_is_a_startup_error_naming_the_known_ones(make_settings: Any) -> None:
    with pytest.raises(ConfigurationError, match="known sets are"):
        select_tools(make_settings(aims_billing_toolsets=["walets"]))


async def test_a_client_of_one_tool_set_lists_only_it(make_server: Any) -> None:
    async with Client(make_server(aims_billing_toolsets=["x402"])) as client:
        listed = {tool.name for tool in (await client.list_tools()).tools}
    assert listed == {spec.name for spec in TOOLS if spec.toolset == "x402"}


def test_published_schemas_carry_no_per_property_titles() -> None:
    text = (Path(__file__).parents[1] / "tools.json").read_text()
    assert '"title": "' not in json.dumps([tool["inputSchema"] for tool in json.loads(text)["tools"]])


def test_the_readme_reports_the_current_tools_list_size_of_each_tool_set() -> None:
    """The table is written by `aims-billing-mcp tools-json` from tools.json (tools/docs.py)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    manifest = json.loads((Path(__file__).parents[1] / "tools.json").read_text())
    sizes = tool_sizes(TOOLS, manifest)
    expected = "\n".join(f"| `{name}` | {count} | {kb} KB |" for name, (count, kb) in sizes.items())
    assert expected in readme, "the README's tool-set table drifted: run `aims-billing-mcp tools-json`"
