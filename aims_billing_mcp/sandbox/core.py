"""What every endpoint handler shares: the request context, routes, lists and events.

A handler is a plain synchronous function ``(ctx, params, path_args) -> body``; the app runs it
inside one store transaction, so a handler either fully applies or (on :class:`StripeError`)
is rolled back. Events created during the request are collected on the context and handed to
listeners only after the transaction committed.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import StripeError, no_such
from .ids import new_id
from .params import Params
from .store import Store

DEFAULT_API_VERSION = "2026-01-28.clover"

Obj = dict[str, Any]


@dataclass
class Ctx:
    """Per-request state handed to handlers."""

    store: Store
    now: int
    api_version: str = DEFAULT_API_VERSION
    request_id: str | None = None
    idempotency_key: str | None = None
    events: list[Obj] = field(default_factory=list)
    pending_webhooks: int = 0
    account: str | None = None  # the Stripe-Account header: the connected account the request acts as

    def record_event(self, event_type: str, obj: Obj, previous: Obj | None = None) -> Obj:
        """Store an Event snapshotting ``obj`` now; listeners get it after commit.

        Like Stripe's, it carries the account's API version (not the request's), and
        ``pending_webhooks`` counts the endpoints it will be sent to (the sandbox has at most one).
        """
        data: Obj = {"object": public(obj)}
        if previous is not None:
            data["previous_attributes"] = previous
        event: Obj = {
            "id": new_id("evt_"),
            "object": "event",
            "api_version": DEFAULT_API_VERSION,
            "created": self.now,
            "data": data,
            "livemode": False,
            "pending_webhooks": self.pending_webhooks,
            "request": {"id": self.request_id, "idempotency_key": self.idempotency_key},
            "type": event_type,
        }
        self.store.insert(event)
        self.events.append(event)
        return event

    def fetch(self, obj_type: str, obj_id: str | None, kind: str, param: str) -> Obj:
        """The stored object or Stripe's 404 naming the param that carried the id."""
        found = self.store.get(obj_id, obj_type) if obj_id else None
        if found is None:
            raise no_such(kind, obj_id or "", param)
        return found


Handler = Callable[[Ctx, Params, Mapping[str, str]], Obj]


@dataclass(frozen=True)
class Route:
    """One endpoint: method, path pattern with ``{name}`` segments, handler."""

    method: str
    pattern: str
    handler: Handler
    regex: re.Pattern[str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        rx = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern)
        object.__setattr__(self, "regex", re.compile(f"^{rx}$"))


def public(obj: Obj) -> Obj:
    """The object as clients see it: private ``_`` fields dropped (also inside lists)."""
    out = {k: v for k, v in obj.items() if not k.startswith("_")}
    if out.get("object") == "list" and isinstance(out.get("data"), list):
        out["data"] = [public(o) if isinstance(o, dict) else o for o in out["data"]]
    return out


LIST_PARAMS = ("limit", "starting_after", "ending_before", "created")


def list_page(
    ctx: Ctx,
    p: Params,
    obj_type: str,
    url: str,
    filters: Mapping[str, str | Sequence[str]] | None = None,
    *,
    oldest_first: bool = False,
) -> Obj:
    """A Stripe list envelope for one page, honouring limit/starting_after/ending_before."""
    limit = p.integer("limit")
    if limit is None:
        limit = 10
    if not 1 <= limit <= 100:
        raise StripeError(
            400,
            "This value must be greater than or equal to 1 and less than or equal to 100.",
            code="parameter_invalid_integer",
            param="limit",
        )
    after = p.string("starting_after")
    before = p.string("ending_before")
    after_seq = before_seq = None
    if after is not None:
        after_seq = ctx.store.seq_of(after, obj_type)
        if after_seq is None:
            raise no_such(obj_type.split(".")[-1], after, "starting_after")
    elif before is not None:
        before_seq = ctx.store.seq_of(before, obj_type)
        if before_seq is None:
            raise no_such(obj_type.split(".")[-1], before, "ending_before")
    data, has_more = ctx.store.page(
        obj_type,
        filters or {},
        limit=limit,
        after_seq=after_seq,
        before_seq=before_seq,
        oldest_first=oldest_first,
    )
    return {"object": "list", "data": [public(o) for o in data], "has_more": has_more, "url": url}


def embedded_list(data: list[Obj], url: str) -> Obj:
    """A complete sub-list embedded in a parent object (invoice lines, subscription items)."""
    return {"object": "list", "data": data, "has_more": False, "total_count": len(data), "url": url}


def add_interval(ts: int, interval: str, count: int) -> int:
    """``ts`` advanced by ``count`` billing intervals; months clamp to the month's last day."""
    if interval == "day":
        return ts + 86400 * count
    if interval == "week":
        return ts + 7 * 86400 * count
    start = dt.datetime.fromtimestamp(ts, tz=dt.UTC)
    months = count * (12 if interval == "year" else 1)
    month_index = start.month - 1 + months
    year = start.year + month_index // 12
    month = month_index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return int(start.replace(year=year, month=month, day=day).timestamp())
