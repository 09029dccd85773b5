"""create_meter_event over stdio, as an agent sends it, with 32 requests in flight: calls/s end to end (JSON-RPC over
a pipe, validation, the durable group-committed write, the answer after COMMIT), against the floor the SDK itself
sets in the same run: the bare echo server (bench/echo_server.py) at the same concurrency. Median of 3 runs, raw
values; target >= 1,000 calls/s and >= 0.67x the echo server.

    python bench/meter_events_stdio.py [--calls 3000] [--in-flight 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters


async def one_run(run: int, calls: int, in_flight: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        params = StdioServerParameters(
            command=sys.executable, args=["-m", "aims_billing_mcp", "serve", "--no-webhooks"],
            env={"AIMS_BILLING_DB": str(Path(tmp) / "bench.db"), "AIMS_BILLING_FLUSH_INTERVAL_SECONDS": "0"},
        )
        async with Client(params) as client:
            made = await client.call_tool("create_customer", {"email": f"bench{run}@example.com"})
            customer = made.structured_content["customer"]["id"]  # type: ignore[index]
            warm = await client.call_tool("create_meter_event", {"customer": customer, "units": 1,
                                                                 "operation": "chat", "identifier": f"warm-{run}"})
            if warm.is_error:
                raise SystemExit(f"create_meter_event failed: {warm.content}")
            queue = list(range(calls))
            failures = 0

            async def worker() -> None:
                nonlocal failures
                while queue:
                    index = queue.pop()
                    operation = ("chat", "code", "image")[index % 3]
                    result = await client.call_tool("create_meter_event", {
                        "customer": customer, "units": 100 + index % 7, "operation": operation,
                        "identifier": f"r{run}-e{index}"})
                    failures += bool(result.is_error)

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(in_flight):
                    tg.start_soon(worker)
            elapsed = time.perf_counter() - start
            if failures:
                raise SystemExit(f"{failures} calls failed")
            summary = await client.call_tool("get_usage_summary", {"customer": customer})
            counted = summary.structured_content["events"]["pending"]  # type: ignore[index]
            if counted != calls + 1:
                raise SystemExit(f"expected {calls + 1} durable events, the summary counts {counted}")
    return calls / elapsed


async def echo_run(calls: int, in_flight: int) -> float:
    """The floor: the bare SDK server's echo tool over stdio, the same calls in flight."""
    params = StdioServerParameters(command=sys.executable, args=[str(Path(__file__).with_name("echo_server.py"))])
    async with Client(params) as client:
        await client.call_tool("echo", {"text": "warm"})
        queue = list(range(calls))

        async def worker() -> None:
            while queue:
                await client.call_tool("echo", {"text": f"e{queue.pop()}"})

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(in_flight):
                tg.start_soon(worker)
        return calls / (time.perf_counter() - start)


async def main(calls: int, in_flight: int, runs: int) -> None:
    rates, floors = [], []
    for run in range(runs):  # interleaved, so both see the same machine
        rates.append(await one_run(run, calls, in_flight))
        floors.append(await echo_run(calls, in_flight))
    median, floor = statistics.median(rates), statistics.median(floors)
    print(f"create_meter_event over stdio, {calls} calls, {in_flight} in flight, {runs} runs")
    print(f"  calls/s median {median:,.0f}  raw {[round(r) for r in rates]}  (target >= 1,000: "
          f"{'met' if median >= 1000 else 'MISSED'}); every acknowledged event counted")
    print(f"  bare echo server, same concurrency: median {floor:,.0f}  raw {[round(r) for r in floors]}")
    print(f"  ratio {median / floor:.2f}x of echo  (target >= 0.67x: {'met' if median / floor >= 0.67 else 'MISSED'})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    ns = parser.parse_args()
    anyio.run(main, ns.calls, ns.in_flight, ns.runs)
