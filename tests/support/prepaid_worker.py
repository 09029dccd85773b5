"""A worker process for tests/services/test_prepaid_processes.py:

    python tests/support/prepaid_worker.py DB SEED ROW_ID...
        builds the server's state on DB (and the embedded sandbox file beside it), opens the sandbox, prints `ready`,
        waits for a line on stdin (so all workers start at once), then starts every given prepaid subscription in
        its own order (SEED shuffles it), each until it is no longer in progress, and prints `<row id> <status>`.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

from aims_billing_mcp.services.prepaid import OPEN
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.state import build_state
from aims_billing_mcp.stripe_gateway import StripeRequest


async def main(db: str, seed: int, row_ids: list[str]) -> None:
    state = build_state(Settings(_env_file=None, aims_billing_db=Path(db)),  # type: ignore[call-arg]
                        retry_delay_scale=0)
    prepaid = state.prepaid
    try:
        await state.gateway.send(StripeRequest("get", "/v1/balance"))  # the sandbox file opened before `go`
        print("ready", flush=True)
        sys.stdin.readline()
        random.Random(seed).shuffle(row_ids)
        for row_id in row_ids:
            row = await prepaid.start(row_id)
            for _ in range(1200):  # an attempt that met a busy moment, or a row another worker holds (leased),
                if row is None or row.status not in OPEN:  # is tried again, as the background would
                    break
                await asyncio.sleep(0.05)
                row = await prepaid.start(row_id)
            print(row_id, row.status if row else None, flush=True)
    finally:
        await state.gateway.close()
        state.store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
