"""Signed webhook delivery, like ``stripe listen --forward-to``.

Every Event the sandbox records after :meth:`WebhookSender.configure` is queued and POSTed, in order,
by one daemon thread, to an ``http(s)://`` URL (httpx) or to an ASGI app called in process
(:func:`call_asgi` on the thread's own event loop). Each attempt is signed as Stripe signs:
``Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``, with ``t`` the real wall
clock (the receiver checks it against its own clock, whatever the sandbox clock says). A non-2xx
answer or a connection error is retried with exponential backoff (0.5 s, 1 s, 2 s, ... times
``retry_delay_scale``) up to ``max_attempts``, then given up; both outcomes are recorded, and handed
to ``on_result`` (the sandbox keeps an undelivered Event's ``pending_webhooks`` at 1 so it can be
sent again: ``aims-billing-mcp sandbox resend``, as Stripe keeps retrying for three days).

Like a Stripe webhook endpoint's ``enabled_events``, ``configure(enabled_events=...)`` limits what is sent: exact
types, ``*`` (every event, the default) or, as a sandbox convenience, a group ``<prefix>.*``; other events are
recorded (``/v1/events``) but not delivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from .asgi_client import call_asgi
from .auth import SANDBOX_WEBHOOK_SECRET

log = logging.getLogger(__name__)

DEFAULT_ASGI_PATH = "/webhooks/stripe"
ATTEMPT_TIMEOUT = 10.0


def signature_header(payload: str, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` value for ``payload`` signed with ``secret`` at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


@dataclass(frozen=True)
class DeliveryRecord:
    """The outcome of one event's delivery: delivered, or given up after ``attempts``."""

    event_id: str
    type: str
    attempts: int
    last_status: int | None
    delivered: bool


@dataclass(frozen=True)
class _Config:
    target: str | Callable[..., Any]
    secret: str
    retry_delay_scale: float
    max_attempts: int
    asgi_path: str
    enabled_events: tuple[str, ...] = ("*",)

    def sends(self, kind: str) -> bool:
        return any(enabled == "*" or enabled == kind or (enabled.endswith(".*") and kind.startswith(enabled[:-1]))
                   for enabled in self.enabled_events)


class WebhookSender:
    """Queues events and delivers them from one background thread (started on first need)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[tuple[dict[str, Any], _Config]] = deque()
        self._pending = 0
        self._records: list[DeliveryRecord] = []
        self._config: _Config | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self.on_result: Callable[[DeliveryRecord], None] | None = None  # called on the delivery thread

    def configure(
        self,
        target: str | Callable[..., Any] | None,
        *,
        secret: str = SANDBOX_WEBHOOK_SECRET,
        retry_delay_scale: float = 1.0,
        max_attempts: int = 5,
        asgi_path: str = DEFAULT_ASGI_PATH,
        enabled_events: tuple[str, ...] = ("*",),
    ) -> None:
        """Deliver events recorded from now on to ``target``; ``None`` turns delivery off.

        ``target`` is an ``http(s)://`` URL or an ASGI app (then POSTed at ``asgi_path``); only the
        ``enabled_events`` are sent (see the module docstring).
        Events already queued keep the configuration they were queued with.
        """
        if target is None:
            with self._cond:
                self._config = None
            return
        if isinstance(target, str):
            if not target.startswith(("http://", "https://")):
                raise ValueError(f"webhook target must be an http(s):// URL or an ASGI app, not {target!r}")
        elif not callable(target):
            raise ValueError("webhook target must be an http(s):// URL or an ASGI app")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if retry_delay_scale < 0:
            raise ValueError("retry_delay_scale must not be negative")
        with self._cond:
            self._config = _Config(target, secret, retry_delay_scale, max_attempts, asgi_path, tuple(enabled_events))

    @property
    def enabled(self) -> bool:
        """Whether new events are being queued."""
        return self._config is not None and not self._closed.is_set()

    @property
    def deliveries(self) -> list[DeliveryRecord]:
        """Finished deliveries, oldest first."""
        with self._cond:
            return list(self._records)

    def enqueue(self, event: dict[str, Any]) -> None:
        """Queue ``event`` for delivery (a no-op while delivery is off)."""
        with self._cond:
            config = self._config
            if config is None or self._closed.is_set() or not config.sends(str(event.get("type"))):
                return
            self._queue.append((event, config))
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sandbox-webhooks", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self, timeout: float = 10.0) -> bool:
        """Block until every queued delivery finished (delivered or given up); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        """Stop the thread; deliveries still queued are dropped."""
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=ATTEMPT_TIMEOUT + 1)

    # -- the delivery thread ------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        http = httpx.Client(timeout=ATTEMPT_TIMEOUT)
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closed.is_set():
                        self._cond.wait()
                    if self._closed.is_set():
                        self._pending = 0
                        self._queue.clear()
                        self._cond.notify_all()
                        return
                    event, config = self._queue.popleft()
                try:
                    record = self._deliver(loop, http, event, config)
                except Exception:  # never let the thread die with events still queued
                    log.exception("sandbox webhook delivery of %s failed", event.get("id"))
                    record = DeliveryRecord(str(event.get("id")), str(event.get("type")), 0, None, False)
                if self.on_result is not None:
                    try:
                        self.on_result(record)
                    except Exception:  # the store closing under us: the outcome is lost, the event stays pending
                        log.exception("recording the delivery of %s failed", record.event_id)
                with self._cond:
                    self._records.append(record)
                    self._pending -= 1
                    self._cond.notify_all()
        finally:
            http.close()
            loop.close()

    def _deliver(self, loop: asyncio.AbstractEventLoop, http: httpx.Client, event: dict[str, Any],
                 config: _Config) -> DeliveryRecord:
        body = json.dumps(event)
        status: int | None = None
        attempts = 0
        while attempts < config.max_attempts:
            attempts += 1
            headers = {
                "Content-Type": "application/json",
                "Stripe-Signature": signature_header(body, config.secret, int(time.time())),
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            }
            try:
                if isinstance(config.target, str):
                    status = http.post(config.target, content=body.encode(), headers=headers).status_code
                else:
                    _, status, _ = loop.run_until_complete(asyncio.wait_for(
                        call_asgi(config.target, "POST", f"http://sandbox.local{config.asgi_path}", headers,
                                  body),
                        ATTEMPT_TIMEOUT,
                    ))
            except Exception as exc:  # connection refused, timeout, the app raising...
                log.debug("webhook attempt %d for %s failed: %r", attempts, event["id"], exc)
                status = None
            if status is not None and 200 <= status < 300:
                return DeliveryRecord(event["id"], event["type"], attempts, status, True)
            if attempts < config.max_attempts:
                delay = 0.5 * 2 ** (attempts - 1) * config.retry_delay_scale
                if self._closed.wait(delay):
                    break
        log.warning("gave up delivering %s (%s) after %d attempts, last status %s",
                    event["id"], event["type"], attempts, status)
        return DeliveryRecord(event["id"], event["type"], attempts, status, False)
