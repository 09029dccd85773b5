"""Events (``/v1/events``): what happened, newest first, as recorded by :meth:`Ctx.record_event`."""

from __future__ import annotations

from collections.abc import Mapping

from .core import LIST_PARAMS, Ctx, Obj, Route, list_page
from .params import Params


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


ROUTES = [
    Route("GET", "/v1/events", list_events),
    Route("GET", "/v1/events/{id}", retrieve_event),
]
