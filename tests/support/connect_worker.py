"""A worker process for tests/services/test_connect_processes.py: one server instance (its own state on the shared
database, its Stripe calls to the shared sandbox over HTTP) doing one thing at the same moment as the others.

    python tests/support/connect_worker.py DB API_BASE x402 QUOTE_ID PAYMENT
        presents PAYMENT (an x402 header value) for QUOTE_ID: prints `accepted <receipt>` or `rejected <code>`
    python tests/support/connect_worker.py DB API_BASE refund SALE AMOUNT KEY
        refund_split_sale: prints `refunded <refund id>` or `error <code>`
    python tests/support/connect_worker.py DB API_BASE webhook EVENT_FILE
        ingests a Stripe event (JSON in EVENT_FILE) as the webhook endpoint does: prints `ingested`

Each opens its state, prints `ready`, and waits for a line on stdin so all act at once (tests/support/processes.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path


async def main(db: str, api_base: str, mode: str, *args: str) -> None:
    from aims_billing_mcp.errors import BillingError
    from aims_billing_mcp.settings import Settings
    from aims_billing_mcp.state import open_state

    settings = Settings(_env_file=None, aims_billing_db=Path(db), stripe_api_base=api_base)  # type: ignore[call-arg]
    async with open_state(settings, retry_delay_scale=0) as state:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()
        try:
            if mode == "x402":
                receipt = await state.x402.verify_and_settle(args[1], quote_id=args[0])
                sys.stdout.write(f"accepted {receipt.receipt_id}\n")
            elif mode == "refund":
                done = await state.connect.refund_sale(sale=args[0], amount=int(args[1]), reason=None,
                                                       idempotency_key=args[2])
                sys.stdout.write(f"refunded {done.refund}\n")
            else:
                payload = Path(args[0]).read_text("utf-8")
                await state.webhook_events.ingest(json.loads(payload), payload)
                sys.stdout.write("ingested\n")
        except BillingError as exc:
            sys.stdout.write(f"{'rejected' if mode == 'x402' else 'error'} {exc.code}\n")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
