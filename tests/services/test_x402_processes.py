"""The same x402 payment presented by 8 processes at once, on one database: exactly one is accepted, the others are
refused as replays, and the wallet is credited once (the UNIQUE keys in the receipt's transaction decide)."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path

import pytest

from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.services.tiers import Pricing
from aims_billing_mcp.services.x402 import X402Service
from aims_billing_mcp.store import Store
from tests.support.processes import run_together

WORKER = Path(__file__).parents[1] / "support" / "x402_worker.py"
from tests.support.x402_worker import Payer, header  # noqa: E402


@pytest.mark.parametrize("quote", ["stored", "challenge token"])
def test_eight_processes_presenting_one_payment_at_once_credit_it_once(tmp_path: Path, quote: str) -> None:
    """A challenge token is checked by each process with the key they share (the file beside the database)."""
    path = tmp_path / "x402.db"
    store = Store(path)
    pricing = Pricing.load()
    ledger = LedgerService(store, luc_per_usd=pricing.luc_per_usd, agent_limit=lambda customer: None)
    service = X402Service(store, ledger, None, pricing)

    async def setup() -> tuple[str, str]:
        await ledger.create_wallet("racer", "cus_r", None, "open")
        if quote == "stored":
            required = await service.create_requirements(luc=250, agent_id="racer", description="d", resource="r")
        else:
            required = await service.challenge(agent_id="racer", luc=250, resource="/x402/credits")
        return required.quote_id, header(Payer().pay(required.payment_required))

    quote_id, payment = asyncio.run(setup())
    store.close()

    # all loaded (the SDK imported): then all present at once
    outputs = run_together([[sys.executable, str(WORKER), str(path), quote_id, payment]] * 8, timeout=120)
    outcomes = Counter(out.split()[0] if out.split()[0] == "accepted" else out.strip() for out in outputs)
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
