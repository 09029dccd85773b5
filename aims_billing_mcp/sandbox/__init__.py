"""An embedded, stateful, Stripe-compatible HTTP API for offline runs and tests.

The real ``stripe`` SDK talks to it over HTTP (in process through an ASGI/WSGI-style transport,
or on loopback via :func:`serve_sandbox`), so the code path is the same as against Stripe:
same JSON shapes, ids, list and error envelopes, idempotency and auth. It also offers controls
real Stripe does not have: fault injection, a request log, completing a Checkout Session as if the
customer paid, and signed webhook delivery of every Event (like ``stripe listen``).
"""

from .app import create_app, serve_sandbox
from .asgi_client import call_asgi
from .auth import SANDBOX_PUBLISHABLE_KEY, SANDBOX_SECRET_KEY, SANDBOX_WEBHOOK_SECRET
from .errors import StripeError
from .faults import Fault, FaultInjector
from .sandbox import RequestRecord, Sandbox
from .webhooks import DeliveryRecord, WebhookSender, signature_header

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
