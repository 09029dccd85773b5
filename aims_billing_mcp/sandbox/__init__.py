"""An embedded, stateful, Stripe-compatible HTTP API for offline runs and tests.

The real ``stripe`` SDK talks to it over HTTP (in process through an ASGI/WSGI-style transport,
or on loopback via :func:`serve_sandbox`), so the code path is the same as against Stripe:
same JSON shapes, ids, list and error envelopes, idempotency and auth. It also offers controls
real Stripe does not have: fault injection, a request log, completing a Checkout Session as if the
customer paid, and signed webhook delivery of every Event (like ``stripe listen``).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .auth import SANDBOX_PUBLISHABLE_KEY, SANDBOX_SECRET_KEY, SANDBOX_WEBHOOK_SECRET

if TYPE_CHECKING:
    from .app import create_app, serve_sandbox
    from .asgi_client import call_asgi
    from .errors import StripeError
    from .faults import Fault, FaultInjector
    from .sandbox import RequestRecord, Sandbox
    from .webhooks import DeliveryRecord, WebhookSender, signature_header

# The app and its modules load on first use (PEP 562): a server talking to Stripe itself never pays for them, and
# one on the sandbox pays when the first Stripe call is made, not before its first tools/list.
_LAZY = {
    "create_app": "app", "serve_sandbox": "app", "call_asgi": "asgi_client", "StripeError": "errors",
    "Fault": "faults", "FaultInjector": "faults", "RequestRecord": "sandbox", "Sandbox": "sandbox",
    "DeliveryRecord": "webhooks", "WebhookSender": "webhooks", "signature_header": "webhooks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "SANDBOX_PUBLISHABLE_KEY",
    "SANDBOX_SECRET_KEY",
    "SANDBOX_WEBHOOK_SECRET",
    "DeliveryRecord",
    "Fault",
    "FaultInjector",
    "RequestRecord",
    "Sandbox",
    "StripeError",
    "WebhookSender",
    "call_asgi",
    "create_app",
    "serve_sandbox",
    "signature_header",
]
