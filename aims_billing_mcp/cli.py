"""`aims-billing-mcp`: serve (stdio or HTTP), demo, sandbox, tools-json, doctor.

Every command loads the settings first, so a malformed variable stops it with a message naming the variable
(exit 2) instead of failing later in the middle of a call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from .errors import BillingError
from .redact import install_log_redaction, mask_secret
from .settings import Settings, StripeMode, describe_validation_error

if TYPE_CHECKING:
    from .store import Store

EXIT_CONFIG = 2


T = TypeVar("T")


def _fail(message: str) -> int:
    print(f"aims-billing-mcp: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _settings(**overrides: Any) -> Settings:
    return Settings(**overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    install_log_redaction()


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["aims_billing_http_host"] = args.host
    if args.port is not None:
        overrides["aims_billing_http_port"] = args.port
    settings = _settings(**overrides)
    if problem := settings.live_key_problem():
        return _fail(problem)
    from .app import build_server

    _configure_logging(settings.aims_billing_log_level)
    try:
        server = build_server(settings, webhook_server=not args.http and not args.no_webhooks)
    except BillingError as exc:
        return _fail(exc.message)
    if not args.http:
        server.run()
        return 0
    from .http_transport import serve_http

    token = settings.aims_billing_http_token.get_secret_value() if settings.aims_billing_http_token else None
    print(f"aims-billing-mcp: streamable HTTP on http://{settings.aims_billing_http_host}:"
          f"{settings.aims_billing_http_port}/mcp ({'bearer token required' if token else 'no token'})",
          file=sys.stderr)
    try:
        asyncio.run(serve_http(server, host=settings.aims_billing_http_host, port=settings.aims_billing_http_port,
                               token=token))
    except ValueError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    return 0 if asyncio.run(run_demo()) else 1


def cmd_sandbox(args: argparse.Namespace) -> int:
    from .sandbox import SANDBOX_SECRET_KEY, SANDBOX_WEBHOOK_SECRET, serve_sandbox

    settings = _settings()
    db_path = args.db or str(settings.sandbox_db_path)
    if args.sandbox_command is not None:
        return cmd_sandbox_action(args, settings, db_path)
    print(f"aims-billing-mcp sandbox on http://{args.host}:{args.port} (db {db_path})\n"
          f"  api key:        {SANDBOX_SECRET_KEY}\n  webhook secret: {SANDBOX_WEBHOOK_SECRET}\n"
          f"  point a server at it: STRIPE_API_BASE=http://{args.host}:{args.port}"
          + (f"\n  forwarding events to {args.forward_to}" if args.forward_to else ""), file=sys.stderr)
    serve_sandbox(host=args.host, port=args.port, db_path=db_path, forward_to=args.forward_to)
    return 0


def cmd_sandbox_action(args: argparse.Namespace, settings: Settings, db_path: str) -> int:
    """Act on the sandbox's file as Stripe would (a customer pays, a renewal fails, time passes) and deliver the
    resulting signed events to the server's webhook endpoint, like `stripe trigger`."""
    from .sandbox import create_app

    target = args.forward_to or f"http://127.0.0.1:{settings.aims_billing_webhook_port}/webhooks/stripe"
    app = create_app(db_path=db_path, webhook_target=target)
    sandbox = app.state.sandbox
    sandbox.webhooks.configure(target, max_attempts=3, retry_delay_scale=0.2)
    try:
        if args.sandbox_command == "complete-checkout":
            session = sandbox.complete_checkout_session(args.session)
            print(f"checkout {session['id']}: {session['status']}, customer {session.get('customer')}, "
                  f"subscription {session.get('subscription') or '-'}")
        elif args.sandbox_command == "trigger":
            event = sandbox.trigger(args.event_type, customer=args.customer, subscription=args.subscription)
            print(f"triggered {event['type']} ({event['id']})")
        else:
            events = sandbox.advance(days=args.days, hours=args.hours)
            print(f"advanced the sandbox clock by {args.days} day(s) {args.hours} hour(s): {len(events)} event(s)")
            for event in events:
                print(f"  {event['type']:40} {event['id']}")
    except (ValueError, LookupError) as exc:
        return _fail(str(exc))
    except Exception as exc:  # the sandbox's Stripe-shaped errors carry a message for the operator
        message = getattr(exc, "message", None) or str(exc)
        return _fail(f"sandbox refused: {message}")
    finally:
        sandbox.webhooks.drain(timeout=15)
        delivered = [d for d in sandbox.webhooks.deliveries if d.delivered]
        failed = [d for d in sandbox.webhooks.deliveries if not d.delivered]
        if delivered or failed:
            print(f"webhooks to {target}: {len(delivered)} delivered, {len(failed)} not delivered"
                  + (" (is `aims-billing-mcp serve` running? events stay in the sandbox: see /v1/events)"
                     if failed else ""), file=sys.stderr)
        sandbox.close()
    return 0


def cmd_setup_stripe(args: argparse.Namespace) -> int:
    settings = _settings()
    if problem := settings.live_key_problem():
        return _fail(problem)
    from .services.stripe_setup import env_lines, setup_stripe, write_env
    from .services.tiers import Pricing
    from .stripe_gateway import build_gateway

    async def run() -> Any:
        gateway = build_gateway(settings)
        try:
            return await setup_stripe(gateway, Pricing.load(settings.aims_billing_pricing))
        finally:
            await gateway.close()

    try:
        setup = asyncio.run(run())
    except BillingError as exc:
        return _fail(exc.message)
    print(f"# setup-stripe on Stripe {settings.stripe_mode.value}: meter {setup.meter} "
          f"({'created' if setup.meter_created else 'found'})", file=sys.stderr)
    for result in setup.tiers:
        made = ", ".join(result.created) if result.created else "nothing (found)"
        print(f"# {result.tier}: product {result.product}, monthly price {result.price or '-'}, overage price "
              f"{result.overage_price}; created {made}", file=sys.stderr)
    for line in env_lines(setup):
        print(line)
    if args.write_env:
        write_env(Path(args.write_env), {r.env: r.price for r in setup.paid if r.env and r.price})
        print(f"# updated {args.write_env}", file=sys.stderr)
    return 0


def _ledger(settings: Settings) -> tuple[Any, Any]:
    """The store and ledger for operator commands (no Stripe needed: agent limits are not checked here)."""
    from .services.ledger import LedgerService
    from .services.tiers import Pricing
    from .store import Store

    store = Store(settings.aims_billing_db)
    pricing = Pricing.load(settings.aims_billing_pricing)
    return store, LedgerService(store, luc_per_usd=pricing.luc_per_usd, agent_limit=lambda customer: None)


def cmd_report(args: argparse.Namespace) -> int:
    from .services.reports import prepaid_report, receipts_report, usage_report, wallet_report

    settings = _settings()
    if args.report in ("usage", "receipts"):
        from .app import build_state

        state = build_state(settings)
        try:
            lines = (usage_report(state.store, state.metering, args.customer) if args.report == "usage"
                     else receipts_report(state.x402, args.limit))
        finally:
            asyncio.run(state.gateway.close())
            state.store.close()
    elif args.report == "prepaid":
        from .store import Store

        store = Store(settings.aims_billing_db)
        try:
            where, params = ("WHERE customer_id = ?", (args.customer,)) if args.customer else ("", ())
            lines = prepaid_report(store.query(f"SELECT * FROM prepaid_subscriptions {where} ORDER BY created_at",
                                               params))
        finally:
            store.close()
    else:
        store, ledger = _ledger(settings)
        try:
            lines = wallet_report(store, ledger, args.customer)
        finally:
            store.close()
    print("\n".join(lines))
    return 0


def cmd_flush_usage(args: argparse.Namespace) -> int:
    """Deliver pending usage to Stripe now, batch after batch, until nothing is pending or Stripe stops taking it."""
    settings = _settings()
    if problem := settings.live_key_problem():
        return _fail(problem)
    from .app import build_state

    async def run() -> tuple[int, int, int, str | None]:
        state = build_state(settings)
        sent = failed = 0
        try:
            while True:
                report = await state.flusher.flush_once()
                sent, failed = sent + report.sent, failed + report.failed
                if report.error or report.pending == 0 or (report.sent == 0 and report.failed == 0):
                    return sent, failed, report.pending, report.error
        finally:
            await state.gateway.close()
            state.store.close()

    sent, failed, pending, error = asyncio.run(run())
    print(f"flush-usage: {sent} event(s) accepted by Stripe, {failed} marked failed, {pending} still pending"
          + (f"; stopped: {error}" if error else ""))
    return 1 if error else 0


def _on_prepaid(command: str, action: Callable[[Any], Awaitable[T]]) -> T:
    """Run `action` on the prepaid subscriptions of the configured database and Stripe, then let the ACP order
    events it wrote go out (or say they wait for the server's next start)."""
    from .app import build_state

    async def run() -> T:
        state = build_state(_settings())
        try:
            assert state.commerce.prepaid is not None
            done = await action(state.commerce.prepaid)
            if state.acp.order_webhooks is not None:
                try:
                    await asyncio.wait_for(state.acp.order_webhooks.drain(), timeout=30)
                except TimeoutError:
                    print(f"{command}: order events still undelivered are sent at the server's next start",
                          file=sys.stderr)
            return done
        finally:
            await state.gateway.close()
            state.store.close()

    return asyncio.run(run())


def cmd_start_subscriptions(args: argparse.Namespace) -> int:
    """Start the prepaid tier subscriptions that were paid for but not started in Stripe (the server also resumes
    open ones at start-up); `--failed` retries the ones that failed for good, after the cause was fixed."""
    if problem := _settings().live_key_problem():
        return _fail(problem)
    from .services.reports import prepaid_report

    rows = _on_prepaid("start-subscriptions", lambda prepaid: prepaid.retry(
        include_failed=args.failed is not None, only=args.failed or ()))
    print("\n".join(prepaid_report(rows)) if rows else "start-subscriptions: nothing to start")
    return 1 if any(row["status"] != "started" for row in rows) else 0


def cmd_refund_prepaid(args: argparse.Namespace) -> int:
    """Refund a prepaid tier that was refused or failed for good: its credit reversed, its payment refunded."""
    if problem := _settings().live_key_problem():
        return _fail(problem)
    from .errors import BillingError
    from .services.reports import prepaid_report

    try:
        row = _on_prepaid("refund-prepaid", lambda prepaid: prepaid.refund(args.prepaid_id))
    except BillingError as exc:  # refused (not refundable, unknown id) or Stripe said no: nothing changed here
        print(f"aims-billing-mcp: refund-prepaid: {exc.message}", file=sys.stderr)
        return 1
    print("\n".join(prepaid_report([row])))
    return 0 if row["status"] == "refunded" else 1  # a pending or failed refund: run it again later


def cmd_check_ledger(args: argparse.Namespace) -> int:
    from .services.reports import ledger_counts

    settings = _settings()
    store, ledger = _ledger(settings)
    try:
        violations = ledger.check_ledger()
        counts = ledger_counts(store)
    finally:
        store.close()
    if violations:
        print(f"check-ledger: {len(violations)} violation(s) in {settings.aims_billing_db}")
        for v in violations:
            print(f"  {v.rule:24} {v.subject:32} {v.detail}")
        return 1
    print(f"check-ledger: ok: {counts['wallets']} wallets, {counts['transactions']} transactions; every transaction "
          "balances, every balance equals its entries, nothing negative, every hold resolved at most once")
    return 0


async def tools_manifest() -> dict[str, Any]:
    """Every tool the server can register (allow-list and read-only ignored), as tools/list shows them."""
    from .app import all_tools, build_server

    server = build_server(Settings(_env_file=None), tools=all_tools())  # type: ignore[call-arg]
    tools = await server.list_tools()
    return {"tools": [tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in tools]}


def cmd_tools_json(args: argparse.Namespace) -> int:
    manifest = asyncio.run(tools_manifest())
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    Path(args.output).write_text(text, encoding="utf-8")
    print(f"wrote {len(manifest['tools'])} tools to {args.output}", file=sys.stderr)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    settings = _settings()
    from .store import Store

    print("aims-billing-mcp doctor")
    for name, value in sorted(settings.model_dump().items()):
        shown = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        if shown is not None and hasattr(value, "get_secret_value"):
            shown = mask_secret(str(shown))
        print(f"  {name.upper():38} {shown if shown not in (None, [], '') else '-'}")
    mode = settings.stripe_mode
    print(f"  stripe mode: {mode.value}" + (f" (sandbox db {settings.sandbox_db_path})"
                                            if mode is StripeMode.SANDBOX else ""))
    store = Store(settings.aims_billing_db)
    try:
        print(f"  database: {settings.aims_billing_db} (schema version {store.schema_version})")
        from .services.x402 import x402_status
        print(f"  x402: {x402_status(settings)}")
        if problem := settings.live_key_problem():
            print(f"  PROBLEM: {problem}")
            return 1
        ok = asyncio.run(_check_key(settings, store))
    finally:
        store.close()
    return 0 if ok else 1


async def _check_key(settings: Settings, store: Store) -> bool:
    from .services.catalog import CatalogService
    from .services.idempotency import IdempotencyService
    from .services.mutations import StripeMutations
    from .stripe_gateway import build_gateway

    gateway = build_gateway(settings)
    try:
        mutations = StripeMutations(gateway, IdempotencyService(store, replay_window_seconds=0))
        balance = await CatalogService(mutations, max_amount=settings.aims_billing_max_amount).retrieve_balance()
    except BillingError as exc:
        print(f"  key check: FAILED: {exc.message}")
        return False
    finally:
        await gateway.close()
    shown = ", ".join(a.display for a in balance.available) or "0"
    print(f"  key check: ok (balance call answered; available {shown})")
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aims-billing-mcp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the MCP server (stdio; --http for streamable HTTP)")
    serve.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    serve.add_argument("--host", help="HTTP bind address (default AIMS_BILLING_HTTP_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default AIMS_BILLING_HTTP_PORT or 8765)")
    serve.add_argument("--no-webhooks", action="store_true",
                       help="stdio only: do not run the webhook endpoint on 127.0.0.1:AIMS_BILLING_WEBHOOK_PORT")
    serve.set_defaults(func=cmd_serve)
    demo = sub.add_parser("demo", help="run an agent session end to end on the embedded sandbox")
    demo.set_defaults(func=cmd_demo)
    sandbox = sub.add_parser("sandbox", help="serve the Stripe-compatible sandbox on loopback, or act on it")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=12111)
    sandbox.add_argument("--db", help="sandbox SQLite file (default beside AIMS_BILLING_DB)")
    sandbox.add_argument("--forward-to", metavar="URL",
                         help="deliver signed events to this webhook URL (default for actions: the serve endpoint)")
    sandbox.set_defaults(func=cmd_sandbox, sandbox_command=None)
    actions = sandbox.add_subparsers(dest="sandbox_command")
    complete = actions.add_parser("complete-checkout", help="a customer pays a checkout session (cs_...)")
    complete.add_argument("session")
    trigger = actions.add_parser("trigger", help="make an event happen, e.g. invoice.payment_failed")
    trigger.add_argument("event_type")
    trigger.add_argument("--customer")
    trigger.add_argument("--subscription")
    advance = actions.add_parser("advance", help="move the sandbox clock: renewals, trial ends, cancellations")
    advance.add_argument("--days", type=float, default=0)
    advance.add_argument("--hours", type=float, default=0)
    setup = sub.add_parser("setup-stripe", help="create (or find) the tier products and prices; print STRIPE_PRICE_*")
    setup.add_argument("--write-env", metavar="PATH", help="also set the STRIPE_PRICE_* lines in this .env file")
    setup.set_defaults(func=cmd_setup_stripe)
    report = sub.add_parser("report", help="operator reports: wallets, usage, receipts, prepaid")
    report.add_argument("report", choices=["wallets", "usage", "receipts", "prepaid"])
    report.add_argument("--customer", help="only this customer (cus_...)")
    report.add_argument("--limit", type=int, default=50, help="receipts: how many of the latest")
    report.set_defaults(func=cmd_report)
    flush = sub.add_parser("flush-usage", help="deliver pending usage to Stripe Billing meters now")
    flush.set_defaults(func=cmd_flush_usage)
    start = sub.add_parser("start-subscriptions", help="start prepaid tier subscriptions paid for but not started")
    start.add_argument("--failed", nargs="*", metavar="PREPAID_ID",
                       help="also retry the ones that failed for good (all of them, or only these pre_... ids)")
    start.set_defaults(func=cmd_start_subscriptions)
    refund = sub.add_parser("refund-prepaid", help="refund a prepaid tier that was refused or failed for good")
    refund.add_argument("prepaid_id", help="pre_... (report prepaid lists them)")
    refund.set_defaults(func=cmd_refund_prepaid)
    check = sub.add_parser("check-ledger", help="verify every ledger invariant; exit 1 on any violation")
    check.set_defaults(func=cmd_check_ledger)
    tools_json = sub.add_parser("tools-json", help="write tools.json from the registered tools")
    tools_json.add_argument("--output", default="tools.json")
    tools_json.set_defaults(func=cmd_tools_json)
    doctor = sub.add_parser("doctor", help="print the effective configuration and check the Stripe key")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ValidationError as exc:
        return _fail(describe_validation_error(exc))
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
