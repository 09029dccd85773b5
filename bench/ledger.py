"""Wallet debits per second through the ledger service (group commit) against one transaction per debit, and the
p99 acknowledgement latency at an offered 1,000 debits/s.

For each of 3 runs, on fresh databases:
- service: 64 concurrent callers debit random wallets among 100 through `LedgerService.debit` (one writer, group
  commit); debits/s = debits / wall time.
- baseline: the very same debit jobs (`LedgerService.debit_job`, the same SQL) one after another on a single
  sqlite3 connection, each in its own BEGIN IMMEDIATE ... COMMIT (same pragmas, WAL, synchronous=NORMAL).
- latency: debits offered at a fixed 1,000/s (open loop: each is timed from its scheduled moment, so a stall
  counts against every debit it delays), p50/p99 of the acknowledgement (after COMMIT).
Prints every run's raw figures, the medians, the ratios and the targets from issue 6.

    python bench/ledger.py [--debits 20000] [--callers 64] [--wallets 100] [--rate 1000] [--seconds 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from measure import medians, paced_debits, percentile, print_checks, print_run

from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.store import Store, connect

TARGET_RATE = 10_000
TARGET_RATIO = 1.5
TARGET_P99_MS = 10.0


def open_ledger(path: Path, wallets: int) -> tuple[Store, LedgerService]:
    store = Store(path)
    ledger = LedgerService(store, luc_per_usd=1000, agent_limit=lambda customer: None)

    async def fund() -> None:
        for i in range(wallets):
            await ledger.create_wallet(f"agent-{i}", "cus_bench", None, f"open-{i}")
        await asyncio.gather(*(ledger.credit(f"agent-{i}", 10**12, idempotency_key=f"fund-{i}", reason="bench")
                               for i in range(wallets)))

    asyncio.run(fund())
    return store, ledger


def service_rate(folder: Path, debits: int, callers: int, wallets: int) -> float:
    store, ledger = open_ledger(folder / "service.db", wallets)
    rng = random.Random(1)
    plan = [(f"agent-{rng.randrange(wallets)}", 1 + rng.randrange(50)) for _ in range(debits)]

    async def run() -> float:
        queue = iter(enumerate(plan))

        async def caller() -> None:
            for i, (agent, amount) in queue:
                await ledger.debit(agent, amount, idempotency_key=f"d{i}", reason="bench")

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return time.perf_counter() - start

    try:
        elapsed = asyncio.run(run())
        assert ledger.check_ledger() == []
    finally:
        store.close()
    return debits / elapsed


def baseline_rate(folder: Path, debits: int, wallets: int) -> float:
    store, ledger = open_ledger(folder / "baseline.db", wallets)
    store.close()  # the service object stays usable for building jobs; it never touches its store for that
    conn = connect(folder / "baseline.db")
    rng = random.Random(1)
    plan = [(f"agent-{rng.randrange(wallets)}", 1 + rng.randrange(50)) for _ in range(debits)]
    start = time.perf_counter()
    for i, (agent, amount) in enumerate(plan):
        job = ledger.debit_job(agent, amount, idempotency_key=f"d{i}", reason="bench")
        conn.execute("BEGIN IMMEDIATE")
        try:
            job(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return debits / elapsed


def latency_at(folder: Path, rate: int, seconds: float, wallets: int) -> tuple[float, float, float]:
    store, ledger = open_ledger(folder / "latency.db", wallets)
    try:
        samples, achieved = asyncio.run(paced_debits(ledger, rate, seconds, wallets))
    finally:
        store.close()
    return percentile(samples, 0.50), percentile(samples, 0.99), achieved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debits", type=int, default=20_000)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--wallets", type=int, default=100)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    runs: list[dict[str, float]] = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            figures = {
                "service_debits_per_s": service_rate(folder, args.debits, args.callers, args.wallets),
                "baseline_debits_per_s": baseline_rate(folder, args.debits, args.wallets),
            }
            figures["p50_ms"], figures["p99_ms"], figures["offered_achieved_per_s"] = latency_at(
                folder, args.rate, args.seconds, args.wallets)
        figures["ratio"] = figures["service_debits_per_s"] / figures["baseline_debits_per_s"]
        runs.append(figures)
        print_run(run, figures)

    median = medians(runs)
    print(f"\nmedian of {args.runs} runs ({args.debits:,} debits, {args.callers} callers, {args.wallets} wallets; "
          f"latency at {args.rate:,}/s for {args.seconds:g} s):")
    checks = [
        ("service debits/s", median["service_debits_per_s"], f">= {TARGET_RATE:,}",
         median["service_debits_per_s"] >= TARGET_RATE),
        ("baseline debits/s (1 txn per debit)", median["baseline_debits_per_s"], "", None),
        ("ratio service / baseline", median["ratio"], f">= {TARGET_RATIO}", median["ratio"] >= TARGET_RATIO),
        (f"p50 ack latency at {args.rate:,}/s (ms)", median["p50_ms"], "", None),
        (f"p99 ack latency at {args.rate:,}/s (ms)", median["p99_ms"], f"<= {TARGET_P99_MS:g}",
         median["p99_ms"] <= TARGET_P99_MS),
    ]
    print_checks(checks, width=40)


if __name__ == "__main__":
    main()
