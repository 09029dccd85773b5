"""ACP's published schemas: the one place the seller's request and response shapes come from.

The JSON Schema bundle and the MCP binding's OpenRPC document of the Agentic Commerce Protocol 2026-04-17 are
shipped as package data, verbatim (`aims_billing_mcp/acp_spec/`, Apache-2.0, its NOTE names the commit). From them:

- `parse(definition, body)`: a request body checked against its definition (`CheckoutSessionCreateRequest`,
  `...UpdateRequest`, `...CompleteRequest`, `CancelSessionRequest`, with every object inside: `Address`, `Buyer`,
  `Item`, `PaymentData`, `IntentTrace`, ...). Every field the schema allows is accepted; whatever it forbids is a
  400 ACP Error naming the RFC 9535 JSONPath of the first offending field and the fix: `unknown_field` (a field
  the object does not have; the message lists the ones it has), `missing_field`, `invalid_email`,
  `invalid_field`. Enums the spec declares extensible (`IntentTrace.reason_code`: "servers SHOULD accept
  unrecognized values") accept unrecognised values.
- `check_json(body)`: no nesting deeper than 32 levels, no lone surrogate (checked before a body is hashed or
  stored, so no later step can fail on it).
- `check_api_version(version)`: `API-Version` (REST) / `meta.api_version` (MCP) is required on every operation:
  missing is 400 `missing_api_version`, another version 400 `unsupported_api_version`, both listing
  `supported_versions` (RFC agentic_checkout §2).
- `resolved(definition)`: the definition with every `$ref` inlined (the MCP binding's tool `payload` schemas);
  `bundled(definition)`: the definition as a self-contained document, `$ref`s resolving to its own `$defs` (the
  tools' output schemas); `meta_schema()` and `openrpc_method(name)`: the binding's OpenRPC `meta` and methods.
  Served schemas leave out the spec's `example` annotations (not JSON Schema, and some do not match their schema);
  output schemas also its `description`s (annotations only: 57 KB a tool with them, 25 KB without).
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from importlib.resources import files
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError, best_match

from .. import jsonsafe
from .acp_models import AcpError

SPEC_VERSION = "2026-04-17"
SUPPORTED_VERSIONS = [SPEC_VERSION]
_SPEC = files("aims_billing_mcp") / "acp_spec" / SPEC_VERSION
_DEFS = "#/$defs/"
_BUNDLE_REF = "../json-schema/schema.agentic_checkout.json#/$defs/"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXTENSIBLE_ENUMS = [("IntentTrace", "reason_code")]  # the spec: "Validators SHOULD ... lenient enum handling"
MAX_NESTING = 32  # the spec's request schemas nest 7 levels; free-form metadata gets the rest


@cache
def _bundle() -> dict[str, Any]:
    bundle: dict[str, Any] = json.loads((_SPEC / "schema.agentic_checkout.json").read_text("utf-8"))
    return bundle


@cache
def _openrpc() -> dict[str, Any]:
    document: dict[str, Any] = json.loads((_SPEC / "openrpc.agentic_checkout.json").read_text("utf-8"))
    return document


def _defs() -> dict[str, Any]:
    defs: dict[str, Any] = _bundle()["$defs"]
    return defs


_NAMED_SCHEMAS = ("properties", "$defs", "patternProperties", "dependentSchemas")  # maps of name -> schema
_DATA = ("enum", "const", "default", "examples")  # values, not schemas


def _without(schema: Any, drop: tuple[str, ...] = ("example",)) -> Any:
    """`schema` without the annotation keywords `drop` (a property that happens to have such a name stays)."""
    if isinstance(schema, list):
        return [_without(value, drop) for value in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in drop:
            continue
        if key in _NAMED_SCHEMAS:
            out[key] = {name: _without(sub, drop) for name, sub in value.items()}
        else:
            out[key] = value if key in _DATA else _without(value, drop)
    return out


def _inline(schema: Any, defs: dict[str, Any] | None = None) -> Any:
    defs = _defs() if defs is None else defs
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = _inline(defs[_ref_name(schema["$ref"])], defs)
            return {**target, **{key: _inline(value, defs) for key, value in schema.items() if key != "$ref"}}
        return {key: _inline(value, defs) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(value, defs) for value in schema]
    return schema


def _ref_name(ref: str) -> str:
    for prefix in (_DEFS, _BUNDLE_REF):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    raise ValueError(f"not a reference into the ACP schema bundle: {ref}")


def _closure(schema: Any, found: set[str]) -> set[str]:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "$ref":
                name = _ref_name(value)
                if name not in found:
                    found.add(name)
                    _closure(_defs()[name], found)
            else:
                _closure(value, found)
    elif isinstance(schema, list):
        for value in schema:
            _closure(value, found)
    return found


def resolved(definition: str) -> dict[str, Any]:
    """`definition` with every `$ref` inlined (the bundle has no cycles) and without the spec's examples."""
    schema: dict[str, Any] = _without(_inline(_defs()[definition]))
    return schema


def bundled(*definitions: str, descriptions: bool = True) -> dict[str, Any]:
    """The definitions as one self-contained document: `{"$ref": "#/$defs/<definition>", "$defs": {its closure}}`
    (several: `{"anyOf": [{"$ref": ...}, ...], "$defs": ...}`); without `description`s when `descriptions` is
    False (the same validation, less than half the size)."""
    refs = [{"$ref": _DEFS + definition} for definition in definitions]
    names = _closure(refs, set())
    top: dict[str, Any] = refs[0] if len(refs) == 1 else {"anyOf": refs}
    document = {**top, "$defs": {name: _defs()[name] for name in sorted(names)}}
    schema: dict[str, Any] = _without(document, ("example",) if descriptions else ("example", "description"))
    return schema


def meta_schema() -> dict[str, Any]:
    """The MCP binding's `meta` object (OpenRPC `components.schemas.meta`): the REST headers as fields."""
    return copy.deepcopy(_openrpc()["components"]["schemas"]["meta"])


def openrpc_method(name: str) -> dict[str, Any]:
    """The binding's OpenRPC method `name` (its `params`, `result`, `description`), references as published."""
    method: dict[str, Any] = next(m for m in _openrpc()["methods"] if m["name"] == name)
    return copy.deepcopy(method)


def definition_of(schema: dict[str, Any]) -> str | None:
    """The bundle definition an OpenRPC param or result schema references (None: an inline schema)."""
    ref = schema.get("$ref")
    return _ref_name(ref) if isinstance(ref, str) and ref.startswith(_BUNDLE_REF) else None


def request_fields(definition: str) -> frozenset[str]:
    """The top-level fields of a request definition."""
    return frozenset(_defs()[definition].get("properties", {}))


# --- parsing -------------------------------------------------------------------------------------------------------


@cache
def _validator(definition: str) -> Draft202012Validator:
    """The definition with every `$ref` inlined: validating it resolves no references (which was a third of the
    validation time per request), and the bundle has no cycles."""
    defs = copy.deepcopy(_defs())
    for name, field in _EXTENSIBLE_ENUMS:
        defs[name]["properties"][field].pop("enum")
    return Draft202012Validator(_inline(defs[definition], defs), format_checker=FormatChecker())


@cache
def _meta_validator() -> Draft202012Validator:
    return Draft202012Validator(meta_schema(), format_checker=FormatChecker())


def parse(definition: str, body: Any) -> dict[str, Any]:
    """`body` if it is a valid `definition` of the bundle, else the 400 ACP Error for its first problem."""
    _raise_first(_validator(definition), body, "$")
    parsed: dict[str, Any] = body
    return parsed


def parse_meta(meta: Any, root: str = "$.meta") -> dict[str, Any]:
    """The MCP binding's `meta` object checked against its OpenRPC schema (unknown fields allowed, as it says)."""
    _raise_first(_meta_validator(), meta, root)
    parsed: dict[str, Any] = meta
    return parsed


def check_api_version(version: Any, *, param: str | None = None, name: str = "API-Version header") -> None:
    """Every operation names the API version it speaks: 400 with `supported_versions` when it is missing or not
    one this seller speaks."""
    extra = {"supported_versions": list(SUPPORTED_VERSIONS)}
    if version is None:
        raise AcpError(400, "missing_api_version", f"the {name} is required: send {SPEC_VERSION}", param=param,
                       extra=extra)
    if version not in SUPPORTED_VERSIONS:
        raise AcpError(400, "unsupported_api_version", f"{name} {str(version)[:32]!r} is not supported: send "
                       f"{SPEC_VERSION}", param=param, extra=extra)


def check_json(value: Any, root: str = "$") -> None:
    """Before anything else reads a request (hashing it for idempotency, storing it, echoing it): nesting deeper
    than `MAX_NESTING` and text that is not valid Unicode (a lone surrogate cannot be stored nor answered) are a
    400 naming where."""
    found = jsonsafe.first_unreadable(value, MAX_NESTING)
    if found is None:
        return
    path = json_path(found.parts, root)
    if found.kind == "too_deep":
        raise AcpError(400, "too_deeply_nested", f"{path} is nested more than {MAX_NESTING} levels deep; no ACP field "
                       "is", param=path)
    if found.kind == "surrogate":
        raise AcpError(400, "invalid_text", f"{path} contains a lone surrogate (not valid Unicode): send UTF-8 text",
                       param=path)
    raise AcpError(400, "invalid_text", f"{path}: a field name with a lone surrogate (not valid Unicode)", param=path)


def _raise_first(validator: Draft202012Validator, body: Any, root: str) -> None:
    error = best_match(validator.iter_errors(body))
    if error is not None:
        raise _acp_error(error, root)


def json_path(parts: Any, root: str = "$") -> str:
    """An RFC 9535 normalized path: `$.name`, `$['odd key']`, `$[0]` (control and lone surrogate characters
    escaped, so the path is always printable UTF-8)."""
    out = root
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _NAME.fullmatch(part):
            out += f".{part}"
        else:
            out += "['" + "".join(_escape(char) for char in str(part)) + "']"
    return out


def _escape(char: str) -> str:
    if char in "'\\":
        return "\\" + char
    code = ord(char)
    return f"\\u{code:04x}" if code < 0x20 or 0xD800 <= code <= 0xDFFF else char


_ARTICLE = {"object": "an object", "array": "an array", "string": "a string", "integer": "an integer",
            "number": "a number", "boolean": "a boolean", "null": "null"}


def _acp_error(error: ValidationError, root: str) -> AcpError:
    path = json_path(error.absolute_path, root)
    kind, value, instance = error.validator, error.validator_value, error.instance
    code, param = "invalid_field", path
    if kind == "required":
        missing = next(name for name in value if name not in instance)
        param = json_path([missing], path)
        code, message = "missing_field", f"{param} is required"
    elif kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = next(name for name in instance if name not in allowed)
        param = json_path([extra], path)
        code = "unknown_field"
        message = (f"{param} is not a field of this object in ACP {SPEC_VERSION}: remove it (its fields are "
                   f"{', '.join(allowed)})" if allowed else f"{param} is not allowed here: remove it")
    elif kind == "type":
        expected = value if isinstance(value, list) else [value]
        message = f"{path} must be " + " or ".join(_ARTICLE.get(str(name), str(name)) for name in expected)
    elif kind == "format":
        code = "invalid_email" if value in ("email", "idn-email") else "invalid_field"
        message = f"{path} is not a valid {value}"
    elif kind in ("enum", "const"):
        choices = value if kind == "enum" else [value]
        message = f"{path} must be one of: {', '.join(json.dumps(choice) for choice in choices)}"
    elif kind in ("minItems", "maxItems"):
        message = f"{path} needs {'at least' if kind == 'minItems' else 'at most'} {value} item(s)"
    elif kind in ("minLength", "maxLength"):
        message = f"{path} must be {'at least' if kind == 'minLength' else 'at most'} {value} characters long"
    elif kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kind]
        message = f"{path} must be {sign} {value}"
    elif kind == "uniqueItems":
        message = f"{path} must not repeat an item"
    elif kind == "pattern":
        message = f"{path} must match the pattern {value}"
    else:  # anyOf / oneOf without a better match, not, ...
        message = f"{path} does not match the ACP {SPEC_VERSION} schema ({kind})"
    if param == "$" and kind == "type":
        message = "the request body must be a JSON object"
    return AcpError(400, code, message, param=param)
