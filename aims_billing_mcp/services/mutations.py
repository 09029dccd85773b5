"""The one path every Stripe-mutating tool takes: an idempotent call key, a deterministic Stripe idempotency key,
a dry run that describes exactly what would be sent, and the projection stored for replays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..models import MutationMeta, StripeRequestPreview
from ..store import Tx
from ..stripe_gateway import StripeGateway, StripeRequest, stripe_idempotency_key
from .idempotency import IdempotencyService

R = TypeVar("R", bound=MutationMeta)


def compact(params: dict[str, Any]) -> dict[str, Any]:
    """Drop unset values so the request (and its idempotency hash) carries only what the caller gave."""
    return {k: v for k, v in params.items() if v is not None and v != {}}


class StripeMutations:
    def __init__(self, gateway: StripeGateway, idempotency: IdempotencyService) -> None:
        self._gateway = gateway
        self._idempotency = idempotency

    async def run(
        self,
        tool: str,
        path: str,
        params: dict[str, Any],
        result_type: type[R],
        project: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        idempotency_key: str | None,
        dry_run: bool,
        method: str = "post",
        after: Callable[[dict[str, Any]], Any] | None = None,
        owner: str | None = None,
        after_stores: Callable[[dict[str, Any], Callable[[Tx], None]], Any] | None = None,
    ) -> R:
        """Send `method path params` once per call key; `after(stripe_object)` runs (awaited if async) only when
        Stripe answered a fresh call, never on a replay or a dry run. `owner` (the customer the call acts for) scopes
        the idempotency key: one customer's key never replays another's call. `after_stores(stripe_object,
        store_in)` in place of `after`: when its writer job calls `store_in(tx)` (once what `project` reads is set),
        the call's result is stored in that job instead of in a transaction of its own."""
        call = self._idempotency.key_for(tool, {"path": path, "method": method, **params}, idempotency_key, owner)
        request = StripeRequest(method, path, params, stripe_idempotency_key(tool, call.scoped))
        if dry_run:
            preview = StripeRequestPreview.model_validate(self._gateway.describe(request))
            return result_type(dry_run=True, request=preview)

        async def execute() -> tuple[dict[str, Any], str | None]:
            result = await self._gateway.send(request)

            def response() -> dict[str, Any]:
                return result_type.model_validate(project(result.data)).model_dump(mode="json")

            def store_in(tx: Tx) -> None:
                self._idempotency.record_in(tx, call, response(), result.request_id)

            done: Any = after(result.data) if after is not None else \
                after_stores(result.data, store_in) if after_stores is not None else None
            if hasattr(done, "__await__"):
                await done
            return response(), result.request_id

        outcome = await self._idempotency.run(call, execute)
        return result_type.model_validate({**outcome.response, "replayed": outcome.replayed})
