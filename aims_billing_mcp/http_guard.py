"""`HttpGuard`: the one ASGI middleware around every HTTP app we serve (`serve --http`, the companion webhook app
beside stdio, the app the embedded sandbox delivers to). Per request, in this order:

1. **Limits** (the `LIMITS` table, first matching path wins): header bytes (431), query string (414) and body.
   A `Content-Length` above the cap is answered 413 before a byte of the body is read; a body without one is read
   chunk by chunk and answered 413 as soon as it passes the cap (the rest is never read). What passes is buffered
   (at most the cap) and replayed to the app. Each refusal is in its surface's error shape.
2. **Policy** (`HttpPolicy`): read-only mode and the allow-list applied to the HTTP surfaces that change state.
   `/x402/credits` is governed by the tool `purchase_luc_credits` (it sells LUC credits as that tool does), the
   ACP seller (REST and `/acp/mcp`) by `create_payment_session` (its checkouts are payment sessions). Read-only
   mode refuses every `/x402/credits` request and every ACP POST (403, code `read_only`); ACP reads stay open.
   Stripe's webhooks are not an agent's action: they are accepted in read-only mode and whatever the allow-list,
   so subscriptions keep following Stripe.
3. **Audit**: one `audit_log` row (tool `http:<METHOD> <route>`, arguments redacted and truncated) per request of
   an authenticated caller to ACP (REST, and `tools/call` on `/acp/mcp`) and per `/x402/credits` request carrying
   a payment. Anonymous requests (a 402 challenge, a refused API key) cost no storage; webhooks are recorded in
   `webhook_events` instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import jsonsafe

if TYPE_CHECKING:
    from .settings import Settings

KIB = 1024
X402_TOOL = "purchase_luc_credits"
ACP_TOOL = "create_payment_session"
INGEST_TOOL = "create_meter_events"  # governs POST /v1/usage/events (it records what that tool records)
INGEST_PATH = "/v1/usage/events"
ACP_MCP_WRITE_TOOLS = ("create_checkout_session", "update_checkout_session", "complete_checkout_session",
                       "cancel_checkout_session")

Message = dict[str, Any]
Shape = Callable[[str, str], dict[str, Any]]


def _plain(code: str, message: str) -> dict[str, Any]:
    return {"error": message, "code": code}


def _x402(code: str, message: str) -> dict[str, Any]:
    return {"error": code, "message": message}


def _acp(code: str, message: str) -> dict[str, Any]:
    return {"type": "invalid_request", "code": code, "message": message}


def _jsonrpc(code: str, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message, "data": {"code": code}}}


@dataclass(frozen=True)
class Limit:
    """The caps for the paths starting with `prefix` (an exact path unless it ends with `/`)."""

    prefix: str
    body: int
    shape: Shape
    headers: int = 16 * KIB
    query: int = 2 * KIB

    def matches(self, path: str) -> bool:
        return path.startswith(self.prefix) if self.prefix.endswith("/") else path == self.prefix


LIMITS: tuple[Limit, ...] = (
    Limit("/webhooks/stripe", 1024 * KIB, _plain),  # Stripe's events are far under 1 MiB
    Limit("/x402/", 1 * KIB, _x402, query=1 * KIB),  # a GET: the payment travels in a header (~1.5 KiB)
    Limit("/acp/mcp", 256 * KIB, _jsonrpc),
    Limit("/acp/", 256 * KIB, _acp),
    Limit("/.well-known/", 1 * KIB, _acp),
    Limit("/mcp", 1024 * KIB, _jsonrpc),
    Limit("/v1/usage/events", 1024 * KIB, _plain),  # 1,000 events of up to ~1 KiB (ingest_http.py counts them)
)
DEFAULT_LIMIT = Limit("", 64 * KIB, _plain)


def limit_for(path: str) -> Limit:
    return next((limit for limit in LIMITS if limit.matches(path)), DEFAULT_LIMIT)


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str


@dataclass(frozen=True)
class HttpPolicy:
    """Read-only mode and the allow-list, as the HTTP surfaces apply them (see the module docstring)."""

    read_only: bool = False
    tools: frozenset[str] = frozenset()  # empty: every tool allowed

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpPolicy:
        return cls(settings.aims_billing_read_only, frozenset(settings.aims_billing_tools))

    def allows(self, tool: str) -> bool:
        return not self.tools or tool in self.tools

    def refusal(self, method: str, path: str) -> Refusal | None:
        if path.startswith("/x402/"):
            return self._refuse("x402 credits", X402_TOOL, write=True)
        if path.startswith("/acp/") or path == "/.well-known/acp.json":
            return self._refuse("the ACP seller", ACP_TOOL, write=method == "POST" and path != "/acp/mcp")
        if path == INGEST_PATH:
            return self._refuse("usage ingestion", INGEST_TOOL, write=True)
        return None

    def _refuse(self, surface: str, tool: str, *, write: bool) -> Refusal | None:
        if not self.allows(tool):
            return Refusal(403, "surface_not_allowed", f"{surface} is off: AIMS_BILLING_TOOLS does not list {tool}, "
                           "which governs it over HTTP; add it to serve this surface")
        if write and self.read_only:
            return Refusal(403, "read_only", f"{surface} is refused: the server runs with AIMS_BILLING_READ_ONLY="
                           "true (nothing that changes state is served); unset it to allow this request")
        return None

    def acp_mcp_tools_off(self) -> tuple[str, ...]:
        """The ACP MCP binding's tools this policy removes (all of them when the seller is off)."""
        if not self.allows(ACP_TOOL):
            return (*ACP_MCP_WRITE_TOOLS, "get_checkout_session")
        return ACP_MCP_WRITE_TOOLS if self.read_only else ()

    def describe(self) -> list[str]:
        """What `doctor` prints: which HTTP surfaces the switches govern, and their state now."""
        def state(tool: str, writes: str) -> str:
            if not self.allows(tool):
                return f"off (AIMS_BILLING_TOOLS lacks {tool})"
            return f"{writes} refused (read-only)" if self.read_only else "on"

        return [
            f"GET /x402/credits (governed by {X402_TOOL}): {state(X402_TOOL, 'every request')}",
            f"ACP seller /acp/... and /acp/mcp (governed by {ACP_TOOL}): {state(ACP_TOOL, 'POSTs and write tools')}",
            f"POST {INGEST_PATH} (governed by {INGEST_TOOL}; callers need a key of AIMS_BILLING_INGEST_KEYS): "
            f"{state(INGEST_TOOL, 'every request')}",
            "POST /webhooks/stripe: always on (Stripe's events, not an agent's action)",
        ]


class HttpGuard:
    """Limits, policy and audit in front of `app` (see the module docstring). `get_state` gives the AppState
    (None while starting) for the audit rows and the ACP caller check."""

    def __init__(self, app: Any, get_state: Callable[[], Any] | None = None,
                 policy: HttpPolicy | None = None, *, loopback: bool = True) -> None:
        self.app = app
        self._get_state = get_state or (lambda: None)
        self._policy = policy or HttpPolicy()
        self._loopback = loopback  # False: served on a non-loopback address (see webhooks.py on the public secret)

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        limit = limit_for(path)
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers") or [])
        if sum(len(name) + len(value) for name, value in headers) > limit.headers:
            await _answer(send, 431, limit.shape("request_headers_too_large",
                                                 f"the request headers are above {limit.headers} bytes"))
            return
        if len(scope.get("query_string") or b"") > limit.query:
            await _answer(send, 414, limit.shape("uri_too_long", f"the query string is above {limit.query} bytes"))
            return
        declared = header_value(headers, b"content-length")
        if declared is not None and not declared.isdigit():
            await _answer(send, 400, limit.shape("invalid_content_length", "Content-Length must be a whole number"))
            return
        if declared is not None and (len(declared) > 15 or int(declared) > limit.body):  # never a huge int()
            await _answer(send, 413, limit.shape("request_too_large", f"the request body is above {limit.body} "
                                                 "bytes (its Content-Length says more)"))
            return
        if not self._loopback and path == "/webhooks/stripe" and self._public_webhook_secret():
            from .webhooks import public_secret_refused

            client = scope.get("client")
            await _answer(send, *public_secret_refused(str(client[0]) if client else "an unknown peer"))
            return
        body = await _read_capped(receive, limit.body)
        if body is None:
            await _answer(send, 413, limit.shape("request_too_large", f"the request body is above {limit.body} "
                                                 "bytes"))
            return
        caller = self._acp_caller(path, headers)
        refusal = self._policy.refusal(method, path)
        if refusal is not None and caller is not None and caller.startswith("!"):
            refusal = Refusal(401, "unauthorized", caller[1:])  # an unknown caller learns nothing about the policy
        audited = self._audited(method, path, headers, body, caller)
        if refusal is not None:
            if audited:  # queued before the answer: whoever reads the answer finds the row queued ahead of their writes
                self._audit(method, path, scope, body, caller, refusal.status, refusal.code, 0.0)
            await _answer(send, refusal.status, limit.shape(refusal.code, refusal.message))
            return
        pending = [body]

        async def replay() -> Message:
            if pending:  # the buffered body once, then the connection's own messages (a disconnect)
                return {"type": "http.request", "body": pending.pop(), "more_body": False}
            message: Message = await receive()
            return message

        if not audited:
            await self.app(scope, replay, send)
            return
        start = time.perf_counter()
        status: list[int] = []
        captured: list[bytes] = []

        async def observe(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            elif (message["type"] == "http.response.body" and status and status[0] >= 400
                  and sum(len(c) for c in captured) < 16 * KIB):
                captured.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay, observe)
        finally:
            if status:
                code = _error_code(status[0], b"".join(captured)) if status[0] >= 400 else None
                self._audit(method, path, scope, body, caller, status[0], code, (time.perf_counter() - start) * 1000)

    def _public_webhook_secret(self) -> bool:
        from .sandbox import SANDBOX_WEBHOOK_SECRET

        state = self._get_state()
        return state is not None and getattr(state, "webhook_secret", None) == SANDBOX_WEBHOOK_SECRET

    def _acp_caller(self, path: str, headers: list[tuple[bytes, bytes]]) -> str | None:
        """For an ACP path: `acp:<key digest>` for a valid API key, `!<why>` for none (the same for the ingestion
        route and its keys: `ingest:<key digest>`); else None."""
        if path == INGEST_PATH:
            return self._ingest_caller(headers)
        if not path.startswith("/acp/"):
            return None
        state = self._get_state()
        acp = getattr(state, "acp", None) if state is not None else None
        if acp is None:
            return None
        authorization = header_value(headers, b"authorization")
        try:
            identity: str = acp.authenticate(authorization.decode("latin-1") if authorization else None)
        except Exception as exc:  # AcpError: 401, which the app answers in its own words
            return "!" + str(getattr(exc, "message", exc))
        return f"acp:{identity[:16]}"

    def _ingest_caller(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        state = self._get_state()
        if state is None or getattr(state, "settings", None) is None:
            return None
        from .ingest_http import IngestRefused, authenticate

        authorization = header_value(headers, b"authorization")
        try:
            return authenticate(state, authorization.decode("latin-1") if authorization else None)
        except IngestRefused as exc:
            return "!" + exc.message

    def _audited(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes | None,
                 caller: str | None) -> bool:
        if path.startswith("/x402/"):
            return (header_value(headers, b"payment-signature") is not None
                    or header_value(headers, b"x-payment") is not None)
        if path == "/acp/mcp":
            return bool(caller and not caller.startswith("!") and method == "POST" and body
                        and b'"tools/call"' in body)
        return bool(caller and not caller.startswith("!"))

    def _audit(self, method: str, path: str, scope: Message, body: bytes | None, caller: str | None, status: int,
               code: str | None, duration_ms: float) -> None:
        state = self._get_state()
        store = getattr(state, "store", None) if state is not None else None
        if store is None:
            return
        from .app import audit

        arguments = request_arguments(path, scope, body)
        outcome = "ok" if status < 400 else "error"
        with contextlib.suppress(Exception):  # a closing store: the request was answered, the row goes with it
            audit(store, f"http:{method} {route_of(path)}", arguments, outcome, code, duration_ms, [],
                  caller=caller or "http", read_only=method == "GET" and not path.startswith("/x402/"))


async def _read_capped(receive: Any, cap: int) -> bytes | None:
    """The whole body, or None as soon as it passes `cap` bytes (the rest is left unread)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # the client went away: the app sees an empty or partial body and answers
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(send: Any, status: int, body: dict[str, Any]) -> None:
    await send_json(send, status, body, close=True)


async def send_json(send: Any, status: int, body: dict[str, Any], *, close: bool = False) -> None:
    """A JSON answer as raw ASGI messages (`close`: and the connection closed after it, for a refused request
    whose body may not have been read)."""
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of the header `name` (lower case) among an ASGI scope's raw headers, or None."""
    return next((value for key, value in headers if key.lower() == name), None)


_ROUTES = ((re.compile(r"^/acp/checkout_sessions/[^/]+/(complete|cancel)$"), r"/acp/checkout_sessions/{id}/\1"),
           (re.compile(r"^/acp/checkout_sessions/[^/]+$"), "/acp/checkout_sessions/{id}"))


def route_of(path: str) -> str:
    """The route template of `path` (ids out of the tool column, into the arguments)."""
    for pattern, template in _ROUTES:
        if pattern.match(path):
            return pattern.sub(template, path)
    return path[:200]


def request_arguments(path: str, scope: Message, body: bytes | None) -> dict[str, Any]:
    """What an audit row keeps of a request: the route's ids, the query, the JSON body (or its size), cut."""
    from urllib.parse import parse_qsl

    out: dict[str, Any] = {}
    parts = path.split("/")
    if path.startswith("/acp/checkout_sessions/") and len(parts) > 3:
        out["session_id"] = parts[3]
    query = (scope.get("query_string") or b"").decode("latin-1")
    if query:
        out["query"] = dict(parse_qsl(query, keep_blank_values=True))
    headers = dict(scope.get("headers") or [])
    for name in (b"payment-signature", b"x-payment", b"idempotency-key"):
        if name in headers:
            value = headers[name]
            out[name.decode()] = (f"sha256:{hashlib.sha256(value).hexdigest()[:16]} ({len(value)} bytes)"
                                  if name != b"idempotency-key" else value.decode("latin-1"))
    if body:
        try:
            out["body"] = jsonsafe.loads(body)
        except (ValueError, RecursionError):
            out["body"] = f"<{len(body)} bytes, not JSON>"
    return out  # audit() bounds and masks it (redact.audit_arguments), as for every tool call


def _error_code(status: int, body: bytes) -> str:
    try:
        data = jsonsafe.loads(body) if body else None
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        code = data.get("code") or (data.get("error") if isinstance(data.get("error"), str) else None)
        if isinstance(code, str) and re.fullmatch(r"[a-z0-9_]{1,64}", code):
            return code
    return f"http_{status}"
