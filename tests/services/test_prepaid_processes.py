"""Prepaid tier subscriptions started by several processes at once, on one database and one Stripe (the sandbox
file): every customer paid for two tiers before either was started, and every process tries to start every row.
Each customer ends with exactly one subscription and one balance credit; the other row is refused, uncredited.
Small by default; the issue-sized run is `-m slow`."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path

import pytest

from aims_billing_mcp.services.prepaid import prepaid_id
from aims_billing_mcp.services.stripe_setup import setup_stripe
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.state import build_state
from aims_billing_mcp.stripe_gateway import StripeRequest
from tests.conftest import record_paid
from tests.support.processes import run_together

WORKER = Path(__file__).parents[1] / "support" / "prepaid_worker.py"
PROCESSES = 4


async def paid_twice(db: Path, customers: int) -> dict[str, list[str]]:
    """Each customer with a 3mo and a 6mo tier paid (by the buyers' own clients) and neither started: row ids."""
    state = build_state(Settings(_env_file=None, aims_billing_db=db), retry_delay_scale=0)  # type: ignore[call-arg]
    try:
        await setup_stripe(state.gateway, state.pricing)
        rows: dict[str, list[str]] = {}
        for index in range(customers):
            customer = (await state.gateway.send(StripeRequest("post", "/v1/customers", {}))).data["id"]
            sessions = []
            for item in ("tier_3mo", "tier_6mo"):
                created = await state.commerce.create_session(
                    customer=customer, agent_id=None, item=item, amount=None, currency=None, description=None,
                    idempotency_key=f"{index}-{item}", dry_run=False)
                assert created.session is not None
                sessions.append(created.session)
            for session in sessions:
                await record_paid(state.store, state.commerce, str(session.payment_intent), state.gateway)
            rows[customer] = [prepaid_id(session.id) for session in sessions]
        return rows
    finally:
        await state.gateway.close()
        state.store.close()


async def in_stripe(db: Path, customer: str) -> tuple[int, int]:
    state = build_state(Settings(_env_file=None, aims_billing_db=db))  # type: ignore[call-arg]
    try:
        subs = (await state.gateway.send(StripeRequest("get", "/v1/subscriptions",
                                                       {"customer": customer, "status": "all"}))).data["data"]
        txns = (await state.gateway.send(StripeRequest(
            "get", f"/v1/customers/{customer}/balance_transactions", {"limit": 100}))).data["data"]
        return len(subs), sum(1 for txn in txns if txn["type"] == "adjustment")
    finally:
        await state.gateway.close()
        state.store.close()


@pytest.mark.parametrize("customers", [3, pytest.param(20, id="issue-size", marks=pytest.mark.slow)])
def test_processes_starting_the_same_rows_subscribe_and_credit_each_customer_once(tmp_path: Path,
                                                                                  customers: int) -> None:
    db = tmp_path / "prepaid.db"
    rows = asyncio.run(paid_twice(db, customers))
    every = [row for pair in rows.values() for row in pair]

    outputs = run_together([[sys.executable, str(WORKER), str(db), str(seed), *every] for seed in range(PROCESSES)],
                           timeout=300)

    for customer, pair in rows.items():
        seen = Counter(line.split()[1] for out in outputs for line in out.splitlines() if line.split()[0] in pair)
        assert set(seen) <= {"started", "refused"}, seen
        assert asyncio.run(in_stripe(db, customer)) == (1, 1), customer
    state = build_state(Settings(_env_file=None, aims_billing_db=db))  # type: ignore[call-arg]
    try:
        statuses = Counter(row["status"] for row in state.store.query("SELECT status FROM prepaid_subscriptions"))
        refused = state.store.query("SELECT balance_transaction_id FROM prepaid_subscriptions WHERE status = "
                                    "'refused'")
    finally:
        asyncio.run(state.gateway.close())
        state.store.close()
    assert statuses == {"started": customers, "refused": customers}
    assert all(row["balance_transaction_id"] is None for row in refused)
