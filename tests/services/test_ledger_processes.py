"""The ledger across processes: several writer processes on one hot wallet lose nothing and debit nothing twice,
and a writer killed with SIGKILL at random moments leaves a sound ledger holding everything it acknowledged.

Sizes are small by default; the issue's sizes run with `-m slow` (or set LEDGER_DEBITS / LEDGER_KILLS)."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.store import Store
from tests.support.processes import kill_midway, run_together

WORKER = Path(__file__).parents[1] / "support" / "ledger_worker.py"
from tests.support.ledger_worker import HOT, amount_of  # noqa: E402


def ledger_on(path: Path) -> tuple[Store, LedgerService]:
    store = Store(path)
    return store, LedgerService(store, luc_per_usd=1000, agent_limit=lambda customer: None)


@pytest.mark.parametrize("debits", [
    pytest.param(int(os.environ.get("LEDGER_DEBITS", "40")), id="quick"),
    pytest.param(1000, id="issue-size", marks=pytest.mark.slow),
])
def test_four_processes_debiting_one_hot_wallet_with_retries_lose_nothing_and_double_nothing(
    tmp_path: Path, debits: int
) -> None:
    workers = 4
    path = tmp_path / "hot.db"
    keys = [f"w{w}-{i}" for w in range(workers) for i in range(debits)]
    opening = sum(amount_of(k) for k in keys) + 1000
    store, ledger = ledger_on(path)
    asyncio.run(ledger.create_wallet(HOT, "cus_hot", None, "open"))
    asyncio.run(ledger.credit(HOT, opening, idempotency_key="fund", reason="fund"))
    store.close()

    outputs = run_together([[sys.executable, str(WORKER), "debits", str(path), str(w), str(workers), str(debits),
                             str(w + 7)] for w in range(workers)], timeout=300)

    acks = [line.split() for out in outputs for line in out.splitlines()]
    fresh = Counter(key for how, key in acks if how == "fresh")
    assert set(fresh) == set(keys)  # every debit happened ...
    assert max(fresh.values()) == 1  # ... once, however often it was retried
    assert sum(how == "replayed" for how, _ in acks) > 0

    store, ledger = ledger_on(path)
    try:
        assert ledger.get_wallet(HOT).balance == opening - sum(amount_of(k) for k in keys)  # no lost update
        assert store.query_one("SELECT COUNT(*) AS n FROM agent_transactions WHERE kind = 'debit' AND entry = 0") == {
            "n": len(keys)}
        assert ledger.check_ledger() == []
    finally:
        store.close()


@pytest.mark.parametrize("kills", [
    pytest.param(int(os.environ.get("LEDGER_KILLS", "3")), id="quick"),
    pytest.param(20, id="issue-size", marks=pytest.mark.slow),
])
def test_a_writer_killed_at_random_moments_leaves_a_sound_ledger_with_every_acknowledged_transaction(
    tmp_path: Path, kills: int
) -> None:
    path = tmp_path / "crash.db"
    rng = random.Random(int(os.environ.get("LEDGER_SEED", "20260115")))
    acknowledged: list[tuple[str, str]] = []
    for run in range(kills):
        command = [sys.executable, str(WORKER), "churn", str(path), str(run), str(rng.random())[2:]]
        before, rest = kill_midway(command, rng.randint(1, 400), label=f"run {run}")
        for line in before:
            operation, key = line.split()
            acknowledged.append((operation, key))
        acknowledged += [tuple(line.split()) for line in rest if len(line.split()) == 2]  # type: ignore[misc]

        store, ledger = ledger_on(path)
        try:
            assert ledger.check_ledger() == [], f"after kill {run + 1}"
            stored = {(r["operation"], r["idempotency_key"]) for r in store.query(
                "SELECT operation, idempotency_key FROM ledger_requests")}
            missing = [ack for ack in acknowledged if ack not in stored]
            assert missing == [], f"after kill {run + 1}: acknowledged but not in the ledger"
        finally:
            store.close()
    assert len({op for op, _ in acknowledged}) >= 4  # the kills landed among credits, debits, transfers, holds...
