"""Full ACP checkouts over loopback HTTP: create, update, complete (paid with a Shared Payment Token through a
PaymentIntent on the in-process sandbox, LUC credited once), against `serve --http`. Prints the p50/p99 latency of a
whole checkout and completed checkouts per second (median of 3 runs, raw values), target >= 100 checkouts/s.
`--items tier` measures checkouts of a prepaid tier instead (each for its own customer: the subscription is started
in Stripe before the answer, three more Stripe calls), and `--items both` (the default) runs the two.

    python bench/acp.py [--checkouts 300] [--concurrency 8] [--runs 3] [--items luc|tier|both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from measure import free_port, percentile

from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.services.stripe_setup import setup_stripe
from aims_billing_mcp.services.tiers import Pricing
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store
from aims_billing_mcp.stripe_gateway import StripeRequest, build_gateway

KEY = "bench-platform-key"
HEADERS = {"Authorization": f"Bearer {KEY}", "API-Version": "2026-04-17", "Content-Type": "application/json"}


async def checkout(http: httpx.AsyncClient, run: int, index: int, tier: bool) -> float:
    start = time.perf_counter()

    async def post(path: str, body: dict[str, object], key: str) -> dict[str, object]:
        response = await http.post(path, content=json.dumps(body), headers={**HEADERS, "Idempotency-Key": key})
        if response.status_code >= 300:
            raise SystemExit(f"{path}: {response.status_code} {response.text}")
        data: dict[str, object] = response.json()
        return data

    agent, lines = (f"bench-subscriber-{index}", [{"id": "tier_3mo"}]) if tier else (
        "bench-buyer", [{"id": "luc_10k"}, {"id": "luc_10k"}])
    created = await post("/acp/checkout_sessions", {
        "currency": "usd", "line_items": [{"id": "luc_10k"}], "capabilities": {},
        "metadata": {"agent_id": agent}}, f"c-{run}-{index}")
    session = f"/acp/checkout_sessions/{created['id']}"
    await post(session, {"line_items": lines}, f"u-{run}-{index}")
    done = await post(f"{session}/complete", {"payment_data": {"handler_id": "stripe_spt", "instrument": {
        "type": "card", "credential": {"type": "spt", "token": f"spt_test_bench_{run}_{index}"}}}}, f"p-{run}-{index}")
    order = done.get("order")
    if done.get("status") != "completed" or not isinstance(order, dict) or order.get("status") != "completed":
        raise SystemExit(f"checkout {index} ended {done.get('status')}, order {order}")
    return (time.perf_counter() - start) * 1000


async def subscribers(db: Path, count: int) -> None:
    """The tier prices, and one customer with an agent wallet per tier checkout (a customer has one tier)."""
    settings = Settings(_env_file=None, aims_billing_db=db)  # type: ignore[call-arg]
    gateway = build_gateway(settings)
    store = Store(db)
    ledger = LedgerService(store, luc_per_usd=1000, agent_limit=lambda customer: None)
    try:
        await setup_stripe(gateway, Pricing.load())
        for index in range(count):
            customer = (await gateway.send(StripeRequest("post", "/v1/customers", {}))).data["id"]
            await ledger.create_wallet(f"bench-subscriber-{index}", customer, None, f"w-{index}")
    finally:
        await gateway.close()
        store.close()


async def one_run(run: int, checkouts: int, concurrency: int, tier: bool) -> tuple[float, list[float], int]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "acp.db"
        store = Store(db)
        await LedgerService(store, luc_per_usd=1000, agent_limit=lambda customer: None).create_wallet(
            "bench-buyer", "cus_bench", None, "w")
        store.close()
        if tier:
            await subscribers(db, checkouts + 1)
        port = free_port()
        env = {**os.environ, "AIMS_BILLING_DB": str(db), "AIMS_BILLING_ACP_API_KEYS": KEY,
               "AIMS_BILLING_LOG_LEVEL": "ERROR", "AIMS_BILLING_FLUSH_INTERVAL_SECONDS": "0"}
        env.pop("STRIPE_SECRET_KEY", None)
        server = subprocess.Popen([sys.executable, "-m", "aims_billing_mcp", "serve", "--http", "--port", str(port)],
                                  env=env, stderr=subprocess.DEVNULL)
        try:
            limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30) as http:
                for _ in range(600):
                    try:
                        await http.get("/.well-known/acp.json")
                        break
                    except httpx.HTTPError:
                        await asyncio.sleep(0.05)
                await checkout(http, run, checkouts, tier)  # warm: the sandbox opens on the first Stripe call
                queue = list(range(checkouts))
                latencies: list[float] = []

                async def worker() -> None:
                    while queue:
                        latencies.append(await checkout(http, run, queue.pop(), tier))

                start = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                elapsed = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(10)
        after = Store(db)
        if tier:  # what was delivered: prepaid subscriptions started (exactly one per checkout)
            row = after.query_one("SELECT COUNT(*) AS n FROM prepaid_subscriptions WHERE status = 'started'")
            delivered = int(row["n"]) if row else 0
        else:
            delivered = LedgerService(after, luc_per_usd=1000, agent_limit=lambda c: None).get_wallet(
                "bench-buyer").balance
        after.close()
    return checkouts / elapsed, latencies, delivered


async def main(checkouts: int, concurrency: int, runs: int, tier: bool) -> None:
    results = [await one_run(run, checkouts, concurrency, tier) for run in range(runs)]
    rates = [r[0] for r in results]
    p50s = [percentile(r[1], 0.5) for r in results]
    p99s = [percentile(r[1], 0.99) for r in results]
    what = "a prepaid tier_3mo, its subscription started" if tier else "LUC packs"
    print(f"ACP checkouts of {what} (create, update, complete with an SPT) over loopback HTTP, {checkouts} per run, "
          f"{concurrency} in flight, {runs} runs")
    target = "" if tier else f"  (target >= 100: {'met' if statistics.median(rates) >= 100 else 'MISSED'})"
    print(f"  completed checkouts/s: median {statistics.median(rates):,.0f}  raw {[round(r) for r in rates]}{target}")
    print(f"  checkout latency ms: p50 {statistics.median(p50s):.1f}  p99 {statistics.median(p99s):.1f}  "
          f"(raw p50 {[round(x, 1) for x in p50s]}, p99 {[round(x, 1) for x in p99s]})")
    if tier:
        once = all(r[2] == checkouts + 1 for r in results)
        print(f"  one subscription started per checkout: {'yes' if once else 'NO'}")
    else:
        once = all(r[2] == (checkouts + 1) * 20_000 for r in results)
        print(f"  LUC credited exactly once per checkout: {'yes' if once else 'NO'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkouts", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--items", choices=["luc", "tier", "both"], default="both")
    ns = parser.parse_args()
    for tier in {"luc": [False], "tier": [True], "both": [False, True]}[ns.items]:
        asyncio.run(main(ns.checkouts, ns.concurrency, ns.runs, tier))
