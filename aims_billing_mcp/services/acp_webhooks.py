"""ACP order webhooks to the agent platform (spec/2026-04-17/openapi/openapi.agentic_checkout_webhook.yaml).

When `AIMS_BILLING_ACP_ORDER_WEBHOOK_URL` is set, every order event is POSTed there as the spec's `WebhookEvent`:
`{"type": "order_create" | "order_update", "data": <the full Order, with "type": "order">}`.

Format, as the spec defines it:
- `Merchant-Signature: t=<unix_seconds>,v1=<64 hex>` where v1 = HMAC-SHA256(secret, `<t>` + "." + raw body), hex;
  the receiver rejects it outside its window (the spec recommends 300 s): so each attempt is signed afresh, with
  the time it is sent, over the exact bytes sent.
- `Content-Type: application/json`; `Request-Id: <event id>` (the same on every attempt of one event, so the
  receiver can drop duplicates); `Timestamp: <RFC 3339>` (optional in the spec, informational).
Where the spec is open we chose: the secret is `AIMS_BILLING_ACP_ORDER_WEBHOOK_SECRET` used as raw UTF-8 bytes
(a URL without a secret is a configuration error: the spec says events MUST be signed); any 2xx is delivered.

Delivery: the event row is written in the same transaction that created or changed the order (an outbox, table
`acp_order_events`: event id, type, order id, session id, payload, attempts, delivered, gave_up, last status/error),
and sent by a background task started after that transaction COMMITs, so the buyer's answer never waits on the
platform. A non-2xx answer or a network error is retried with exponential backoff (1 s, 2 s, 4 s ... times
`retry_delay_scale`, which tests set to 0) up to `max_attempts` (4); then the row stays `delivered = 0,
gave_up = 1`. `resume()` re-sends events left pending by a process that stopped before delivering them.
Several instances on one database: each delivery first leases its event (`store.acp.lease_order_events`), so one
sender sends it, and records each attempt under its lease token: an instance killed or paused holding an event is
taken over once its lease ends, and a paused one that resumes records nothing and stops.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import re
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..store import Store, Tx, dumps, utc_iso
from ..store.acp import OrderEventRow
from .background import Background

if TYPE_CHECKING:  # httpx loads on the first delivery, not at start-up
    import httpx

ORDER_CREATE = "order_create"
ORDER_UPDATE = "order_update"
SIGNATURE_HEADER = "Merchant-Signature"
TOLERANCE_SECONDS = 300
_HEADER = re.compile(r"t=(\d+),v1=([a-fA-F0-9]{64})")


def merchant_signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Merchant-Signature` header value for `body` sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_merchant_signature(secret: str, header: str | None, body: bytes, *, now: float | None = None,
                              tolerance: int = TOLERANCE_SECONDS) -> bool:
    """What a receiver checks: the header's shape, its timestamp within `tolerance`, and the HMAC (constant time)."""
    match = _HEADER.fullmatch(header or "")
    if match is None:
        return False
    timestamp = int(match.group(1))
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = merchant_signature(secret, timestamp, body).split(",v1=", 1)[1]
    return hmac.compare_digest(expected, match.group(2).lower())


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every delivery's client: httpx builds one per client otherwise, loading the whole CA
    bundle (about 20 ms of CPU an order event)."""
    import httpx

    return httpx.create_ssl_context()


class OrderWebhooks:
    """The order events outbox and its sender."""

    def __init__(self, store: Store, url: str, secret: str, *, clock: Callable[[], float] = time.time,
                 max_attempts: int = 4, retry_delay_scale: float = 1.0, timeout_seconds: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not secret:
            raise ValueError("an ACP order webhook URL needs AIMS_BILLING_ACP_ORDER_WEBHOOK_SECRET: the spec says "
                             "order events MUST be signed")
        self._store = store
        self.url = url
        self._secret = secret
        self._clock = clock
        self._max_attempts = max(1, max_attempts)
        self._scale = retry_delay_scale
        self._timeout = timeout_seconds
        self._transport = transport
        self.background = Background()

    def enqueue(self, tx: Tx, event_type: str, order: dict[str, Any]) -> str:
        """Record an event inside the caller's write transaction; send it with `dispatch` once that commits."""
        event_id = "evt_" + uuid.uuid4().hex
        payload = dumps({"type": event_type, "data": {**order, "type": "order"}})
        self._store.acp.add_order_event(tx, event_id, event_type, order["id"], order["checkout_session_id"], payload,
                                        utc_iso(self._clock()))
        return event_id

    def dispatch(self, event_ids: Sequence[str]) -> None:
        """Send these (committed) events in the background, from any thread's loop: the caller does not wait."""
        self.background.spawn((event_id, lambda event_id=event_id: self._deliver(event_id))  # type: ignore[misc]
                              for event_id in event_ids)

    def kick(self) -> list[str]:
        """Dispatch every event still pending (neither delivered nor given up) and not already being sent: after a
        COMMIT that may have written one, and at start-up for the ones a previous run left."""
        ids = self._store.acp.pending_order_events()
        self.dispatch(ids)
        return ids

    def resume(self) -> list[str]:
        """At start-up, on the server's loop: deliveries run there from now on."""
        self.background.bind()
        return self.kick()

    async def drain(self) -> None:
        """Wait for the deliveries in flight (shutdown and tests)."""
        await self.background.drain()

    def event(self, event_id: str) -> OrderEventRow | None:
        return self._store.acp.order_event(event_id)

    async def _deliver(self, event_id: str) -> None:
        # one sender per event across instances: a lease long enough for every attempt and its backoff, under a
        # token each outcome is recorded with (a sender paused past it records nothing once another took over)
        token, now, acp = "lease_" + uuid.uuid4().hex, self._clock(), self._store.acp
        until = now + 60 + self._max_attempts * self._timeout + self._scale * 2 ** self._max_attempts
        if not await self._store.write(lambda tx: acp.lease_order_events(tx, token, now, until,
                                                                         event_ids=[event_id])):
            return  # delivered, given up, or another sender holds it
        row = self.event(event_id)
        if row is None or row.delivered or row.gave_up:
            return
        body = row.payload.encode()
        attempts = row.attempts
        import httpx

        async with httpx.AsyncClient(transport=self._transport, timeout=self._timeout, verify=_tls()) as http:
            while attempts < self._max_attempts:
                if attempts:
                    await asyncio.sleep(self._scale * 2 ** (attempts - 1))
                attempts += 1
                now = self._clock()
                headers = {"Content-Type": "application/json", "Request-Id": event_id, "Timestamp": utc_iso(now),
                           SIGNATURE_HEADER: merchant_signature(self._secret, int(now), body)}
                status: int | None = None
                error: str | None = None
                try:
                    response = await http.post(self.url, content=body, headers=headers)
                    status = response.status_code
                    if not 200 <= status < 300:
                        error = f"HTTP {status}: {response.text[:200]}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"[:300]
                delivered = error is None
                held = await self._store.write(self._record(event_id, attempts, status, error, delivered, token,
                                                            gave_up=not delivered and attempts >= self._max_attempts))
                if delivered or not held:  # not held: another sender took the event over
                    return

    def _record(self, event_id: str, attempts: int, status: int | None, error: str | None, delivered: bool,
                token: str, *, gave_up: bool) -> Callable[[Tx], bool]:
        iso, acp = utc_iso(self._clock()), self._store.acp

        def job(tx: Tx) -> bool:
            return acp.record_delivery(tx, event_id, attempts=attempts, status=status, error=error,
                                       delivered=delivered, gave_up=gave_up, at=iso, lease=token)

        return job
