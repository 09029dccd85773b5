"""The audit log as operators read it: what an agent did (tool, caller, redacted and truncated arguments, outcome,
error code, duration, Stripe request ids), filtered, and pruned after the retention period.

Rows are written by `app.audit()` for every tool call (and by the HTTP surfaces); they hold no secrets (arguments
are redacted before they are stored) and are kept AIMS_BILLING_AUDIT_RETENTION_DAYS days.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..store import Store, utc_iso


@dataclass(frozen=True)
class AuditFilter:
    tool: str | None = None
    customer: str | None = None
    since: datetime | None = None
    errors_only: bool = False
    limit: int = 50


def _stamp(moment: datetime) -> str:
    """The format the audit rows are written in (`store.utc_now`), so times compare as text."""
    return utc_iso(moment.timestamp())


def _like_literal(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def audit_rows(store: Store, wanted: AuditFilter) -> list[dict[str, Any]]:
    """The latest rows matching every filter given, newest first. A customer matches a row whose arguments name it
    as a value (customer, customer_id, or anywhere in the arguments)."""
    clauses: list[str] = []
    params: list[Any] = []
    if wanted.tool:
        clauses.append("tool = ?")
        params.append(wanted.tool)
    if wanted.customer:
        clauses.append("arguments LIKE ? ESCAPE '\\'")
        params.append(f'%"{_like_literal(wanted.customer)}"%')
    if wanted.since:
        clauses.append("at >= ?")
        params.append(_stamp(wanted.since))
    if wanted.errors_only:
        clauses.append("outcome = 'error'")
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    params.append(wanted.limit)
    return store.query(f"SELECT * FROM audit_log {where} ORDER BY id DESC LIMIT ?", params)


def prune_audit(store: Store, *, retention_days: int, now: datetime | None = None) -> int:
    """Delete rows older than the retention period; returns how many went."""
    cutoff = _stamp((now or datetime.now(UTC)) - timedelta(days=retention_days))
    return store.write_sync(lambda conn: conn.execute("DELETE FROM audit_log WHERE at < ?", (cutoff,)).rowcount)


def audit_report(rows: list[dict[str, Any]]) -> list[str]:
    from .reports import table

    if not rows:
        return ["no audit rows match"]
    return table(("at", "tool", "caller", "outcome", "error", "ms", "arguments"), [
        (row["at"][:19], row["tool"], row["caller"], row["outcome"], row["error_code"],
         f"{row['duration_ms']:.1f}", _short(row["arguments"])) for row in rows])


def _short(arguments: str, width: int = 90) -> str:
    try:
        text = json.dumps(json.loads(arguments), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        text = arguments
    return text if len(text) <= width else text[: width - 1] + "…"
