"""The Agentic Commerce Protocol seller over REST (version 2026-04-17), as Starlette routes:

- `POST /acp/checkout_sessions` (201), `GET` / `POST /acp/checkout_sessions/{id}`,
  `POST /acp/checkout_sessions/{id}/complete`, `POST /acp/checkout_sessions/{id}/cancel`
- `GET /.well-known/acp.json`: the discovery document

Every ACP request needs `API-Version: 2026-04-17` (else 400 `missing_api_version` / `unsupported_api_version`, with
`supported_versions`) and `Authorization: Bearer <api key>`; every POST an `Idempotency-Key`. Answers echo
`API-Version`, `Idempotency-Key` and `Request-Id`; errors are ACP's Error object (type, code, message, param).
With a signing secret configured, every checkout request also needs `Signature` and `Timestamp` over its exact body
(services/acp_protocol.py says how), checked after the bearer key and before the Idempotency-Key is claimed.
`acp_routes(get_state)` is what routes.py declares (for `serve --http` and the companion app); the service is
`state.acp`, the seller state.py builds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .services.acp import AcpService
from .services.acp_models import AcpError, AcpResponse
from .services.acp_protocol import API_VERSION, require_idempotency_key
from .services.acp_schema import SUPPORTED_VERSIONS, check_api_version, check_json

BASE = "/acp"
SESSIONS = f"{BASE}/checkout_sessions"
DISCOVERY = "/.well-known/acp.json"
_MAX_BODY = 256 * 1024
_MAX_PARSE_DEPTH = 128  # deeper is refused unread; services/acp_schema.check_json names where past 32 levels
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


def acp_routes(get_state: Callable[[], Any]) -> list[Route]:
    """The ACP REST routes over the app state's `acp` service, resolved per request so the routes can be built
    before the state exists (503 until it does)."""

    def service() -> AcpService:
        state = get_state()
        if state is None:
            raise AcpError(503, "starting", "the server is starting: retry", type="service_unavailable",
                           headers={"Retry-After": "1"})
        acp: AcpService = state.acp
        return acp

    def endpoint(
        operation: Callable[[AcpService, Request, str, Any], Awaitable[AcpResponse]], *, post: bool,
    ) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def handle(request: Request) -> JSONResponse:
            echo = _echo(request)
            try:
                acp = service()
                _check_version(request)
                identity = acp.authenticate(request.headers.get("authorization"))
                acp.verify_signature(request.headers.get("signature"), request.headers.get("timestamp"),
                                     await _raw(request))
                if not post:
                    result = await operation(acp, request, identity, None)
                else:
                    key = require_idempotency_key(request.headers.get("idempotency-key"))
                    body = await _body(request, optional=request.url.path.endswith("/cancel"))

                    async def run() -> AcpResponse:
                        return await operation(acp, request, identity, body)

                    result = await acp.idempotent(identity, request.url.path, key, body, run)
            except AcpError as exc:
                result = exc.response()
            return JSONResponse(result.body, status_code=result.status, headers={**echo, **result.headers})

        return handle

    async def create(acp: AcpService, request: Request, identity: str, body: Any) -> AcpResponse:
        return await acp.create(body, seed=f"{identity}\x00{request.headers.get('idempotency-key')}")

    async def get(acp: AcpService, request: Request, _identity: str, _body: Any) -> AcpResponse:
        return await acp.get(request.path_params["session_id"])

    async def update(acp: AcpService, request: Request, _identity: str, body: Any) -> AcpResponse:
        return await acp.update(request.path_params["session_id"], body)

    async def complete(acp: AcpService, request: Request, identity: str, body: Any) -> AcpResponse:
        # the attempt is the caller's own (its API key and Idempotency-Key): another platform's key never replays it
        return await acp.complete(request.path_params["session_id"], body,
                                  attempt=f"{identity}\x00{request.headers.get('idempotency-key')}")

    async def cancel(acp: AcpService, request: Request, _identity: str, body: Any) -> AcpResponse:
        return await acp.cancel(request.path_params["session_id"], body)

    async def discovery(request: Request) -> JSONResponse:
        try:
            acp = service()
        except AcpError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers={**_echo(request), **exc.headers})
        base = str(request.base_url).rstrip("/") + BASE
        return JSONResponse(acp.discovery(base), headers={**_echo(request), "Cache-Control": "public, max-age=300"})

    return [
        Route(DISCOVERY, discovery, methods=["GET"]),
        Route(SESSIONS, endpoint(create, post=True), methods=["POST"]),
        Route(SESSIONS + "/{session_id}", endpoint(get, post=False), methods=["GET"]),
        Route(SESSIONS + "/{session_id}", endpoint(update, post=True), methods=["POST"]),
        Route(SESSIONS + "/{session_id}/complete", endpoint(complete, post=True), methods=["POST"]),
        Route(SESSIONS + "/{session_id}/cancel", endpoint(cancel, post=True), methods=["POST"]),
    ]


def _echo(request: Request) -> dict[str, str]:
    version = request.headers.get("api-version")  # echoed when we speak it; else the version we answer in
    out = {"API-Version": version if version in SUPPORTED_VERSIONS else API_VERSION}
    for name in ("Idempotency-Key", "Request-Id"):
        value = request.headers.get(name.lower())
        if value and len(value) <= 255:
            out[name] = value
    return out


def _check_version(request: Request) -> None:
    check_api_version(request.headers.get("api-version"))


async def _raw(request: Request) -> bytes:
    raw = await request.body()
    if len(raw) > _MAX_BODY:
        raise AcpError(413, "request_too_large", f"the request body is above {_MAX_BODY} bytes")
    return raw


async def _body(request: Request, *, optional: bool) -> Any:
    raw = await _raw(request)
    if not raw.strip():
        if optional:
            return None
        raise AcpError(400, "invalid_json", "the request needs a JSON body", param="$")
    if _nests_deeper(raw, _MAX_PARSE_DEPTH):
        raise AcpError(400, "too_deeply_nested", f"the body nests more than {_MAX_PARSE_DEPTH} levels deep; no ACP "
                       "request does", param="$")
    try:  # json (not jsonsafe) once the depth is known to be safe: check_json then names a lone surrogate's field
        body = json.loads(raw)
    except ValueError as exc:
        raise AcpError(400, "invalid_json", f"the body is not JSON: {exc}", param="$") from exc
    check_json(body)
    return body


def _nests_deeper(raw: bytes, limit: int) -> bool:
    """Whether the JSON text opens more than `limit` arrays/objects at once (brackets inside strings skipped), read
    before `json.loads`: its C parser recurses on the C stack, and with the recursion limit a dependency raises
    (py_ecc sets 100000 when x402's signer is imported) a 200 KB body of `[` would crash the process."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub(b"", raw)):
        depth += 1 if bracket in (b"[", b"{") else -1
        if depth > limit:
            return True
    return False
