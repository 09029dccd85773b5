"""The Agentic Commerce Protocol over MCP (ACP's `docs/mcp-binding.md`), served on its own endpoint, `/acp/mcp`.

Its five tools are named `create_checkout_session` ... `cancel_checkout_session`, which clash with our Stripe
catalog tool of the same name: so this is a second MCP server, never mixed with the billing one. Each tool takes the
binding's `{meta, id, payload}` arguments (meta carries the REST headers: `api_version` required, `idempotency_key`
recommended), runs the same `AcpService` operation as the REST route, and answers the `CheckoutSession` as the
result, or a JSON-RPC error -32000 whose `data` is ACP's Error object. Authentication is the connection's bearer key
(one of AIMS_BILLING_ACP_API_KEYS), never a tool argument. With a signing secret configured, `meta.signature` and
`meta.timestamp` are required and checked as the REST `Signature` / `Timestamp` headers are, over the canonical JSON
of `payload` (services/acp.py says how).
"""

import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from pydantic import Field

from . import __version__
from .services.acp import API_VERSION, SUPPORTED_VERSIONS, AcpService, signed_payload
from .services.acp_models import AcpError, AcpResponse

MCP_PATH = "/acp/mcp"
ACP_ERROR = -32000
SESSIONS = "/acp/checkout_sessions"

Meta = Annotated[dict[str, Any], Field(description="Protocol metadata from the REST headers: api_version (required, "
                                       f"{API_VERSION}), idempotency_key (recommended on create and complete), "
                                       "request_id, user_agent, accept_language, signature, timestamp")]
SessionId = Annotated[str, Field(min_length=1, max_length=128, description="The checkout session id")]
Payload = Annotated[dict[str, Any], Field(description="The ACP request body for this operation")]


def build_acp_mcp_server(get_state: Callable[[], Any]) -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer(
        "aims-billing-acp", title="AIMS ACP seller", version=__version__,
        instructions="Agentic Commerce Protocol checkout (version 2026-04-17) over MCP: create, update, complete "
        "(pay with a Stripe Shared Payment Token) and cancel checkout sessions for LUC credit packs.",
    )

    async def call(ctx: Context[Any, Any], meta: dict[str, Any], path: str,
                   operation: Callable[[AcpService, str], Awaitable[AcpResponse]], *, payload: Any,
                   post: bool) -> dict[str, Any]:
        state = get_state()
        try:
            if state is None:
                raise AcpError(503, "starting", "the server is starting: retry", type="service_unavailable")
            acp: AcpService = state.acp
            version = meta.get("api_version")
            if version not in SUPPORTED_VERSIONS:
                raise AcpError(400, "unsupported_api_version", f"meta.api_version must be one of "
                               f"{SUPPORTED_VERSIONS} (got {str(version)[:32]!r})", param="meta.api_version")
            identity = acp.authenticate((ctx.headers or {}).get("authorization"))
            signature, timestamp = meta.get("signature"), meta.get("timestamp")
            acp.verify_signature(signature if isinstance(signature, str) else None,
                                 timestamp if isinstance(timestamp, str) else None, signed_payload(payload))
            key = meta.get("idempotency_key")
            attempt = str(key) if key else uuid.uuid4().hex  # without a key, every call is its own attempt
            if post and key:
                result = await acp.idempotent(identity, path, str(key), payload,
                                              lambda: operation(acp, f"{identity}\x00{attempt}"))
            else:
                result = await operation(acp, f"{identity}\x00{attempt}")
        except AcpError as exc:
            result = exc.response()
        if result.status >= 400:
            raise MCPError(code=ACP_ERROR, message=str(result.body.get("message") or "ACP error"), data=result.body)
        body: dict[str, Any] = result.body
        return body

    @server.tool()
    async def create_checkout_session(ctx: Context[Any, Any], meta: Meta, payload: Payload) -> dict[str, Any]:
        """Create an ACP checkout session (POST /checkout_sessions)."""
        return await call(ctx, meta, SESSIONS, lambda acp, seed: acp.create(payload, seed=seed),
                          payload=payload, post=True)

    @server.tool()
    async def get_checkout_session(ctx: Context[Any, Any], meta: Meta, id: SessionId) -> dict[str, Any]:
        """Retrieve a checkout session's current state (GET /checkout_sessions/{id})."""
        return await call(ctx, meta, f"{SESSIONS}/{id}", lambda acp, _: acp.get(id), payload=None, post=False)

    @server.tool()
    async def update_checkout_session(
        ctx: Context[Any, Any], meta: Meta, id: SessionId, payload: Payload
    ) -> dict[str, Any]:
        """Update items, buyer or fulfilment details (POST /checkout_sessions/{id})."""
        return await call(ctx, meta, f"{SESSIONS}/{id}", lambda acp, _: acp.update(id, payload),
                          payload=payload, post=True)

    @server.tool()
    async def complete_checkout_session(
        ctx: Context[Any, Any], meta: Meta, id: SessionId, payload: Payload
    ) -> dict[str, Any]:
        """Pay and finalise the order (POST /checkout_sessions/{id}/complete)."""
        return await call(ctx, meta, f"{SESSIONS}/{id}/complete",
                          lambda acp, seed: acp.complete(id, payload, attempt=seed),
                          payload=payload, post=True)

    @server.tool()
    async def cancel_checkout_session(
        ctx: Context[Any, Any], meta: Meta, id: SessionId,
        payload: Annotated[dict[str, Any] | None, Field(description="Optional cancel request body")] = None,
    ) -> dict[str, Any]:
        """Cancel a checkout session (POST /checkout_sessions/{id}/cancel)."""
        return await call(ctx, meta, f"{SESSIONS}/{id}/cancel", lambda acp, _: acp.cancel(id, payload),
                          payload=payload, post=True)

    return server
