"""The MCP server: `build_server(settings)` registers the allowed tools and the HTTP routes (routes.py), builds
the service graph in its lifespan (state.py) and runs the background tasks (tasks.py); every call gets the same
error shape (shaping.py) and an audit row.

`BillingServer.call_tool` is the one place a call is observed end to end: it sees the raw arguments (before the
SDK validates them), so invalid input is audited and answered in our error shape too, not only the calls that reach
a tool function.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.tools import Tool
from mcp.types import CallToolResult

from . import __version__
from .http_guard import HttpPolicy
from .http_transport import companion_server
from .redact import audit_arguments
from .routes import build_companion_app
from .sandbox import SANDBOX_WEBHOOK_SECRET
from .services.webhook_events import ENABLED_EVENTS
from .settings import Settings
from .shaping import VALIDATED, StrictlyValidated, error_result, masked_result, refuse_loose_arguments, to_billing_error
from .state import AppState, open_state
from .store import Store, monotonic_ms, utc_now
from .store.audit import AuditEntry
from .stripe_gateway import last_request_ids
from .tasks import background_tasks
from .tools import TOOLS, ToolSpec, select_tools

INSTRUCTIONS = """Billing tools backed by Stripe (or an offline Stripe sandbox when no key is configured).
Sell and collect: products, prices, payment links, checkout sessions, subscriptions on the 3-6-9 tiers
(list_tiers, create_subscription_checkout, get_billing_status, cancel_subscription). Meter usage with
create_meter_event (LUC units, task multipliers, tier allowance and overage). Agents hold LUC in wallets
(credit/debit/transfer/hold/capture).
Amounts are integers in minor units (cents for usd); usage and LUC are integers. Creating Stripe objects takes an
optional idempotency_key (the same key, or the same arguments within a few minutes, returns the first result with
replayed: true); wallet tools require one. dry_run: true shows the exact Stripe request without sending it.
Errors come back as isError results whose text names the field or cause and what to do next."""


class BillingServer(MCPServer[AppState]):
    """MCPServer with one error shape and an audit row for every tool call."""

    read_only_tools: frozenset[str] = frozenset()
    http_policy: HttpPolicy = HttpPolicy()
    state: AppState | None = None

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[AppState, Any] | None = None
    ) -> Any:
        start = time.perf_counter()
        request_ids: list[str] = []
        token = last_request_ids.set(request_ids)
        outcome, error_code = "ok", None
        validated = None
        try:
            validated = VALIDATED.set(self._refuse_loose_arguments(name, arguments))
            result = await super().call_tool(name, arguments, context)
            if isinstance(result, CallToolResult):
                result = masked_result(result)
            if isinstance(result, CallToolResult) and isinstance(result.structured_content, dict):
                content = result.structured_content
                if result.is_error:  # a tool's own isError answer, e.g. an x402 challenge
                    outcome, error_code = "error", "payment_required" if "accepts" in content else "tool_error"
                elif content.get("replayed"):
                    outcome = "replayed"
                elif content.get("dry_run"):
                    outcome = "dry_run"
            return result
        except Exception as exc:  # every failure becomes an isError result, never a crash of the server
            error = to_billing_error(name, exc, takes_idempotency_key=self._takes(name, "idempotency_key"))
            outcome, error_code = "error", error.code
            return error_result(name, error)
        finally:
            if validated is not None:
                VALIDATED.reset(validated)
            last_request_ids.reset(token)
            state = _state(context)
            if state is not None:
                audit(state.store, name, arguments, outcome, error_code, monotonic_ms(start), request_ids,
                      caller=_caller_name(context), read_only=name in self.read_only_tools)

    async def run_stdio_async(self) -> None:
        """Stdio, with every frame answered: see stdio_guard (the SDK's reader drops what it cannot parse)."""
        from .stdio_guard import guarded_stdio_server

        async with guarded_stdio_server() as (read_stream, write_stream):
            await self._lowlevel_server.run(read_stream, write_stream,
                                            self._lowlevel_server.create_initialization_options())

    def _takes(self, name: str, parameter: str) -> bool:
        tool = self._tool_manager.get_tool(name)
        return tool is not None and parameter in tool.parameters.get("properties", {})

    def _refuse_loose_arguments(self, name: str, arguments: dict[str, Any]) -> tuple[dict[str, Any],
                                                                                     dict[str, Any]] | None:
        tool = self._tool_manager.get_tool(name)
        return (arguments, refuse_loose_arguments(tool, arguments)) if tool is not None else None




def settle_heap() -> None:
    """Once the server is built: move everything alive (the modules, the tools' schemas, the pricing: the bulk of
    the heap, all of it kept until exit) to the collector's permanent generation. A full collection otherwise walks
    all of it each time, and they come due as a stream of events or requests promotes its objects: a few
    microseconds an event in bench/ingest.py, batches of 500. No collection first: it would add ~70 ms to start-up
    for the little garbage the imports leave (frozen with the rest, never freed)."""
    gc.freeze()


def audit(
    store: Store, tool: str, arguments: dict[str, Any], outcome: str, error_code: str | None, duration_ms: float,
    request_ids: list[str], *, caller: str | None, read_only: bool = False,
) -> None:
    """Queue the audit row without waiting, off the call's latency. A read-only call's row is deferred to share a
    commit (a crash may lose the last DEFER_SECONDS of read rows, never a write's)."""
    entries = (AuditEntry(utc_now(), tool, caller, audit_arguments(arguments), outcome, error_code, duration_ms,
                          ",".join(request_ids) or None),)
    audit_log = store.audit
    (store.defer if read_only else store.submit)(lambda tx: audit_log.append(tx, entries))


def _state(context: Context[AppState, Any] | None) -> AppState | None:
    try:
        return context.request_context.lifespan_context if context is not None else None
    except (AttributeError, ValueError, LookupError):
        return None


def _caller_name(context: Context[AppState, Any] | None) -> str | None:
    """Who called, as far as the transport tells: the client's declared name (and HTTP vs stdio/in-memory)."""
    if context is None:
        return None
    try:
        params = context.session.client_params
        name = params.client_info.name if params is not None else None
    except (AttributeError, ValueError, LookupError):
        name = None
    transport = "http" if context.headers is not None else "local"
    return f"{transport}:{name}" if name else transport


def build_server(
    settings: Settings,
    *,
    sandbox_app: Any = None,
    retry_delay_scale: float = 1.0,
    tools: list[ToolSpec] | None = None,
    webhook_server: bool = False,
) -> BillingServer:
    """The server every transport and the demo use. `tools` overrides the settings' selection (tools-json);
    `webhook_server` runs the companion webhook endpoint on 127.0.0.1 beside a stdio server."""

    @asynccontextmanager
    async def lifespan(_: MCPServer[AppState]) -> AsyncIterator[AppState]:
        async with open_state(settings, sandbox_app=sandbox_app, retry_delay_scale=retry_delay_scale) as state:
            server.state = state
            embedded = state.gateway.embedded
            if embedded is not None:  # the in-process sandbox delivers its signed events straight to our routes
                embedded.when_ready(lambda app: app.state.sandbox.webhooks.configure(  # signed with what we verify
                    build_companion_app(lambda: server.state), secret=state.webhook_secret or SANDBOX_WEBHOOK_SECRET,
                    retry_delay_scale=retry_delay_scale, enabled_events=ENABLED_EVENTS))
            try:
                async with AsyncExitStack() as stack:
                    if webhook_server:
                        await stack.enter_async_context(
                            companion_server(lambda: server.state, settings.aims_billing_webhook_port,
                                             policy=server.http_policy))
                    await stack.enter_async_context(
                        background_tasks(state, flush_interval_seconds=settings.aims_billing_flush_interval_seconds))
                    yield state
            finally:
                if embedded is not None and embedded.ready:  # in-flight sandbox events land while routes have state
                    sandbox = embedded.app.state.sandbox
                    await anyio.to_thread.run_sync(lambda: sandbox.webhooks.drain(timeout=5))
                server.state = None

    server = BillingServer(
        "aims-billing-mcp",
        title="AIMS billing",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        log_level=settings.aims_billing_log_level.upper(),  # type: ignore[arg-type]
    )
    selected = tools if tools is not None else select_tools(settings)
    for spec in selected:
        register(server, spec)
    server.read_only_tools = frozenset(spec.name for spec in selected if spec.permission == "read")
    server.http_policy = HttpPolicy.from_settings(settings)  # read-only and the allow-list on the HTTP surfaces
    return server


def register(server: MCPServer[Any], spec: ToolSpec) -> None:
    """Add the tool, built once per process (`built_tool`) and shared by every server the process builds."""
    server._tool_manager._tools[spec.name] = built_tool(spec)


@functools.cache
def built_tool(spec: ToolSpec) -> Tool:
    """The tool's models and published schemas, without pydantic's per-property `title`s (a field's name says the
    same: they were 17% of tools/list); validation uses the models, not these dicts, so nothing else changes.
    Building one costs milliseconds of pydantic work and depends on the spec alone, so it is done once: the test
    suite builds hundreds of servers. Nothing mutates a built tool afterwards."""
    tool = Tool.from_function(spec.fn, name=spec.name, title=spec.title, annotations=spec.annotations)
    metadata = tool.fn_metadata  # arguments validated once, strictly (shaping.py: StrictlyValidated)
    tool.fn_metadata = StrictlyValidated.model_construct(**{field: getattr(metadata, field)
                                                            for field in type(metadata).model_fields})
    tool.parameters = without_titles(tool.parameters)
    if tool.fn_metadata.output_schema is not None:
        tool.fn_metadata.output_schema = without_titles(tool.fn_metadata.output_schema)
    return tool


def without_titles(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {key: without_titles(value) for key, value in schema.items()
                if not (key == "title" and isinstance(value, str))}
    if isinstance(schema, list):
        return [without_titles(value) for value in schema]
    return schema


def all_tools() -> list[ToolSpec]:
    return list(TOOLS)

