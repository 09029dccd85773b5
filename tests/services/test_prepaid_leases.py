"""Prepaid rows across instances on PostgreSQL (issue 15, part 5): an attempt leases its row under a fencing token.

An instance (a worker process) is stopped with SIGSTOP while it holds a row's lease, just before its first Stripe
call; the lease runs out and another instance takes the row over and starts it. Resumed with SIGCONT, the first
instance records nothing and sends nothing more to Stripe: its lease renewal fails before its next Stripe call, and
every step it would record renews the lease in the same transaction. Stripe ends with one credit and one
subscription.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from aims_billing_mcp.services.prepaid import prepaid_id
from aims_billing_mcp.services.stripe_setup import setup_stripe
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.state import AppState, build_state
from aims_billing_mcp.stripe_gateway import StripeRequest
from tests.conftest import record_paid
from tests.support.zygote import spawn

pytestmark = pytest.mark.anyio
WORKER = Path(__file__).parents[1] / "support" / "prepaid_lease_worker.py"
LEASE_S = 0.5  # the paused instance's lease: short, so the other instance takes over soon
WITHIN_S = 60.0


def instance(db: Path, url: str) -> AppState:
    return build_state(Settings(_env_file=None, aims_billing_db=db, aims_billing_database_url=url),  # type: ignore[call-arg]
                       retry_delay_scale=0)


async def paid_row(state: AppState) -> tuple[str, str]:
    """A customer who paid for the 3mo tier, nothing started yet: (customer, prepaid row id)."""
    await setup_stripe(state.gateway, state.pricing)
    customer = (await state.gateway.send(StripeRequest("post", "/v1/customers", {}))).data["id"]
    created = await state.commerce.create_session(customer=customer, agent_id=None, item="tier_3mo", amount=None,
                                                  currency=None, description=None, idempotency_key="k",
                                                  dry_run=False)
    assert created.session is not None
    await record_paid(state.store, state.commerce, str(created.session.payment_intent), state.gateway)
    return customer, prepaid_id(created.session.id)


async def in_stripe(state: AppState, customer: str) -> tuple[int, int]:
    subs = (await state.gateway.send(StripeRequest("get", "/v1/subscriptions",
                                                   {"customer": customer, "status": "all"}))).data["data"]
    txns = (await state.gateway.send(StripeRequest(
        "get", f"/v1/customers/{customer}/balance_transactions", {"limit": 100}))).data["data"]
    return len(subs), sum(1 for txn in txns if txn["type"] == "adjustment")


def read_line(process: Any) -> str:
    assert process.stdout is not None
    return process.stdout.readline()


async def test_an_instance_paused_past_its_lease_records_and_sends_nothing_once_another_took_the_row_over(
        postgres_url: str, tmp_path: Path) -> None:
    db = tmp_path / "billing.db"  # unused by the store (PostgreSQL); its sandbox file beside it is the one Stripe
    other = instance(db, postgres_url)
    try:
        customer, row_id = await paid_row(other)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMS_", "STRIPE_"))}
        env.update({"AIMS_BILLING_DATABASE_URL": postgres_url, "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"})
        paused = spawn([sys.executable, str(WORKER), str(db), str(LEASE_S), "/v1/prices", row_id],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                       cwd=tmp_path)
        try:
            before: list[str] = []
            with anyio.fail_after(WITHIN_S):
                while not before or before[-1] != "paused\n":
                    line = await anyio.to_thread.run_sync(read_line, paused)
                    assert line, paused.communicate()[1]
                    before.append(line)
            os.kill(paused.pid, signal.SIGSTOP)  # it holds the row's lease, its first Stripe call not yet sent
            held = other.store.query_one("SELECT status, lease_token FROM prepaid_subscriptions WHERE id = %s",
                                         (row_id,))
            assert held is not None and held["status"] == "claimed" and held["lease_token"]

            row: Any = None
            with anyio.fail_after(WITHIN_S):  # refused while the paused lease lasts, then taken over
                while row is None or row.status != "started":
                    row = await other.prepaid.start(row_id)
                    if row.status != "started":
                        await anyio.sleep(0.05)
            recorded = other.store.query_one("SELECT * FROM prepaid_subscriptions WHERE id = %s", (row_id,))

            os.kill(paused.pid, signal.SIGCONT)
            assert paused.stdin is not None
            paused.stdin.write("go\n")
            paused.stdin.flush()
            out, err = paused.communicate(timeout=WITHIN_S)
        finally:
            if paused.poll() is None:
                os.kill(paused.pid, signal.SIGCONT)
                paused.kill()
                paused.wait(30)
        after = out.splitlines()
        assert paused.returncode == 0, err
        assert after[-1] == "done started"  # it found the row started by the other instance
        assert [line for line in after if line.startswith("send")] == [], after  # nothing more to Stripe
        assert other.store.query_one("SELECT * FROM prepaid_subscriptions WHERE id = %s", (row_id,)) == recorded
        assert await in_stripe(other, customer) == (1, 1)
        assert before[-2].startswith("send GET /v1/prices")
        assert not any(line.startswith("send POST") for line in before)
    finally:
        await other.gateway.close()
        other.store.close()
