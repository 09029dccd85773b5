"""`aims-billing-mcp demo`: an agent session end to end on the embedded sandbox, printed as a table.

It goes through the same MCP client/server path an agent uses (in memory), with a fresh database in a temporary
directory, so it needs no key and no network and can be run any number of times. The verdict is computed from what
came back: each step says what it expects, and the demo fails (exit 1) if any expectation is not met.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp import Client
from pydantic import SecretStr

from .app import build_server
from .sandbox import create_app
from .services.stripe_setup import setup_stripe
from .services.x402 import usd_of
from .settings import Settings


@dataclass
class Row:
    tool: str
    arguments: str
    result: str
    ms: float
    ok: bool


def _short(arguments: dict[str, Any]) -> str:
    parts = []
    for key, value in arguments.items():
        text = json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value
        parts.append(f"{key}={text[:38]}")
    return " ".join(parts)[:70]


def _summary(content: dict[str, Any] | None) -> str:
    if not content:
        return ""
    if "accepts" in content:
        first = content["accepts"][0]
        usdc = usd_of(int(first["amount"]))
        return f"402 payment required: {usdc} USDC on {first['network']} to {first['payTo'][:10]}…"
    if "error" in content:
        return f"refused: {content['error']['code']} ({content['error'].get('param') or ''})"
    if "session" in content and isinstance(content["session"], dict):
        content = content["session"]
    if str(content.get("id", "")).startswith("ps_"):
        delivered = content.get("fulfilment") or {}
        extra = f", +{delivered['luc_credited']:,} LUC" if delivered.get("luc_credited") else ""
        if delivered.get("kind") == "subscription":
            extra = f", {delivered['tier']} {delivered['status']} {delivered.get('subscription') or ''}".rstrip()
        return f"{content['id']} {content['status']} {content['amount_display']}{extra}"
    if "receipt_id" in content:
        return (f"paid {content['amount_usd']} USD by {content['payer'][:10]}…: +{content['luc_credited']:,} LUC, "
                f"balance {content['balance_after']:,}")
    if "entitlements" in content:
        e = content["entitlements"]
        return (f"{content['tier']} {content['status']}: {e['tokens_per_month']:,} tokens/mo, {e['agents']} agents, "
                f"{e['concurrent']} concurrent")
    if isinstance(content.get("account"), dict):
        a = content["account"]
        return f"{a['id']} {a['status']}, can receive transfers: {str(a['can_receive_transfers']).lower()}"
    if isinstance(content.get("payout_schedule"), dict):
        schedule = content["payout_schedule"]
        return (f"{content['id']} {content['status']}, payouts {schedule['interval']} ({schedule['status']}), "
                f"balance {content.get('balance')}")
    if "url" in content and "expires_at" in content:
        return f"onboarding link for {content['account']}, expires {content['expires_at']}"
    if isinstance(content.get("plug"), dict):
        p = content["plug"]
        return f"plug {p['id']}: {p['unit_amount']} {p['currency']}, {p['creator_amount_per_unit']} to the creator"
    if "fee_refunded" in content:
        return (f"{content['refund']}: {content['amount']} back; creator gave {content['reversed']}, platform "
                f"{content['fee_refunded']}")
    if content.get("earnings"):
        return "; ".join(f"{e['account']}: gross {e['gross']}, fees {e['platform_fees']}, transferred "
                         f"{e['transferred']}, reversed {e['reversed']}" for e in content["earnings"])
    flags = [flag for flag in ("replayed", "dry_run") if content.get(flag)]
    for value in content.values():
        if isinstance(value, dict) and "id" in value:
            shown = value.get("url") or value.get("unit_amount_display") or value.get("email") or ""
            ident = value["id"] if len(value["id"]) <= 30 else value["id"][:27] + "…"
            return " ".join([*flags, ident, str(shown)]).strip()
    if content.get("dry_run"):
        return f"dry run: {content['request']['method']} {content['request']['url'].split('/', 3)[-1]}"
    if "invoices" in content:
        return f"{len(content['invoices'])} invoice(s), has_more={content['has_more']}"
    if "tiers" in content:
        return ", ".join(f"{t['id']} {t['monthly_price_display']}" for t in content["tiers"])
    if "unit" in content and "aggregation" in content and content.get("meter") != "luc_tokens":  # another meter
        return (f"{content['meter']} ({content['aggregation']}): {content['weighted_units']:,} {content['unit']}s of "
                f"{content['allowance']:,} included, overage {content['overage_units']:,} = "
                f"{content['overage_cost_cents']} cents")
    if "totals" in content and "results" in content:
        t = content["totals"]
        codes = ", ".join(f"#{r['index']} {r['error']['field']}" for r in content["results"] if r.get("error"))
        return f"{t['accepted']} accepted, {t['replayed']} replayed, {t['refused']} refused" + (
            f" ({codes})" if codes else "")
    if "weighted_units" in content and "allowance" in content:
        used = content.get("period_usage", content["weighted_units"])
        if "identifier" not in content and "by_operation" not in content:  # a quote
            return (f"{content['weighted_units']:,} weighted would cost {content['cost_cents']} cents "
                    f"({content['overage_units']:,} over the allowance)")
        replayed = " replayed" if content.get("replayed") else ""
        return (f"{content['weighted_units']:,} weighted; {used:,} of {content['allowance']:,} used, overage "
                f"{content.get('period_overage_units', content.get('overage_units', 0)):,}{replayed}")
    if "holds" in content and "available" in content:
        return f"{content['agent_id']}: balance {content['balance']:,} LUC, available {content['available']:,}"
    if "hold_id" in content or "txn_id" in content or "wallet_id" in content:
        shown = {k: v for k, v in content.items() if k in ("agent_id", "amount", "balance_after", "available_after",
                                                            "captured", "released", "to_balance_after", "daily_cap")}
        return " ".join(f"{k}={v}" for k, v in shown.items())
    if "cancellation" in content:
        return f"{content['cancellation']['subscription']} {content['cancellation']['status']}"
    if "available" in content:
        return "available " + (", ".join(a["display"] for a in content["available"]) or "0")
    return json.dumps(content)[:60]


async def run_demo(print_line: Callable[[str], None] = print) -> bool:
    with tempfile.TemporaryDirectory(prefix="aims-billing-demo-") as tmp:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            stripe_secret_key=None,
            stripe_api_base=None,
            aims_billing_db=Path(tmp) / "demo.db",
            aims_billing_tools=[],
            aims_billing_read_only=False,
            aims_billing_acp_api_keys=[SecretStr(ACP_DEMO_KEY)],
            aims_billing_ingest_keys=[SecretStr(INGEST_DEMO_KEY)],
            # the demo plays both sides on its own sandbox: the operator's secrets and endpoints are not its own
            stripe_webhook_secret=None,
            aims_billing_acp_signing_secret=None,
            aims_billing_acp_order_webhook_url=None,
            aims_billing_acp_order_webhook_secret=None,
        )
        sandbox_app = create_app(db_path=":memory:")
        sandbox = sandbox_app.state.sandbox
        server = build_server(settings, sandbox_app=sandbox_app)
        rows: list[Row] = []
        values: dict[str, Any] = {}

        async with Client(server) as client:

            async def call(tool: str, arguments: dict[str, Any], expect: Callable[[dict[str, Any]], bool],
                           meta: dict[str, Any] | None = None) -> Any:
                start = time.perf_counter()
                result = await client.call_tool(tool, arguments, meta=meta)  # type: ignore[arg-type]
                ms = (time.perf_counter() - start) * 1000
                content = result.structured_content or {}
                shown = _short(arguments) + (" +_meta[x402/payment]" if meta else "")
                rows.append(Row(tool, shown[:70], _summary(content), ms, expect(content)))
                return content

            def sandbox_step(label: str, action: Callable[[], dict[str, Any]],
                             expect: Callable[[dict[str, Any]], bool] = lambda o: o.get("status") == "complete",
                             ) -> dict[str, Any]:
                """Something Stripe or the human does (pay, fail a renewal), then its webhooks land."""
                start = time.perf_counter()
                obj = action()
                delivered = sandbox.webhooks.drain(timeout=10)
                shown = f"{obj.get('type') or obj.get('status')} {obj['id']}"
                rows.append(Row("(sandbox)", label, shown, (time.perf_counter() - start) * 1000,
                                expect(obj) and delivered))
                return obj

            await call("retrieve_balance", {}, lambda c: c.get("mode") == "sandbox")
            product = await call("create_product", {"name": "LUC credits, 10k pack"}, lambda c: "product" in c)
            values["product"] = product["product"]["id"]
            price = await call(
                "create_price", {"product": values["product"], "currency": "usd", "unit_amount": 1999},
                lambda c: c.get("price", {}).get("unit_amount") == 1999,
            )
            values["price"] = price["price"]["id"]
            first = await call("create_customer", {"email": "ada@example.com", "name": "Ada", "idempotency_key":
                                                   "demo-ada"}, lambda c: "customer" in c)
            values["customer"] = first["customer"]["id"]
            await call("create_customer", {"email": "ada@example.com", "name": "Ada", "idempotency_key": "demo-ada"},
                       lambda c: c.get("replayed") is True and c["customer"]["id"] == values["customer"])
            await call("create_payment_link", {"line_items": [{"price": values["price"], "quantity": 2}]},
                       lambda c: c.get("payment_link", {}).get("amount_total") == 3998)
            session = await call(
                "create_checkout_session",
                {"line_items": [{"price": values["price"]}], "customer": values["customer"],
                 "success_url": "https://example.com/done?session={CHECKOUT_SESSION_ID}"},
                lambda c: c.get("checkout_session", {}).get("status") == "open",
            )
            sandbox_step("customer pays checkout", lambda: sandbox.complete_checkout_session(
                session["checkout_session"]["id"]))
            monthly = await call(
                "create_price", {"product": values["product"], "currency": "usd", "unit_amount": 1799,
                                 "recurring": {"interval": "month"}},
                lambda c: c.get("price", {}).get("type") == "recurring",
            )
            subscription = await call(
                "create_checkout_session",
                {"mode": "subscription", "line_items": [{"price": monthly["price"]["id"]}],
                 "customer": values["customer"], "success_url": "https://example.com/welcome"},
                lambda c: c.get("checkout_session", {}).get("mode") == "subscription",
            )
            sandbox_step("customer subscribes", lambda: sandbox.complete_checkout_session(
                subscription["checkout_session"]["id"]))
            await call("list_invoices", {"customer": values["customer"]},
                       lambda c: len(c.get("invoices", [])) == 1 and c["invoices"][0]["status"] == "paid")
            await call("create_billing_portal_session", {"customer": values["customer"],
                                                         "return_url": "https://example.com/account"},
                       lambda c: c.get("portal_session", {}).get("url", "").startswith("http"))
            await call("retrieve_balance", {},
                       lambda c: any(a["currency"] == "usd" and a["amount"] == 1999 + 1799 for a in c["available"]))
            # The 3-6-9 story: tiers set up, a human subscribes to 6mo, a renewal fails, the agent cancels.
            start = time.perf_counter()
            setup = await setup_stripe(server.state.gateway, server.state.pricing)  # type: ignore[union-attr]
            rows.append(Row("(operator)", "setup-stripe", f"meter {setup.meter[:14]}…, " + " ".join(
                f"{r.tier}={(r.price or r.overage_price)[:12]}…" for r in setup.tiers),
                (time.perf_counter() - start) * 1000, len(setup.paid) == 3))
            await call("list_tiers", {}, lambda c: [t["id"] for t in c["tiers"]] == ["p2p", "3mo", "6mo", "9mo"])
            tier_session = await call(
                "create_subscription_checkout", {"tier": "6mo", "customer": values["customer"]},
                lambda c: c.get("checkout_session", {}).get("tier") == "6mo")
            paid = sandbox_step("human pays the 6mo checkout", lambda: sandbox.complete_checkout_session(
                tier_session["checkout_session"]["id"]))
            await call("get_billing_status", {"customer": values["customer"]},
                       lambda c: (c.get("tier"), c.get("status"), c.get("entitlements")) == (
                           "6mo", "active", {"tokens_per_month": 250_000, "agents": 15, "concurrent": 5}))
            # Agent wallets for the 6mo customer (15 agents allowed): a top-up, a hold settled, a transfer.
            team = {"customer": values["customer"]}
            await call("create_agent_wallet", {"agent_id": "planner", **team, "idempotency_key": "w-planner"},
                       lambda c: c.get("agent_id") == "planner")
            await call("create_agent_wallet", {"agent_id": "coder", **team, "idempotency_key": "w-coder",
                                               "daily_cap": 20_000}, lambda c: c.get("daily_cap") == 20_000)
            await call("credit_agent_wallet", {"agent_id": "planner", "usd_cents": 500, "idempotency_key": "topup-1",
                                               "reason": "top-up $5"}, lambda c: c.get("balance_after") == 5000)
            hold = await call("hold_luc", {"agent_id": "planner", "amount": 2000, "idempotency_key": "task-1",
                                           "reason": "research task"}, lambda c: c.get("available_after") == 3000)
            await call("capture_hold", {"hold_id": hold.get("hold_id", "hold_x"), "amount": 1200,
                                        "idempotency_key": "task-1-done", "reason": "actual cost"},
                       lambda c: (c.get("captured"), c.get("released")) == (1200, 800))
            await call("transfer_luc", {"from_agent": "planner", "to_agent": "coder", "amount": 1000,
                                        "idempotency_key": "delegate-1", "reason": "hand off coding"},
                       lambda c: c.get("to_balance_after") == 1000)
            await call("get_agent_wallet", {"agent_id": "planner"},
                       lambda c: (c.get("balance"), c.get("available")) == (2800, 2800))

            # Agent commerce: the planner buys a 10k LUC pack, paid with a Shared Payment Token its user granted.
            pack = await call("create_payment_session", {"item": "luc_10k", "agent_id": "planner",
                                                         "idempotency_key": "pack-1"},
                              lambda c: c.get("session", {}).get("status") == "requires_payment_method")
            await call("confirm_payment_session", {"session_id": pack["session"]["id"],
                                                   "shared_payment_token": "spt_test_demo_grant",
                                                   "idempotency_key": "pack-1-pay"},
                       lambda c: c.get("fulfilled") is True and c.get("fulfilment", {}).get("wallet_balance") == 12_800)

            # ACP: a buyer agent checks out a 50k pack from us as the seller, over the Agentic Commerce Protocol.
            await acp_checkout(rows, server)

            # A tier bought by an agent for a new customer: the 3-month commitment prepaid once with an SPT, the
            # subscription started in Stripe from that credit (send_invoice: nothing is charged later).
            bob = await call("create_customer", {"email": "bob@example.com", "idempotency_key": "demo-bob"},
                             lambda c: "customer" in c)
            tier_buy = await call("create_payment_session", {"item": "tier_3mo", "customer": bob["customer"]["id"],
                                                             "idempotency_key": "tier-1"},
                                  lambda c: c.get("session", {}).get("amount") == 5997)
            await call("confirm_payment_session", {"session_id": tier_buy["session"]["id"],
                                                   "shared_payment_token": "spt_test_demo_tier",
                                                   "idempotency_key": "tier-1-pay"},
                       lambda c: c.get("fulfilment", {}).get("status") == "started")
            await call("get_billing_status", {"customer": bob["customer"]["id"]},
                       lambda c: (c.get("tier"), c.get("status")) == ("3mo", "active"))

            # x402: another agent pays for LUC credits with USDC (a generated key signs, as any x402 client would).
            await pay_with_x402(call, values["customer"])

            # Usage: a burst across operation types against the 6mo allowance, the summary, a flush to Stripe.
            burst = [("chat", 40_000), ("code", 30_000), ("research", 25_000), ("image", 20_000),
                     ("agent_swarm", 15_000)]
            def recorded(units: int) -> Callable[[dict[str, Any]], bool]:
                return lambda c: c.get("replayed") is False and c.get("weighted_units", 0) >= units

            for index, (operation, units) in enumerate(burst):
                await call("create_meter_event", {"customer": values["customer"], "units": units,
                                                  "operation": operation, "identifier": f"demo-{index}"},
                           recorded(units))
            await call("create_meter_event", {"customer": values["customer"], "units": 40_000, "operation": "chat",
                                              "identifier": "demo-0"}, lambda c: c.get("replayed") is True)
            await call("get_usage_summary", {"customer": values["customer"]},
                                 lambda c: (c.get("weighted_units"), c.get("overage_units")) == (230_000, 0))
            # Meters beyond LUC tokens: a mixed batch through the tool and through HTTP, then each meter's summary.
            mixed = await meters_batch(call, rows, server, values["customer"])
            start = time.perf_counter()
            flushed = await server.state.flusher.flush_once()  # type: ignore[union-attr]
            rows.append(Row("(flusher)", "deliver usage to Stripe meters",
                            f"{flushed.sent} events sent via {flushed.transport}, {flushed.pending} pending",
                            (time.perf_counter() - start) * 1000,
                            flushed.sent == len(burst) + mixed and not flushed.pending))
            await call("quote_usage", {"units": 20_000, "operation": "code", "customer": values["customer"]},
                       lambda c: (c.get("weighted_units"), c.get("overage_units"), c.get("cost_cents")) == (
                           30_000, 10_000, 1200))  # 20,000 still included, 10,000 over at 120 cents per 1,000

            sandbox_step("renewal payment fails", lambda: sandbox.trigger(
                "invoice.payment_failed", subscription=paid["subscription"]),
                lambda o: o.get("type") == "invoice.payment_failed")
            await call("get_billing_status", {"customer": values["customer"]},
                       lambda c: (c.get("tier"), c.get("status")) == ("6mo", "past_due"))
            await call("cancel_subscription", {"customer": values["customer"], "immediately": True},
                       lambda c: c.get("cancellation", {}).get("status") == "canceled")
            sandbox.webhooks.drain(timeout=10)
            await call("get_billing_status", {"customer": values["customer"]},
                       lambda c: (c.get("tier"), c.get("status")) == ("p2p", "canceled"))

            account = await marketplace(call, sandbox_step, sandbox, values)
            await marketplace_acp(acp_poster(rows, server), call, sandbox_step, sandbox, values, account)

            await call("create_price", {"product": values["product"], "currency": "usd", "unit_amount": 99_999_999},
                       lambda c: c.get("error", {}).get("code") == "amount_above_ceiling")
            before = sandbox.count("customer")
            await call("create_customer", {"email": "dry@example.com", "dry_run": True},
                       lambda c: c.get("dry_run") is True and sandbox.count("customer") == before)

        _print_table(rows, print_line)
        failed = [row for row in rows if not row.ok]
        total_ms = sum(row.ms for row in rows)
        if failed:
            print_line(f"FAIL: {len(failed)} of {len(rows)} steps did not do what they should: "
                       + ", ".join(f"#{rows.index(r) + 1} {r.tool}" for r in failed))
            return False
        print_line(
            f"PASS: {len(rows)} steps in {total_ms:.0f} ms on the embedded sandbox ({_database(settings)}); the "
            "repeated create_customer "
            "was replayed (no second customer); signed webhooks took the customer to 6mo, past_due, then P2P; a LUC "
            "pack and a prepaid 3mo tier were paid with Shared Payment Tokens and an ACP checkout completed with an "
            "order; an x402 payment "
            "credited once and its replay was refused; a creator's plug sold through a checkout paid them 70% and a "
            "partial refund reversed both shares in proportion; an ACP order of two creators' plugs paid each their "
            "share; the over-ceiling price was refused; the dry run sent nothing."
        )
        return True


ACP_DEMO_KEY = "demo-platform-key"


async def marketplace(call: Any, sandbox_step: Any, sandbox: Any, values: dict[str, Any]) -> str:
    """A creator onboarded, their plug sold through a checkout (a destination charge: 70% to them), a partial
    refund reversing both sides in proportion, the earnings report. Returns the creator's account."""
    made = await call("create_connected_account", {"display_name": "Plug Maker", "country": "US",
                                                   "email": "maker@example.com", "idempotency_key": "demo-maker"},
                      lambda c: c.get("account", {}).get("status") == "onboarding")
    account = str(made["account"]["id"])
    await call("create_account_link", {"account": account, "refresh_url": "https://aims.example/refresh",
                                       "return_url": "https://aims.example/welcome"}, lambda c: bool(c.get("url")))
    onboard(sandbox_step, sandbox, account, "creator completes onboarding")
    price = await call("create_price", {"product": values["product"], "currency": "usd", "unit_amount": 2000},
                       lambda c: "price" in c)
    await call("create_plug", {"plug_id": "seo-audit", "price": price["price"]["id"], "account": account,
                               "creator_share_bp": 7000},
               lambda c: c.get("plug", {}).get("creator_amount_per_unit") == 1400)
    session = await call("create_checkout_session", {"line_items": [{"price": price["price"]["id"]}],
                                                     "customer_email": "buyer@example.com"},
                         lambda c: c.get("checkout_session", {}).get("status") == "open")
    sale = session["checkout_session"]["id"]
    sandbox_step("buyer pays the plug", lambda: sandbox.complete_checkout_session(sale))
    await call("refund_split_sale", {"sale": sale, "amount": 500, "idempotency_key": "demo-refund"},
               lambda c: (c.get("reversed"), c.get("fee_refunded")) == (350, 150))
    await call("get_creator_earnings", {"account": account},
               lambda c: [(e["gross"], e["platform_fees"], e["transferred"], e["reversed"])
                          for e in c.get("earnings", [])] == [(2000, 600, 1400, 350)])
    return account


def onboard(sandbox_step: Any, sandbox: Any, account: str, label: str) -> None:
    """The creator finishes Stripe's onboarding (the sandbox's control), and can then receive transfers."""
    def finish() -> dict[str, Any]:
        done = sandbox.complete_account_onboarding(account)
        return {"id": done["id"], "status": f"transfers {done['capabilities']['transfers']}"}

    sandbox_step(label, finish, lambda o: o["status"] == "transfers active")


async def marketplace_acp(post: Any, call: Any, sandbox_step: Any, sandbox: Any, values: dict[str, Any],
                          first: str) -> None:
    """The creator's payout schedule; a second creator's plug; an ACP order of both creators' plugs (one charge,
    one transfer per creator of exactly their share); the earnings of both."""
    await call("get_connected_account", {"account": first},
               lambda c: c.get("can_receive_transfers") is True
               and (c.get("payout_schedule") or {}).get("interval") == "daily")
    made = await call("create_connected_account", {"display_name": "Data Maker", "country": "US",
                                                   "idempotency_key": "demo-maker-2"},
                      lambda c: c.get("account", {}).get("status") == "onboarding")
    second = str(made["account"]["id"])

    onboard(sandbox_step, sandbox, second, "second creator completes onboarding")
    price = await call("create_price", {"product": values["product"], "currency": "usd", "unit_amount": 1500},
                       lambda c: "price" in c)
    await call("create_plug", {"plug_id": "data-clean", "price": price["price"]["id"], "account": second,
                               "creator_share_bp": 5000},
               lambda c: c.get("plug", {}).get("creator_amount_per_unit") == 750)
    created = await post("/acp/checkout_sessions", {"currency": "usd", "capabilities": {}, "line_items": [
        {"id": "plug:seo-audit"}, {"id": "plug:data-clean"}]}, "acp-plugs",
        lambda a: a.get("status") == "ready_for_payment")
    await post(f"/acp/checkout_sessions/{created.get('id')}/complete", {"payment_data": {
        "handler_id": "stripe_spt", "instrument": {"type": "card", "credential": {
            "type": "spt", "token": "spt_test_demo_plugs"}}}}, "acp-plugs-pay",
        lambda a: a.get("status") == "completed")
    await call("get_creator_earnings", {},
               lambda c: sorted((e["account"], e["transferred"]) for e in c.get("earnings", []))
               == sorted([(first, 2800), (second, 750)]))


INGEST_DEMO_KEY = "demo-ingest-key"


async def meters_batch(call: Any, rows: list[Row], server: Any, customer: str) -> int:
    """Usage on the other meters: a mixed batch through create_meter_events, another through POST /v1/usage/events
    (a CloudEvents batch, in process), then each meter's summary. Answers how many events were recorded."""
    from .routes import build_companion_app
    from .sandbox.asgi_client import call_asgi

    await call("create_meter_events", {"events": [
        {"customer": customer, "units": 30_000, "meter": "compute_seconds", "identifier": "demo-cpu-1"},
        {"customer": customer, "units": 1, "meter": "api_calls", "identifier": "demo-call-1"},
        {"customer": customer, "units": 1, "meter": "api_calls", "identifier": "demo-call-2"},
        {"customer": customer, "units": 12_000, "meter": "storage_gb_hours", "identifier": "demo-gbh-1"},
        {"customer": customer, "units": 5, "meter": "gpu_hours", "identifier": "demo-gpu-1"}]},
        lambda c: [r.get("status") for r in c.get("results", [])] == ["accepted"] * 4 + ["refused"])
    app = build_companion_app(lambda: server.state)
    body = [{"specversion": "1.0", "source": "/demo/worker", "id": f"demo-ce-{n}", "subject": customer, "type": kind,
             "data": {"units": units}} for n, (kind, units) in enumerate(
                 [("compute_seconds", 80_000), ("api_calls", 1), ("storage_gb_hours", 40_000)])]
    start = time.perf_counter()
    raw, status, _ = await call_asgi(app, "POST", "http://demo/v1/usage/events", {
        "Authorization": f"Bearer {INGEST_DEMO_KEY}", "Content-Type": "application/cloudevents-batch+json"},
        json.dumps(body))
    totals = json.loads(raw).get("totals", {})
    rows.append(Row("(HTTP ingest)", "POST /v1/usage/events (3 CloudEvents)",
                    f"{status}: {totals.get('accepted')} accepted, {totals.get('refused')} refused",
                    (time.perf_counter() - start) * 1000, status == 200 and totals.get("accepted") == 3))
    expected = {"compute_seconds": (110_000, 20_000, 120), "api_calls": (3, 0, 0),  # 6mo: 90,000 s included, 6/1,000
                "storage_gb_hours": (40_000, 3_500, 35)}  # the last value; 36,500 included, 10 per 1,000
    for meter, (used, over, cost) in expected.items():
        await call("get_usage_summary", {"customer": customer, "meter": meter},
                   lambda c, want=(used, over, cost): (c.get("weighted_units"), c.get("overage_units"),
                                                       c.get("overage_cost_cents")) == want)
    return 7


async def acp_checkout(rows: list[Row], server: Any) -> None:
    """ACP REST, in process: create a checkout session for the planner's wallet, complete it with a Shared Payment
    Token, and read the order."""
    post = acp_poster(rows, server)
    created = await post("/acp/checkout_sessions", {"currency": "usd", "line_items": [{"id": "luc_50k"}],
                                                    "capabilities": {}, "metadata": {"agent_id": "planner"}},
                         "acp-1", lambda a: a.get("status") == "ready_for_payment")
    await post(f"/acp/checkout_sessions/{created.get('id')}/complete", {"payment_data": {
        "handler_id": "stripe_spt", "instrument": {"type": "card", "credential": {
            "type": "spt", "token": "spt_test_demo_acp"}}}}, "acp-1-pay", lambda a: a.get("status") == "completed")


def acp_poster(rows: list[Row], server: Any) -> Callable[..., Any]:
    """POST to our ACP REST routes in process, as a buyer agent's platform, one table row per call."""
    from .routes import build_companion_app
    from .sandbox.asgi_client import call_asgi

    app = build_companion_app(lambda: server.state)
    headers = {"Authorization": f"Bearer {ACP_DEMO_KEY}", "API-Version": "2026-04-17",
               "Content-Type": "application/json"}

    async def post(path: str, body: dict[str, Any], key: str, expect: Callable[[dict[str, Any]], bool]) -> Any:
        start = time.perf_counter()
        raw, status, _ = await call_asgi(app, "POST", f"http://demo{path}", {**headers, "Idempotency-Key": key},
                                         json.dumps(body))
        answer: dict[str, Any] = json.loads(raw)
        shown = f"{status} {answer.get('status', answer.get('code'))}"
        if answer.get("order"):
            shown += f", order {answer['order']['id']}"
        rows.append(Row("(ACP REST)", f"POST {path}"[:56], shown, (time.perf_counter() - start) * 1000,
                        expect(answer)))
        return answer

    return post


async def pay_with_x402(call: Any, customer: str) -> None:
    """The x402 flow over MCP: the paid tool answers 402, the payer signs an EIP-3009 authorization with the x402
    package's own client scheme, the paid call credits the wallet, and the same payment again is refused."""
    from eth_account import Account
    from x402.mechanisms.evm.exact.client import ExactEvmScheme
    from x402.schemas import PaymentRequirements

    await call("create_agent_wallet", {"agent_id": "buyer", "customer": customer, "idempotency_key": "w-buyer"},
               lambda c: c.get("agent_id") == "buyer")
    args = {"agent_id": "buyer", "luc": 3000}
    challenge = await call("purchase_luc_credits", args, lambda c: c.get("accepts", [{}])[0].get("amount") == "3000000")
    accepted = challenge["accepts"][0]
    signed = ExactEvmScheme(Account.create()).create_payment_payload(PaymentRequirements.model_validate(accepted))
    payment = {"x402Version": 2, "accepted": accepted, "payload": signed, "resource": challenge.get("resource")}
    await call("purchase_luc_credits", args, lambda c: c.get("luc_credited") == 3000, meta={"x402/payment": payment})
    await call("purchase_luc_credits", args,
               lambda c: c.get("error", {}).get("code") == "invalid_exact_evm_nonce_already_used",
               meta={"x402/payment": payment})


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _database(settings: Settings) -> str:
    """Where the demo's records went: a temporary SQLite file, or AIMS_BILLING_DATABASE_URL (password masked)."""
    if settings.database_url:
        from .store.postgres import mask_url

        return f"PostgreSQL at {mask_url(settings.database_url)}"
    return "a temporary SQLite file"


def _print_table(rows: list[Row], print_line: Callable[[str], None]) -> None:
    headers = ("#", "tool", "key arguments", "result", "ms")
    table = [(str(i + 1), r.tool, r.arguments[:56], _clip(r.result, 78) + ("" if r.ok else "  <-- unexpected"),
              f"{r.ms:.1f}") for i, r in enumerate(rows)]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print_line(line)
    print_line("-" * len(line))
    for row in table:
        print_line("  ".join(cell.rjust(w) if i == 4 else cell.ljust(w)
                             for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
