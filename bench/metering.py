"""Durable meter events per second through the metering service against raw sqlite3 inserts, and the flush drain
rate to the in-process sandbox.

For each of 3 runs, on fresh databases:
- service: 64 concurrent callers record events for 100 customers (tiers mixed, operation types cycling) through
  `MeteringService.record`: validated, weighted, counted against the period's running total and acknowledged after
  COMMIT; events/s = events / wall time. Each customer's first sighting happens before the clock starts.
- baseline: the same rows (every column the service writes) inserted with sqlite3 `executemany`, 100 per
  BEGIN IMMEDIATE ... COMMIT, on one connection into the same schema (same pragmas, WAL, synchronous=NORMAL).
- flush: the recorded events drained by `MeterFlusher.flush_once` through the real gateway and SDK to the sandbox
  in-process (v2 session + stream, 100 per request, marks per batch); events/s = events / flush wall time. The
  sandbox's meter totals are checked against ours.
Prints every run's raw figures, the medians, the ratio and the targets from issue 5.

    python bench/metering.py [--events 50000] [--flush-events 20000] [--callers 64] [--customers 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from measure import medians, print_checks, print_run

from aims_billing_mcp.services.meter_flusher import MeterFlusher
from aims_billing_mcp.services.metering import MeteringService
from aims_billing_mcp.services.tiers import Pricing, calendar_month_of
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import Store, connect, utc_now
from aims_billing_mcp.stripe_gateway import StripeGateway, StripeRequest, build_gateway

TARGET_RATE = 12_000
TARGET_RATIO = 0.5
TARGET_FLUSH = 5_000
PRICING = Pricing.load()
TIERS = ("p2p", "3mo", "6mo", "9mo")


def make_service(store: Store, customers: list[str]) -> MeteringService:
    tiers = {customer: PRICING.tier(TIERS[i % len(TIERS)]) for i, customer in enumerate(customers)}

    async def exists(customer: str) -> bool:
        return True

    return MeteringService(store, PRICING, tier_of=tiers.__getitem__, period_of=lambda c, t: calendar_month_of(t),
                           customer_exists=exists)


async def record(metering: MeteringService, customers: list[str], events: int, callers: int, tag: str) -> float:
    operations = list(PRICING.multipliers)
    await asyncio.gather(*(metering.record(customer, 1) for customer in customers))  # first sightings, untimed
    counter = iter(range(events))

    async def caller() -> None:
        for i in counter:
            await metering.record(customers[i % len(customers)], 1 + i % 5000,
                                  operation=operations[i % len(operations)], identifier=f"{tag}-{i}")

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return time.perf_counter() - start


def service_rate(folder: Path, events: int, callers: int, customers: list[str]) -> float:
    store = Store(folder / "service.db")
    try:
        elapsed = asyncio.run(record(make_service(store, customers), customers, events, callers, "s"))
        stored = store.query_one("SELECT COUNT(*) AS n FROM meter_events")
        assert stored == {"n": events + len(customers)}, stored
    finally:
        store.close()
    return events / elapsed


def baseline_rate(folder: Path, events: int, customers: list[str]) -> float:
    Store(folder / "baseline.db").close()  # the same schema, migrated
    conn = connect(folder / "baseline.db")
    operations = list(PRICING.multipliers)
    now = int(time.time())
    start_p, end_p = calendar_month_of(now)
    created = utc_now()
    rows = []
    for i in range(events):
        operation = operations[i % len(operations)]
        raw = 1 + i % 5000
        milli = PRICING.multipliers[operation]
        weighted = (raw * milli + 500) // 1000
        rows.append((f"b-{i}", customers[i % len(customers)], operation, milli, raw, weighted, None, now, None, "3mo",
                     start_p, end_p, weighted, 100_000, 150, 0, 0, PRICING.meter_event_name, created,
                     f"{customers[i % len(customers)]}:b-{i}"))
    sql = ("INSERT INTO meter_events (identifier, customer_id, operation, multiplier_milli, raw_units, weighted_units, "
           "agent_id, timestamp, metadata, tier, period_start, period_end, period_units_after, allowance, "
           "overage_rate, overage_units, cost_cents, event_name, status, attempts, created_at, stripe_identifier) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)")
    start = time.perf_counter()
    for index in range(0, events, 100):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows[index:index + 100])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return events / elapsed


async def stripe_total(gateway: StripeGateway, meter: str, customer: str) -> int:
    now = int(time.time()) // 60 * 60
    page = await gateway.send(StripeRequest("get", f"/v1/billing/meters/{meter}/event_summaries", {
        "customer": customer, "start_time": now - 86_400, "end_time": now + 86_400}))
    return int(sum(summary["aggregated_value"] for summary in page.data["data"]))


def flush_rate(folder: Path, events: int, callers: int) -> float:
    from aims_billing_mcp.sandbox import create_app

    app = create_app(db_path=":memory:")
    settings = Settings(_env_file=None, aims_billing_db=folder / "flush.db")  # type: ignore[call-arg]
    gateway = build_gateway(settings, sandbox_app=app, retry_delay_scale=0)
    store = Store(folder / "flush.db")

    async def run() -> float:
        meter = (await gateway.send(StripeRequest("post", "/v1/billing/meters", {
            "display_name": "LUC", "event_name": PRICING.meter_event_name,
            "default_aggregation": {"formula": "sum"}}))).data["id"]
        customers = [(await gateway.send(StripeRequest("post", "/v1/customers", {"name": f"c{i}"}))).data["id"]
                     for i in range(10)]
        await record(make_service(store, customers), customers, events, callers, "f")
        flusher = MeterFlusher(store, gateway, retry_delay_scale=0)
        start = time.perf_counter()
        report = await flusher.flush_once()
        elapsed = time.perf_counter() - start
        assert report.pending == 0 and report.error is None, report
        for customer in customers:  # P2P usage is invoiced per period, never sent to the meter
            local = store.query_one("SELECT COALESCE(SUM(weighted_units), 0) AS n FROM meter_events WHERE "
                                    "customer_id = ? AND tier != 'p2p'", (customer,))
            assert local is not None and await stripe_total(gateway, meter, customer) == local["n"], customer
        return report.sent / elapsed

    try:
        return asyncio.run(run())
    finally:
        store.close()
        app.state.sandbox.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--flush-events", type=int, default=20_000)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--customers", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    customers = [f"cus_bench{i:03d}" for i in range(args.customers)]

    runs: list[dict[str, float]] = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            figures = {
                "service_events_per_s": service_rate(folder, args.events, args.callers, customers),
                "raw_executemany_events_per_s": baseline_rate(folder, args.events, customers),
                "flush_events_per_s": flush_rate(folder, args.flush_events, args.callers),
            }
        figures["ratio"] = figures["service_events_per_s"] / figures["raw_executemany_events_per_s"]
        runs.append(figures)
        print_run(run, figures)

    median = medians(runs)
    print(f"\nmedian of {args.runs} runs ({args.events:,} events, {args.callers} callers, {args.customers} customers; "
          f"flush of {args.flush_events:,}):")
    checks = [
        ("service events/s (durable, acknowledged)", median["service_events_per_s"], f">= {TARGET_RATE:,}",
         median["service_events_per_s"] >= TARGET_RATE),
        ("raw executemany events/s (100 per txn)", median["raw_executemany_events_per_s"], "", None),
        ("ratio service / raw", median["ratio"], f">= {TARGET_RATIO}", median["ratio"] >= TARGET_RATIO),
        ("flush drain events/s (sandbox)", median["flush_events_per_s"], f">= {TARGET_FLUSH:,}",
         median["flush_events_per_s"] >= TARGET_FLUSH),
    ]
    print_checks(checks, width=42)


if __name__ == "__main__":
    main()
