"""The same x402 payment presented by 8 processes at once, on one database: exactly one is accepted, the others are
refused as replays, and the wallet is credited once (the UNIQUE keys in the receipt's transaction decide)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path

from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.services.tiers import Pricing
from aims_billing_mcp.services.x402 import X402Service
from aims_billing_mcp.store import Store

WORKER = Path(__file__).parent / "x402_worker.py"
sys.path.insert(0, str(WORKER.parent))
from x402_worker import Payer, header  # noqa: E402


def test_eight_processes_presenting_one_payment_at_once_credit_it_once(tmp_path: Path) -> None:
    path = tmp_path / "x402.db"
    store = Store(path)
    pricing = Pricing.load()
    ledger = LedgerService(store, luc_per_usd=pricing.luc_per_usd, agent_limit=lambda customer: None)
    service = X402Service(store, ledger, None, pricing)

    async def setup() -> tuple[str, str]:
        await ledger.create_wallet("racer", "cus_r", None, "open")
        quote = await service.create_requirements(luc=250, agent_id="racer", description="d", resource="r")
        return quote.quote_id, header(Payer().pay(quote.payment_required))

    quote_id, payment = asyncio.run(setup())
    store.close()

    processes = [subprocess.Popen([sys.executable, str(WORKER), str(path), quote_id, payment], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for process in processes:  # all loaded (the SDK imported): then all present at once
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = [p.communicate(timeout=120) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
    outcomes = Counter(out.split()[0] if out.split()[0] == "accepted" else out.strip() for out, _ in outputs)
    assert outcomes == {"accepted": 1, "rejected invalid_exact_evm_nonce_already_used": 7}, outcomes

    store = Store(path)
    try:
        ledger = LedgerService(store, luc_per_usd=pricing.luc_per_usd, agent_limit=lambda customer: None)
        assert ledger.get_wallet("racer").balance == 250
        assert store.query_one("SELECT COUNT(*) AS n FROM x402_receipts") == {"n": 1}
        assert store.query_one("SELECT status FROM x402_quotes") == {"status": "paid"}
        assert ledger.check_ledger() == []
    finally:
        store.close()
