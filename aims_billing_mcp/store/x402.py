"""x402 quotes, receipts (settled payments) and registered payer addresses.

`X402Store` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteX402Store` is the SQLite implementation.

The quote's state machine (`QuoteStatus`, `TRANSITIONS`): a quote is stored `open` (a stored quote when asked for,
a challenge token only in the transaction that pays it), becomes `paid` in the transaction that records its receipt,
or `expired` when its expiry passes unpaid (the clock's doing: no write), and an expired quote is `swept` (deleted)
after a grace period. Only `open` and `paid` are ever written (the table's CHECK); `expired` and `swept` are what a
reader derives from the clock and from the row's absence. A receipt has no states: it is written once, in the
transaction that marks its quote paid, and never changes; its UNIQUE keys (network, asset, payer, nonce), tx hash,
PaymentIntent and quote are the replay guard.

PostgreSQL (`PostgresX402Store`), where several instances write at once, keeps the outcome the SQLite single writer
gives: a transaction that asks `payment_used` first takes a transaction-scoped advisory lock on each of the
payment's keys (the receipt does not exist yet, so no row lock can guard it) and `quote_status` locks the quote's
row (`FOR UPDATE`), so two instances recording one payment take turns and the second sees the first's receipt, as it
would have one after the other; behind the locks stand the UNIQUE keys, and `record_receipt` raises the same
`ReceiptConflict` either way. The open-quote count and a wallet's payer list are read under an advisory lock (their
limits hold across instances). The quote sweep is one `DELETE` of rows taken with `FOR UPDATE SKIP LOCKED`: sweeps
on several instances delete disjoint rows, each expired quote once, and skip a quote a payment holds (the payment
decides; a quote it marks paid is never swept). No lease is needed: the delete is the whole effect, in the
statement that takes the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, Protocol

from .core import Reader, SqliteDialect, Tx
from .postgres_sql import PostgresDialect


class QuoteStatus(StrEnum):
    OPEN = "open"
    PAID = "paid"
    EXPIRED = "expired"  # open, past its expiry: derived from the clock, never written
    SWEPT = "swept"  # expired and deleted by the sweep: derived from the row's absence


STORED_QUOTE_STATUSES = frozenset({QuoteStatus.OPEN, QuoteStatus.PAID})  # the values x402_quotes.status may hold
TRANSITIONS: dict[QuoteStatus, frozenset[QuoteStatus]] = {
    QuoteStatus.OPEN: frozenset({QuoteStatus.PAID, QuoteStatus.EXPIRED}),
    QuoteStatus.EXPIRED: frozenset({QuoteStatus.SWEPT}),
    QuoteStatus.PAID: frozenset(),
    QuoteStatus.SWEPT: frozenset(),
}


def quote_state(status: str | None, expires_at: int | float, now: float) -> QuoteStatus:
    """The state of a quote stored with `status` (None: no row any more) at time `now`."""
    if status is None:
        return QuoteStatus.SWEPT
    if status == QuoteStatus.OPEN and now >= expires_at:
        return QuoteStatus.EXPIRED
    return QuoteStatus(status)


@dataclass(frozen=True, slots=True)
class Quote:
    """A quote: stored (`stored`: a row of x402_quotes) or described by a challenge token (not stored yet)."""

    id: str
    network: str  # CAIP-2
    asset: str
    pay_to: str
    amount: int  # atomic USDC
    agent_id: str | None
    luc: int
    description: str
    resource: str
    x402_version: int
    status: QuoteStatus
    expires_at: int  # epoch seconds
    created_at: str
    receipt_id: str | None = None
    paid_at: str | None = None
    stored: bool = True


@dataclass(frozen=True, slots=True)
class ReceiptRecord:
    """A receipt as recorded: one settled payment, written once."""

    id: str
    quote_id: str | None
    network: str
    asset: str
    payer: str
    pay_to: str
    amount: int
    nonce: str
    tx_hash: str | None
    agent_id: str | None
    luc_credited: int
    created_at: str
    payment_intent: str | None
    mode: str
    x402_version: int
    settlement: str | None  # the SettleResponse, JSON


@dataclass(frozen=True, slots=True)
class PayerLink:
    """A registered payer address and the wallet it pays for."""

    address: str
    agent_id: str


class ReceiptConflict(Exception):
    """`record_receipt` found a receipt already holding one of its UNIQUE keys: `on` says which kind of key, the
    quote's (it was paid already) or the payment's (the same payment: nonce, tx hash or PaymentIntent)."""

    def __init__(self, on: Literal["quote", "payment"]) -> None:
        super().__init__(f"a receipt already holds this {on}")
        self.on = on


class X402Store(Protocol):
    """The x402 operations every backend provides."""

    def find_quote(self, quote_id: str) -> Quote | None:
        """The stored quote `quote_id` (stored=True), or None."""

    def quote_status(self, tx: Tx, quote_id: str) -> tuple[QuoteStatus, int] | None:
        """The stored status and expiry (epoch seconds) of `quote_id` as `tx` sees it; None: never stored, or swept."""

    def count_open_quotes(self, tx: Tx, now: int) -> int:
        """How many stored quotes are open and unexpired at `now`."""

    def add_quote(self, tx: Tx, quote: Quote) -> bool:
        """Store `quote` as open; False (and nothing written) if a quote with its id exists."""

    def mark_quote_paid(self, tx: Tx, quote_id: str, receipt_id: str, paid_at: str) -> None:
        """Mark `quote_id` paid by `receipt_id` (call it in the transaction that records the receipt)."""

    def sweep_quotes(self, tx: Tx, expired_before: int) -> int:
        """Delete open quotes whose expiry is before `expired_before` (epoch seconds); return how many."""

    def payment_used(self, tx: Tx, network: str, asset: str, payer: str, nonce: str, tx_hash: str | None,
                     payment_intent: str | None) -> bool:
        """Whether a receipt holds this payment's (network, asset, payer, nonce), tx hash or PaymentIntent."""

    def nonce_used(self, network: str, asset: str, payer: str, nonce: str) -> bool:
        """Whether a receipt holds (network, asset, payer, nonce) (committed state, the replay pre-check)."""

    def payment_intent_used(self, payment_intent: str) -> bool:
        """Whether a receipt holds this PaymentIntent (committed state)."""

    def record_receipt(self, tx: Tx, receipt: ReceiptRecord) -> None:
        """Insert the receipt; raises ReceiptConflict (and writes nothing) if a receipt holds its quote or any of
        its payment keys (network, asset, payer, nonce), tx hash, PaymentIntent: UNIQUE keys, not a read-then-write,
        so a racing second backend connection is refused too."""

    def recent_receipts(self, limit: int) -> list[ReceiptRecord]:
        """The `limit` most recent receipts, newest first (created_at, then id)."""

    def payer_links(self, address: str, agent_id: str | None) -> list[PayerLink]:
        """Every registration of `address` and every registered payer of `agent_id`."""

    def payers_of(self, tx: Tx, agent_id: str) -> list[str]:
        """The addresses registered for `agent_id`, oldest first (then by address)."""

    def register_payer(self, tx: Tx, address: str, agent_id: str, created_at: str) -> bool:
        """Register `address` for `agent_id`; False (nothing changed) if it already is."""

    def wallet_exists(self, agent_id: str) -> bool:
        """Whether an agent wallet `agent_id` exists (a read of the ledger's wallets, which quotes credit)."""


_RECEIPT_COLUMNS = ("id", "quote_id", "network", "asset", "payer", "pay_to", "amount", "nonce", "tx_hash",
                    "agent_id", "luc_credited", "created_at", "payment_intent", "mode", "x402_version", "settlement")


class SqliteX402Store:
    dialect: type[SqliteDialect | PostgresDialect] = SqliteDialect

    def __init__(self, core: Reader) -> None:
        self._core = core

    def find_quote(self, quote_id: str) -> Quote | None:
        row = self._core.query_one("SELECT * FROM x402_quotes WHERE id = ?", (quote_id,))
        if row is None:
            return None
        row["status"] = QuoteStatus(row["status"])
        return Quote(**row)

    def quote_status(self, tx: Tx, quote_id: str) -> tuple[QuoteStatus, int] | None:
        row = tx.execute(f"SELECT status, expires_at FROM x402_quotes WHERE id = ?{self.dialect.for_update}",
                         (quote_id,)).fetchone()
        return None if row is None else (QuoteStatus(row[0]), row[1])

    def count_open_quotes(self, tx: Tx, now: int) -> int:
        self.dialect.lock(tx, "x402:open-quotes")
        (count,) = tx.execute("SELECT COUNT(*) FROM x402_quotes WHERE status = ? AND expires_at > ?",
                              (QuoteStatus.OPEN, now)).fetchone()
        return int(count)

    def add_quote(self, tx: Tx, quote: Quote) -> bool:
        return bool(tx.execute(
            "INSERT INTO x402_quotes (id, network, asset, pay_to, amount, agent_id, luc, description, resource, "
            "x402_version, status, expires_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING",
            (quote.id, quote.network, quote.asset, quote.pay_to, quote.amount, quote.agent_id, quote.luc,
             quote.description, quote.resource, quote.x402_version, QuoteStatus.OPEN, quote.expires_at,
             quote.created_at)).rowcount == 1)

    def mark_quote_paid(self, tx: Tx, quote_id: str, receipt_id: str, paid_at: str) -> None:
        tx.execute("UPDATE x402_quotes SET status = ?, receipt_id = ?, paid_at = ? WHERE id = ?",
                   (QuoteStatus.PAID, receipt_id, paid_at, quote_id))

    def sweep_quotes(self, tx: Tx, expired_before: int) -> int:
        return int(tx.execute(  # rows another instance's sweep is deleting are skipped, not waited for
            "DELETE FROM x402_quotes WHERE id IN (SELECT id FROM x402_quotes WHERE status = ? AND expires_at < ?"
            f"{self.dialect.skip_locked})", (QuoteStatus.OPEN, expired_before)).rowcount)

    def payment_used(self, tx: Tx, network: str, asset: str, payer: str, nonce: str, tx_hash: str | None,
                     payment_intent: str | None) -> bool:
        keys = [f"x402:nonce:{network}:{asset}:{payer}:{nonce}"]
        if tx_hash is not None:
            keys.append(f"x402:tx:{tx_hash}")
        if payment_intent is not None:
            keys.append(f"x402:pi:{payment_intent}")
        # Every key, in one order for every transaction (fewer deadlocks); then the read, in a later statement
        # (under READ COMMITTED each statement sees what committed before it began: the first payer's receipt).
        self.dialect.lock(tx, *sorted(keys))
        return tx.execute(
            "SELECT 1 FROM x402_receipts WHERE (network = ? AND asset = ? AND payer = ? AND nonce = ?) "
            "OR tx_hash = ? OR payment_intent = ?", (network, asset, payer, nonce, tx_hash, payment_intent)
        ).fetchone() is not None

    def nonce_used(self, network: str, asset: str, payer: str, nonce: str) -> bool:
        return self._core.query_one(
            "SELECT 1 FROM x402_receipts WHERE network = ? AND asset = ? AND payer = ? AND nonce = ?",
            (network, asset, payer, nonce)) is not None

    def payment_intent_used(self, payment_intent: str) -> bool:
        return self._core.query_one("SELECT 1 FROM x402_receipts WHERE payment_intent = ?",
                                    (payment_intent,)) is not None

    def record_receipt(self, tx: Tx, receipt: ReceiptRecord) -> None:
        """`ON CONFLICT DO NOTHING` (on PostgreSQL it waits for a concurrent insert of the same keys to commit or roll
        back), then, if nothing was inserted, which key the stored receipts hold: the transaction stays usable, and
        the quote's key is named before the payment's."""
        inserted = tx.execute(
            "INSERT INTO x402_receipts (id, quote_id, network, asset, payer, pay_to, amount, nonce, tx_hash, "
            "agent_id, luc_credited, created_at, payment_intent, mode, x402_version, settlement) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (receipt.id, receipt.quote_id, receipt.network, receipt.asset, receipt.payer, receipt.pay_to,
             receipt.amount, receipt.nonce, receipt.tx_hash, receipt.agent_id, receipt.luc_credited,
             receipt.created_at, receipt.payment_intent, receipt.mode, receipt.x402_version,
             receipt.settlement)).rowcount
        if inserted == 1:
            return
        quote_paid = receipt.quote_id is not None and tx.execute(
            "SELECT 1 FROM x402_receipts WHERE quote_id = ?", (receipt.quote_id,)).fetchone() is not None
        raise ReceiptConflict("quote" if quote_paid else "payment")

    def recent_receipts(self, limit: int) -> list[ReceiptRecord]:
        rows = self._core.query(f"SELECT {', '.join(_RECEIPT_COLUMNS)} FROM x402_receipts "
                                "ORDER BY created_at DESC, id DESC LIMIT ?", (limit,))
        return [ReceiptRecord(**row) for row in rows]

    def payer_links(self, address: str, agent_id: str | None) -> list[PayerLink]:
        rows = self._core.query("SELECT address, agent_id FROM x402_payers WHERE address = ? OR agent_id = ?",
                                (address, agent_id))
        return [PayerLink(row["address"], row["agent_id"]) for row in rows]

    def payers_of(self, tx: Tx, agent_id: str) -> list[str]:
        self.dialect.lock(tx, f"x402:payers:{agent_id}")
        return [r[0] for r in tx.execute(
            "SELECT address FROM x402_payers WHERE agent_id = ? ORDER BY created_at, address", (agent_id,))]

    def register_payer(self, tx: Tx, address: str, agent_id: str, created_at: str) -> bool:
        return bool(tx.execute("INSERT INTO x402_payers (address, agent_id, created_at) VALUES (?, ?, ?) "
                               "ON CONFLICT DO NOTHING", (address, agent_id, created_at)).rowcount == 1)

    def wallet_exists(self, agent_id: str) -> bool:
        return self._core.query_one("SELECT 1 FROM agent_wallets WHERE agent_id = ?", (agent_id,)) is not None


class PostgresX402Store(SqliteX402Store):
    """PostgreSQL: the same statements (store/postgres_sql.py), with the locks the module docstring names."""

    dialect = PostgresDialect
