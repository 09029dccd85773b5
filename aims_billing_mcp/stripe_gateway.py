"""The only module that imports `stripe`: one StripeClient, our idempotency keys, and the one error translation.

Every call is a `StripeRequest` (method, path, params, idempotency key) sent through `StripeClient.raw_request_async`,
so a dry run can show the exact request (`describe`) that `send` would make, by construction. With no key the
client talks to the embedded sandbox in-process through `ASGIHTTPClient`, so tests and the demo run the same SDK
path (encoding, headers, retries, error classes) as production.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import anyio
import stripe
from stripe._encode import _api_encode

from .errors import (
    BillingError,
    ConfigurationError,
    StripeAuthenticationFailed,
    StripeCardDeclined,
    StripeError,
    StripeInvalidRequest,
    StripeRateLimited,
    StripeUnavailable,
)
from .redact import redact_text
from .sandbox.asgi_client import call_asgi
from .settings import Settings, StripeMode

API_VERSION = "2026-01-28.clover"
STRIPE_API_BASE = "https://api.stripe.com"
STRIPE_METER_EVENTS_BASE = "https://meter-events.stripe.com"  # where Stripe serves the v2 meter event stream
# The Stripe request ids of the current tool call, for its audit row (set by the server around each call).
last_request_ids: ContextVar[list[str] | None] = ContextVar("stripe_request_ids", default=None)
SANDBOX_BASE = "http://sandbox.stripe.internal"
log = logging.getLogger(__name__)


def stripe_idempotency_key(tool: str, key: str) -> str:
    """Deterministic: the same (tool, our key) always sends Stripe the same key, so a retry after a crash between
    Stripe's answer and our COMMIT cannot create a second object."""
    digest = hashlib.sha256(f"{tool}\x00{key}".encode()).hexdigest()[:40]
    return f"aims-{tool}-{digest}"


def encode_form(params: Mapping[str, Any]) -> str:
    """The body exactly as the SDK encodes it (nested `a[b][0][c]` keys, brackets left readable)."""
    return urlencode(list(_api_encode(dict(params)))).replace("%5B", "[").replace("%5D", "]")


@dataclass(frozen=True)
class StripeRequest:
    """One Stripe call. `base` picks the SDK's base address ("api", or "meter_events" for the v2 meter event
    stream); `api_key` overrides the client's key for this call alone (the stream is authorized by a meter event
    session's token, not by the secret key)."""

    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    base: str = "api"
    api_key: str | None = field(default=None, repr=False)
    stripe_account: str | None = None  # the Stripe-Account header: act as this connected account

    def describe(self, base_url: str, api_version: str) -> dict[str, Any]:
        body = encode_form(self.params)
        out: dict[str, Any] = {
            "method": self.method.upper(),
            "url": f"{base_url}{self.path}" + (f"?{body}" if self.method.lower() == "get" and body else ""),
            "params": self.params,
            "stripe_version": api_version,
        }
        if self.method.lower() != "get":
            out["body"] = body
            out["idempotency_key"] = self.idempotency_key
        return out


@dataclass(frozen=True)
class StripeResult:
    data: dict[str, Any]
    request_id: str | None


class ASGIHTTPClient(stripe.HTTPClient):
    """Routes the SDK's HTTP into an ASGI app (the sandbox) with no socket. Async requests call the app directly
    with one ASGI scope (httpx.ASGITransport did the same job at about twice the cost per call, measured by
    bench/tool_latency.py); sync requests go through starlette's TestClient. `retry_delay_scale` shortens the SDK's
    retry backoff, which exists to spare a remote API and only slows an in-process one."""

    name = "asgi"

    def __init__(self, app: Any = None, *, factory: Callable[[], Any] | None = None,
                 retry_delay_scale: float = 1.0) -> None:
        super().__init__()
        if app is None and factory is None:
            raise ValueError("give the ASGI app, or a factory that builds it on first use")
        self._app = app
        self._factory = factory
        self._on_ready: list[Callable[[Any], None]] = []
        self._scale = retry_delay_scale
        self._sync: Any = None

    @property
    def app(self) -> Any:
        """The app, built on the first request when a factory was given (the sandbox costs start-up time)."""
        if self._app is None:
            assert self._factory is not None
            self._app = self._factory()
            for callback in self._on_ready:
                callback(self._app)
        return self._app

    @property
    def ready(self) -> bool:
        return self._app is not None

    def when_ready(self, callback: Callable[[Any], None]) -> None:
        """Run `callback(app)` once the app exists (now, if it already does)."""
        if self._app is not None:
            callback(self._app)
        else:
            self._on_ready.append(callback)

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        try:
            body, status, raw_headers = await call_asgi(self.app, method, url, headers, post_data)
            # ASGI header names are lowercase already, which is how the SDK looks them up; a plain dict keeps httpx
            # (and the CLI extras it imports) off the start-up path.
            return body, status, {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}
        except Exception as exc:  # the sandbox crashed: the SDK treats this like a network error
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"sandbox request failed: {type(exc).__name__}", should_retry=True
            ) from exc

    def request(  # type: ignore[override]
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None, **_: Any
    ) -> tuple[bytes, int, Mapping[str, str]]:
        if self._sync is None:
            from starlette.testclient import TestClient

            self._sync = TestClient(self.app, raise_server_exceptions=False)
        response = self._sync.request(method, url, headers=dict(headers or {}), content=post_data)
        return response.content, response.status_code, response.headers

    def request_stream(
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any = None, **_: Any
    ) -> tuple[Iterator[bytes], int, Mapping[str, str]]:
        content, status, rheaders = self.request(method, url, headers, post_data)
        return iter([content]), status, rheaders

    async def request_stream_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[AsyncIterator[bytes], int, Mapping[str, str]]:
        content, status, rheaders = await self.request_async(method, url, headers, post_data)

        async def chunks() -> AsyncIterator[bytes]:
            yield content

        return chunks(), status, rheaders

    async def sleep_async(self, secs: float) -> None:  # type: ignore[override]
        await anyio.sleep(secs * self._scale)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()

    async def close_async(self) -> None:
        return None


class HTTPXContentClient(stripe.HTTPXClient):
    """The SDK's httpx client, sending the encoded body as `content=`: its own `data=<str>` is deprecated by httpx
    and warns on every POST."""

    def _get_request_args_kwargs(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any
    ) -> list[Any]:
        args, kwargs = super()._get_request_args_kwargs(method, url, headers, post_data)
        body = kwargs.pop("data", None)
        if body:
            kwargs["content"] = body
        return [args, kwargs]


class StripeGateway:
    """One StripeClient with our version, retries and keys; `send` is the single door to Stripe."""

    def __init__(
        self,
        api_key: str,
        *,
        mode: StripeMode,
        base_url: str = STRIPE_API_BASE,
        meter_events_url: str | None = None,
        http_client: stripe.HTTPClient | None = None,
        api_version: str = API_VERSION,
        max_network_retries: int = 2,
        rate_limit_retries: int = 2,
        retry_delay_scale: float = 1.0,
        refusal: str | None = None,
    ) -> None:
        self.mode = mode
        self.base_url = base_url
        # Stripe serves the v2 meter event stream from its own host; a sandbox or override serves everything
        self.meter_events_url = meter_events_url or (
            STRIPE_METER_EVENTS_BASE if base_url == STRIPE_API_BASE else base_url)
        self.embedded: ASGIHTTPClient | None = http_client if isinstance(http_client, ASGIHTTPClient) else None
        self.api_version = api_version
        self._refusal = refusal
        self._rate_limit_retries = rate_limit_retries
        self._scale = retry_delay_scale
        self._http_client = http_client
        self._client_args: dict[str, Any] = {
            "stripe_version": api_version, "max_network_retries": max_network_retries,
            "base_addresses": {"api": base_url, "meter_events": self.meter_events_url},
        }
        self._api_key = api_key
        self._stripe_client: stripe.StripeClient | None = None

    @property
    def _client(self) -> stripe.StripeClient:
        """Built on the first call, not at start-up: the client (and, for Stripe itself, its TLS context) costs tens
        of milliseconds that the time to the first tools/list should not pay."""
        if self._stripe_client is None:
            if self._http_client is None:
                self._http_client = HTTPXContentClient()
            self._stripe_client = stripe.StripeClient(self._api_key, http_client=self._http_client,
                                                      **self._client_args)
        return self._stripe_client

    def describe(self, request: StripeRequest) -> dict[str, Any]:
        base_url = self.meter_events_url if request.base == "meter_events" else self.base_url
        return request.describe(base_url, self.api_version)

    async def send(self, request: StripeRequest) -> StripeResult:
        """Send one request; 429 is retried here with backoff (the SDK does not), with the same idempotency key."""
        if self._refusal:
            raise ConfigurationError(self._refusal, param="STRIPE_SECRET_KEY")
        options: dict[str, Any] = {}
        if request.idempotency_key and request.method.lower() != "get":
            options["idempotency_key"] = request.idempotency_key
        if request.base != "api":
            options["base"] = request.base
        if request.api_key is not None:
            options["api_key"] = request.api_key
        if request.stripe_account is not None:
            options["stripe_account"] = request.stripe_account
        attempt = 0
        while True:
            try:
                response = await self._client.raw_request_async(
                    request.method.lower(), request.path, **request.params, **options
                )
            except stripe.RateLimitError as exc:
                _note_request_id(exc.request_id)
                if attempt >= self._rate_limit_retries:
                    raise translate_stripe_error(exc) from None
                attempt += 1
                await anyio.sleep(min(0.5 * 2 ** (attempt - 1), 4.0) * self._scale)
            except stripe.StripeError as exc:
                _note_request_id(exc.request_id)
                raise translate_stripe_error(exc) from None
            else:
                _note_request_id(response.request_id)
                return StripeResult(data=dict(response.data), request_id=response.request_id)

    async def close(self) -> None:
        if self._http_client is None:
            return
        with contextlib.suppress(NotImplementedError):
            await self._http_client.close_async()  # type: ignore[no-untyped-call]


def _note_request_id(request_id: str | None) -> None:
    ids = last_request_ids.get()
    if ids is not None and request_id:
        ids.append(request_id)


_HINTS = {
    "price": "create one with create_price (or run `aims-billing-mcp setup-stripe`), or pass an existing price id",
    "customer": "create one with create_customer, or pass an existing customer id",
    "product": "create one with create_product, or pass an existing product id",
}


def translate_stripe_error(exc: stripe.StripeError) -> BillingError:
    """The one place Stripe's exceptions become ours: keep type, code, param, request_id and doc_url; mask secrets."""
    err = exc.error
    details: dict[str, Any] = {
        "stripe_type": getattr(err, "type", None),
        "stripe_code": exc.code or getattr(err, "code", None),
        "request_id": exc.request_id,
        "doc_url": getattr(err, "doc_url", None),
        "http_status": exc.http_status,
    }
    param = getattr(err, "param", None)
    text = redact_text(getattr(err, "message", None) or exc.user_message or str(exc) or type(exc).__name__)
    if isinstance(exc, stripe.AuthenticationError):
        return StripeAuthenticationFailed(
            f"Stripe rejected the API key (401): {text} Check STRIPE_SECRET_KEY (an sk_test_ key from the "
            "dashboard), or unset it to use the embedded sandbox.",
            **details,
        )
    if isinstance(exc, stripe.PermissionError):
        return StripeAuthenticationFailed(
            f"the API key may not do this (403): {text} Grant the restricted key this permission or use another.",
            **details,
        )
    if isinstance(exc, stripe.CardError):
        details["decline_code"] = getattr(err, "decline_code", None)
        return StripeCardDeclined(f"the card was declined: {text} Ask for another payment method.", param=param,
                                  **details)
    if isinstance(exc, stripe.TemporarySessionExpiredError):
        return StripeSessionExpired(
            f"the v2 meter event session expired: {text} Create a new meter event session and resend.", **details
        )
    if isinstance(exc, stripe.RateLimitError):
        return StripeRateLimited(
            f"Stripe is rate limiting this account (429) and our retries ran out: {text} Wait a few seconds and "
            "retry with the same idempotency_key.",
            **details,
        )
    if isinstance(exc, stripe.InvalidRequestError | stripe.IdempotencyError):
        field = (param or "").split("[")[0]
        hint = _HINTS.get(field) if details["stripe_code"] == "resource_missing" else None
        message = f"Stripe refused the request: {text}" + (f" ({param})" if param and param not in text else "")
        return StripeInvalidRequest(message + (f": {hint}" if hint else ""), param=param, **details)
    if isinstance(exc, stripe.APIConnectionError):
        return StripeUnavailable(
            f"could not reach Stripe after retries: {text} Retry later with the same idempotency_key.", **details
        )
    return StripeUnavailable(
        f"Stripe failed to answer ({exc.http_status or 'no status'}): {text} Retry with the same idempotency_key.",
        **details,
    )


class StripeSessionExpired(StripeError):
    """A v2 meter event session token expired (or is unknown): create a new session and resend."""

    code = "stripe_session_expired"
    retryable = True


def build_gateway(settings: Settings, *, sandbox_app: Any = None, retry_delay_scale: float = 1.0) -> StripeGateway:
    """Pick the target from the settings: the embedded sandbox in-process (no key, or an app handed in by tests),
    a base URL override (a standalone sandbox), or Stripe itself."""
    refusal = settings.live_key_problem()
    key = settings.stripe_secret_key.get_secret_value() if settings.stripe_secret_key else None
    if sandbox_app is not None or (key is None and settings.stripe_api_base is None):
        from .sandbox import SANDBOX_SECRET_KEY

        def sandbox_from_file() -> Any:
            from .sandbox import create_app

            return create_app(db_path=str(settings.sandbox_db_path))

        client = ASGIHTTPClient(sandbox_app, factory=None if sandbox_app is not None else sandbox_from_file,
                                retry_delay_scale=retry_delay_scale)
        return StripeGateway(
            key or SANDBOX_SECRET_KEY,
            mode=StripeMode.SANDBOX,
            base_url=SANDBOX_BASE,
            http_client=client,
            retry_delay_scale=retry_delay_scale,
            refusal=refusal,
        )
    if key is None:
        from .sandbox import SANDBOX_SECRET_KEY

        key = SANDBOX_SECRET_KEY
    mode = StripeMode.SANDBOX if "aims_sandbox" in key else settings.stripe_mode
    return StripeGateway(
        key,
        mode=mode,
        base_url=settings.stripe_api_base or STRIPE_API_BASE,
        retry_delay_scale=retry_delay_scale,
        refusal=refusal,
    )


__all__ = [
    "API_VERSION",
    "ASGIHTTPClient",
    "StripeError",
    "StripeGateway",
    "StripeRequest",
    "StripeResult",
    "StripeSessionExpired",
    "build_gateway",
    "last_request_ids",
    "stripe_idempotency_key",
    "translate_stripe_error",
]
