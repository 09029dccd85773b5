"""Contracts between the code and what users read: tools.json is what the server registers, and the README
documents every tool and every command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from aims_billing_mcp.cli import build_parser, tools_manifest
from aims_billing_mcp.tools import TOOLS
from aims_billing_mcp.tools.docs import render

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.anyio


async def test_tools_json_matches_the_registered_tools() -> None:
    committed = json.loads((ROOT / "tools.json").read_text())
    assert committed == await tools_manifest(), "tools.json drifted: run `aims-billing-mcp tools-json`"


TOOL_EXAMPLES = (ROOT / "docs" / "tools.md").read_text()


def test_the_readme_tool_tables_and_the_example_skeletons_are_derived_from_the_tools() -> None:
    """The README's tool table and tool-set sizes and docs/tools.md's skeleton examples, rendered in memory from the
    table and tools.json (which the test above holds to the server), equal the committed files."""
    manifest = json.loads((ROOT / "tools.json").read_text())
    readme, examples = render(TOOLS, manifest, README, TOOL_EXAMPLES)
    assert readme == README, "README.md's tool tables drifted from the tools: run `aims-billing-mcp tools-json`"
    assert examples == TOOL_EXAMPLES, "docs/tools.md's examples drifted: run `aims-billing-mcp tools-json`"


@pytest.mark.parametrize("name", [spec.name for spec in TOOLS])
def test_every_tool_is_documented_in_the_readme_with_an_example(name: str) -> None:
    assert f"| `{name}` |" in README, f"{name} is missing from the README's tool table"
    assert f"- `{name}` `" in TOOL_EXAMPLES or f"run, `{name}` `" in TOOL_EXAMPLES, f"{name}: no example in docs"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_the_readme_contents_list_every_section_in_order() -> None:
    sections = re.findall(r"^## (.+)$", README, re.MULTILINE)
    listed = re.findall(r"^- \[(.+?)\]\(#(.+?)\)$", README.split("## Contents", 1)[1].split("\n## ", 1)[0],
                        re.MULTILINE)
    assert [title for title, _ in listed] == [s for s in sections if s != "Contents"]
    assert all(anchor == slug(title) for title, anchor in listed)


@pytest.mark.parametrize("word", ["ACHEEVY", "LUC", "P2P", "x402", "ACP"])
def test_every_word_of_the_glossary_is_explained_before_the_tool_reference(word: str) -> None:
    glossary = README.split("## Words used here", 1)[1].split("\n## ", 1)[0]
    assert f"| **{word}** |" in glossary


TOOLS_JSON = {tool["name"]: tool for tool in json.loads((ROOT / "tools.json").read_text())["tools"]}
TABLE_ROW = re.compile(r"^\| `([a-z0-9_]+)` \| .*? \| (.*?) \| [^|]* \|$", re.MULTILINE)


@pytest.mark.parametrize("name", sorted(TOOLS_JSON))
def test_the_readme_tool_table_marks_exactly_the_required_parameters_and_names_only_real_ones(name: str) -> None:
    rows = {match.group(1): match.group(2) for match in TABLE_ROW.finditer(README)}
    cell = rows[name]
    schema = TOOLS_JSON[name]["inputSchema"]
    bold = set(re.findall(r"\*\*`([a-z_]+)`\*\*", cell))
    named = {word.split("{")[0].split("[")[0] for word in re.findall(r"`([a-z_]+[a-z_{}\[\], ]*)`", cell)}
    assert bold == set(schema.get("required", [])), f"{name}: bold {sorted(bold)} vs required {schema.get('required')}"
    unknown = {word for word in named if word not in schema.get("properties", {}) and "_" in word
               and not word.startswith(("tier_", "luc_", "pm_", "spt_", "cus_"))}
    assert not unknown, f"{name}: the table names parameters the tool does not take: {sorted(unknown)}"


def test_every_cli_command_is_documented_in_the_readme() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in commands:
        assert f"`aims-billing-mcp {command}" in README, command


QUICK_START = ('python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/aims-billing-mcp demo',
               'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/pytest')


def test_the_readme_names_the_two_setup_commands_that_ci_runs() -> None:
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in QUICK_START:
        assert command in README, command
        assert command in ci_lines, command
