"""Batch usage ingestion (issue 16): events/s through `create_meter_events` over stdio and `POST /v1/usage/events`
over loopback HTTP, against floors measured in the same run.

For each of 3 runs, on fresh databases, 100 customers (tiers mixed; known to the store before the clock starts, as
customers seen once are), operation types cycling:
- svc100 / svc500: the service in process, `MeteringService.record_many` with batches of 100 (4 callers) and of 500
  (8 callers): parsed, validated, weighted, counted against the period totals, acknowledged after COMMIT.
- raw100 / raw500: (c) the raw SQLite floor, the same rows `executemany`d 100 / 500 per BEGIN IMMEDIATE ... COMMIT,
  one connection, same schema and pragmas.
- stdio: (a) `create_meter_events` over stdio to `aims-billing-mcp serve` (a subprocess), batches of 100, 4 in
  flight: JSON-RPC over a pipe, strict argument parsing, the audit row, the write, the answer. The load comes from a
  plain JSON-RPC client (requests serialised before the clock starts, each answer parsed with json.loads), as the
  webhook bench's comes from raw sockets: the SDK's own `Client` checks every result against the tool's output
  schema with jsonschema, about 75 us of its CPU per event, and on 2 shared cores that check, not the server, set the
  pace (profiled: three quarters of the client's CPU; the server waited on its pipe). The SDK client's rate is
  printed beside it (sdk_stdio) with its CPU per event, so what an agent on the reference SDK gets is shown too.
- http: (b) `POST /v1/usage/events` to `serve --http` (a subprocess) over loopback, batches of 500, 8 connections
  (httpx), bodies serialised before the clock starts; bare: the same bodies to a bare Starlette endpoint that only
  reads them (bench/bare_endpoint.py), the transport's own ceiling.
After every timed part each acknowledged event is checked to be stored exactly once (rows = acknowledged accepted,
the period totals count them once). Prints each run's raw figures, the medians and the targets.

    python bench/ingest.py [--stdio-events 20000] [--http-events 50000] [--service-events 50000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
from mcp import Client, StdioServerParameters
from measure import free_port, medians, print_checks, print_run

from aims_billing_mcp.app import settle_heap
from aims_billing_mcp.services.metering import MeteringService
from aims_billing_mcp.services.tiers import Pricing, calendar_month_of
from aims_billing_mcp.store import Store, connect, utc_now

PRICING = Pricing.load()
TIERS = ("p2p", "3mo", "6mo", "9mo")
OPERATIONS = list(PRICING.multipliers)
KEY = "bench-ingest-key-0123456789"
CUSTOMERS = [f"cus_bench{n:03d}" for n in range(100)]
HERE = Path(__file__).parent


def events(tag: str, count: int) -> list[dict[str, Any]]:
    return [{"customer": CUSTOMERS[i % len(CUSTOMERS)], "units": 1 + i % 5000,
             "operation": OPERATIONS[i % len(OPERATIONS)], "identifier": f"{tag}-{i}"} for i in range(count)]


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def known_customers(db: Path) -> None:
    """The schema, and the customers as seen before (verified once, as the hot path finds them)."""
    Store(db).close()
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO meter_customers (customer_id, verified_at) VALUES (?, ?)",
                         [(customer, int(time.time())) for customer in CUSTOMERS])


def check_counted(db: Path, acknowledged: int) -> None:
    """Every acknowledged event stored once, and counted once in its period's running total."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT COUNT(*), COUNT(DISTINCT customer_id || ':' || identifier) FROM meter_events")
        stored, distinct = rows.fetchone()
        counted = conn.execute(  # the running totals plus the events not folded into them yet (migration 0022)
            "SELECT (SELECT COALESCE(SUM(events), 0) FROM meter_usage_totals) + (SELECT COUNT(*) FROM meter_events "
            "WHERE id > (SELECT folded_upto FROM meter_usage_version))").fetchone()[0]
    if not stored == distinct == counted == acknowledged:
        raise SystemExit(f"{acknowledged} acknowledged, {stored} stored ({distinct} distinct), {counted} counted")


# --- in process ----------------------------------------------------------------------------------------------------


def service_rate(folder: Path, count: int, size: int, callers: int) -> float:
    db = folder / f"service{size}.db"
    known_customers(db)
    store = Store(db)
    settle_heap()  # as `serve` does once the server is built (the rows of the earlier parts are gone by now)
    tiers = {customer: PRICING.tier(TIERS[i % len(TIERS)]) for i, customer in enumerate(CUSTOMERS)}

    async def exists(customer: str) -> bool:
        return True

    # the placements never change (no provision does while the bench runs), as the server's subscription service
    # tells metering through `placement_version`
    metering = MeteringService(store, PRICING, tier_of=tiers.__getitem__,
                               period_of=lambda c, t: calendar_month_of(t), customer_exists=exists,
                               placements=lambda: 0)
    queue = batches(events(f"s{size}", count), size)

    async def run() -> tuple[float, int]:
        accepted = 0

        async def caller() -> None:
            nonlocal accepted
            while queue:
                result = await metering.record_many(queue.pop())
                accepted += result.totals.accepted

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return time.perf_counter() - start, accepted

    try:
        elapsed, accepted = asyncio.run(run())
    finally:
        store.close()
    if accepted != count:
        raise SystemExit(f"service: {accepted} of {count} accepted")
    check_counted(db, accepted)
    return count / elapsed


def raw_rate(folder: Path, count: int, size: int) -> float:
    db = folder / f"raw{size}.db"
    Store(db).close()
    conn = connect(db)
    now = int(time.time())
    start_p, end_p = calendar_month_of(now)
    created = utc_now()
    rows = []
    for event in events(f"r{size}", count):
        milli = PRICING.multipliers[event["operation"]]
        weighted = (event["units"] * milli + 500) // 1000
        rows.append((event["identifier"], event["customer"], event["operation"], milli, event["units"], weighted, None,
                     now, None, "3mo", start_p, end_p, weighted, 100_000, 150, 0, 0, PRICING.meter_event_name, created,
                     f"{event['customer']}:{event['identifier']}"))
    sql = ("INSERT INTO meter_events (identifier, customer_id, operation, multiplier_milli, raw_units, weighted_units, "
           "agent_id, timestamp, metadata, tier, period_start, period_end, period_units_after, allowance, "
           "overage_rate, overage_units, cost_cents, event_name, status, attempts, created_at, stripe_identifier) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)")
    start = time.perf_counter()
    for index in range(0, count, size):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows[index:index + size])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return count / elapsed


# --- over stdio and HTTP -------------------------------------------------------------------------------------------


def server_env(folder: Path, db: Path) -> dict[str, str]:
    return {**os.environ, "AIMS_BILLING_DB": str(db), "AIMS_BILLING_SANDBOX_DB": str(folder / "sandbox.db"),
            "AIMS_BILLING_FLUSH_INTERVAL_SECONDS": "0", "AIMS_BILLING_INGEST_KEYS": KEY,
            "AIMS_BILLING_LOG_LEVEL": "ERROR"}


async def stdio_rate(folder: Path, count: int, size: int = 100, in_flight: int = 4) -> float:
    db = folder / "stdio.db"
    known_customers(db)
    params = StdioServerParameters(command=sys.executable, args=["-m", "aims_billing_mcp", "serve", "--no-webhooks"],
                                   env=server_env(folder, db))
    queue = batches(events("io", count), size)
    accepted = 0
    async with Client(params) as client:
        warm = await client.call_tool("create_meter_events", {"events": events("warm", 2)})
        if warm.is_error:
            raise SystemExit(f"create_meter_events failed: {warm.content}")

        async def worker() -> None:
            nonlocal accepted
            while queue:
                result = await client.call_tool("create_meter_events", {"events": queue.pop()})
                if result.is_error or result.structured_content is None:
                    raise SystemExit(f"create_meter_events failed: {result.content}")
                accepted += result.structured_content["totals"]["accepted"]

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(in_flight):
                tg.start_soon(worker)
        elapsed = time.perf_counter() - start
    if accepted != count:
        raise SystemExit(f"stdio: {accepted} of {count} accepted")
    check_counted(db, accepted + 2)
    return count / elapsed


async def stdio_rate_plain(folder: Path, count: int, size: int = 100, in_flight: int = 4) -> float:
    """(a) with a plain JSON-RPC client: the MCP handshake, then `in_flight` tools/call requests kept in flight on
    the server's stdin, each answer read from its stdout and its accepted count added up."""
    db = folder / "stdio_plain.db"
    known_customers(db)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aims_billing_mcp", "serve", "--no-webhooks", stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, env=server_env(folder, db), limit=2**24)
    assert process.stdin is not None and process.stdout is not None
    stdin, stdout = process.stdin, process.stdout

    def frame(request_id: int, method: str, params: dict[str, Any]) -> bytes:
        return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}).encode() + b"\n"

    async def answer() -> dict[str, Any]:
        while True:
            message: dict[str, Any] = json.loads(await stdout.readline())
            if "id" in message:  # a notification, if any, is not an answer
                return message

    def accepted_in(message: dict[str, Any]) -> int:
        result = message.get("result") or {}
        if "error" in message or result.get("isError") or "structuredContent" not in result:
            raise SystemExit(f"create_meter_events failed: {str(message)[:500]}")
        return int(result["structuredContent"]["totals"]["accepted"])

    try:
        with anyio.fail_after(60):
            stdin.write(frame(0, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                                "clientInfo": {"name": "bench", "version": "1"}}))
            await answer()
            stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
            stdin.write(frame(1, "tools/call", {"name": "create_meter_events",
                                                "arguments": {"events": events("plain-warm", 2)}}))
            accepted_in(await answer())
        requests = [frame(n, "tools/call", {"name": "create_meter_events", "arguments": {"events": batch}})
                    for n, batch in enumerate(batches(events("plain", count), size), start=2)]
        accepted, sent = 0, 0
        start = time.perf_counter()
        for request in requests[:in_flight]:
            stdin.write(request)
            sent += 1
        await stdin.drain()
        for _ in requests:
            accepted += accepted_in(await answer())
            if sent < len(requests):
                stdin.write(requests[sent])
                sent += 1
        elapsed = time.perf_counter() - start
    finally:
        stdin.close()
        with anyio.move_on_after(30):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
    if accepted != count:
        raise SystemExit(f"stdio (plain client): {accepted} of {count} accepted")
    check_counted(db, accepted + 2)
    return count / elapsed


async def started(port: int, process: subprocess.Popen[bytes]) -> None:
    with anyio.fail_after(60):
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with {process.returncode}")
            try:
                await anyio.connect_tcp("127.0.0.1", port)
                return
            except OSError:
                await anyio.sleep(0.1)


async def post_all(url: str, bodies: list[bytes], connections: int, headers: dict[str, str]) -> tuple[float, int]:
    queue = list(bodies)
    accepted = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        await http.post(url, content=bodies[0][:0] + b"[]", headers=headers)  # connections warm, nothing written

        async def worker() -> None:
            nonlocal accepted
            while queue:
                answer = await http.post(url, content=queue.pop(), headers=headers)
                if answer.status_code != 200:
                    raise SystemExit(f"POST {url}: {answer.status_code} {answer.text[:300]}")
                totals = json.loads(answer.content).get("totals")
                accepted += totals["accepted"] if totals else 0

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(connections):
                tg.start_soon(worker)
        return time.perf_counter() - start, accepted


async def http_rates(folder: Path, count: int, size: int = 500, connections: int = 8) -> tuple[float, float]:
    db = folder / "http.db"
    known_customers(db)
    bodies = [json.dumps(batch).encode() for batch in batches(events("h", count), size)]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "aims_billing_mcp", "serve", "--http", "--port", str(port)],
                              env=server_env(folder, db), stdout=subprocess.DEVNULL)
    try:
        await started(port, server)
        elapsed, accepted = await post_all(f"http://127.0.0.1:{port}/v1/usage/events", bodies, connections, headers)
    finally:
        server.terminate()
        server.wait(30)
    if accepted != count:
        raise SystemExit(f"http: {accepted} of {count} accepted")
    check_counted(db, accepted)
    port = free_port()
    bare = subprocess.Popen([sys.executable, str(HERE / "bare_endpoint.py"), str(port)])
    try:
        await started(port, bare)
        bare_elapsed, _ = await post_all(f"http://127.0.0.1:{port}/webhooks/stripe", bodies, connections, headers)
    finally:
        bare.terminate()
        bare.wait(30)
    return count / elapsed, count / bare_elapsed


def one_run(stdio_events: int, http_events: int, service_events: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        figures = {
            "svc100": service_rate(folder, service_events, 100, 4),
            "svc500": service_rate(folder, service_events, 500, 8),
            "raw100": raw_rate(folder, service_events, 100),
            "raw500": raw_rate(folder, service_events, 500),
            "stdio": anyio.run(stdio_rate_plain, folder, stdio_events),
        }
        cpu = time.process_time()
        figures["sdk_stdio"] = anyio.run(stdio_rate, folder, stdio_events)
        figures["sdk_client_cpu_us_per_event"] = (time.process_time() - cpu) / stdio_events * 1e6
        figures["http"], figures["bare"] = anyio.run(http_rates, folder, http_events)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--stdio-events", type=int, default=20_000)
    parser.add_argument("--http-events", type=int, default=50_000)
    parser.add_argument("--service-events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    ns = parser.parse_args()
    runs = []
    for run in range(ns.runs):
        runs.append(one_run(ns.stdio_events, ns.http_events, ns.service_events))
        print_run(run, runs[-1])
    m = medians(runs)
    ratios = [{"a": r["stdio"] / r["svc100"], "b": r["http"] / r["svc500"], "c100": r["svc100"] / r["raw100"],
               "c500": r["svc500"] / r["raw500"], "bare": r["http"] / r["bare"]} for r in runs]
    q = medians(ratios)
    print(f"medians of {ns.runs} runs (events/s; ratios are per run, then their median); every acknowledged event "
          "stored and counted exactly once in every run")
    print_checks([
        ("service in process, batches of 100, 4 callers", m["svc100"], "", None),
        ("service in process, batches of 500, 8 callers", m["svc500"], "", None),
        ("raw SQLite executemany, 100 per commit", m["raw100"], "", None),
        ("raw SQLite executemany, 500 per commit", m["raw500"], "", None),
        ("(a) create_meter_events over stdio (100 x 4)", m["stdio"], ">= 10,000", m["stdio"] >= 10_000),
        ("(a) stdio / service (batches of 100)", q["a"], ">= 0.33", q["a"] >= 0.33),
        ("(a) the same through the SDK's Client", m["sdk_stdio"], "", None),
        ("(a) the SDK client's CPU per event (us)", m["sdk_client_cpu_us_per_event"], "", None),
        ("(b) POST /v1/usage/events (500 x 8 conns)", m["http"], ">= 20,000", m["http"] >= 20_000),
        ("(b) http / service (batches of 500)", q["b"], ">= 0.5", q["b"] >= 0.5),
        ("(b) bare Starlette endpoint, same bodies", m["bare"], "", None),
        ("(b) http / bare endpoint", q["bare"], "", None),
        ("(b) stretch: 100,000 events/s", m["http"], ">= 100,000", m["http"] >= 100_000),
        ("(c) service / raw, batches of 100", q["c100"], ">= 0.5", q["c100"] >= 0.5),
        ("(c) service / raw, batches of 500", q["c500"], ">= 0.5", q["c500"] >= 0.5),
    ], width=48)


if __name__ == "__main__":
    main()
