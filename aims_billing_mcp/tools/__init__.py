"""The one table of tools: each with its MCP annotations and the permission it needs, declared beside the tool
function by `@tool(...)` (registry.py) and collected here from the family modules.

The tool sets (AIMS_BILLING_TOOLSETS: the families, one per module), the allow-list (AIMS_BILLING_TOOLS) and
read-only mode (AIMS_BILLING_READ_ONLY) filter this table *before* registration, so a tool that is off does not
exist for the client at all (and costs nothing in the client's tools/list).

The tool modules do not use `from __future__ import annotations`: the SDK reads each signature with
`eval_str=True` and `get_type_hints`, and string annotations made it compile and evaluate every parameter's
annotation twice per tool at start-up (14 ms of the time to the first tools/list).
"""

from __future__ import annotations

from ..errors import ConfigurationError
from ..settings import Settings
from . import catalog, commerce, connect, metering, subscriptions, wallets, x402
from .registry import Permission, ToolSpec, collect, tool

__all__ = ["FAMILIES", "TOOLS", "TOOLSETS", "Permission", "ToolSpec", "is_tool_allowed", "select_tools", "tool"]

# The tool families, in the order of tools/list and tools.json; each module's tools in definition order.
FAMILIES = (catalog, subscriptions, metering, wallets, x402, commerce, connect)

TOOLS: tuple[ToolSpec, ...] = collect(FAMILIES)


TOOLSETS: tuple[str, ...] = tuple(dict.fromkeys(spec.toolset for spec in TOOLS))


def is_tool_allowed(spec: ToolSpec, settings: Settings) -> bool:
    """Read-only mode, the tool sets and the allow-list each narrow the table; a tool must pass all three."""
    if settings.aims_billing_read_only and spec.permission != "read":
        return False
    if settings.aims_billing_toolsets and spec.toolset not in settings.aims_billing_toolsets:
        return False
    return not settings.aims_billing_tools or spec.name in settings.aims_billing_tools


def select_tools(settings: Settings, tools: tuple[ToolSpec, ...] = TOOLS) -> list[ToolSpec]:
    """The tools this configuration exposes; an unknown name in the allow-list is a start-up error, not a typo
    that silently hides a tool."""
    known = {spec.name for spec in tools}
    unknown = sorted(set(settings.aims_billing_tools) - known)
    if unknown:
        raise ConfigurationError(
            f"AIMS_BILLING_TOOLS names unknown tools {unknown}: known tools are {sorted(known)}",
            param="AIMS_BILLING_TOOLS",
        )
    unknown_sets = sorted(set(settings.aims_billing_toolsets) - {spec.toolset for spec in tools})
    if unknown_sets:
        raise ConfigurationError(
            f"AIMS_BILLING_TOOLSETS names unknown tool sets {unknown_sets}: known sets are {list(TOOLSETS)}",
            param="AIMS_BILLING_TOOLSETS",
        )
    return [spec for spec in tools if is_tool_allowed(spec, settings)]
