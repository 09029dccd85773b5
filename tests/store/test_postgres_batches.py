"""PostgreSQL throughput paths (issue 15, Performance) keep the ledger's and metering's guarantees.

The ledger's jobs are trusted (every check before the first write), so PostgreSQL's writer runs a batch of them in
one transaction without a savepoint each: the store reads ahead for the whole batch (request keys, wallets) and
writes behind it (one statement). These tests gather jobs into one batch by holding the one writer thread
with a blocker until they are queued, then check what each caller hears and what the database holds."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from aims_billing_mcp.errors import IdempotencyConflict, InsufficientFunds, NotFound
from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.store import PostgresStore, utc_iso

pytest.importorskip("psycopg")
pytestmark = pytest.mark.anyio


@pytest.fixture
async def ledger(postgres_url: str) -> AsyncIterator[tuple[PostgresStore, LedgerService]]:
    store = PostgresStore(postgres_url, writers=1, pool_size=2)
    service = LedgerService(store, luc_per_usd=1000, agent_limit=lambda customer: None)  # type: ignore[arg-type]
    try:
        for agent in ("agent-a", "agent-b"):
            await service.create_wallet(agent, "cus_batch", None, f"open-{agent}")
            await service.credit(agent, 100, idempotency_key=f"fund-{agent}", reason="opening")
        yield store, service
    finally:
        store.close()


async def in_one_batch(store: PostgresStore, calls: list[Any]) -> list[Any]:
    """Run the calls' writer jobs as one batch: the one writer thread is held until every job is queued."""
    started, release = threading.Event(), threading.Event()

    def blocker(conn: Any) -> None:
        started.set()
        release.wait(30)

    held = store.submit(blocker)
    assert await anyio.to_thread.run_sync(started.wait, 30)
    queued = store._writer._queue.qsize()
    tasks = [asyncio.ensure_future(call) for call in calls]
    with anyio.fail_after(30):
        while store._writer._queue.qsize() < queued + len(calls):
            await asyncio.sleep(0)
    batches = store._writer.batches
    release.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    await anyio.to_thread.run_sync(held.result, 30)
    assert store._writer.batches == batches + 2, "the blocker and the gathered jobs: two transactions"
    return outcomes


async def test_a_batch_of_ledger_calls_applies_them_in_order_refuses_alone_and_replays_a_key_repeated_in_it(
    ledger: tuple[PostgresStore, LedgerService],
) -> None:
    store, service = ledger
    outcomes = await in_one_batch(store, [
        service.debit("agent-a", 60, idempotency_key="k1", reason="first"),
        service.debit("agent-a", 60, idempotency_key="k2", reason="overdraft"),
        service.debit("agent-a", 30, idempotency_key="k3", reason="fits"),
        service.debit("agent-a", 60, idempotency_key="k1", reason="first"),  # the first one, retried
        service.debit("agent-a", 5, idempotency_key="k1", reason="other"),  # its key, other arguments
        service.transfer("agent-b", "agent-a", 40, idempotency_key="t1", reason="move"),  # runs last: wallet order
        service.debit("agent-a", 10, idempotency_key="k4", reason="the rest"),
        service.debit("agent-nobody", 1, idempotency_key="k5", reason="unknown"),
    ])

    first, overdraft, fits, replay, conflict, transfer, rest, unknown = outcomes
    assert (first.balance_after, first.replayed) == (40, False)
    assert isinstance(overdraft, InsufficientFunds)
    assert fits.balance_after == 10
    assert (replay.txn_id, replay.replayed) == (first.txn_id, True)
    assert isinstance(conflict, IdempotencyConflict)
    assert rest.balance_after == 0
    assert (transfer.from_balance_after, transfer.to_balance_after) == (60, 40)
    assert isinstance(unknown, NotFound)
    assert store._writer.redone == 0, "nothing failed after writing: no redo"
    assert service.get_wallet("agent-a").balance == 40 and service.get_wallet("agent-b").balance == 60
    assert service.check_ledger() == []
    again = await service.debit("agent-a", 30, idempotency_key="k3", reason="fits")  # its key stored by the batch
    assert again.replayed and again.txn_id == fits.txn_id


async def test_a_trusted_job_failing_after_it_wrote_redoes_the_batch_with_savepoints_and_fails_alone(
    ledger: tuple[PostgresStore, LedgerService],
) -> None:
    store, service = ledger

    def breaks_its_promise(tx: Any) -> None:  # writes, then refuses: its write must not land
        now = utc_iso(0)
        wallet = store.ledger.load_wallet(tx, "agent-b", now)
        assert wallet is not None
        wallet.balance += 999
        store.ledger.save_wallet(tx, wallet, now)
        raise ValueError("refused after writing")

    breaks_its_promise.pipelined = True  # type: ignore[attr-defined]

    outcomes = await in_one_batch(store, [
        service.debit("agent-a", 10, idempotency_key="before", reason="ok"),
        store.write(breaks_its_promise, savepoint=False),
        service.debit("agent-b", 10, idempotency_key="after", reason="ok"),
    ])

    before, broken, after = outcomes
    assert before.balance_after == 90 and after.balance_after == 90
    assert isinstance(broken, ValueError)
    assert store._writer.redone == 1
    assert service.get_wallet("agent-b").balance == 90
    assert service.check_ledger() == []


class _FailingWriteBehind:
    """A store's batch hook whose write-behind raises something that is not a database error (as an array element
    of a type the literal refuses would), once."""

    def __init__(self) -> None:
        self.failed = False

    def read_ahead(self, tx: Any, requests: list[Any]) -> None:
        pass

    def write_behind(self, tx: Any) -> None:
        if not self.failed:
            self.failed = True
            raise TypeError("an array element must be str, int or None, not float")


async def test_a_store_hook_failing_outside_the_database_redoes_the_batch_instead_of_failing_every_job(
    ledger: tuple[PostgresStore, LedgerService],
) -> None:
    store, service = ledger
    hook = _FailingWriteBehind()
    store.add_batch_hook(hook)

    outcomes = await in_one_batch(store, [
        service.debit("agent-a", 10, idempotency_key="one", reason="ok"),
        service.debit("agent-b", 20, idempotency_key="two", reason="ok"),
    ])

    assert hook.failed
    assert [outcome.balance_after for outcome in outcomes] == [90, 80]
    assert store._writer.redone == 1
    assert service.check_ledger() == []


async def test_a_write_the_database_refuses_when_the_batch_commits_fails_only_its_own_job(
    ledger: tuple[PostgresStore, LedgerService],
) -> None:
    """A trusted batch's writes are sent together with COMMIT: one the schema refuses there (a negative balance,
    past every check) rolls the batch back, and the batch is redone with a savepoint per job to find whose it was."""
    store, service = ledger

    def overdraws(tx: Any) -> None:
        now = utc_iso(0)
        wallet = store.ledger.load_wallet(tx, "agent-b", now)
        assert wallet is not None
        wallet.balance = -1  # agent_wallets CHECK (balance >= 0)
        store.ledger.save_wallet(tx, wallet, now)

    overdraws.pipelined = True  # type: ignore[attr-defined]

    outcomes = await in_one_batch(store, [
        service.debit("agent-a", 10, idempotency_key="before", reason="ok"),
        store.write(overdraws, savepoint=False),
        service.credit("agent-b", 5, idempotency_key="after", reason="ok"),
    ])

    before, refused, after = outcomes
    assert before.balance_after == 90 and after.balance_after == 105
    assert type(refused).__name__ == "CheckViolation"
    assert store._writer.redone == 1
    assert service.get_wallet("agent-b").balance == 105
    assert service.check_ledger() == []


async def test_looking_up_recorded_meter_events_reads_their_index_not_the_whole_table(postgres_url: str) -> None:
    """A fresh table has no statistics until autovacuum analyzes it: `identifier = ANY(...)` was planned as a
    sequential scan then, so every recording batch read every event recorded so far."""
    from aims_billing_mcp.services.metering import MeteringService
    from aims_billing_mcp.services.tiers import Pricing, calendar_month_of

    pricing = Pricing.load()

    async def exists(customer: str) -> bool:
        return True

    store = PostgresStore(postgres_url, writers=1, pool_size=2)
    try:
        metering = MeteringService(store, pricing, tier_of=lambda customer: pricing.tier("3mo"),
                                   period_of=lambda c, t: calendar_month_of(t), customer_exists=exists)
        for start in range(0, 3000, 1000):
            result = await metering.record_many([{"customer": f"cus_m{i % 7}", "units": 1, "identifier": f"e{i}"}
                                                 for i in range(start, start + 1000)])
            assert result.totals.accepted == 1000

        def look(tx: Any) -> tuple[int, int]:
            found = store.metering.find_events(tx, {(f"cus_m{i % 7}", f"e{i}") for i in range(0, 3000, 30)})
            (scans,) = tx.execute("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'meter_events'"
                                  ).fetchone()
            return len(found), int(scans)

        assert await store.write(look) == (100, 0)
    finally:
        store.close()
