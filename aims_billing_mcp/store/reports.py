"""Read-only questions the operator reports ask across aggregates (wallets per customer, customers with usage).

`ReportsStore` is the seam (reads only, on the backend's reader); `SqliteReports` is the SQLite implementation,
`PostgresReports` the PostgreSQL one (the same statements).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .core import Reader


@dataclass(frozen=True, slots=True)
class LedgerCounts:
    wallets: int
    transactions: int


class ReportsStore(Protocol):
    """The report reads every backend provides."""

    def wallet_agents(self, customer: str | None = None) -> list[str]:
        """The agents with a wallet (of `customer`, or of everyone), ordered by customer, then agent."""
        ...

    def ledger_counts(self) -> LedgerCounts:
        """How many wallets and how many ledger transactions there are, read in one snapshot."""
        ...

    def usage_customers(self, customer: str | None = None) -> list[str]:
        """The customers with recorded usage in any period (only `customer`, if given), ordered."""
        ...


class SqliteReports:
    def __init__(self, core: Reader) -> None:
        self._core = core

    def wallet_agents(self, customer: str | None = None) -> list[str]:
        where = " WHERE customer_id = ?" if customer else ""
        sql = f"SELECT agent_id FROM agent_wallets{where} ORDER BY customer_id, agent_id"
        return [str(row["agent_id"]) for row in self._core.query(sql, (customer,) if customer else ())]

    def ledger_counts(self) -> LedgerCounts:
        row = self._core.query_one("SELECT (SELECT COUNT(*) FROM agent_wallets) AS wallets, "
                                   "(SELECT COUNT(DISTINCT txn_id) FROM agent_transactions) AS transactions")
        if row is None:  # cannot happen: a SELECT without FROM answers one row
            return LedgerCounts(wallets=0, transactions=0)
        return LedgerCounts(wallets=int(row["wallets"]), transactions=int(row["transactions"]))

    def usage_customers(self, customer: str | None = None) -> list[str]:
        where = " WHERE customer_id = ?" if customer else ""
        return [str(row["customer_id"]) for row in self._core.query(  # the running totals: per customer and period
            f"SELECT DISTINCT customer_id FROM meter_usage_totals{where} ORDER BY customer_id",
            (customer,) if customer else ())]


class PostgresReports(SqliteReports):
    """PostgreSQL: the same reads (store/postgres_sql.py); `ledger_counts` is one statement, hence one snapshot."""
