"""A worker process for tests/services/test_prepaid_leases.py:

    python tests/support/prepaid_lease_worker.py DB LEASE_SECONDS PAUSE_AT ROW_ID
        builds the server's state on AIMS_BILLING_DATABASE_URL (the embedded sandbox file beside DB: the one Stripe
        every process shares), leases rows for LEASE_SECONDS, and makes one attempt to start ROW_ID. Every Stripe
        request is printed (`send METHOD PATH`) before it goes out; the first whose path starts with PAUSE_AT
        prints `paused` and waits for a line on stdin first (the test stops the process there with SIGSTOP, lets
        the lease run out, resumes it). Prints `done <status>` at the end.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from aims_billing_mcp.settings import Settings
from aims_billing_mcp.state import build_state


async def main(db: str, lease_seconds: float, pause_at: str, row_id: str) -> None:
    state = build_state(Settings(aims_billing_db=Path(db)), retry_delay_scale=0)
    state.prepaid.lease_seconds = lease_seconds
    send, paused = state.gateway.send, []

    async def announced(request: Any) -> Any:
        print("send", request.method.upper(), request.path, flush=True)
        if request.path.startswith(pause_at) and not paused:
            paused.append(True)
            print("paused", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
        return await send(request)

    state.gateway.send = announced  # type: ignore[method-assign]
    try:
        row = await state.prepaid.start(row_id)
        print("done", row.status if row else None, flush=True)
    finally:
        await state.gateway.close()
        state.store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]))
