"""The Agentic Commerce Protocol over MCP (ACP's `docs/mcp-binding.md`), served on its own endpoint, `/acp/mcp`.

Its five tools are named `create_checkout_session` ... `cancel_checkout_session`, which clash with our Stripe
catalog tool of the same name: so this is a second MCP server, never mixed with the billing one. Each tool takes the
binding's `{meta, id, payload}` arguments, runs the same `AcpService` operation as the REST route, and answers the
`CheckoutSession` as the result. Its schemas are the spec's, from the bundled OpenRPC document and JSON Schema
(services/acp_schema.py): `meta` is the OpenRPC `meta` object (`api_version` required, the REST headers as fields,
unknown fields ignored), `payload` the operation's request schema with every `$ref` inlined, and the output schema
`CheckoutSession` (complete: `CheckoutSessionWithOrder`, or the `CheckoutSession` a declined payment answers), bundled
with its `$defs` and without the descriptions (annotations: the validation is the spec's).

Errors, as the binding says: a malformed envelope (`meta` or a required `id` / `payload` missing or of the wrong JSON
type, an argument the tool does not take) is JSON-RPC -32602 before anything runs; every ACP error is -32000 whose
`data` is ACP's Error object, its `param` addressing the tool arguments (`$.payload.currency`, `$.meta.api_version`,
`$.id`), not the REST body. Authentication is the connection's bearer key (one of AIMS_BILLING_ACP_API_KEYS), never
a tool argument. With a signing secret configured, `meta.signature` and `meta.timestamp` are required and checked as
the REST `Signature` / `Timestamp` headers are, over the canonical JSON of `payload` (services/acp_protocol.py says
how).
"""

import re
import uuid
from collections.abc import Awaitable, Callable
from functools import cached_property
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.tools import Tool
from mcp.shared.exceptions import MCPError
from pydantic import Field

from . import __version__
from .services.acp import AcpService
from .services.acp_models import AcpError, AcpResponse
from .services.acp_protocol import signed_payload
from .services.acp_schema import (
    SPEC_VERSION,
    bundled,
    check_api_version,
    check_json,
    definition_of,
    json_path,
    meta_schema,
    openrpc_method,
    parse_meta,
    request_fields,
    resolved,
)

MCP_PATH = "/acp/mcp"
ACP_ERROR = -32000
INVALID_PARAMS = -32602
SESSIONS = "/acp/checkout_sessions"
_META_REF = "#/components/schemas/meta"
_KINDS: dict[str, tuple[type, str]] = {"meta": (dict, "an object"), "id": (str, "a string"),
                                        "payload": (dict, "an object")}
_FIRST_FIELD = re.compile(r"\$\.([A-Za-z_][A-Za-z0-9_]*)")


class AcpTool(Tool):
    """A binding tool: the spec's input and output schemas, and its argument envelope checked before it runs."""

    envelope: dict[str, bool] = Field(default_factory=dict, exclude=True)  # argument name -> required
    published_output: dict[str, Any] | None = Field(default=None, exclude=True)

    @cached_property
    def output_schema(self) -> dict[str, Any] | None:
        return self.published_output

    async def run(self, arguments: dict[str, Any], context: Any, convert_result: bool = False) -> Any:
        self.check_envelope(arguments)
        return await super().run(arguments, context, convert_result=convert_result)

    def check_envelope(self, arguments: dict[str, Any]) -> None:
        """`{meta, id, payload}` as this tool takes them, else JSON-RPC -32602 naming the argument."""
        takes = ", ".join(self.envelope)
        for name in arguments:
            if name not in self.envelope:
                raise _invalid_params(f"{self.name} takes no argument {name[:64]!r}: its arguments are {takes}",
                                      json_path([name]))
        for name, required in self.envelope.items():
            value = arguments.get(name)
            kind, article = _KINDS[name]
            if value is None:  # an optional payload may be left out or null
                if required:
                    raise _invalid_params(f"{self.name} needs {name} ({article}): its arguments are {takes}",
                                          f"$.{name}")
            elif not isinstance(value, kind):
                raise _invalid_params(f"{self.name}: {name} must be {article}", f"$.{name}")


def _invalid_params(message: str, param: str) -> MCPError:
    return MCPError(code=INVALID_PARAMS, message=f"Invalid params: {message}", data={"param": param})


def _input_schema(method: dict[str, Any]) -> dict[str, Any]:
    """The tool's arguments as the OpenRPC method declares them, every `$ref` resolved."""
    properties: dict[str, Any] = {}
    for param in method["params"]:
        schema = param["schema"]
        definition = definition_of(schema)
        if schema.get("$ref") == _META_REF:
            properties[param["name"]] = meta_schema()
        elif definition is not None:
            properties[param["name"]] = resolved(definition)
        else:
            properties[param["name"]] = {**schema, "description": param["description"]}
    return {"type": "object", "properties": properties,
            "required": [param["name"] for param in method["params"] if param.get("required")],
            "additionalProperties": False}


def _output_schema(method: dict[str, Any]) -> dict[str, Any]:
    """The method's result schema, bundled; complete's also allows the CheckoutSession a declined payment answers."""
    result = definition_of(method["result"]["schema"])
    assert result is not None
    names = [result, "CheckoutSession"] if result != "CheckoutSession" else [result]
    return {"type": "object", **bundled(*names, descriptions=False)}


def _on_arguments(body: dict[str, Any], request: str | None) -> dict[str, Any]:
    """An ACP Error from the service, its `param` moved onto the tool arguments: a path into the request body goes
    under `$.payload` (a field of the request schema, or one it does not have); a path to the session (`$.id`, or a
    session field the request does not carry, e.g. `$.currency` on update) stays."""
    param = body.get("param")
    if not isinstance(param, str) or request is None:
        return body
    first = _FIRST_FIELD.match(param)
    if param == "$" or body.get("code") == "unknown_field" or (first and first.group(1) in request_fields(request)):
        return {**body, "param": "$.payload" + param[1:]}
    return body


def build_acp_mcp_server(get_state: Callable[[], Any]) -> MCPServer[Any]:
    async def call(ctx: Context[Any, Any], meta: dict[str, Any], path: str,
                   operation: Callable[[AcpService, str], Awaitable[AcpResponse]], *, payload: Any,
                   post: bool, request: str | None) -> dict[str, Any]:
        state = get_state()
        try:
            if state is None:
                raise AcpError(503, "starting", "the server is starting: retry", type="service_unavailable")
            acp: AcpService = state.acp
            check_api_version(meta.get("api_version"), param="$.meta.api_version", name="meta.api_version")
            check_json(meta, "$.meta")
            parse_meta(meta)
            check_json(payload, "$.payload")
            identity = acp.authenticate((ctx.headers or {}).get("authorization"))
            acp.verify_signature(meta.get("signature"), meta.get("timestamp"), signed_payload(payload))
        except AcpError as exc:
            raise _acp_error(exc.body()) from exc
        try:
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
            raise _acp_error(_on_arguments(result.body, request))
        body: dict[str, Any] = result.body
        return body

    async def create_checkout_session(ctx: Context[Any, Any], meta: dict[str, Any],
                                      payload: dict[str, Any]) -> dict[str, Any]:
        """Create an ACP checkout session (REST: POST /acp/checkout_sessions)."""
        return await call(ctx, meta, SESSIONS, lambda acp, seed: acp.create(payload, seed=seed),
                          payload=payload, post=True, request="CheckoutSessionCreateRequest")

    async def get_checkout_session(ctx: Context[Any, Any], meta: dict[str, Any], id: str) -> dict[str, Any]:
        """Retrieve a checkout session's current state (REST: GET /acp/checkout_sessions/{id})."""
        return await call(ctx, meta, f"{SESSIONS}/{id}", lambda acp, _: acp.get(id), payload=None, post=False,
                          request=None)

    async def update_checkout_session(ctx: Context[Any, Any], meta: dict[str, Any], id: str,
                                      payload: dict[str, Any]) -> dict[str, Any]:
        """Update items, buyer or fulfilment details (REST: POST /acp/checkout_sessions/{id})."""
        return await call(ctx, meta, f"{SESSIONS}/{id}", lambda acp, _: acp.update(id, payload),
                          payload=payload, post=True, request="CheckoutSessionUpdateRequest")

    async def complete_checkout_session(ctx: Context[Any, Any], meta: dict[str, Any], id: str,
                                        payload: dict[str, Any]) -> dict[str, Any]:
        """Pay and finalise the order (REST: POST /acp/checkout_sessions/{id}/complete)."""
        return await call(ctx, meta, f"{SESSIONS}/{id}/complete",
                          lambda acp, seed: acp.complete(id, payload, attempt=seed),
                          payload=payload, post=True, request="CheckoutSessionCompleteRequest")

    async def cancel_checkout_session(ctx: Context[Any, Any], meta: dict[str, Any], id: str,
                                      payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """Cancel a checkout session, optionally with an intent trace (REST: POST
        /acp/checkout_sessions/{id}/cancel)."""
        return await call(ctx, meta, f"{SESSIONS}/{id}/cancel", lambda acp, _: acp.cancel(id, payload),
                          payload=payload, post=True, request="CancelSessionRequest")

    tools: list[Tool] = [_bound(fn) for fn in (create_checkout_session, get_checkout_session, update_checkout_session,
                                                complete_checkout_session, cancel_checkout_session)]
    return MCPServer(
        "aims-billing-acp", title="AIMS ACP seller", version=__version__, tools=tools,
        instructions=f"Agentic Commerce Protocol checkout (version {SPEC_VERSION}) over MCP: create, update, complete "
        "(pay with a Stripe Shared Payment Token) and cancel checkout sessions for LUC credit packs.",
    )


_BUILT: dict[str, AcpTool] = {}


def _bound(fn: Callable[..., Awaitable[dict[str, Any]]]) -> AcpTool:
    """The binding's tool for `fn` (this server's closure). Its argument model and the spec's schemas depend on the
    method alone and cost ~10 ms of pydantic and schema work each, so they are built once per process (as the main
    tools are: app.py `built_tool`); each server gets a copy that calls its own `fn`."""
    built = _BUILT.get(fn.__name__)
    if built is None:
        method = openrpc_method(fn.__name__)
        tool = AcpTool.from_function(fn)
        assert isinstance(tool, AcpTool)
        built = tool
        built.parameters = _input_schema(method)
        built.envelope = {param["name"]: bool(param.get("required")) for param in method["params"]}
        built.published_output = _output_schema(method)
        _BUILT[fn.__name__] = built
    return built.model_copy(update={"fn": fn})


def _acp_error(body: dict[str, Any]) -> MCPError:
    return MCPError(code=ACP_ERROR, message=str(body.get("message") or "ACP error"), data=body)
