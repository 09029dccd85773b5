"""API keys of the sandbox and Stripe-style authentication errors.

The keys are fixed and public on purpose: the sandbox holds no real money and tools pointed at it
(the Stripe CLI, other SDKs) need a key they can be configured with.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection

from .errors import StripeError

SANDBOX_SECRET_KEY = "sk_test_aims_sandbox_4eC39HqLyjWDarjtT1zdp7dc"
SANDBOX_PUBLISHABLE_KEY = "pk_test_aims_sandbox_TYooMQauvdEDq54NiTphI7jx"
SANDBOX_WEBHOOK_SECRET = "whsec_aims_sandbox_0000000000000000000000000000"


def key_from_header(authorization: str | None) -> str | None:
    """The API key in ``Bearer <key>`` or ``Basic base64(<key>:)``; None when absent."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ""
        return decoded.partition(":")[0]
    return ""


def mask(key: str) -> str:
    """Stripe never echoes a key: it keeps the prefix and the last four characters."""
    prefix = key[:8] if key.startswith(("sk_", "rk_", "pk_")) else ""
    return f"{prefix}{'*' * 4}{key[-4:]}" if len(key) > 4 else "****"


def authenticate(authorization: str | None, accepted: Collection[str]) -> str:
    """The accepted key of a request, or the 401 Stripe answers."""
    key = key_from_header(authorization)
    if key is None:
        raise StripeError(
            401,
            "You did not provide an API key. You need to provide your API key in the Authorization "
            "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
            "https://stripe.com/docs/api#authentication for details, or we can help at "
            "https://support.stripe.com/.",
        )
    if key not in accepted:
        raise StripeError(401, f"Invalid API Key provided: {mask(key)}")
    return key
