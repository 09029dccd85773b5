"""Tool-call latency over stdio, as an agent sees it, against the bare SDK floor measured in the same run.

For each of 3 runs: start the server as a subprocess (the sandbox in-process, a fresh database), time the start-up
to the first tools/list answer, then time N sequential calls of retrieve_balance and of create_customer (distinct
emails, so each really creates). The same for a bare MCPServer with one echo tool. Prints medians of the 3 runs'
p50/p99 and the ratios against the echo server, with the targets from the issue.

    python bench/tool_latency.py [--calls 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from measure import percentile

from aims_billing_mcp.store import Store

HERE = Path(__file__).parent


async def measure(params: StdioServerParameters, calls: dict[str, Callable[[int], tuple[str, dict[str, Any]]]],
                  n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    start = time.perf_counter()
    async with Client(params) as client:
        await client.list_tools()
        out["startup_ms"] = (time.perf_counter() - start) * 1000
        for label, make in calls.items():
            samples = []
            for i in range(n):
                tool, args = make(i)
                t0 = time.perf_counter()
                result = await client.call_tool(tool, args)
                samples.append((time.perf_counter() - t0) * 1000)
                if result.is_error:
                    raise SystemExit(f"{tool} failed during the benchmark: {result.content}")
            out[f"{label}_p50"] = percentile(samples, 0.50)
            out[f"{label}_p99"] = percentile(samples, 0.99)
    return out


async def main(n: int, runs: int, fresh_db: bool) -> None:
    echo_params = StdioServerParameters(command=sys.executable, args=[str(HERE / "echo_server.py")])
    echo_calls: dict[str, Callable[[int], tuple[str, dict[str, Any]]]] = {"echo": lambda i: ("echo", {"text": f"x{i}"})}
    billing_calls: dict[str, Callable[[int], tuple[str, dict[str, Any]]]] = {
        "retrieve_balance": lambda i: ("retrieve_balance", {}),
        "create_customer": lambda i: ("create_customer", {"email": f"bench{i}@example.com"}),
    }
    echo_runs, billing_runs = [], []
    for run in range(runs):
        echo_runs.append(await measure(echo_params, echo_calls, n))
        with tempfile.TemporaryDirectory() as tmp:
            if not fresh_db:  # as Claude Desktop restarts it: the database exists (migrating once is not start-up)
                Store(Path(tmp) / "bench.db").close()
            params = StdioServerParameters(
                command=sys.executable, args=["-m", "aims_billing_mcp", "serve"],
                env={"AIMS_BILLING_DB": str(Path(tmp) / "bench.db"), "AIMS_BILLING_REPLAY_WINDOW_SECONDS": "600"},
            )
            billing_runs.append(await measure(params, billing_calls, n))
        print(f"run {run + 1}/{runs}: echo p50 {echo_runs[-1]['echo_p50']:.2f} ms, "
              f"retrieve_balance p50 {billing_runs[-1]['retrieve_balance_p50']:.2f} ms", file=sys.stderr)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    echo = {k: med(echo_runs, k) for k in echo_runs[0]}
    bill = {k: med(billing_runs, k) for k in billing_runs[0]}
    print(f"tool latency over stdio, {n} sequential calls each, median of {runs} runs (ms); "
          f"{'a new database (first start: migrations included)' if fresh_db else 'an existing database'}")
    print(f"{'server / tool':32} {'p50':>8} {'p99':>8} {'start-up':>9}")
    print(f"{'bare MCPServer / echo':32} {echo['echo_p50']:8.2f} {echo['echo_p99']:8.2f} {echo['startup_ms']:9.0f}")
    for tool in ("retrieve_balance", "create_customer"):
        startup = f"{bill['startup_ms']:9.0f}" if tool == "retrieve_balance" else f"{'':9}"
        print(f"{'aims-billing-mcp / ' + tool:32} {bill[tool + '_p50']:8.2f} {bill[tool + '_p99']:8.2f} {startup}")
    checks = [
        ("retrieve_balance p50 / echo p50", bill["retrieve_balance_p50"] / echo["echo_p50"], 1.5),
        ("retrieve_balance p99 / echo p99", bill["retrieve_balance_p99"] / echo["echo_p99"], 3.0),
        ("start-up / bare start-up", bill["startup_ms"] / echo["startup_ms"], 1.3),
        ("create_customer p50 / echo p50", bill["create_customer_p50"] / echo["echo_p50"], None),
        ("create_customer p99 / echo p99", bill["create_customer_p99"] / echo["echo_p99"], None),
    ]
    print("ratios")
    for label, ratio, target in checks:
        verdict = "" if target is None else (f"target <= {target}x: " + ("met" if ratio <= target else "MISSED"))
        print(f"  {label:34} {ratio:5.2f}x  {verdict}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fresh-db", action="store_true", help="start on a new database (migrations included)")
    ns = parser.parse_args()
    anyio.run(main, ns.calls, ns.runs, ns.fresh_db)
