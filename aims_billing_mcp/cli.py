"""`aims-billing-mcp`: serve (stdio or HTTP), demo, sandbox, tools-json, doctor.

Every command loads the settings first, so a malformed variable stops it with a message naming the variable
(exit 2) instead of failing later in the middle of a call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from . import __version__
from .errors import BillingError
from .redact import display, install_log_redaction, redact_text, redacted_streams
from .settings import Settings, StripeMode, describe_validation_error

if TYPE_CHECKING:
    from .state import AppState

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


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
    from .app import build_server, settle_heap

    _check_databases(settings)
    _configure_logging(settings.aims_billing_log_level)
    try:
        server = build_server(settings, webhook_server=not args.http and not args.no_webhooks)
    except BillingError as exc:
        return _fail(exc.message)
    settle_heap()
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


def _check_databases(settings: Settings) -> None:
    """A path that cannot be a database stops start-up here, in one line (StoreUnavailable), not in a traceback
    from inside the server's lifespan or at the first Stripe call (the embedded sandbox opens its file then)."""
    from .store import check_database_file, open_store

    open_store(settings.aims_billing_db, settings.database_url, writers=1).close()  # a check: one writer is plenty
    if settings.stripe_secret_key is None and settings.stripe_api_base is None:
        check_database_file(settings.sandbox_db_path, "AIMS_BILLING_SANDBOX_DB")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    try:  # the demo's database lives in a fresh temporary directory: a TMPDIR that cannot hold one stops it here
        with tempfile.TemporaryDirectory(prefix="aims-billing-demo-"):
            pass
    except OSError as exc:
        return _fail(f"the demo cannot create its temporary database in {tempfile.gettempdir()} "
                     f"({exc.strerror or exc}): set TMPDIR to a writable directory")
    return 0 if asyncio.run(run_demo()) else 1


def cmd_sandbox(args: argparse.Namespace) -> int:
    from .redact import keep_public
    from .sandbox import SANDBOX_SECRET_KEY, SANDBOX_WEBHOOK_SECRET, serve_sandbox
    from .store import check_database_file

    settings = _settings()
    db_path = args.db or str(settings.sandbox_db_path)
    check_database_file(Path(db_path), "--db" if args.db else "AIMS_BILLING_SANDBOX_DB")
    keep_public([SANDBOX_SECRET_KEY, SANDBOX_WEBHOOK_SECRET])  # the sandbox's fixed credentials are published
    if args.sandbox_command is not None:
        return cmd_sandbox_action(args, settings, db_path)
    own = settings.stripe_webhook_secret  # the server it forwards to verifies with it: sign with it too
    print(f"aims-billing-mcp sandbox on http://{args.host}:{args.port} (db {db_path})\n"
          f"  api key:        {SANDBOX_SECRET_KEY}\n  webhook secret: "
          f"{'STRIPE_WEBHOOK_SECRET (from the environment)' if own else SANDBOX_WEBHOOK_SECRET}\n"
          f"  point a server at it: STRIPE_API_BASE=http://{args.host}:{args.port}"
          + (f"\n  forwarding events to {args.forward_to}" if args.forward_to else ""), file=sys.stderr)
    if own is None or not args.forward_to:
        serve_sandbox(host=args.host, port=args.port, db_path=db_path, forward_to=args.forward_to)
        return 0
    import uvicorn

    from .sandbox import create_app

    app = create_app(db_path=db_path)
    app.state.sandbox.webhooks.configure(args.forward_to, secret=own.get_secret_value())
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        app.state.sandbox.close()
    return 0


def cmd_sandbox_action(args: argparse.Namespace, settings: Settings, db_path: str) -> int:
    """Act on the sandbox's file as Stripe would (a customer pays, a renewal fails, time passes) and deliver the
    resulting signed events to the server's webhook endpoint, like `stripe trigger`. Events that were not delivered
    stay pending in the sandbox (exit 1): `sandbox resend --undelivered` sends them again."""
    from .sandbox import SANDBOX_WEBHOOK_SECRET, create_app
    from .sandbox.events import undelivered

    target = args.forward_to or f"http://127.0.0.1:{settings.aims_billing_webhook_port}/webhooks/stripe"
    secret = (settings.stripe_webhook_secret.get_secret_value() if settings.stripe_webhook_secret
              else SANDBOX_WEBHOOK_SECRET)  # what the server verifies with
    app = create_app(db_path=db_path, webhook_target=target)
    sandbox = app.state.sandbox
    sandbox.webhooks.configure(target, secret=secret, max_attempts=3, retry_delay_scale=0.2)
    code = 0
    try:
        if args.sandbox_command == "complete-checkout":
            session = sandbox.complete_checkout_session(args.session)
            print(f"checkout {session['id']}: {session['status']}, customer {session.get('customer')}, "
                  f"subscription {session.get('subscription') or '-'}")
        elif args.sandbox_command == "complete-onboarding":
            account = sandbox.complete_account_onboarding(args.account, onboarded=not args.restrict)
            print(f"account {account['id']}: transfers {account['capabilities']['transfers']}, still due: "
                  f"{', '.join(account['requirements']['currently_due']) or 'nothing'}")
        elif args.sandbox_command == "trigger":
            event = sandbox.trigger(args.event_type, customer=args.customer, subscription=args.subscription)
            print(f"triggered {event['type']} ({event['id']})")
        elif args.sandbox_command == "resend":
            code = _resend(sandbox, args.event_ids, undelivered(sandbox.store) if args.undelivered else [])
        else:
            events = sandbox.advance(days=args.days, hours=args.hours)
            print(f"advanced the sandbox clock by {args.days} day(s) {args.hours} hour(s): {len(events)} event(s)")
            for event in events:
                print(f"  {event['type']:40} {event['id']}")
    except (ValueError, LookupError) as exc:
        code = _fail(str(exc))
    except Exception as exc:  # the sandbox's Stripe-shaped errors carry a message for the operator
        message = getattr(exc, "message", None) or str(exc)
        code = _fail(f"sandbox refused: {message}")
    finally:
        sandbox.webhooks.drain(timeout=15)
        delivered = [d for d in sandbox.webhooks.deliveries if d.delivered]
        failed = [d for d in sandbox.webhooks.deliveries if not d.delivered]
        if delivered or failed:
            print(f"webhooks to {target}: {len(delivered)} delivered, {len(failed)} not delivered"
                  + (" (is `aims-billing-mcp serve` running? they stay pending in the sandbox: send them with "
                     "`aims-billing-mcp sandbox resend --undelivered`)" if failed else ""), file=sys.stderr)
        sandbox.close()
    return code or (1 if failed else 0)


def _resend(sandbox: Any, event_ids: list[str], pending: list[dict[str, Any]]) -> int:
    """Queue the named events and the pending ones (each once, in that order) for delivery again."""
    if not event_ids and not pending:
        print("sandbox resend: nothing to resend (name evt_... ids, or --undelivered: none are pending)")
        return 0
    chosen: dict[str, dict[str, Any]] = {}
    for event_id in event_ids:
        event = sandbox.store.get(event_id, "event")
        if event is None:
            raise LookupError(f"no sandbox event {event_id!r}: `sandbox resend` takes evt_... ids from this "
                              f"sandbox (GET /v1/events lists them)")
        chosen[event_id] = event
    for event in pending:
        chosen.setdefault(event["id"], event)
    for event in chosen.values():
        sandbox.webhooks.enqueue(event)
        print(f"resending {event['type']:40} {event['id']}")
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


def cmd_report(args: argparse.Namespace) -> int:
    from .services.reports import creators_report, prepaid_report, receipts_report, usage_report, wallet_report
    from .state import open_state

    with open_state(_settings()) as state:
        store = state.store
        if args.report == "audit":
            from .services.audit import AuditFilter, audit_report, audit_rows

            lines = audit_report(audit_rows(store, AuditFilter(
                tool=args.tool, customer=args.customer, since=args.since, errors_only=args.errors, limit=args.limit)))
        elif args.report == "usage":
            lines = usage_report(store, state.metering, args.customer)
        elif args.report == "receipts":
            lines = receipts_report(state.x402, args.limit)
        elif args.report == "creators":
            from .store import utc_iso

            since = utc_iso(args.since.timestamp()) if args.since else None
            lines = creators_report(state.connect.earnings(args.account, since, args.limit))
        elif args.report == "prepaid":
            lines = prepaid_report(store.prepaid.rows(args.customer))
        else:
            lines = wallet_report(store, state.ledger, args.customer)
    print("\n".join(lines))
    return 0


def cmd_prune_audit(args: argparse.Namespace) -> int:
    """Delete audit rows older than the retention period (the server also prunes them once a day)."""
    from .services.audit import prune_audit
    from .state import open_state

    settings = _settings()
    days = args.days if args.days is not None else settings.aims_billing_audit_retention_days
    with open_state(settings) as state:
        pruned = prune_audit(state.store, retention_days=days)
    print(f"prune-audit: deleted {pruned} audit row(s) older than {days} days")
    return 0


def _since(text: str) -> datetime:
    """`--since`: an ISO date or time (UTC unless it says otherwise), or a span back from now: 30m, 12h, 7d."""
    span = re.fullmatch(r"(\d{1,6})([mhd])", text.strip())
    if span:
        amount, unit = int(span.group(1)), span.group(2)
        unit_name = {"m": "minutes", "h": "hours", "d": "days"}[unit]
        return datetime.now(UTC) - timedelta(**{unit_name: amount})
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an ISO date/time nor a span like 30m, 12h, 7d") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _amount(text: str) -> int:
    """Minor units, as the tools take them: a whole number in 1..10**12 (`1e3`, `2.5`, `true` refused)."""
    if not re.fullmatch(r"[0-9]{1,13}", text) or not 1 <= int(text) <= 10**12:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount in minor units (a whole number, 1..10^12)")
    return int(text)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{value} is out of range 1..1000000")
    return value


def cmd_flush_usage(args: argparse.Namespace) -> int:
    """Deliver pending usage to Stripe now, batch after batch, until nothing is pending or Stripe stops taking it."""
    settings = _settings()
    if problem := settings.live_key_problem():
        return _fail(problem)
    from .state import open_state

    async def run() -> tuple[int, int, int, str | None]:
        sent = failed = 0
        async with open_state(settings) as state:
            while True:
                report = await state.flusher.flush_once()
                sent, failed = sent + report.sent, failed + report.failed
                if report.error or report.pending == 0 or (report.sent == 0 and report.failed == 0):
                    return sent, failed, report.pending, report.error

    sent, failed, pending, error = asyncio.run(run())
    print(f"flush-usage: {sent} event(s) accepted by Stripe, {failed} marked failed, {pending} still pending"
          + (f"; stopped: {error}" if error else ""))
    return 1 if error else 0


def _on_prepaid(command: str, action: Callable[[Any], Awaitable[T]]) -> T:
    """Run `action` on the prepaid subscriptions of the configured database and Stripe, then let the ACP order
    events it wrote go out (or say they wait for the server's next start)."""
    from .state import open_state

    async def run() -> T:
        async with open_state(_settings()) as state:
            done = await action(state.prepaid)
            if state.acp.order_webhooks is not None:
                try:
                    await asyncio.wait_for(state.acp.order_webhooks.drain(), timeout=30)
                except TimeoutError:
                    print(f"{command}: order events still undelivered are sent at the server's next start",
                          file=sys.stderr)
            return done

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
    return 1 if any(row.status != "started" for row in rows) else 0


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
    return 0 if row.status == "refunded" else 1  # a pending or failed refund: run it again later


def cmd_refund_split(args: argparse.Namespace) -> int:
    """Refund (part of) a split sale, as the refund_split_sale tool does: the buyer's money back, the creator's
    transfer reversed and the platform's fee refunded in proportion. The key defaults to one derived from the sale
    and amount, so running the same command again replays the first refund instead of refunding twice."""
    if problem := _settings().live_key_problem():
        return _fail(problem)
    from .errors import BillingError
    from .state import open_state

    key = args.key or f"cli-refund-split:{args.sale}:{args.amount}"

    async def run() -> Any:
        async with open_state(_settings()) as state:
            return await state.connect.refund_sale(sale=args.sale, amount=args.amount, reason=args.reason,
                                                   idempotency_key=key)

    try:
        result = asyncio.run(run())
    except BillingError as exc:  # refused (nothing left, unknown sale) or Stripe said no: nothing changed here
        print(f"aims-billing-mcp: refund-split: {exc.message}", file=sys.stderr)
        return 1
    again = " (replayed: this key already refunded it)" if result.replayed else ""
    print(f"refund-split: {args.sale}: refunded {result.amount} as {result.refund}; creator reversed "
          f"{result.reversed}, platform fee refunded {result.fee_refunded}{again}")
    return 0


def cmd_check_splits(args: argparse.Namespace) -> int:
    """Every paid split sale against Stripe's transfers and application fees; exit 1 on any mismatch."""
    from .state import open_state

    async def run() -> tuple[int, list[str]]:
        async with open_state(_settings()) as state:
            return await state.connect.check_splits()

    checked, problems = asyncio.run(run())
    if problems:
        print(f"check-splits: {len(problems)} mismatch(es) in {checked} sale(s)")
        print("\n".join(f"  {line}" for line in problems))
        return 1
    print(f"check-splits: ok: {checked} sale(s); each has one transfer to its creator, its application fee, and "
          "refunds reversed as recorded")
    return 0


def cmd_check_ledger(args: argparse.Namespace) -> int:
    from .services.reports import ledger_counts
    from .state import open_state

    settings = _settings()
    with open_state(settings) as state:
        violations = state.ledger.check_ledger()
        counts = ledger_counts(state.store)
    if violations:
        print(f"check-ledger: {len(violations)} violation(s) in {_database_name(settings)}")
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
    """tools.json, and beside it the parts of README.md and docs/tools.md derived from the tools (tools/docs.py)."""
    from .tools import TOOLS
    from .tools.docs import render

    manifest = asyncio.run(tools_manifest())
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    Path(args.output).write_text(text, encoding="utf-8")
    print(f"wrote {len(manifest['tools'])} tools to {args.output}", file=sys.stderr)
    readme, examples = (Path(args.output).resolve().parent / name for name in ("README.md", "docs/tools.md"))
    if readme.is_file() and examples.is_file():
        texts = render(TOOLS, manifest, readme.read_text(encoding="utf-8"), examples.read_text(encoding="utf-8"))
        for path, derived in zip((readme, examples), texts, strict=True):
            path.write_text(derived, encoding="utf-8")
        print(f"updated the tool tables of {readme} and the examples of {examples}", file=sys.stderr)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    settings = _settings()
    print("aims-billing-mcp doctor")
    for name in sorted(type(settings).model_fields):
        print(f"  {name.upper():38} {display(getattr(settings, name))}")
    print(f"  stripe mode: {settings.stripe_mode.value} ({_stripe_target(settings)})")
    from .http_guard import HttpPolicy

    print("  HTTP surfaces under AIMS_BILLING_READ_ONLY / AIMS_BILLING_TOOLS:")
    for line in HttpPolicy.from_settings(settings).describe():
        print(f"    {line}")
    if settings.database_url:  # named before anything opens it, so a refusal below still says which it was
        print(f"  database: {_describe_postgres(settings.database_url)}")
    _check_databases(settings)
    return 0 if asyncio.run(_doctor_state(settings)) else 1


async def _doctor_state(settings: Settings) -> bool:
    """The database, x402 and the Stripe key, on the graph every command builds."""
    from .services.x402 import x402_status
    from .state import open_state

    async with open_state(settings) as state:
        if not settings.database_url:
            from .store import SQLITE_VERSION

            print(f"  database: SQLite {SQLITE_VERSION} at {settings.aims_billing_db} (schema version "
                  f"{state.store.schema_version})")
        print(f"  x402: {x402_status(settings)}")
        if problem := settings.live_key_problem():
            print(f"  PROBLEM: {problem}")
            return False
        return await _check_key(state)


def _database_name(settings: Settings) -> str:
    """The database commands act on, for an operator: the PostgreSQL URL (password masked) or the SQLite file."""
    if settings.database_url:
        from .store import postgres

        return f"PostgreSQL at {postgres.mask_url(settings.database_url)}"
    return f"SQLite at {settings.aims_billing_db}"


def _describe_postgres(url: str) -> str:
    """The backend, where it is (the password masked), its server version and schema version against the code's."""
    from .store import postgres

    with postgres.connect(url) as conn:
        version, server = postgres.schema_version(conn), postgres.server_version(conn)
    return (f"PostgreSQL {server} at {postgres.mask_url(url)} (schema version {version}; this release needs "
            f"{postgres.SCHEMA_VERSION})")


def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the configured database to the code's schema: PostgreSQL needs it once per release (from any one
    instance: instances migrating together wait for each other); SQLite upgrades itself on opening, so this only
    reports."""
    settings = _settings()
    if settings.database_url:
        from .store import postgres

        with postgres.connect(settings.database_url) as conn:
            applied = postgres.migrate(conn)
            version = postgres.schema_version(conn)
        where = f"PostgreSQL at {postgres.mask_url(settings.database_url)}"
    else:
        from contextlib import closing

        from .store import Store

        with closing(Store(settings.aims_billing_db)) as store:
            applied, version = store.applied_migrations, store.schema_version
        where = f"SQLite at {settings.aims_billing_db}"
    done = f"applied {', '.join(f'{n:04d}' for n in applied)}" if applied else "nothing to apply"
    print(f"{where}: {done}; schema version {version}")
    return 0


def _stripe_target(settings: Settings) -> str:
    """What the gateway really talks to: the embedded sandbox (and its file), a sandbox or API at STRIPE_API_BASE,
    or Stripe itself."""
    if settings.stripe_api_base:
        kind = "an external sandbox" if settings.stripe_mode is StripeMode.SANDBOX else "a Stripe-compatible API"
        return f"{kind} at {settings.stripe_api_base}; no local sandbox file is used"
    if settings.stripe_mode is StripeMode.SANDBOX:
        return f"the embedded sandbox, its file {settings.sandbox_db_path}"
    return "api.stripe.com"


async def _check_key(state: AppState) -> bool:
    try:
        balance = await state.catalog.retrieve_balance()  # a read: no amount to hold to the ceiling
    except BillingError as exc:
        print(f"  key check: FAILED: {exc.message}")
        return False
    shown = ", ".join(a.display for a in balance.available) or "0"
    print(f"  key check: ok (balance call answered; available {shown})")
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aims-billing-mcp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    sandbox.add_argument("--host", default="127.0.0.1", help="bind address when serving (default 127.0.0.1)")
    sandbox.add_argument("--port", type=int, default=12111,
                         help="port when serving; point STRIPE_API_BASE at http://127.0.0.1:PORT (default 12111)")
    sandbox.add_argument("--db", help="sandbox SQLite file (default beside AIMS_BILLING_DB)")
    sandbox.add_argument("--forward-to", metavar="URL",
                         help="deliver signed events to this webhook URL (default for actions: the serve endpoint)")
    sandbox.set_defaults(func=cmd_sandbox, sandbox_command=None)
    actions = sandbox.add_subparsers(dest="sandbox_command", metavar="ACTION")
    complete = actions.add_parser("complete-checkout", help="a customer pays a checkout session (cs_...)")
    complete.add_argument("session", help="the checkout session id (cs_test_...) to pay, as a customer would")
    onboard = actions.add_parser("complete-onboarding", help="a creator completes a connected account's onboarding")
    onboard.add_argument("account", help="the connected account id (acct_...) whose account link was followed")
    onboard.add_argument("--restrict", action="store_true", help="instead: Stripe asks for more, transfers stop")
    trigger = actions.add_parser("trigger", help="make an event happen, e.g. invoice.payment_failed")
    trigger.add_argument("event_type", help="the Stripe event type to cause, e.g. invoice.payment_failed")
    trigger.add_argument("--customer", help="the customer (cus_...) the event is about")
    trigger.add_argument("--subscription", help="the subscription (sub_...) the event is about")
    advance = actions.add_parser("advance", help="move the sandbox clock: renewals, trial ends, cancellations")
    advance.add_argument("--days", type=float, default=0, help="days to move the clock forward (fractions allowed)")
    advance.add_argument("--hours", type=float, default=0, help="hours to move the clock forward")
    resend = actions.add_parser("resend", help="deliver sandbox events again (like `stripe events resend`)")
    resend.add_argument("event_ids", nargs="*", metavar="EVENT_ID", help="evt_... ids to send again")
    resend.add_argument("--undelivered", action="store_true",
                        help="every event whose delivery has not succeeded yet, oldest first")
    setup = sub.add_parser("setup-stripe", help="create (or find) the tier products and prices; print STRIPE_PRICE_*")
    setup.add_argument("--write-env", metavar="PATH", help="also set the STRIPE_PRICE_* lines in this .env file")
    setup.set_defaults(func=cmd_setup_stripe)
    report = sub.add_parser("report", help="operator reports: wallets, usage, receipts, prepaid, audit")
    report.add_argument("report", choices=["wallets", "usage", "receipts", "prepaid", "audit", "creators"],
                        help="which report: wallets (balances), usage (this period), receipts (x402), prepaid "
                             "(prepaid tiers), audit (what agents called), creators (plug sales split with creators)")
    report.add_argument("--customer", help="only this customer (cus_...)")
    report.add_argument("--account", help="creators: only this connected account (acct_...)")
    report.add_argument("--limit", type=_positive, default=50, help="receipts, audit: how many of the latest")
    report.add_argument("--tool", help="audit: only calls of this tool")
    report.add_argument("--since", type=_since, help="audit, creators: only rows since an ISO date/time or a span "
                        "(30m, 12h, 7d)")
    report.add_argument("--errors", action="store_true", help="audit: only calls that failed")
    report.set_defaults(func=cmd_report)
    prune = sub.add_parser("prune-audit", help="delete audit rows older than the retention period")
    prune.add_argument("--days", type=_positive,
                       help="keep this many days (default AIMS_BILLING_AUDIT_RETENTION_DAYS, 90)")
    prune.set_defaults(func=cmd_prune_audit)
    flush = sub.add_parser("flush-usage", help="deliver pending usage to Stripe Billing meters now")
    flush.set_defaults(func=cmd_flush_usage)
    start = sub.add_parser("start-subscriptions", help="start prepaid tier subscriptions paid for but not started")
    start.add_argument("--failed", nargs="*", metavar="PREPAID_ID",
                       help="also retry the ones that failed for good (all of them, or only these pre_... ids)")
    start.set_defaults(func=cmd_start_subscriptions)
    refund = sub.add_parser("refund-prepaid", help="refund a prepaid tier that was refused or failed for good")
    refund.add_argument("prepaid_id", help="pre_... (report prepaid lists them)")
    refund.set_defaults(func=cmd_refund_prepaid)
    migrate = sub.add_parser("migrate", help="bring the database (SQLite or AIMS_BILLING_DATABASE_URL) to this "
                             "release's schema")
    migrate.set_defaults(func=cmd_migrate)
    check = sub.add_parser("check-ledger", help="verify every ledger invariant; exit 1 on any violation")
    check.set_defaults(func=cmd_check_ledger)
    refund_split = sub.add_parser("refund-split", help="refund (part of) a split sale: the creator's transfer and "
                                  "the platform's fee given back in proportion")
    refund_split.add_argument("sale", help="the sale (cs_... or ps_...), as report creators lists it")
    refund_split.add_argument("--amount", type=_amount, required=True, help="minor units to give back (cents)")
    refund_split.add_argument("--reason", choices=["duplicate", "fraudulent", "requested_by_customer"],
                              help="Stripe's refund reason")
    refund_split.add_argument("--key", help="idempotency key (default: derived from the sale and amount)")
    refund_split.set_defaults(func=cmd_refund_split)
    splits = sub.add_parser("check-splits", help="reconcile every split sale with Stripe; exit 1 on any mismatch")
    splits.set_defaults(func=cmd_check_splits)
    tools_json = sub.add_parser(
        "tools-json", help="write tools.json, and the tool tables of README.md and docs/tools.md beside it")
    tools_json.add_argument("--output", default="tools.json", help="where to write it (default tools.json)")
    tools_json.set_defaults(func=cmd_tools_json)
    doctor = sub.add_parser("doctor", help="print the effective configuration and check the Stripe key")
    doctor.set_defaults(func=cmd_doctor)
    return parser


E = TypeVar("E", bound=BaseException)


def _found(exc: BaseException, kind: type[E]) -> E | None:
    """`exc` itself, its cause, or one inside an exception group, if it is a `kind`."""
    if isinstance(exc, kind):
        return exc
    nested = list(exc.exceptions) if isinstance(exc, BaseExceptionGroup) else []
    nested += [e for e in (exc.__cause__, exc.__context__) if e is not None]
    return next((hit for e in nested if (hit := _found(e, kind)) is not None), None)


def main(argv: list[str] | None = None) -> int:
    """Run one command; what it prints goes through the secret masking (redact.py), and a failure to start is one
    line on stderr naming the cause and the fix: exit 2 for configuration, 1 for the machine or a bug."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `aims-billing-mcp`: say what it can do, not an error
        parser.print_help()
        return 0
    from .store import StoreUnavailable
    from .store.postgres import PostgresUnavailable

    with redacted_streams():
        try:
            code: int = args.func(args)
        except ValidationError as exc:
            return _fail(describe_validation_error(exc))
        except Exception as exc:  # never a traceback for an operator; AIMS_BILLING_LOG_LEVEL=DEBUG shows one
            unavailable = _found(exc, StoreUnavailable) or _found(exc, PostgresUnavailable)  # also in task groups
            if unavailable is not None:
                _fail(unavailable.message)
                return unavailable.exit_code
            if os.environ.get("AIMS_BILLING_LOG_LEVEL", "").upper() == "DEBUG":
                traceback.print_exc()
            cause: BaseException = exc
            while isinstance(cause, BaseExceptionGroup) and cause.exceptions:  # the first failure in a task group
                cause = cause.exceptions[0]
            _fail(f"{args.command} failed: {type(cause).__name__}: {redact_text(str(cause))[:500]} (set "
                  "AIMS_BILLING_LOG_LEVEL=DEBUG to see where)")
            return EXIT_RUNTIME
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
