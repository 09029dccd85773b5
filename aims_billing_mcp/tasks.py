"""What runs while the server serves, beside the calls: the meter flusher, the sweeps of expired holds and quotes,
the pruning of old audit rows, and the outboxes a previous run left (prepaid starts, ACP order events, refunds)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from .services.audit import prune_audit
from .state import AppState

log = logging.getLogger(__name__)
AUDIT_PRUNE_SECONDS = 86_400.0


@asynccontextmanager
async def background_tasks(
    state: AppState, *, flush_interval_seconds: float, interval_seconds: float = 60.0
) -> AsyncIterator[None]:
    """What runs while the server serves: the meter flusher delivering usage to Stripe (0 turns it off: run
    `aims-billing-mcp flush-usage` instead), expired holds written down (they already stopped counting), and audit
    rows past their retention pruned (at start and then daily)."""

    async def sweep_holds() -> None:
        last_prune = 0.0
        while True:
            try:
                if time.monotonic() - last_prune >= AUDIT_PRUNE_SECONDS or not last_prune:
                    last_prune = time.monotonic()
                    await anyio.to_thread.run_sync(functools.partial(
                        prune_audit, state.store, retention_days=state.settings.aims_billing_audit_retention_days))
            except Exception:  # housekeeping must never take the server down; the next round retries
                log.exception("pruning the audit log failed")
            await anyio.sleep(interval_seconds)
            try:
                await state.ledger.sweep_expired_holds()
                await state.x402.sweep_expired_quotes()
            except Exception:  # housekeeping must never take the server down; the next round retries
                log.exception("sweeping expired holds failed")

    webhooks, prepaid = state.acp.order_webhooks, state.prepaid
    if webhooks is not None:
        webhooks.resume()  # ACP order events a previous run committed but did not deliver
    prepaid.resume()  # prepaid subscriptions paid for but not yet started in Stripe
    state.acp.resume_refunds()  # ACP payments a checkout could not take, recorded as to refund but not refunded
    state.connect.resume_transfers()  # creators' separate transfers of paid sales, not yet made

    async def reconcile_payments() -> None:  # confirms a crash cut off before their outcome was recorded
        try:
            await state.commerce.reconcile()
        except Exception:
            log.exception("reconciling unrecorded PaymentIntents failed; the next start-up retries")

    async with anyio.create_task_group() as tg:
        tg.start_soon(sweep_holds)
        tg.start_soon(reconcile_payments)
        if flush_interval_seconds > 0:
            tg.start_soon(state.flusher.run, flush_interval_seconds)
        try:
            yield
        finally:
            with anyio.move_on_after(5):  # work in flight gets a moment; the rest resumes at the next start
                await prepaid.drain()
                if webhooks is not None:
                    await webhooks.drain()
                await state.acp.drain()
                await state.connect.transfers.drain()
            await state.acp.refunds.stop()
            await state.connect.transfers.stop()
            await prepaid.background.stop()
            if webhooks is not None:
                await webhooks.background.stop()
            tg.cancel_scope.cancel()
