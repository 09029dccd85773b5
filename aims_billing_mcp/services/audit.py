"""The audit log as operators read it: what an agent did (tool, caller, redacted and truncated arguments, outcome,
error code, duration, Stripe request ids), filtered, and pruned after the retention period.

Rows are written by `app.audit()` for every tool call (and by the HTTP surfaces); they hold no secrets (arguments
are redacted before they are stored) and are kept AIMS_BILLING_AUDIT_RETENTION_DAYS days.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from ..store import Store
from ..store.audit import AuditFilter, AuditRow

__all__ = ["AuditFilter", "AuditRow", "audit_report", "audit_rows", "prune_audit"]


def audit_rows(store: Store, wanted: AuditFilter) -> list[AuditRow]:
    """The latest rows matching every filter given, newest first. A customer matches a row whose arguments name it
    as a value (customer, customer_id, or anywhere in the arguments)."""
    return store.audit.report(wanted)


def prune_audit(store: Store, *, retention_days: int, now: datetime | None = None) -> int:
    """Delete rows older than the retention period; returns how many went."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    log = store.audit
    return store.write_sync(lambda tx: log.prune(tx, cutoff))


def audit_report(rows: list[AuditRow]) -> list[str]:
    from .reports import table

    if not rows:
        return ["no audit rows match"]
    return table(("at", "tool", "caller", "outcome", "error", "ms", "arguments"), [
        (row.at[:19], row.tool, row.caller, row.outcome, row.error_code, f"{row.duration_ms:.1f}",
         _short(row.arguments)) for row in rows])


def _short(arguments: str, width: int = 90) -> str:
    try:
        text = json.dumps(json.loads(arguments), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        text = arguments
    return text if len(text) <= width else text[: width - 1] + "…"
