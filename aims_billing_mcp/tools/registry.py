"""Registration beside the tool: `@tool(title, permission, ...)` records a function's ToolSpec, and `collect` builds
the table from the family modules in their order, each module's tools in definition order (the order of tools/list
and tools.json).

A tool's README row is derived from its spec and published schema (tools/docs.py); `summary`, `params` and `hints`
override the derived cells where the hand-written text says more (a parameter's shape, what "idempotent" means).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import FunctionType, ModuleType
from typing import Any, Literal, TypeVar

from mcp.types import ToolAnnotations

Permission = Literal["read", "write"]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ToolSpec:
    fn: Callable[..., Any]
    title: str
    permission: Permission
    destructive: bool = False
    idempotent: bool = True
    open_world: bool = True
    summary: str | None = None  # README "what it does"; default: the docstring's first sentence
    params: str | None = None  # README "key parameters"; default: the schema's properties, required in bold
    hints: str | None = None  # README "annotations"; default: from permission, destructive, idempotent, open_world

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def toolset(self) -> str:
        """The family a tool belongs to (its module: catalog, subscriptions, metering, wallets, x402, commerce)."""
        return self.fn.__module__.rsplit(".", 1)[-1]

    @property
    def annotations(self) -> ToolAnnotations:
        return ToolAnnotations(
            title=self.title,
            read_only_hint=self.permission == "read",
            destructive_hint=self.destructive,
            idempotent_hint=self.idempotent,
            open_world_hint=self.open_world,
        )


_REGISTERED: dict[Callable[..., Any], ToolSpec] = {}


def tool(
    title: str,
    permission: Permission,
    *,
    destructive: bool = False,
    idempotent: bool = True,
    open_world: bool = True,
    summary: str | None = None,
    params: str | None = None,
    hints: str | None = None,
) -> Callable[[F], F]:
    """Declare a tool: its MCP title and annotations and the permission it needs. The function is returned as is."""

    def register(fn: F) -> F:
        _REGISTERED[fn] = ToolSpec(fn, title, permission, destructive, idempotent, open_world, summary, params, hints)
        return fn

    return register


def collect(families: tuple[ModuleType, ...]) -> tuple[ToolSpec, ...]:
    """The specs of every decorated function of the families, module by module in definition order. A tool declared
    in another module of the families' package, or a name declared twice, is a start-up error, not a tool that
    silently never registers."""
    specs = tuple(
        _REGISTERED[value]
        for module in families
        for value in vars(module).values()
        if isinstance(value, FunctionType) and value.__module__ == module.__name__ and value in _REGISTERED
    )
    packages = {module.__name__.rpartition(".")[0] for module in families}
    stray = sorted(f"{spec.fn.__module__}.{spec.name}" for spec in set(_REGISTERED.values()) - set(specs)
                   if spec.fn.__module__.rpartition(".")[0] in packages)
    if stray:
        raise RuntimeError(f"tools {stray} are declared outside the families: add their module to FAMILIES "
                           f"in {sorted(packages)}")
    names = [spec.name for spec in specs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise RuntimeError(f"tool names {twice} are declared twice: a tool's name is its function's, unique across "
                           "the families")
    return specs
