"""The documents derived from the tool table, written by `aims-billing-mcp tools-json` beside tools.json: the README's
tool table and tool-set sizes, and a skeleton example in docs/tools.md for a tool that has no hand-written one yet.
Each is the text between a pair of markers (`<!-- tools:start -->` ... `<!-- tools:end -->`); the rest of the file
is left alone. tests/test_docs.py renders them in memory and compares.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .registry import ToolSpec

FIX = "run `aims-billing-mcp tools-json`"
QUIET = ("idempotency_key", "dry_run")  # every creating tool takes them (the README says so once): listed if required


def between(text: str, name: str, body: str) -> str:
    """`text` with what lies between `<!-- name:start -->` and `<!-- name:end -->` replaced by `body`."""
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    head, found, rest = text.partition(start)
    if not found or end not in rest:
        raise ValueError(f"the markers {start.strip()} ... {end} are missing")
    return head + start + body + rest[rest.index(end):]


def tool_sizes(specs: tuple[ToolSpec, ...], manifest: dict[str, Any]) -> dict[str, tuple[int, float]]:
    """Tools and KB of compact tools/list JSON per tool set (and for all of them)."""
    family = {spec.name: spec.toolset for spec in specs}
    sizes = {}
    for toolset in ("all", *dict.fromkeys(family.values())):
        chosen = [tool for tool in manifest["tools"] if toolset == "all" or family[tool["name"]] == toolset]
        sizes[toolset] = (len(chosen), round(len(json.dumps({"tools": chosen}, separators=(",", ":"))) / 1024, 1))
    return sizes


def toolsets_table(specs: tuple[ToolSpec, ...], manifest: dict[str, Any]) -> str:
    rows = [f"| `{name}` | {count} | {kb} KB |\n" for name, (count, kb) in tool_sizes(specs, manifest).items()]
    return "| tool set | tools | `tools/list` |\n|---|---|---|\n" + "".join(rows)


def summary_of(spec: ToolSpec, tool: dict[str, Any]) -> str:
    if spec.summary is not None:
        return spec.summary
    first = re.split(r"(?<=[^.])\.\s", " ".join(tool.get("description", "").split()), maxsplit=1)[0].rstrip(".")
    return first[:1].lower() + first[1:]


def params_of(spec: ToolSpec, tool: dict[str, Any]) -> str:
    if spec.params is not None:
        return spec.params
    schema = tool["inputSchema"]
    required = set(schema.get("required", []))
    cells = [f"**`{name}`**" if name in required else f"`{name}`" for name in schema.get("properties", {})
             if name in required or name not in QUIET]
    return ", ".join(cells) or "none"


def hints_of(spec: ToolSpec) -> str:
    if spec.hints is not None:
        return spec.hints
    parts = ["read-only" if spec.permission == "read" else "write"]
    if spec.destructive:
        parts.append("**destructive**")
    elif spec.permission == "write" and spec.idempotent:
        parts.append("idempotent")
    if not spec.open_world:
        parts.append("local")
    return ", ".join(parts)


def tools_table(specs: tuple[ToolSpec, ...], manifest: dict[str, Any]) -> str:
    tools = {tool["name"]: tool for tool in manifest["tools"]}
    rows = [f"| `{spec.name}` | {summary_of(spec, tools[spec.name])} | {params_of(spec, tools[spec.name])} "
            f"| {hints_of(spec)} |\n" for spec in specs if spec.name in tools]
    return "| tool | what it does | key parameters | annotations |\n|---|---|---|---|\n" + "".join(rows)


def skeleton(tool: dict[str, Any]) -> str:
    """A call with the required arguments, for a tool whose example is not written yet."""
    blank = {"integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}
    properties = tool["inputSchema"].get("properties", {})
    arguments = {name: blank.get(properties[name].get("type", ""), "...")
                 for name in tool["inputSchema"].get("required", [])}
    return (f"- `{tool['name']}` `{json.dumps(arguments)}` → (no recorded answer yet: call it on the sandbox and move "
            "the call and its answer above this block)\n")


def skeletons(manifest: dict[str, Any], tools_md: str) -> str:
    written = between(tools_md, "examples", "")
    return "".join(skeleton(tool) for tool in manifest["tools"]
                   if f"- `{tool['name']}` `" not in written and f"run, `{tool['name']}` `" not in written)


def render(specs: tuple[ToolSpec, ...], manifest: dict[str, Any], readme: str, tools_md: str) -> tuple[str, str]:
    """The README and docs/tools.md with their derived parts brought up to date with the tools."""
    readme = between(readme, "toolsets", toolsets_table(specs, manifest))
    readme = between(readme, "tools", tools_table(specs, manifest))
    return readme, between(tools_md, "examples", skeletons(manifest, tools_md))
