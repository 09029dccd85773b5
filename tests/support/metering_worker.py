"""A metering process for the crash test (tests/services/test_metering_processes.py).

    python tests/support/metering_worker.py DB RUN
        records meter events for three customers from 64 concurrent callers, forever; prints `<identifier>` after
        each acknowledgement, flushed, so a parent that kills it with SIGKILL knows what was committed. DB is a
        SQLite path or a postgresql:// URL (tests/services/test_metering_postgres.py: several workers on one database).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from aims_billing_mcp.services.metering import MeteringService
from aims_billing_mcp.services.tiers import Pricing, calendar_month_of
from aims_billing_mcp.store import PostgresStore, Store

CUSTOMERS = ("cus_a", "cus_b", "cus_c")
TIERS = {"cus_a": "p2p", "cus_b": "3mo", "cus_c": "9mo"}


async def exists(customer: str) -> bool:
    return True


async def main(path: str, run: str) -> None:
    pricing = Pricing.load()
    store: Any = PostgresStore(path) if path.startswith("postgresql://") else Store(path)
    metering = MeteringService(store, pricing, tier_of=lambda c: pricing.tier(TIERS[c]),
                               period_of=lambda c, t: calendar_month_of(t), customer_exists=exists)
    operations = list(pricing.multipliers)

    async def caller(lane: int) -> None:
        i = 0
        while True:
            result = await metering.record(CUSTOMERS[(lane + i) % 3], 1 + (lane * 31 + i) % 997,
                                           operation=operations[i % len(operations)], identifier=f"r{run}-{lane}-{i}")
            sys.stdout.write(result.identifier + "\n")
            sys.stdout.flush()
            i += 1

    await asyncio.gather(*(caller(lane) for lane in range(64)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
