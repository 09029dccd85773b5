"""Events (``/v1/events``): what happened, newest first, as recorded by :meth:`Ctx.record_event`.

An Event's ``pending_webhooks`` is 1 from the moment it is queued for delivery until the endpoint
answers 2xx (then 0), as Stripe counts: :func:`undelivered` lists the ones still pending, for
``aims-billing-mcp sandbox resend --undelivered``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .core import LIST_PARAMS, Ctx, Obj, Route, list_page
from .params import Params

if TYPE_CHECKING:
    from .store import Store
    from .webhooks import DeliveryRecord


def list_events(ctx: Ctx, p: Params, _: Mapping[str, str]) -> Obj:
    p.allow((*LIST_PARAMS, "type", "types", "delivery_success"))
    filters: dict[str, str | list[str]] = {}
    kind = p.string("type")
    if kind is not None:
        filters["type"] = kind
    elif p.has("types"):
        filters["type"] = p.strings("types")
    return list_page(ctx, p, "event", "/v1/events", filters)


def retrieve_event(ctx: Ctx, p: Params, args: Mapping[str, str]) -> Obj:
    return ctx.fetch("event", args["id"], "event", "id")


def record_delivery(store: Store, record: DeliveryRecord) -> None:
    """Keep the outcome on the stored Event: ``pending_webhooks`` 0 once delivered, 1 while not."""
    with store.transaction():
        event = store.get(record.event_id, "event")
        if event is not None and event.get("pending_webhooks") != (0 if record.delivered else 1):
            event["pending_webhooks"] = 0 if record.delivered else 1
            store.update(event)


def undelivered(store: Store) -> list[Obj]:
    """Every Event whose delivery has not succeeded yet, oldest first."""
    found: list[Obj] = []
    after: int | None = None
    while True:
        page, more = store.page("event", {}, limit=100, after_seq=after, oldest_first=True)
        found.extend(event for event in page if event.get("pending_webhooks"))
        if not more or not page:
            return found
        after = store.seq_of(page[-1]["id"], "event")


ROUTES = [
    Route("GET", "/v1/events", list_events),
    Route("GET", "/v1/events/{id}", retrieve_event),
]
