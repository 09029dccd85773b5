"""The errors a tool can answer with, written for the agent who reads them.

Every message says what went wrong, names the field or cause, and says what to do next. Stripe's own errors are
translated once, in `stripe_gateway.py`, into this tree; nothing else catches SDK exceptions.

    BillingError                      code, message, param, retryable
    ├── InvalidInput                  a field is wrong before anything is sent (names the field)
    │   ├── AmountAboveCeiling        an amount exceeds AIMS_BILLING_MAX_AMOUNT
    │   ├── IdempotencyConflict       the same idempotency key with other arguments
    │   └── UnknownTier               a tier name that is not in the pricing file
    ├── NotFound                      an id of ours that does not exist (wallet, hold, quote, session)
    ├── Refused                       a rule of ours refuses the operation; nothing was written
    │   ├── InsufficientFunds         a debit or hold beyond the available balance
    │   ├── SpendCapExceeded          beyond a wallet's daily spend cap
    │   ├── WalletFrozen              the wallet is frozen
    │   ├── LimitReached              a tier limit (agents, concurrent tasks) is reached
    │   └── InvalidState              e.g. capturing a hold that was released or expired
    ├── PaymentRejected               an x402 payment failed verification or settlement; `code` is the x402
    │                                 spec's reason (invalid_exact_evm_payload_signature, ..._nonce_already_used)
    ├── ConfigurationError            settings refuse the call (live key without opt-in, price not set up)
    ├── DatabaseBusy                  the database could not take the call now (pool exhausted, conflicts kept
    │                                 recurring, connection lost): retry with the same idempotency key
    └── StripeError                   Stripe (or the sandbox) refused or failed; keeps type/code/param/request_id
        ├── StripeAuthenticationFailed    401: the key is wrong or revoked
        ├── StripeInvalidRequest          400/404: a param or id Stripe does not accept
        ├── StripeCardDeclined            402: the card was declined
        ├── StripeRateLimited             429: still limited after our retries
        └── StripeUnavailable             5xx or network: Stripe did not answer
"""

from __future__ import annotations

from typing import Any


class BillingError(Exception):
    """Base of every error a tool reports; `to_dict()` is the one error shape agents see."""

    code = "billing_error"
    retryable = False

    def __init__(self, message: str, *, param: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = {k: v for k, v in details.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message, "retryable": self.retryable}
        if self.param is not None:
            out["param"] = self.param
        out.update(self.details)
        return out


class InvalidInput(BillingError):
    code = "invalid_input"


class AmountAboveCeiling(InvalidInput):
    code = "amount_above_ceiling"


class IdempotencyConflict(InvalidInput):
    code = "idempotency_conflict"


class UnknownTier(InvalidInput):
    code = "unknown_tier"


class NotFound(BillingError):
    code = "not_found"


class Refused(BillingError):
    code = "refused"


class InsufficientFunds(Refused):
    code = "insufficient_funds"


class SpendCapExceeded(Refused):
    code = "spend_cap_exceeded"


class WalletFrozen(Refused):
    code = "wallet_frozen"


class LimitReached(Refused):
    code = "limit_reached"


class InvalidState(Refused):
    code = "invalid_state"


class PaymentRejected(BillingError):
    """An x402 payment refused; the instance's `code` is the x402 spec's reason code, so agents can branch on it."""

    code = "payment_rejected"

    def __init__(self, reason: str, message: str, *, param: str | None = None, **details: Any) -> None:
        super().__init__(message, param=param, **details)
        self.code = reason


class ConfigurationError(BillingError):
    code = "configuration_error"


class DatabaseBusy(BillingError):
    code = "database_busy"
    retryable = True


class StripeError(BillingError):
    code = "stripe_error"


class StripeAuthenticationFailed(StripeError):
    code = "stripe_authentication_failed"


class StripeInvalidRequest(StripeError):
    code = "stripe_invalid_request"


class StripeCardDeclined(StripeError):
    code = "card_declined"


class StripeRateLimited(StripeError):
    code = "stripe_rate_limited"
    retryable = True


class StripeUnavailable(StripeError):
    code = "stripe_unavailable"
    retryable = True
