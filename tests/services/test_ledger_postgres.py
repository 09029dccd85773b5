"""The ledger on PostgreSQL with several instances on one database (issue 15): each instance a `PostgresStore` and
a `LedgerService` of its own, as separate servers would have, so only the database orders their writes.

In one process: three instances debit the same wallets at once, each key sent to every instance (a client retrying
against another replica), more demand than funds. Across processes: three worker processes
(tests/support/ledger_worker.py) debit one hot wallet with retried keys, and one of them is killed with SIGKILL
mid-load."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from aims_billing_mcp.errors import InsufficientFunds
from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.store import PostgresStore
from tests.services.test_ledger import DAMAGE, books_with_every_kind_of_row
from tests.support.processes import rest_of, start_together

WORKER = Path(__file__).parents[1] / "support" / "ledger_worker.py"
from tests.support.ledger_worker import HOT, amount_of  # noqa: E402

pytestmark = pytest.mark.anyio

WALLETS = [f"agent-{n}" for n in range(4)]


def instance(url: str) -> tuple[PostgresStore, LedgerService]:
    store = PostgresStore(url, writers=2, pool_size=2)
    return store, LedgerService(store, luc_per_usd=1000, agent_limit=lambda customer: None)  # type: ignore[arg-type]


@pytest.fixture
async def instances(postgres_url: str) -> AsyncIterator[list[tuple[PostgresStore, LedgerService]]]:
    opened = [instance(postgres_url) for _ in range(3)]
    try:
        yield opened
    finally:
        for store, _ in opened:
            store.close()


async def test_three_instances_debiting_the_same_wallets_with_keys_retried_across_them_apply_each_key_once(
    instances: list[tuple[PostgresStore, LedgerService]],
) -> None:
    first = instances[0][1]
    funds = 300
    for agent in WALLETS:
        await first.create_wallet(agent, "cus_multi", None, f"open-{agent}")
        await first.credit(agent, funds, idempotency_key=f"fund-{agent}", reason="fund")
    keys = [(agent, f"k{n}") for agent in WALLETS for n in range(60)]  # 60 x 1..9 LUC: more than 300 on each

    async def debit(ledger: LedgerService, agent: str, key: str) -> tuple[str, str, str]:
        try:
            result = await ledger.debit(agent, amount_of(key), idempotency_key=key, reason="multi")
        except InsufficientFunds:
            return agent, key, "refused"
        return agent, key, "replayed" if result.replayed else "fresh"

    outcomes = await asyncio.gather(*(debit(ledger, agent, key) for agent, key in keys for _, ledger in instances))

    fresh = Counter((agent, key) for agent, key, how in outcomes if how == "fresh")
    assert max(fresh.values()) == 1  # no key applied twice, whichever instances it reached
    for agent, key, how in outcomes:
        if how == "replayed":
            assert fresh[(agent, key)] == 1  # a replay is of the one application
    for agent in WALLETS:
        spent = sum(amount_of(key) for (owner, key) in fresh if owner == agent)
        wallet = first.get_wallet(agent)
        assert wallet.balance == funds - spent >= 0  # no lost update, never below zero
        assert funds - spent < 9  # refusals only once the funds ran out
    store = instances[0][0]
    assert store.query_one("SELECT COUNT(*) AS n FROM agent_transactions WHERE kind = 'debit' AND entry = 0") == {
        "n": len(fresh)}
    assert first.check_ledger() == []


async def waiting_on_locks(url: str, count: int) -> None:
    """Until `count` sessions wait on a lock (a row lock or an advisory lock)."""
    import psycopg

    with anyio.fail_after(30), psycopg.connect(url, autocommit=True) as conn:
        while conn.execute("SELECT COUNT(*) FROM pg_locks WHERE NOT granted").fetchone()[0] < count:  # type: ignore[index]
            await anyio.sleep(0.01)


async def test_one_key_sent_to_two_instances_while_its_wallet_is_busy_is_applied_once_and_replayed_once(
    instances: list[tuple[PostgresStore, LedgerService]], postgres_url: str,
) -> None:
    """Both instances take the call while a third session holds the wallet; when it lets go, the first applies the
    debit and the second, which waited on the key, finds and replays it (no UNIQUE violation, no second debit)."""
    import psycopg

    first = instances[0][1]
    await first.create_wallet("agent-k", "cus_multi", None, "open")
    await first.credit("agent-k", 100, idempotency_key="fund", reason="fund")
    with psycopg.connect(postgres_url) as blocker:
        blocker.execute("SELECT 1 FROM agent_wallets WHERE agent_id = 'agent-k' FOR UPDATE")
        calls = [asyncio.ensure_future(ledger.debit("agent-k", 7, idempotency_key="same", reason="twice"))
                 for _, ledger in instances[:2]]
        await waiting_on_locks(postgres_url, 2)  # one on the wallet, the other on the key
        blocker.rollback()
        results = await asyncio.gather(*calls)

    assert sorted(r.replayed for r in results) == [False, True]
    assert results[0].txn_id == results[1].txn_id
    assert first.get_wallet("agent-k").balance == 93
    assert first.check_ledger() == []


async def test_two_instances_opening_one_agents_wallet_under_different_keys_open_it_once(
    instances: list[tuple[PostgresStore, LedgerService]],
) -> None:
    results = await asyncio.gather(*(ledger.create_wallet("agent-x", "cus_multi", None, f"open-{n}")
                                     for n, (_, ledger) in enumerate(instances)), return_exceptions=True)

    opened = [r for r in results if not isinstance(r, BaseException)]
    assert len(opened) == 1
    assert all("already has a wallet" in str(r) for r in results if isinstance(r, BaseException))
    assert instances[0][0].ledger.wallet_id("agent-x") == opened[0].wallet_id


def seeded_hot_wallet(url: str, keys: list[str]) -> int:
    store, ledger = instance(url)
    opening = sum(amount_of(k) for k in keys) + 1000
    try:
        asyncio.run(ledger.create_wallet(HOT, "cus_hot", None, "open"))
        asyncio.run(ledger.credit(HOT, opening, idempotency_key="fund", reason="fund"))
    finally:
        store.close()
    return opening


def test_three_processes_debiting_one_hot_wallet_one_killed_mid_load_keep_every_acknowledged_debit_once(
    postgres_url: str,
) -> None:
    workers, debits, victim = 3, int(os.environ.get("LEDGER_DEBITS", "60")), 1
    keys = [f"w{w}-{i}" for w in range(workers) for i in range(debits)]
    opening = seeded_hot_wallet(postgres_url, keys)
    processes = start_together([[sys.executable, str(WORKER), "debits", postgres_url, str(w), str(workers),
                                  str(debits), str(w + 11)] for w in range(workers)])
    killed = processes[victim]
    assert killed.stdout is not None
    before = [killed.stdout.readline() for _ in range(debits // 3)]  # it is mid-load: a third acknowledged
    os.kill(killed.pid, signal.SIGKILL)
    rest, _ = rest_of(killed)
    assert killed.returncode == -signal.SIGKILL
    outputs: list[str] = ["".join(before) + rest]
    for process in processes:
        if process is not killed:
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0, err
            outputs.append(out)

    acks = [line.split() for out in outputs for line in out.splitlines() if len(line.split()) == 2]
    fresh = Counter(key for how, key in acks if how == "fresh")
    assert max(fresh.values()) == 1
    survivors = {f"w{w}-{i}" for w in range(workers) if w != victim for i in range(debits)}
    # the survivors' own debits were all acknowledged: fresh, or replayed when the killed worker's retry of the same
    # key committed first (and it died before printing it)
    assert survivors <= {key for _, key in acks}

    store, ledger = instance(postgres_url)
    try:
        stored: dict[str, Any] = {r["idempotency_key"]: r for r in store.query(
            "SELECT idempotency_key FROM ledger_requests WHERE operation = 'debit'")}
        assert {key for _, key in acks} <= set(stored)  # every acknowledged debit is in the ledger
        debited = store.query("SELECT idempotency_key FROM agent_transactions WHERE kind = 'debit' AND entry = 0")
        assert len(debited) == len(stored)  # one transaction per key, none lost
        assert ledger.get_wallet(HOT).balance == opening - sum(amount_of(k) for k in stored)
        assert ledger.check_ledger() == []
    finally:
        store.close()


def test_a_batch_runs_its_ledger_jobs_in_wallet_order_so_concurrent_batches_lock_wallets_in_one_order(
    postgres_url: str,
) -> None:
    """Each batch locks wallets as its jobs run, until its COMMIT: run in arrival order, two batches (of two
    instances, or two writer threads) can lock two wallets in opposite orders and deadlock, which costs PostgreSQL's
    deadlock_timeout (1 s) and the whole batch. In wallet order they queue instead."""
    core = PostgresStore(postgres_url, writers=1, pool_size=1)
    service = LedgerService(core, luc_per_usd=1000, agent_limit=lambda customer: None)  # type: ignore[arg-type]
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def blocker(conn: Any) -> None:  # holds the one writer thread, so the next jobs gather into one batch
        started.set()
        release.wait(30)

    def job(agent: str) -> Any:
        real = service.debit_job(agent, 1, idempotency_key=f"k-{agent}", reason="order")

        def fn(conn: Any) -> None:
            ran.append(agent)

        fn.lock_order = real.lock_order  # type: ignore[attr-defined]
        return fn

    try:
        first = core.submit(blocker)
        assert started.wait(30)
        futures = [core.submit(job(agent)) for agent in ["agent-c", "agent-a", "agent-b"]]
        release.set()
        for future in [first, *futures]:
            future.result(timeout=30)
    finally:
        core.close()
    assert ran == ["agent-a", "agent-b", "agent-c"]


@pytest.mark.parametrize(("tamper", "rule"), DAMAGE)
async def test_check_ledger_on_postgresql_names_each_kind_of_damage(postgres_url: str, tamper: str, rule: str) -> None:
    """`check_ledger` is one statement written for both backends (store/ledger.py `_checks`): each rule must fire on
    PostgreSQL as it does on SQLite."""
    store, ledger = instance(postgres_url)
    try:
        await books_with_every_kind_of_row(ledger)

        def damage(tx: Any) -> None:
            for statement in tamper.split("; "):
                tx.execute(statement)

        await store.write(damage)

        assert rule in {v.rule for v in ledger.check_ledger()}
    finally:
        store.close()
