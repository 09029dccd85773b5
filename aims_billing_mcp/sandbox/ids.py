"""Stripe-shaped identifiers: a prefix and a random base62 body."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def random_base62(length: int) -> str:
    """Cryptographically random base62 text (ids must not collide across runs of a persisted DB).

    One urandom read per id, mapped through the alphabet (bytes 248-255 are dropped to keep the mapping uniform):
    a fifth of the cost of one `secrets.choice` per character, and every request makes a `req_` id."""
    out: list[str] = []
    while len(out) < length:
        out.extend(_ALPHABET[b % 62] for b in secrets.token_bytes(length + 8) if b < 248)
    return "".join(out[:length])


def new_id(prefix: str, length: int = 24) -> str:
    """An id like ``cus_Qx3...``; ``prefix`` includes the underscore, e.g. ``"cus_"``."""
    return prefix + random_base62(length)


def checkout_session_id() -> str:
    """Checkout session ids are long, like Stripe's ``cs_test_a1YS...`` (66 chars)."""
    return new_id("cs_test_a1", 56)


def request_id() -> str:
    """The ``Request-Id`` header value of one response."""
    return new_id("req_", 14)
