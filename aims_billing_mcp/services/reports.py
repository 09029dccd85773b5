"""Operator reports: plain tables over the services, printed by `aims-billing-mcp report ...`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..models import format_amount
from ..store import Store
from ..store.prepaid import PrepaidRow
from .ledger import LedgerService
from .metering import MeteringService
from .tiers import LUC_METER
from .x402 import X402Service


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Left-aligned text, numbers right-aligned, with a rule under the headers."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else f"{v:,}" if isinstance(v, int) and not
                                            isinstance(v, bool) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all((isinstance(row[i], int) and not isinstance(row[i], bool)) or row[i] is None for row in rows)
               for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("  ".join(cell.rjust(w) if numeric[i] and index else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def wallet_report(store: Store, ledger: LedgerService, customer: str | None = None) -> list[str]:
    rows = []
    for agent in store.reports.wallet_agents(customer):
        w = ledger.get_wallet(agent, recent=0)
        rows.append((w.customer_id, w.agent_id, w.balance, w.held, w.available, w.daily_cap, w.spent_today,
                     "yes" if w.frozen else "no"))
    if not rows:
        return ["no agent wallets" + (f" for {customer}" if customer else "")]
    totals = ("total", f"{len(rows)} wallets", sum(r[2] for r in rows), sum(r[3] for r in rows),
              sum(r[4] for r in rows), None, sum(r[6] for r in rows), "")
    return table(("customer", "agent", "balance", "held", "available", "daily cap", "spent today", "frozen"),
                 [*rows, totals])


def ledger_counts(store: Store) -> dict[str, int]:
    counts = store.reports.ledger_counts()
    return {"wallets": counts.wallets, "transactions": counts.transactions}


def usage_report(store: Store, metering: MeteringService, customer: str | None = None) -> list[str]:
    """Per customer with recorded usage and per meter (LUC tokens always, the others when used this period): tier,
    usage this period, allowance, overage and its cost, and what is still waiting to reach Stripe."""
    rows = []
    for who in store.reports.usage_customers(customer):
        for meter in metering.meters():
            s = metering.summary(who, "current", meter)
            if s.events.pending + s.events.sent + s.events.failed == 0 and meter != LUC_METER:
                continue
            rows.append((who, s.tier, s.meter, s.weighted_units, s.allowance, s.overage_units,
                         format_amount(s.overage_cost_cents, s.currency), s.events.pending, s.events.failed))
    if not rows:
        return ["no usage recorded" + (f" for {customer}" if customer else "")]
    return table(("customer", "tier", "meter", "used", "allowance", "overage", "overage cost", "pending to Stripe",
                  "failed"), rows)


def receipts_report(x402: X402Service, limit: int = 50) -> list[str]:
    rows = [(r.created_at[:19].replace("T", " "), r.mode, r.network, r.payer[:14] + "…", r.amount_usd,
             r.agent_id or "-", r.luc_credited, r.tx_hash[:14] + "…" if r.tx_hash else (r.payment_intent or "-"))
            for r in x402.receipts(limit)]
    if not rows:
        return ["no x402 receipts"]
    return table(("at (UTC)", "mode", "network", "payer", "usd", "agent credited", "luc", "settlement"), rows)


def prepaid_report(rows: Sequence[PrepaidRow]) -> list[str]:
    """Prepaid tier subscriptions and how far each got (started, still open, or failed with the reason)."""
    if not rows:
        return ["no prepaid subscriptions"]
    return table(("prepaid id", "source", "customer", "tier", "prepaid", "status", "subscription", "attempts",
                  "last error"),
                 [(row.id, row.source_id, row.customer_id, row.tier, format_amount(row.amount, row.currency),
                   str(row.status), row.subscription_id, row.attempts, (row.last_error or "")[:120] or None)
                  for row in rows])


def creators_report(report: Any) -> list[str]:
    """`report creators`: per creator and currency, then the latest sales with their Stripe ids."""
    if not report.earnings:
        return ["no split sales"]
    lines = table(("account", "currency", "sales", "gross", "platform fees", "transferred", "reversed",
                   "fee refunded", "pending", "net to creator"),
                  [(e.account, e.currency, e.sales, e.gross, e.platform_fees, e.transferred, e.reversed,
                    e.fee_refunded, e.pending, e.net_to_creator) for e in report.earnings])
    lines += ["", *table(("sale", "path", "plug", "account", "gross", "fee", "creator", "status", "payment intent",
                          "transfer group", "refunded"),
                         [(s.sale, s.path, s.plug, s.account, s.gross, s.platform_fee, s.creator_amount, s.status,
                           s.payment_intent or "-", s.transfer_group or "-", s.refunded) for s in report.splits])]
    return lines
