"""What a tool reaches through its Context: the services the server's lifespan built (state.py's AppState)."""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import Context

from ..state import AppState

ToolContext = Context[AppState, Any]


def services(ctx: ToolContext) -> AppState:
    return ctx.request_context.lifespan_context
