"""`GET /x402/credits?agent_id=...&luc=...`: x402 over plain HTTP, so any x402 client can buy LUC credits.

Without a payment header it answers 402 with the challenge in `PAYMENT-REQUIRED` (and as the JSON body); the
challenge stores nothing (its quote id is a signed token, stored only when paid). With `PAYMENT-SIGNATURE` (v2) or
`X-PAYMENT` (v1, add `quote_id`) it verifies, settles, credits and answers 200 with `PAYMENT-RESPONSE`. The payment
must be for this request's agent and luc (its accepted quote says so). A refused payment answers 402 again with the
reason code, so the client can pay afresh.

Every other answer is a 4xx/5xx with `{"error", "message", "param"}`: a query that does not parse into
`CreditsQuery` or a malformed, oversized or doubled payment header is 400, an unknown wallet 404, x402 refused by the
configuration (live mode) 503.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse

from .errors import BillingError, ConfigurationError, InvalidInput, NotFound, PaymentRejected, Refused
from .models import AgentId
from .services.x402 import MAX_LUC, MAX_PAYMENT_CHARS, MAX_QUOTE_ID, Challenge, decode_payment_header

if TYPE_CHECKING:
    from .state import AppState

CREDITS_PATH = "/x402/credits"
PAYMENT_HEADERS = ("payment-signature", "x-payment")
EXAMPLE = f"{CREDITS_PATH}?agent_id=planner&luc=5000"


class CreditsQuery(BaseModel):
    """The query string, strictly: luc in ASCII digits (no `²`, no sign, at most 10 digits), no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agent_id: AgentId
    luc: Annotated[int, Field(gt=0, le=MAX_LUC)]
    quote_id: Annotated[str | None, Field(min_length=1, max_length=MAX_QUOTE_ID)] = None

    @field_validator("luc", mode="before")
    @classmethod
    def _ascii_digits(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 10:
            raise ValueError(f"must be a whole number of LUC from 1 to {MAX_LUC} in digits")
        return int(value)


def _answer(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": code, "message": message}
    if param is not None:
        body["param"] = param
    return JSONResponse(body, status_code=status)


def _parse_query(request: Request) -> CreditsQuery | JSONResponse:
    items = request.query_params.multi_items()
    keys = [key for key, _ in items]
    doubled = sorted({key for key in keys if keys.count(key) > 1})
    if doubled:
        return _answer(400, "invalid_request", f"{doubled[0]} is given more than once: give each once, e.g. "
                       f"{EXAMPLE}", doubled[0])
    try:
        return CreditsQuery.model_validate(dict(items))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "query"
        reason = "is required" if first["type"] == "missing" else (
            "is not a parameter of this route" if first["type"] == "extra_forbidden"
            else first["msg"].removeprefix("Value error, "))
        return _answer(400, "invalid_request", f"{field}: {reason[:1].lower()}{reason[1:]}; pass agent_id and a "
                       f"positive whole luc (and quote_id with a v1 X-PAYMENT), e.g. {EXAMPLE}", field)


def _payment_header(request: Request, mode: str) -> str | JSONResponse | None:
    values = [(name, value) for name in PAYMENT_HEADERS for value in request.headers.getlist(name)]
    if len(values) > 1:
        return _answer(400, "invalid_request", "send one payment header (PAYMENT-SIGNATURE or X-PAYMENT), once",
                       "payment")
    if not values:
        return None
    name, value = values[0]
    if len(value) > MAX_PAYMENT_CHARS:
        return _answer(400, "invalid_payload", f"the {name.upper()} header is {len(value)} characters long: at most "
                       f"{MAX_PAYMENT_CHARS}; send the value the x402 client built", "payment")
    try:
        if mode != "stripe":  # there the payment is a PaymentIntent id, checked against Stripe
            decode_payment_header(value)
    except PaymentRejected as exc:
        return _answer(400, exc.code, exc.message, "payment")
    return value


def _status(error: BillingError) -> int:
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, ConfigurationError):
        return 503
    if isinstance(error, Refused):
        return 409
    if isinstance(error, InvalidInput | PaymentRejected):
        return 400
    return 502  # Stripe (stripe mode) did not answer as it should


def credits_handler(get_state: Callable[[], AppState | None]) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def handle(request: Request) -> JSONResponse:
        state = get_state()
        if state is None:
            return JSONResponse({"error": "the server is starting: retry"}, status_code=503)
        query = _parse_query(request)
        if isinstance(query, JSONResponse):
            return query
        payment = _payment_header(request, state.x402.mode)
        if isinstance(payment, JSONResponse):
            return payment
        try:
            outcome = await state.x402.pay_or_challenge(payment, agent_id=query.agent_id, luc=query.luc,
                                                        resource=CREDITS_PATH, quote_id=query.quote_id)
        except BillingError as exc:
            return _answer(_status(exc), exc.code, exc.message, exc.param)
        if isinstance(outcome, Challenge):
            return challenge_response(outcome)
        return JSONResponse(outcome.model_dump(mode="json"),
                            headers={"PAYMENT-RESPONSE": outcome.payment_response_header})

    return handle


def challenge_response(challenge: Challenge) -> JSONResponse:
    """402 with a challenge that stores nothing (and the refusal's reason, after a refused payment)."""
    body = dict(challenge.required.payment_required)
    error = challenge.refusal
    if error is not None:
        body.update({"error": error.code, "message": error.message})
        if error.param is not None:
            body["param"] = error.param
    return JSONResponse(body, status_code=402, headers={"PAYMENT-REQUIRED": challenge.required.header})
