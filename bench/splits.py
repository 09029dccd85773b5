"""A sale with a creator split against the same sale without one, in the same run (issue 17: split <= 1.2x).

One sale = `create_checkout_session` (an MCP call to the in-process server: the plug lookup, the creator's status,
the destination parameters, the split row) + the buyer paying it on the embedded sandbox (a destination charge: the
transfer and the application fee) + the webhooks delivered and applied (`checkout.session.completed` marking the
split transferred). Each run alternates an unsplit sale (a plain price) and a split sale (a plug's price) N times;
the figure is each kind's total time, then the median of the runs and the ratio split / unsplit.

    python bench/splits.py [--sales 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client

from aims_billing_mcp.app import build_server
from aims_billing_mcp.sandbox import create_app
from aims_billing_mcp.settings import Settings


def _ok(result: Any) -> dict[str, Any]:
    if result.is_error:
        raise SystemExit(f"a call failed during the benchmark: {result.content}")
    data: dict[str, Any] = result.structured_content
    return data


async def run_once(sales: int) -> tuple[float, float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app()
        sandbox = app.state.sandbox
        settings = Settings(_env_file=None, aims_billing_db=Path(tmp) / "bench.db")  # type: ignore[call-arg]
        async with Client(build_server(settings, sandbox_app=app, retry_delay_scale=0)) as client:
            account = _ok(await client.call_tool("create_connected_account", {
                "display_name": "Bench maker", "country": "US"}))["account"]["id"]
            sandbox.complete_account_onboarding(account)
            product = _ok(await client.call_tool("create_product", {"name": "Bench plug"}))["product"]["id"]
            prices = [_ok(await client.call_tool("create_price", {"product": product, "unit_amount": amount,
                                                                  "currency": "usd"}))["price"]["id"]
                      for amount in (1000, 1001)]
            _ok(await client.call_tool("create_plug", {"plug_id": "bench", "price": prices[1], "account": account,
                                                       "creator_share_bp": 7000}))
            totals = [0.0, 0.0]
            creates = [0.0, 0.0]
            for i in range(sales):
                for kind, price in enumerate(prices):
                    start = time.perf_counter()
                    made = _ok(await client.call_tool("create_checkout_session", {
                        "line_items": [{"price": price}], "customer_email": f"b{i}-{kind}@example.com"}))
                    creates[kind] += time.perf_counter() - start
                    await anyio.to_thread.run_sync(sandbox.complete_checkout_session,
                                                   made["checkout_session"]["id"])
                    await anyio.to_thread.run_sync(lambda: sandbox.webhooks.drain(10))
                    totals[kind] += time.perf_counter() - start
            earned = _ok(await client.call_tool("get_creator_earnings", {"account": account}))["earnings"]
            if earned[0]["sales"] != sales:
                raise SystemExit(f"expected {sales} split sales, found {earned[0]['sales']}")
        sandbox.close()
    return totals[0], totals[1], creates[0], creates[1]


async def main(sales: int, runs: int) -> None:
    plain, split, plain_create, split_create = [], [], [], []
    for run in range(runs):
        a, b, c, d = await run_once(sales)
        plain.append(a)
        split.append(b)
        plain_create.append(c)
        split_create.append(d)
        print(f"run {run + 1}: {sales} sales, unsplit {a * 1000:,.1f} ms (create {c * 1000:,.1f}), split "
              f"{b * 1000:,.1f} ms (create {d * 1000:,.1f}); ratio {b / a:.3f} (create {d / c:.3f})")
    for label, x, y in (("whole sale (create, pay, webhooks)", plain, split),
                        ("create_checkout_session alone", plain_create, split_create)):
        ratio = statistics.median(y) / statistics.median(x)
        print(f"median of {runs}, {label}: unsplit {statistics.median(x) / sales * 1000:.2f} ms/sale, split "
              f"{statistics.median(y) / sales * 1000:.2f} ms/sale, ratio {ratio:.3f}  (target <= 1.2: "
              f"{'met' if ratio <= 1.2 else 'MISSED'})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sales", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    anyio.run(main, args.sales, args.runs)
