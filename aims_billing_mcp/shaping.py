"""What a tool call takes and gives back, whatever the tool: its raw arguments parsed strictly (before the SDK's
lax validation), every failure turned into one error shape (an isError result naming the field and the fix), and
secrets masked out of what a call answers. BillingServer (app.py) applies it to every call."""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from typing import Any

import pydantic_core
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import FuncMetadata
from mcp.types import CallToolResult, TextContent
from pydantic import ValidationError

from . import jsonsafe
from .errors import BillingError, InvalidInput
from .redact import may_hold_secret, redact, redact_text, redact_values

log = logging.getLogger(__name__)

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
    if not may_hold_secret(seen if structured is None else seen + _json_text(structured)):
        return result
    content = [c.model_copy(update={"text": redact_text(c.text)}) if isinstance(c, TextContent) else c
               for c in result.content]
    return result.model_copy(update={"content": content, "structured_content": redact_values(structured)})


def _json_text(value: Any) -> str:
    """`value` as JSON text for the secret test, by pydantic-core's writer (a batch's result, a hundred objects, in a
    fifth of json.dumps' time); json.dumps for what it refuses (a lone surrogate, which has no UTF-8). Either holds
    every text of `value` JSON-escaped, with non-ASCII characters as they are or as `\\u` escapes: both forms of a
    configured secret are registered (`register_secrets`)."""
    try:
        return pydantic_core.to_json(value, fallback=str).decode()
    except pydantic_core.PydanticSerializationError:
        return json.dumps(value, default=str)


def refuse_loose_arguments(tool: Tool, arguments: dict[str, Any]) -> dict[str, Any]:
    """Parse the raw arguments strictly instead of the SDK's lax validation: a misspelt argument (`amout`)
    silently ignored could bill the wrong thing, and lax pydantic takes `true`, `"7"` and `3.0` as the integer 1,
    7 and 3. Money is never read from a boolean or a string, so both are refused here, naming the field. What
    passes is the tool's keyword arguments, from the tool's own argument model (validated strictly, so to the
    values the SDK's lax pass would give): `StrictlyValidated` hands them to the SDK instead of a second pass."""
    name = tool.name
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
    parsed = metadata.pre_parse_json(arguments)
    fields = metadata.arg_model.model_fields
    # A list of anything (a batch's events, each parsed by the service on its own) passes the strict check as any
    # list of its length would: the check writes and reads back a stand-in, not the events (a JSON round trip of a
    # hundred events per call), and the tool gets the list as it came.
    kept = {key: value for key, value in parsed.items()
            if type(value) is list and key in fields and not fields[key].alias and fields[key].annotation == list[Any]}
    for key, value in kept.items():
        if value is not arguments.get(key):  # parsed from a JSON string just now: its texts were not walked yet
            _refuse_unreadable_value(key, value)
    try:
        model = metadata.arg_model.model_validate_json(
            _json_for_strict_check({**parsed, **{key: [None] * len(value) for key, value in kept.items()}}),
            strict=True)
    except ValidationError as exc:
        raise invalid_arguments(name, exc, properties) from exc
    return {**model.model_dump_one_level(), **kept}


# (the arguments dict BillingServer.call_tool checked, the keyword arguments it gave) for the call in progress
VALIDATED: ContextVar[tuple[dict[str, Any], dict[str, Any]] | None] = ContextVar("validated", default=None)


class StrictlyValidated(FuncMetadata):
    """A tool's FuncMetadata taking the keyword arguments `refuse_loose_arguments` produced for this very call
    (the same argument model, validated strictly) instead of validating the same dict a second time, laxly. Any
    other arguments (a caller that did not go through BillingServer.call_tool) are validated as the SDK does."""

    def validate_arguments(self, arguments_to_validate: dict[str, Any]) -> dict[str, Any]:
        done = VALIDATED.get()
        if done is not None and done[0] is arguments_to_validate:
            return done[1]
        return super().validate_arguments(arguments_to_validate)
