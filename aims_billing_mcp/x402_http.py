"""`GET /x402/credits?agent_id=...&luc=...`: x402 over plain HTTP, so any x402 client can buy LUC credits.

Without a payment header it answers 402 with the challenge in `PAYMENT-REQUIRED` (and as the JSON body); with
`PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1) it verifies, settles, credits and answers 200 with `PAYMENT-RESPONSE`.
A refused payment answers 402 again with the reason code, so the client can pay afresh.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .errors import BillingError, PaymentRejected

if TYPE_CHECKING:
    from .tools.context import AppState

CREDITS_PATH = "/x402/credits"


def credits_handler(get_state: Callable[[], AppState | None]) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def handle(request: Request) -> JSONResponse:
        from .tools.x402 import quote_id_of

        state = get_state()
        if state is None:
            return JSONResponse({"error": "the server is starting: retry"}, status_code=503)
        agent_id, luc_text = request.query_params.get("agent_id"), request.query_params.get("luc", "")
        if not agent_id or not luc_text.isdigit() or int(luc_text) <= 0:
            return JSONResponse({"error": "invalid_request", "message": "pass agent_id and a positive whole luc, e.g. "
                                 "/x402/credits?agent_id=planner&luc=5000"}, status_code=400)
        payment = request.headers.get("payment-signature") or request.headers.get("x-payment")
        try:
            if payment:
                quote = request.query_params.get("quote_id") or quote_id_of(payment)
                if not quote:
                    raise PaymentRejected("invalid_payment_requirements", "a v1 X-PAYMENT does not name its quote: "
                                          "add quote_id to the query", param="quote_id")
                receipt = await state.x402.verify_and_settle(payment, quote_id=quote)
                return JSONResponse(receipt.model_dump(mode="json"),
                                    headers={"PAYMENT-RESPONSE": receipt.payment_response_header})
            return await challenge(state, agent_id, int(luc_text), error=None)
        except PaymentRejected as exc:
            return await challenge(state, agent_id, int(luc_text), error=exc)
        except BillingError as exc:
            return JSONResponse({"error": exc.code, "message": exc.message}, status_code=400)

    return handle


async def challenge(state: AppState, agent_id: str, luc: int, *, error: PaymentRejected | None) -> JSONResponse:
    required = await state.x402.create_requirements(
        luc=luc, agent_id=agent_id, description=f"{luc} LUC credits for agent {agent_id}", resource=CREDITS_PATH)
    body = dict(required.payment_required)
    if error is not None:
        body.update({"error": error.code, "message": error.message})
    return JSONResponse(body, status_code=402, headers={"PAYMENT-REQUIRED": required.header})


def credits_route(get_state: Callable[[], AppState | None]) -> Route:
    return Route(CREDITS_PATH, credits_handler(get_state), methods=["GET"])
