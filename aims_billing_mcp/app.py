"""Wiring: build the MCP server from settings (lifespan: store, gateway, services), register the allowed tools,
and give every call the same error shape and an audit row.

`BillingServer.call_tool` is the one place a call is observed end to end: it sees the raw arguments (before the
SDK validates them), so invalid input is audited and answered in our error shape too, not only the calls that reach
a tool function.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.types import CallToolResult, TextContent
from pydantic import ValidationError

from . import __version__, jsonsafe
from .acp_http import acp_routes
from .errors import BillingError, InvalidInput
from .http_guard import INGEST_PATH, HttpPolicy
from .ingest_http import ingest_handler
from .redact import audit_arguments, may_hold_secret, redact, redact_text, redact_values
from .sandbox import SANDBOX_WEBHOOK_SECRET
from .services.acp import AcpService
from .services.audit import prune_audit
from .services.catalog import CatalogService
from .services.ceiling import Ceiling
from .services.commerce import PaymentSessionService
from .services.connect import ConnectService
from .services.idempotency import IdempotencyService
from .services.ledger import LedgerService
from .services.meter_flusher import MeterFlusher
from .services.metering import MeteringService
from .services.mutations import StripeMutations
from .services.prepaid import PrepaidSubscriptions
from .services.subscriptions import SubscriptionService
from .services.tiers import Pricing
from .services.webhook_events import WebhookEventService
from .services.x402 import X402Service
from .settings import Settings, StripeMode
from .store import Store, monotonic_ms, utc_now
from .stripe_gateway import build_gateway, last_request_ids
from .tools import TOOLS, ToolSpec, select_tools
from .tools.context import AppState
from .webhooks import WEBHOOK_PATH, build_webhook_app, webhook_handler
from .x402_http import CREDITS_PATH, credits_handler

log = logging.getLogger(__name__)
AUDIT_PRUNE_SECONDS = 86_400.0

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
        try:
            self._refuse_loose_arguments(name, arguments)
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

    def _refuse_loose_arguments(self, name: str, arguments: dict[str, Any]) -> None:
        """Parse the raw arguments strictly before the SDK's lax validation sees them: a misspelt argument
        (`amout`) silently ignored could bill the wrong thing, and lax pydantic takes `true`, `"7"` and `3.0` as
        the integer 1, 7 and 3. Money is never read from a boolean or a string, so both are refused here, naming
        the field; what passes is then validated (to the same values) by the SDK."""
        tool = self._tool_manager.get_tool(name)
        if tool is None:
            return
        properties = tool.parameters.get("properties", {})
        unknown = sorted(set(arguments) - set(properties))
        if unknown:
            raise InvalidInput(
                f"unknown argument(s) {unknown} for {name}: it takes {sorted(properties)}", param=unknown[0]
            )
        for key, value in arguments.items():
            if isinstance(value, bool) and "boolean" not in _json_types(properties[key]):
                raise InvalidInput(f"{key}: must be {_describe(properties[key])}, not a boolean", param=key)
            _refuse_unreadable_value(key, value)
        metadata = tool.fn_metadata
        try:
            metadata.arg_model.model_validate_json(_json_for_strict_check(metadata.pre_parse_json(arguments)),
                                                   strict=True)
        except ValidationError as exc:
            raise invalid_arguments(name, exc, properties) from exc


MAX_NESTING = 32
UNREADABLE = {"too_deep": f"nested more than {MAX_NESTING} levels deep; no parameter takes that",
              "surrogate": "contains a lone surrogate (not valid Unicode): send UTF-8 text",
              "surrogate_key": "has a field name with a lone surrogate (not valid Unicode): send UTF-8 text"}


def _refuse_unreadable_value(key: str, value: Any) -> None:
    """Text that is not valid Unicode (a lone surrogate cannot be stored or sent to Stripe) and nesting deeper than
    any parameter has are refused here, naming the field."""
    found = jsonsafe.first_unreadable(value, MAX_NESTING)
    if found is not None:
        raise InvalidInput(f"{key}: {UNREADABLE[found.kind]}", param=key)


def _json_types(schema: dict[str, Any]) -> set[str]:
    """The JSON types a property's schema admits (through anyOf/oneOf and enum values)."""
    types: set[str] = set()
    kind = schema.get("type")
    types.update([kind] if isinstance(kind, str) else kind or [])
    if "enum" in schema:
        types.update("boolean" if isinstance(v, bool) else type(v).__name__ for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key, []):
            types |= _json_types(option)
    return types


def _describe(schema: dict[str, Any]) -> str:
    types = sorted(_json_types(schema) - {"null"})
    return " or ".join("an integer" if t == "integer" else f"a {t}" for t in types) or "a value of its schema"


def _json_for_strict_check(arguments: dict[str, Any]) -> str:
    """JSON for pydantic's strict JSON mode (which keeps str -> enum/URL but refuses str/bool/float -> int). Values
    json cannot write (a lone surrogate is fine, but NaN is written as NaN) stay as they are for the field check."""
    return json.dumps(arguments, default=str)


def to_billing_error(tool: str, exc: Exception, *, takes_idempotency_key: bool = False) -> BillingError:
    cause = exc.__cause__ if isinstance(exc, ToolError) else exc
    if isinstance(cause, BillingError):
        return cause
    if isinstance(cause, ValidationError):
        return invalid_arguments(tool, cause)
    if isinstance(exc, UnexpectedToolError) or not isinstance(exc, ToolError):
        log.error("tool %s crashed", tool, exc_info=cause)
        retry = ("retry with the same idempotency_key (a retried call never creates a second object)"
                 if takes_idempotency_key else "retry the call")
        return BillingError(
            f"{tool} failed with an internal error ({type(cause).__name__}): {retry}, or report it to the operator "
            "(details are in the server log)"
        )
    return InvalidInput(str(exc))  # unknown tool and other SDK-level refusals keep the SDK's words


RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal", "string_too_long",
                          "string_too_short", "too_long", "too_short"})


def invalid_arguments(tool: str, error: ValidationError,
                      properties: dict[str, Any] | None = None) -> InvalidInput:
    """Name every bad field and what it needs, in one line each; a value out of range also gets the field's own
    description (which states the rule, e.g. "within the past 35 days"), so the agent knows what would pass."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "arguments"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "is required"
        elif item["type"] == "extra_forbidden":
            message = "is not a parameter of this tool"
        described = (properties or {}).get(str(item["loc"][0]) if item["loc"] else "", {}).get("description")
        if item["type"] in RANGE_ERRORS and described:
            message = f"{message} ({described})"
        problems.append(f"{field}: {message}")
    first = ".".join(str(part) for part in error.errors()[0]["loc"]) if error.errors() else None
    return InvalidInput(f"invalid arguments for {tool}: " + "; ".join(problems) + ". Fix them and call again.",
                        param=first)


def error_result(tool: str, error: BillingError) -> CallToolResult:
    message = redact_text(error.message)
    return CallToolResult(
        content=[TextContent(type="text", text=f"{tool} failed: {message}")],
        structured_content={"error": redact(error.to_dict())},
        is_error=True,
    )


def masked_result(result: CallToolResult) -> CallToolResult:
    """A successful result with any secret it echoes masked (a dry run shows what an agent passed, a Stripe object
    what it was given); a regex pass only when a candidate substring is present."""
    structured = result.structured_content
    seen = "".join([c.text for c in result.content if isinstance(c, TextContent)])
    if not may_hold_secret(seen if structured is None else seen + json.dumps(structured, default=str)):
        return result
    content = [c.model_copy(update={"text": redact_text(c.text)}) if isinstance(c, TextContent) else c
               for c in result.content]
    return result.model_copy(update={"content": content, "structured_content": redact_values(structured)})


def audit(
    store: Store, tool: str, arguments: dict[str, Any], outcome: str, error_code: str | None, duration_ms: float,
    request_ids: list[str], *, caller: str | None, read_only: bool = False,
) -> None:
    """Queue the audit row without waiting, off the call's latency. A read-only call's row is deferred to share a
    commit (a crash may lose the last DEFER_SECONDS of read rows, never a write's)."""
    row = (utc_now(), tool, caller, audit_arguments(arguments), outcome, error_code, duration_ms,
           ",".join(request_ids) or None)
    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO audit_log (at, tool, caller, arguments, outcome, error_code, duration_ms, request_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)

    (store.defer if read_only else store.submit)(write)


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


def build_state(settings: Settings, *, sandbox_app: Any = None, retry_delay_scale: float = 1.0) -> AppState:
    pricing = Pricing.load(settings.aims_billing_pricing)
    store = Store(settings.aims_billing_db)
    gateway = build_gateway(settings, sandbox_app=sandbox_app, retry_delay_scale=retry_delay_scale)
    idempotency = IdempotencyService(store, replay_window_seconds=settings.aims_billing_replay_window_seconds)
    mutations = StripeMutations(gateway, idempotency)
    ceiling = Ceiling.from_settings(settings)  # one per-call money ceiling for every path (services/ceiling.py)
    subscriptions = SubscriptionService(mutations, store, pricing, settings, ceiling=ceiling)
    secret = settings.stripe_webhook_secret.get_secret_value() if settings.stripe_webhook_secret else None
    if secret is None and gateway.mode is StripeMode.SANDBOX:
        secret = SANDBOX_WEBHOOK_SECRET
    def agent_limit(customer: str) -> int | None:
        tier = subscriptions.entitled_tier(customer)
        return settings.aims_billing_p2p_agents if tier.id == pricing.p2p.id else tier.agents

    ledger = LedgerService(store, luc_per_usd=pricing.luc_per_usd, agent_limit=agent_limit, ceiling=ceiling)
    x402 = X402Service.from_settings(store, ledger, gateway, pricing, settings)
    metering = MeteringService(store, pricing, tier_of=subscriptions.entitled_tier,
                               period_of=subscriptions.usage_period, customer_exists=subscriptions.customer_exists,
                               ceiling=ceiling)
    prepaid = PrepaidSubscriptions(store, gateway, subscriptions, pricing, retry_delay_scale=retry_delay_scale)
    connect = ConnectService(store, mutations)
    x402.connect = connect
    commerce = PaymentSessionService(store, mutations, ledger, pricing, prepaid=prepaid, connect=connect)
    acp = AcpService(store, commerce, pricing,
                     api_keys={key.get_secret_value() for key in settings.aims_billing_acp_api_keys},
                     public_url=settings.aims_billing_public_url,
                     signing_secret=settings.aims_billing_acp_signing_secret,
                     order_webhook_url=settings.aims_billing_acp_order_webhook_url,
                     order_webhook_secret=settings.aims_billing_acp_order_webhook_secret,
                     retry_delay_scale=retry_delay_scale)
    return AppState(
        ledger=ledger, x402=x402, commerce=commerce, acp=acp, connect=connect,
        metering=metering,
        flusher=MeterFlusher(store, gateway, retry_delay_scale=retry_delay_scale, currency=pricing.currency),
        settings=settings, store=store, gateway=gateway, idempotency=idempotency,
        catalog=CatalogService(mutations, ceiling=ceiling, connect=connect), pricing=pricing,
        subscriptions=subscriptions, webhook_events=WebhookEventService(store, subscriptions, commerce, connect),
        webhook_secret=secret,
    )


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
        state = build_state(settings, sandbox_app=sandbox_app, retry_delay_scale=retry_delay_scale)
        server.state = state
        embedded = state.gateway.embedded
        if embedded is not None:  # the in-process sandbox delivers its signed events straight to our endpoint
            embedded.when_ready(lambda app: app.state.sandbox.webhooks.configure(  # signed with what we verify with
                build_webhook_app(lambda: server.state), secret=state.webhook_secret or SANDBOX_WEBHOOK_SECRET,
                retry_delay_scale=retry_delay_scale))
        try:
            async with AsyncExitStack() as stack:
                if webhook_server:
                    await stack.enter_async_context(
                        companion_webhook_server(lambda: server.state, settings.aims_billing_webhook_port,
                                                 policy=server.http_policy))
                await stack.enter_async_context(
                    background_tasks(state, flush_interval_seconds=settings.aims_billing_flush_interval_seconds))
                yield state
        finally:
            if embedded is not None and embedded.ready:  # in-flight sandbox events land while the endpoint has state
                sandbox = embedded.app.state.sandbox
                await anyio.to_thread.run_sync(lambda: sandbox.webhooks.drain(timeout=5))
            server.state = None
            await state.gateway.close()
            state.store.close()

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
    server.custom_route(WEBHOOK_PATH, methods=["POST"])(webhook_handler(lambda: server.state))
    server.custom_route(CREDITS_PATH, methods=["GET"])(credits_handler(lambda: server.state))
    for route in acp_routes(lambda: server.state):
        server.custom_route(route.path, methods=sorted(route.methods or ()))(route.endpoint)
    server.custom_route(INGEST_PATH, methods=["POST"])(ingest_handler(lambda: server.state))
    return server


@asynccontextmanager
async def background_tasks(
    state: AppState, *, flush_interval_seconds: float, interval_seconds: float = 60.0
) -> AsyncIterator[None]:
    """What runs while the server serves: the meter flusher delivering usage to Stripe (0 turns it off: run
    `aims-billing-mcp flush-usage` instead), expired holds written down (they already stopped counting), and audit
    rows past their retention pruned (at start and then daily)."""

    async def sweep_holds() -> None:
        last_prune = 0.0
        while True:
            try:
                if time.monotonic() - last_prune >= AUDIT_PRUNE_SECONDS or not last_prune:
                    last_prune = time.monotonic()
                    await anyio.to_thread.run_sync(functools.partial(
                        prune_audit, state.store, retention_days=state.settings.aims_billing_audit_retention_days))
            except Exception:  # housekeeping must never take the server down; the next round retries
                log.exception("pruning the audit log failed")
            await anyio.sleep(interval_seconds)
            try:
                await state.ledger.sweep_expired_holds()
                await state.x402.sweep_expired_quotes()
            except Exception:  # housekeeping must never take the server down; the next round retries
                log.exception("sweeping expired holds failed")

    webhooks, prepaid = state.acp.order_webhooks, state.commerce.prepaid
    if webhooks is not None:
        webhooks.resume()  # ACP order events a previous run committed but did not deliver
    if prepaid is not None:
        prepaid.resume()  # prepaid subscriptions paid for but not yet started in Stripe
    state.acp.resume_refunds()  # ACP payments a checkout could not take, recorded as to refund but not refunded

    async def reconcile_payments() -> None:  # confirms a crash cut off before their outcome was recorded
        try:
            await state.commerce.reconcile()
        except Exception:
            log.exception("reconciling unrecorded PaymentIntents failed; the next start-up retries")

    async with anyio.create_task_group() as tg:
        tg.start_soon(sweep_holds)
        tg.start_soon(reconcile_payments)
        if flush_interval_seconds > 0:
            tg.start_soon(state.flusher.run, flush_interval_seconds)
        try:
            yield
        finally:
            with anyio.move_on_after(5):  # work in flight gets a moment; the rest resumes at the next start
                if prepaid is not None:
                    await prepaid.drain()
                if webhooks is not None:
                    await webhooks.drain()
                await state.acp.drain()
            await state.acp.refunds.stop()
            for outbox in (prepaid, webhooks):
                if outbox is not None:
                    await outbox.background.stop()
            tg.cancel_scope.cancel()


@asynccontextmanager
async def companion_webhook_server(get_state: Callable[[], AppState | None], port: int, *,
                                   policy: HttpPolicy | None = None) -> AsyncIterator[None]:
    """The webhook endpoint on 127.0.0.1:port beside a stdio server. A taken port is reported on stderr and the MCP
    server keeps serving: tools work, events wait in Stripe's retry queue until the endpoint is reachable.
    Only the bind happens before MCP serves (so a taken port is reported at once); uvicorn loads in the background,
    off the time to the first tools/list (the kernel queues connections on the bound socket meanwhile)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        print(f"aims-billing-mcp: webhook port {port} is taken ({exc.strerror}): set AIMS_BILLING_WEBHOOK_PORT to a "
              "free port, or run `serve --no-webhooks`; continuing without the webhook endpoint", file=sys.stderr)
        yield
        return
    sock.listen(128)
    print(f"aims-billing-mcp: webhooks on http://127.0.0.1:{sock.getsockname()[1]}{WEBHOOK_PATH}", file=sys.stderr)
    servers: list[Any] = []

    async def serve() -> None:
        import uvicorn

        web = uvicorn.Server(uvicorn.Config(build_webhook_app(get_state, with_acp_mcp=True, policy=policy),
                                            log_level="warning", lifespan="on"))
        servers.append(web)
        await web.serve(sockets=[sock])

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        try:
            yield
        finally:
            for web in servers:
                web.should_exit = True
            if not servers:
                tg.cancel_scope.cancel()


def register(server: MCPServer[Any], spec: ToolSpec) -> None:
    """Add the tool, its published schemas without pydantic's per-property `title`s (a field's name says the same:
    they were 17% of tools/list); validation uses the models, not these dicts, so nothing else changes."""
    server.add_tool(spec.fn, name=spec.name, title=spec.title, annotations=spec.annotations)
    added = server._tool_manager.get_tool(spec.name)
    if added is not None:
        added.parameters = without_titles(added.parameters)
        if added.fn_metadata.output_schema is not None:
            added.fn_metadata.output_schema = without_titles(added.fn_metadata.output_schema)


def without_titles(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {key: without_titles(value) for key, value in schema.items()
                if not (key == "title" and isinstance(value, str))}
    if isinstance(schema, list):
        return [without_titles(value) for value in schema]
    return schema


def all_tools() -> list[ToolSpec]:
    return list(TOOLS)

