"""x402 verify + record + credit per second in one process, against a bare signature recovery loop in the same run.

    python bench/x402.py [--payments 1000] [--concurrency 32] [--runs 3]

Each payment: a distinct EIP-3009 authorization signed beforehand (signing is the client's cost, not counted), then
`X402Service.verify_and_settle` in local mode: decode, checks, the SDK's exact-EVM facilitator (EIP-712 digest,
secp256k1 recovery, simulated transfer with the nonce read from the receipts table, simulated settlement), and one
store job recording the receipt, marking the quote paid and crediting the wallet. The baseline recovers the same
typed data with eth-account (`Account.recover_message(encode_typed_data(...))`), nothing else. Prints the raw
values of each run, the medians, and which eth-keys secp256k1 backend ran. Targets: >= 500 receipts/s and >= 50% of
the bare recovery rate.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

# this file is named x402.py: its own folder must not shadow the x402 package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aims_billing_mcp.services.ledger import LedgerService  # noqa: E402
from aims_billing_mcp.services.tiers import Pricing  # noqa: E402
from aims_billing_mcp.services.x402 import CAIP_TO_NAME, NETWORKS, X402Service  # noqa: E402
from aims_billing_mcp.store import Store  # noqa: E402
from tests.support.x402_worker import TYPES, Payer, header  # noqa: E402


async def service_run(n: int, concurrency: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        store = Store(Path(folder) / "bench.db")
        pricing = Pricing.load()
        ledger = LedgerService(store, luc_per_usd=pricing.luc_per_usd, agent_limit=lambda customer: None)
        service = X402Service(store, ledger, None, pricing, clock=time.time)
        await ledger.create_wallet("bench", "cus_bench", None, "open")
        payer = Payer()
        quotes = await asyncio.gather(*(service.create_requirements(
            luc=10, agent_id="bench", description="bench", resource="urn:bench", valid_seconds=3600)
            for _ in range(n)))
        payments = [(q.quote_id, header(payer.pay(q.payment_required))) for q in quotes]
        service._scheme(quotes[0].network)  # the SDK imported and built before the clock starts
        queue = list(reversed(payments))

        async def lane() -> None:
            while queue:
                quote_id, payment = queue.pop()
                await service.verify_and_settle(payment, quote_id=quote_id)

        start = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        assert ledger.get_wallet("bench").balance == 10 * n
        assert store.query_one("SELECT COUNT(*) AS n FROM x402_receipts") == {"n": n}
        store.close()
        return n / elapsed


def bare_run(n: int) -> float:
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    payer = Payer()
    caip, chain_id, asset, name, version = NETWORKS["base-sepolia"]
    domain = {"name": name, "version": version, "chainId": chain_id, "verifyingContract": asset}
    requirements = {"payTo": "0x88905996E9aFA7565698F7d1cfC71b4D4b3840d7", "amount": "10000", "network": caip}
    signed = []
    for _ in range(n):
        auth = payer.authorization(requirements)
        signed.append((auth, payer.sign(auth, CAIP_TO_NAME[caip])))
    start = time.perf_counter()
    for auth, signature in signed:
        message = {"from": auth["from"], "to": auth["to"], "value": int(auth["value"]),
                   "validAfter": int(auth["validAfter"]), "validBefore": int(auth["validBefore"]),
                   "nonce": bytes.fromhex(auth["nonce"][2:])}
        recovered = Account.recover_message(encode_typed_data(domain, TYPES, message), signature=signature)
        assert recovered == payer.address
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from eth_keys.backends import get_backend

    backend = type(get_backend()).__name__
    service_rates, bare_rates = [], []
    for run in range(args.runs):
        bare_rates.append(bare_run(args.payments))
        service_rates.append(asyncio.run(service_run(args.payments, args.concurrency)))
        print(f"run {run + 1}: verify+record+credit {service_rates[-1]:.0f}/s, bare recovery {bare_rates[-1]:.0f}/s")
    service_rate, bare_rate = statistics.median(service_rates), statistics.median(bare_rates)
    ratio = service_rate / bare_rate
    print(f"secp256k1 backend: {backend}")
    print(f"raw verify+record+credit/s: {[round(r) for r in service_rates]}")
    print(f"raw bare recovery/s: {[round(r) for r in bare_rates]}")
    print(f"median: {service_rate:.0f} receipts/s (target >= 500: {'met' if service_rate >= 500 else 'MISSED'}), "
          f"bare {bare_rate:.0f}/s, ratio {ratio:.0%} (target >= 50%: {'met' if ratio >= 0.5 else 'MISSED'})")


if __name__ == "__main__":
    main()
