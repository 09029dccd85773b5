"""Stripe error envelopes.

Handlers raise :class:`StripeError`; the app turns it into the JSON body and status code Stripe
would answer with, so the real SDK maps it to the same exception class it would raise against
Stripe (400/404 -> InvalidRequestError, 401 -> AuthenticationError, 402 -> CardError, ...).
"""

from __future__ import annotations

from typing import Any

DOC_BASE = "https://stripe.com/docs/error-codes/"


class StripeError(Exception):
    """An API error with everything needed to render Stripe's ``{"error": {...}}`` envelope.

    ``commit`` says whether the state changes made before the error stay (true for card
    declines, which leave the PaymentIntent with ``last_payment_error`` set) or are rolled back.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
        extra: dict[str, Any] | None = None,
        commit: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.decline_code = decline_code
        self.extra = extra or {}
        self.commit = commit

    def envelope(self, request_id: str | None = None) -> dict[str, Any]:
        """The response body: only the keys Stripe sends for this kind of error."""
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            err["code"] = self.code
            err["doc_url"] = DOC_BASE + self.code
        if self.param is not None:
            err["param"] = self.param
        if self.decline_code is not None:
            err["decline_code"] = self.decline_code
        if request_id is not None:
            err["request_log_url"] = f"https://dashboard.stripe.com/test/logs/{request_id}"
        err.update(self.extra)
        return {"error": err}


def missing(param: str) -> StripeError:
    """A required parameter was not sent."""
    return StripeError(400, f"Missing required param: {param}.", code="parameter_missing", param=param)


def unknown(param: str) -> StripeError:
    """A parameter the endpoint does not take (Stripe refuses rather than ignores)."""
    return StripeError(
        400, f"Received unknown parameter: {param}", code="parameter_unknown", param=param
    )


def no_such(kind: str, obj_id: str, param: str) -> StripeError:
    """An id that does not name a stored object of the expected kind."""
    return StripeError(
        404, f"No such {kind}: '{obj_id}'", code="resource_missing", param=param
    )


def invalid(param: str, message: str, code: str = "parameter_invalid_string") -> StripeError:
    """A parameter whose value is not acceptable."""
    return StripeError(400, message, code=code, param=param)


def invalid_state(message: str, param: str | None = None) -> StripeError:
    """The object exists but is not in a state that allows this action."""
    return StripeError(400, message, param=param)


def card_declined(message: str = "Your card was declined.", **extra: Any) -> StripeError:
    """A declined test card: 402 card_error that keeps the state changes."""
    return StripeError(
        402,
        message,
        type="card_error",
        code="card_declined",
        decline_code="generic_decline",
        extra=extra,
        commit=True,
    )


def unrecognized_url(method: str, path: str) -> StripeError:
    """No route matches: Stripe's own wording, with the method and path."""
    return StripeError(
        404,
        f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can "
        "help at https://support.stripe.com/.",
    )


def rate_limited() -> StripeError:
    """The 429 an injected fault (or real Stripe under load) answers."""
    return StripeError(
        429,
        "Too many requests hit the API too quickly. We recommend an exponential backoff of your "
        "requests.",
        code="rate_limit",
    )


def api_error(status: int = 500) -> StripeError:
    """A server-side failure (injected)."""
    return StripeError(
        status,
        "An unknown error occurred (injected by the AIMS sandbox).",
        type="api_error",
    )


def idempotency_mismatch(key: str) -> StripeError:
    """Same Idempotency-Key reused with other parameters or on another endpoint."""
    return StripeError(
        400,
        "Keys for idempotent requests can only be used with the same parameters they were first "
        f"used with. Try using a key other than '{key}' if you meant to execute a different request.",
        type="idempotency_error",
    )


def fault(status: int) -> StripeError:
    """The error an injected fault answers with for ``status``."""
    if status == 429:
        return rate_limited()
    if status >= 500:
        return api_error(status)
    if status == 402:
        return card_declined()
    return StripeError(status, f"Injected fault with status {status}.")
