"""Stripe events, each stored once and applied in the same transaction.

The event id is UNIQUE in `webhook_events`, and the insert and the provision update run in one writer job: a
duplicate delivery (even five at once) inserts nothing and applies nothing, and a crash leaves either both or
neither. Events of any type are stored and acknowledged; only the ones that change a provision are applied.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..store import Store, utc_now
from .commerce import PaymentSessionService
from .subscriptions import Applied, SubscriptionService


@dataclass(frozen=True)
class Ingested:
    event_id: str
    duplicate: bool
    note: str | None = None
    customer_id: str | None = None


class WebhookEventService:
    def __init__(self, store: Store, subscriptions: SubscriptionService,
                 commerce: PaymentSessionService | None = None) -> None:
        self._store = store
        self._subscriptions = subscriptions
        self._commerce = commerce

    async def ingest(self, event: dict[str, Any], payload: bytes | str) -> Ingested:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload

        def job(conn: sqlite3.Connection) -> Ingested:
            # Apply first, then record: a duplicate's INSERT fails on the UNIQUE id and the savepoint undoes the
            # apply with it (one statement fewer than insert-check-apply-update on the common, first delivery).
            if event["type"].startswith("payment_intent.") and self._commerce is not None:
                obj = (event.get("data") or {}).get("object") or {}
                customer = obj.get("customer") if isinstance(obj.get("customer"), str) else None
                applied = Applied(customer, self._commerce.apply_event(conn, event))
            else:
                applied = self._subscriptions.apply_event(conn, event)
            now = utc_now()
            conn.execute(
                "INSERT INTO webhook_events (id, type, created, payload, received_at, processed, processed_at, "
                "customer_id, error) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?)",
                (event["id"], event["type"], int(event["created"]), text, now, now, applied.customer_id, applied.note),
            )
            return Ingested(event["id"], duplicate=False, note=applied.note, customer_id=applied.customer_id)

        try:
            result = await self._store.write(job)
            self._subscriptions.forget(result.customer_id)
            if self._commerce is not None:
                self._commerce.after_webhook(event)
            return result
        except sqlite3.IntegrityError as exc:
            if "webhook_events.id" not in str(exc):
                raise
            return Ingested(event["id"], duplicate=True)

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self._store.query(
            "SELECT id, type, created, customer_id, processed, error, received_at FROM webhook_events "
            "ORDER BY received_at DESC LIMIT ?", (limit,))
        return rows


def parse_event(payload: bytes) -> dict[str, Any]:
    """The event as plain JSON (after the signature was verified on these exact bytes)."""
    event: dict[str, Any] = json.loads(payload)
    if not isinstance(event, dict) or not {"id", "type", "created"} <= set(event):
        raise ValueError("not a Stripe event: expected an object with id, type and created")
    return event
