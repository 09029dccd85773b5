"""A ledger writer in its own process, for the multi-process and crash tests (tests/services/test_ledger_processes.py).

DB is a SQLite file, or a postgresql:// URL (then the worker is one instance of a PostgresStore).

    python tests/support/ledger_worker.py debits DB WORKER WORKERS N SEED
        prints `ready`, waits for a line on stdin (so all workers start together), then
        N debits of keys `w<WORKER>-<i>` on the hot wallet, 8 at a time, retrying random keys of any worker (with
        their own amount) along the way; prints `fresh <key>` or `replayed <key>` after each acknowledgement.
    python tests/support/ledger_worker.py churn DB RUN SEED
        credits, debits, transfers, holds, captures and releases over four wallets, 16 at a time, forever; prints
        `<operation> <key>` after each acknowledgement, flushed, so a parent that kills it knows what was committed.
"""

from __future__ import annotations

import asyncio
import random
import sys
from typing import Any

from aims_billing_mcp.errors import InvalidInput, Refused
from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.store import PostgresStore, Store

HOT = "hot"
CHURN_AGENTS = ["w0", "w1", "w2", "w3"]


def amount_of(key: str) -> int:
    """Every key always means the same debit, whichever process sends it."""
    return 1 + sum(key.encode()) % 9


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def debits(ledger: LedgerService, worker: int, workers: int, n: int, rng: random.Random) -> None:
    async def debit(key: str) -> None:
        result = await ledger.debit(HOT, amount_of(key), idempotency_key=key, reason="hot wallet")
        say(f"{'replayed' if result.replayed else 'fresh'} {key}")

    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(f"w{worker}-{i}")
        if rng.random() < 0.3:  # a retry of any worker's key, maybe not sent by its owner yet
            queue.put_nowait(f"w{rng.randrange(workers)}-{rng.randrange(max(1, i))}")
        if rng.random() < 0.05:  # twins in flight at once
            queue.put_nowait(f"w{worker}-{i}")

    async def lane() -> None:
        while not queue.empty():
            await debit(queue.get_nowait())

    await asyncio.gather(*(lane() for _ in range(8)))


async def churn(ledger: LedgerService, run: int, rng: random.Random) -> None:
    for agent in CHURN_AGENTS:
        await ledger.create_wallet(agent, "cus_churn", None, f"open-{agent}")
    holds: list[str] = []
    counter = 0

    async def one() -> None:
        nonlocal counter
        counter += 1
        key = f"r{run}-{counter}"
        agent, other = rng.sample(CHURN_AGENTS, 2)
        roll = rng.random()
        common: dict[str, Any] = {"idempotency_key": key, "reason": "churn"}
        try:
            if roll < 0.25:
                await ledger.credit(agent, rng.randint(1, 50), **common)
                say(f"credit {key}")
            elif roll < 0.5:
                await ledger.debit(agent, rng.randint(1, 20), **common)
                say(f"debit {key}")
            elif roll < 0.7:
                await ledger.transfer(agent, other, rng.randint(1, 20), **common)
                say(f"transfer {key}")
            elif roll < 0.85 or not holds:
                placed = await ledger.hold(agent, rng.randint(1, 20), rng.choice([1, 3600]), **common)
                holds.append(placed.hold_id)
                say(f"hold {key}")
            elif roll < 0.95:
                await ledger.capture_hold(holds.pop(rng.randrange(len(holds))), rng.randint(1, 5), **common)
                say(f"capture_hold {key}")
            else:
                await ledger.release_hold(holds.pop(rng.randrange(len(holds))), **common)
                say(f"release_hold {key}")
        except (Refused, InvalidInput):
            pass  # not enough funds, an expired hold, a capture above the hold: nothing written, nothing acknowledged

    async def lane() -> None:
        while True:
            await one()

    await asyncio.gather(*(lane() for _ in range(16)))


async def main(argv: list[str]) -> None:
    mode, path = argv[0], argv[1]
    store: Any = PostgresStore(path) if path.startswith("postgresql://") else Store(path)
    ledger = LedgerService(store, luc_per_usd=1000, agent_limit=lambda customer: None)
    try:
        if mode == "debits":
            worker, workers, n, seed = (int(a) for a in argv[2:6])
            say("ready")
            sys.stdin.readline()
            await debits(ledger, worker, workers, n, random.Random(seed))
        elif mode == "churn":
            run, seed = int(argv[2]), int(argv[3])
            await churn(ledger, run, random.Random(seed))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
