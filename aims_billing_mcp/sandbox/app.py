"""The Starlette app: routing, authentication, fault injection, idempotency and the request log.

One catch-all route dispatches to the Stripe endpoint table so that unknown paths and methods get
Stripe's "Unrecognized request URL" 404 instead of Starlette's. ``/_sandbox/...`` holds the
sandbox-only controls (faults, request log, completing a checkout), under the same auth.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute

from . import catalog, checkout, connect, customers, events, invoices, meters, payments, refunds, subscriptions
from .auth import SANDBOX_SECRET_KEY, authenticate, key_from_header
from .core import DEFAULT_API_VERSION, Route
from .errors import StripeError, fault, invalid, unrecognized_url
from .faults import Fault
from .forms import Form, decode, decode_json
from .ids import request_id
from .params import Params
from .sandbox import RequestRecord, Sandbox

ROUTES: tuple[Route, ...] = (
    *catalog.ROUTES,
    *customers.ROUTES,
    *checkout.ROUTES,
    *invoices.ROUTES,
    *subscriptions.ROUTES,
    *payments.ROUTES,
    *refunds.ROUTES,
    *events.ROUTES,
    *meters.ROUTES,
    *connect.ROUTES,
)
V2_SESSION = "/v2/billing/meter_event_session"
V2_STREAM = "/v2/billing/meter_event_stream"
V2_EVENTS = "/v2/core/events/"
CONTROL_PREFIX = "/_sandbox/"
ALL_METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]


def _match(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    for route in ROUTES:
        if route.method != method:
            continue
        found = route.regex.match(path)
        if found:
            return route, found.groupdict()
    return None


async def _read_form(request: Request) -> Form:
    """Query string plus body (form-encoded, or JSON for the control routes)."""
    form = decode(request.url.query) if request.url.query else {}
    raw = await request.body()
    if raw:
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                form.update(decode_json(json.loads(raw)))
            except ValueError:
                raise StripeError(400, "Invalid JSON body.") from None
        else:
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                raise StripeError(400, "Request body must be UTF-8.") from None
            form.update(decode(text))
    return form


def _control(sandbox: Sandbox, method: str, path: str, form: Form) -> tuple[int, Any]:
    """The sandbox-only HTTP controls."""
    sub = path[len(CONTROL_PREFIX):]
    if sub == "faults" and method == "POST":
        p = Params(form)
        p.allow(("status", "count", "mode", "delay_ms", "path_prefix"))
        status = p.integer("status") if p.has("status") else (None if p.has("delay_ms") else 500)
        mode = p.string("mode", choices=("before", "after")) or "before"
        try:
            armed = sandbox.faults.inject(
                status=status,
                count=p.integer("count") or 1,
                mode="after" if mode == "after" else "before",
                delay_ms=p.integer("delay_ms") or 0,
                path_prefix=p.string("path_prefix"),
            )
        except ValueError as exc:
            raise invalid("status", str(exc)) from None
        return 200, {"object": "sandbox.fault", **_shown(armed)}
    if sub == "faults" and method == "DELETE":
        sandbox.faults.clear()
        return 200, {"object": "sandbox.faults", "cleared": True}
    if sub == "faults" and method == "GET":
        return 200, {"object": "list", "data": [_shown(f) for f in sandbox.faults.active()]}
    if sub == "requests" and method == "GET":
        return 200, {"object": "list", "data": [asdict(r) for r in sandbox.request_log]}
    if sub == "advance" and method == "POST":
        p = Params(form)
        p.allow(("days", "hours"))
        amounts = []
        for key in ("days", "hours"):
            try:
                amounts.append(float(p.string(key) or 0))
            except ValueError:
                raise invalid(key, f"Invalid number: {p.string(key)}") from None
        if min(amounts) < 0:
            raise invalid("days", "The sandbox clock only moves forward.")
        events = sandbox.advance(days=amounts[0], hours=amounts[1])
        return 200, {"object": "sandbox.clock", "now": sandbox.now(), "events": events}
    if sub == "clock" and method == "GET":
        return 200, {"object": "sandbox.clock", "now": sandbox.now(), "events": []}
    if sub == "trigger" and method == "POST":
        p = Params(form)
        p.allow(("type", "customer", "subscription"))
        kind = p.req_str("type")
        try:
            return 200, sandbox.trigger(kind, customer=p.string("customer"), subscription=p.string("subscription"))
        except ValueError as exc:
            raise invalid("type", str(exc)) from None
    if sub == "fail_payments" and method == "POST":
        p = Params(form)
        p.allow(("customer", "fail"))
        customer = p.req_str("customer")
        fail = p.boolean("fail")
        sandbox.fail_payments(customer, True if fail is None else fail)
        return 200, {"object": "sandbox.fail_payments", "customer": customer, "fail": fail is not False}
    parts = sub.split("/")
    if method == "POST" and len(parts) == 4 and parts[:2] == ["checkout", "sessions"] \
            and parts[3] == "complete":
        return 200, sandbox.complete_checkout_session(parts[2])
    if method == "POST" and len(parts) == 3 and parts[0] == "accounts" \
            and parts[2] in ("complete_onboarding", "restrict"):
        return 200, sandbox.complete_account_onboarding(parts[1], onboarded=parts[2] == "complete_onboarding")
    if method == "POST" and len(parts) == 3 and parts[0] == "payment_links" and parts[2] == "pay":
        return 200, sandbox.pay_payment_link(parts[1])
    raise unrecognized_url(method, path)


def _v2_envelope(exc: StripeError) -> dict[str, Any]:
    """The v2 error shape: ``{"error": {"type", "code", "message"}}``."""
    err: dict[str, Any] = {"type": exc.type, "code": exc.code, "message": exc.message}
    if exc.param is not None:
        err["param"] = exc.param
    return {"error": err}


async def _v2(sandbox: Sandbox, request: Request, method: str, path: str) -> tuple[int, Any]:
    """The v2 meter event endpoints: JSON bodies, v2 error shapes, a session token for the stream; and the full
    form of a thin event (``GET /v2/core/events/{id}``)."""
    if method == "GET" and path.startswith(V2_EVENTS) and "/" not in path[len(V2_EVENTS):]:
        return 200, sandbox.run(lambda ctx: meters.retrieve_v2_event(ctx, path[len(V2_EVENTS):]))
    if method != "POST" or path not in (V2_SESSION, V2_STREAM):
        raise StripeError(404, f"Unrecognized request URL ({method}: {path}).", code="not_found")
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise StripeError(400, "Invalid JSON body.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise StripeError(400, "Request body must be a JSON object.", code="invalid_json")
    if path == V2_SESSION:
        return 200, sandbox.run(meters.create_session)
    token = key_from_header(request.headers.get("authorization"))
    events = data.get("events")
    errors = sandbox.meter_event_errors

    def work(ctx: Any) -> dict[str, Any]:
        if not meters.session_valid(ctx, token):
            raise StripeError(401, "The meter event session has expired (or is unknown). Create a new meter "
                              "event session and retry with its authentication_token.",
                              type="temporary_session_expired", code="billing_meter_event_session_expired")
        if not isinstance(events, list) or not events:
            raise StripeError(400, "`events` must be a non-empty array.", code="parameter_missing", param="events")
        if len(events) > meters.MAX_STREAM_EVENTS:
            raise StripeError(400, f"`events` can contain at most {meters.MAX_STREAM_EVENTS} events; got "
                              f"{len(events)}.", code="parameter_invalid", param="events")
        meters.stream(ctx, events, errors)
        return {}

    return 200, sandbox.run(work)


def create_app(
    db_path: str = ":memory:",
    api_keys: Iterable[str] = (SANDBOX_SECRET_KEY,),
    webhook_target: str | Callable[..., Any] | None = None,
) -> Starlette:
    """A Stripe-compatible app over a fresh or persisted (``db_path`` file) sandbox.

    ``api_keys`` are the accepted secret keys; ``SANDBOX_SECRET_KEY`` unless told otherwise.
    ``webhook_target`` (a URL or an ASGI app) receives every Event as a signed webhook
    (``sandbox.webhooks.configure`` for the other options).
    """
    sandbox = Sandbox(db_path, api_keys)
    if webhook_target is not None:
        sandbox.webhooks.configure(webhook_target)

    async def dispatch(request: Request) -> Response:
        method, path = request.method, request.url.path
        rid = request_id()
        version = request.headers.get("stripe-version") or DEFAULT_API_VERSION
        idem = request.headers.get("idempotency-key") if method == "POST" else None
        control = path.startswith(CONTROL_PREFIX)
        replayed = False
        armed: Fault | None = None
        v2 = path.startswith("/v2/")
        account = request.headers.get("stripe-account") or None
        try:
            api_key = "" if path == V2_STREAM else authenticate(request.headers.get("authorization"),
                                                                sandbox.api_keys)
            armed = None if control else sandbox.faults.take(path)
            if armed is not None and armed.delay_ms:
                await anyio.sleep(armed.delay_ms / 1000)
            if armed is not None and armed.gate is not None and armed.mode == "before":
                await armed.gate()
            if armed is not None and armed.status is not None and armed.mode == "before":
                raise fault(armed.status)
            if v2 and (path in (V2_SESSION, V2_STREAM) or path.startswith(V2_EVENTS)):  # the rest: routes
                status, payload = await _v2(sandbox, request, method, path)
                body = json.dumps(payload)
            elif control:
                status, payload = _control(sandbox, method, path, await _read_form(request))
                body = json.dumps(payload)
            else:
                matched = _match(method, path)
                if matched is None:
                    raise unrecognized_url(method, path)
                route, args = matched
                form = await _read_form(request)
                outcome = sandbox.execute(
                    route, form, args, method=method, path=path, api_key=api_key,
                    idempotency_key=idem, request_id=rid, api_version=version, account=account,
                )
                status, body, replayed = outcome.status, outcome.body, outcome.replayed
                if armed is not None and armed.gate is not None and armed.mode == "after":
                    await armed.gate()  # done, its answer held back
                if armed is not None and armed.status is not None:  # "after": the answer is lost
                    raise fault(armed.status)
        except StripeError as exc:
            status, body = exc.status, json.dumps(_v2_envelope(exc) if v2 else exc.envelope(rid))
        headers = {"Request-Id": rid, "Stripe-Version": version}
        if idem is not None:
            headers["Idempotency-Key"] = idem
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        if not control:
            sandbox.request_log.append(RequestRecord(method, path, status, idem, replayed))
        return Response(body, status_code=status, headers=headers, media_type="application/json")

    app = Starlette(routes=[StarletteRoute("/{path:path}", dispatch, methods=ALL_METHODS)])
    app.state.sandbox = sandbox
    return app


def serve_sandbox(host: str = "127.0.0.1", port: int = 12111, db_path: str = ":memory:",
                  forward_to: str | None = None) -> None:
    """Serve the sandbox over HTTP until interrupted (``aims-billing-mcp sandbox --port N``).

    With ``forward_to`` (a URL), every Event is also delivered there as a signed webhook, like
    ``stripe listen --forward-to``.
    """
    import uvicorn

    app = create_app(db_path=db_path, webhook_target=forward_to)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        app.state.sandbox.close()


def _shown(fault: Fault) -> dict[str, Any]:
    """A fault as JSON: its gate (a test's callable) is not data."""
    return {name: value for name, value in asdict(fault).items() if name != "gate"}
