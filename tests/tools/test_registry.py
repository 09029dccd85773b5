"""Adding a tool: its function and the `@tool` declaration beside it are all the table, the server, tools.json, the
README's tables and docs/tools.md need; the rest is derived (`aims-billing-mcp tools-json`)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import pytest
from pydantic import Field

from aims_billing_mcp.app import build_server
from aims_billing_mcp.models import CustomerId
from aims_billing_mcp.services.subscriptions_models import BillingStatus
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.tools import FAMILIES, TOOLS, registry, tool
from aims_billing_mcp.tools.context import ToolContext, services
from aims_billing_mcp.tools.docs import render

ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.anyio


def scratch_family(monkeypatch: pytest.MonkeyPatch, module_name: str, name: str = "list_scratch_subscriptions"
                   ) -> ModuleType:
    """A family module with one new read-only tool, declared the way a real one is; the registry is restored after."""
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    family = ModuleType(module_name)

    async def list_scratch_subscriptions(
        ctx: ToolContext,
        customer: Annotated[CustomerId, Field(description="Customer (cus_...)")],
        limit: Annotated[int, Field(ge=1, le=100, description="How many, newest first")] = 10,
    ) -> BillingStatus:
        """A customer's subscriptions, newest first. Read-only."""
        return await services(ctx).subscriptions.get_billing_status(customer)

    list_scratch_subscriptions.__module__, list_scratch_subscriptions.__name__ = module_name, name
    setattr(family, name, tool("List subscriptions", "read")(list_scratch_subscriptions))
    return family


async def test_a_new_read_only_tool_is_registered_listed_and_documented_from_its_declaration_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    specs = registry.collect((*FAMILIES, scratch_family(monkeypatch, "tests.tools.scratch")))
    assert specs[:-1] == TOOLS and (specs[-1].name, specs[-1].toolset) == ("list_scratch_subscriptions", "scratch")
    server = build_server(Settings(_env_file=None), tools=list(specs))  # type: ignore[call-arg]
    listed = {tool.name: tool for tool in await server.list_tools()}
    assert listed["list_scratch_subscriptions"].annotations.read_only_hint is True  # type: ignore[union-attr]
    manifest: dict[str, Any] = {"tools": [tool.model_dump(mode="json", by_alias=True, exclude_none=True)
                                          for tool in listed.values()]}
    readme, examples = render(specs, manifest, (ROOT / "README.md").read_text(),
                              (ROOT / "docs" / "tools.md").read_text())
    assert ("| `list_scratch_subscriptions` | a customer's subscriptions, newest first | **`customer`**, `limit` "
            "| read-only |") in readme
    assert f"| `all` | {len(TOOLS) + 1} |" in readme and "| `scratch` | 1 |" in readme
    assert '- `list_scratch_subscriptions` `{"customer": "..."}` → (no recorded answer yet' in examples


def test_a_tool_declared_in_a_module_left_out_of_the_families_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    scratch_family(monkeypatch, "aims_billing_mcp.tools.scratch")
    with pytest.raises(RuntimeError, match=r"aims_billing_mcp\.tools\.scratch\.list_scratch_subscriptions.*FAMILIES"):
        registry.collect(FAMILIES)


def test_two_tools_of_one_name_in_two_families_stop_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    family = scratch_family(monkeypatch, "tests.tools.scratch", name="list_tiers")
    with pytest.raises(RuntimeError, match=r"\['list_tiers'\] are declared twice"):
        registry.collect((*FAMILIES, family))


def test_the_table_is_the_declared_tools_of_the_families_in_order() -> None:
    assert [spec.toolset for spec in TOOLS] == sorted((spec.toolset for spec in TOOLS),
                                                      key=[family.__name__.rsplit(".", 1)[-1]
                                                           for family in FAMILIES].index)
    assert len({spec.name for spec in TOOLS}) == len(TOOLS)


def test_tools_json_rewrites_the_derived_tables_beside_it_and_leaves_the_rest_alone(tmp_path: Path) -> None:
    from aims_billing_mcp.cli import main

    readme, examples = (ROOT / "README.md").read_text(), (ROOT / "docs" / "tools.md").read_text()
    unwritten = examples.replace("- `list_tiers` `", "- list_tiers `")  # its example is not written yet
    (tmp_path / "docs").mkdir()
    drifted = readme.replace("| `all` | ", "| `all` | 1").replace("| `list_tiers` |", "| x |")
    (tmp_path / "README.md").write_text(drifted)
    (tmp_path / "docs" / "tools.md").write_text(unwritten)
    assert main(["tools-json", "--output", str(tmp_path / "tools.json")]) == 0
    assert (tmp_path / "README.md").read_text() == readme
    skeleton = ("- `list_tiers` `{}` → (no recorded answer yet: call it on the sandbox and move the call and its "
                "answer above this block)\n")
    assert (tmp_path / "docs" / "tools.md").read_text() == unwritten.replace(
        "<!-- examples:start -->\n", "<!-- examples:start -->\n" + skeleton)


async def test_the_output_schemas_a_client_in_memory_starts_with_are_the_ones_the_server_lists(
        client: Any) -> None:
    """The suite's clients connected in memory are given their server's output schemas when they connect
    (tests/conftest.py `output_schemas_read_from_the_in_memory_server`) instead of listing before the first call:
    those must be exactly what the listing says, for every tool, so every result is validated as an agent's would be."""
    given = dict(client.session._tool_output_schemas)
    listed = {tool.name: tool.output_schema for tool in (await client.list_tools()).tools}
    assert given == listed and len(listed) >= 40
    assert all(schema is not None for schema in listed.values())  # every tool's result is validated
