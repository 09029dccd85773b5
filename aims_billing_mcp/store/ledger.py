"""Agent wallets, their double-entry postings, holds and the per-owner request keys (ledger_requests).

`LedgerStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteLedgerStore` is the SQLite implementation; `PostgresLedgerStore` the PostgreSQL one,
for several instances on one database (its docstring: READ COMMITTED with row locks, and why). The rules (what
may be debited, what a hold's capture posts, what a key replays) stay in `services/ledger.py`; this module only
reads and writes rows, and checks nothing a service should decide, except that a hold leaves `active` only once
(`TRANSITIONS`).

Hold statuses in SQL: a status *written* is bound (`SET status = ?`); a status *filtered on* is a literal formatted
from `HoldStatus` when the module loads, because `ledger_holds`' partial indexes filter on `status = 'active'`, and
a parameter compared with such a column makes SQLite re-plan the statement at every execution (3.6 times slower,
measured on the expired-holds lookup every write to a wallet with holds makes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, NamedTuple, Protocol

from pydantic import BaseModel, Field

from ..errors import InvalidState
from .core import StoreCore, Tx
from .postgres_core import WROTE
from .postgres_sql import array_columns, array_literal

TxnKind = Literal["credit", "debit", "transfer", "hold", "capture", "release", "expire"]
KINDS: tuple[TxnKind, ...] = ("credit", "debit", "transfer", "hold", "capture", "release", "expire")


class HoldStatus(StrEnum):
    """A hold's state (`ledger_holds.status`): active until captured, released or expired, each at most once."""

    ACTIVE = "active"
    CAPTURED = "captured"
    RELEASED = "released"
    EXPIRED = "expired"


TRANSITIONS: dict[HoldStatus, frozenset[HoldStatus]] = {
    HoldStatus.ACTIVE: frozenset({HoldStatus.CAPTURED, HoldStatus.RELEASED, HoldStatus.EXPIRED}),
    HoldStatus.CAPTURED: frozenset(),
    HoldStatus.RELEASED: frozenset(),
    HoldStatus.EXPIRED: frozenset(),
}

_ACTIVE = f"'{HoldStatus.ACTIVE}'"  # the SQL literals for filters (see the module docstring)
_CAPTURED = f"'{HoldStatus.CAPTURED}'"


# --- what crosses the seam --------------------------------------------------------------------------------------


class HoldView(BaseModel):
    hold_id: str
    amount: int
    expires_at: str
    created_at: str


class LedgerEntry(BaseModel):
    """One wallet's side of a transaction."""

    entry_id: int = Field(description="position in the ledger; cursors and ordering use it")
    txn_id: str
    kind: TxnKind
    amount: int = Field(description="signed change to the balance (negative: LUC left the wallet)")
    held_change: int = Field(description="signed change to the held amount (holds and their resolution)")
    balance_after: int
    counterparty: str = Field(description="the other account: system:issuance, system:revenue or agent:<id>")
    hold_id: str | None = None
    reason: str | None = None
    reference: str | None = None
    created_at: str


class LedgerViolation(BaseModel):
    rule: str = Field(description="which invariant is broken, e.g. txn_unbalanced, balance_mismatch")
    subject: str = Field(description="the transaction, wallet, hold or key concerned")
    detail: str


class ExpiredHold(NamedTuple):
    hold_id: str
    amount: int


@dataclass(slots=True)
class WalletState:
    """A wallet as a write job sees it: loaded by `load_wallet`, changed by the job, written by `save_wallet`.
    Mutable on purpose: it is the job's working copy, never shared. `held` already leaves out the holds in
    `expired` (found expired by `load_wallet`, still `active` in the database until the job writes them down)."""

    id: str
    agent_id: str
    customer_id: str
    balance: int
    held: int
    daily_cap: int | None
    frozen: bool
    spend_day: int
    spent_today: int
    loaded_balance: int = 0  # the balance in the database when loaded (what an expiry entry's balance_after says)
    expired: list[ExpiredHold] = field(default_factory=list)

    @property
    def account(self) -> str:
        return f"agent:{self.agent_id}"

    @property
    def available(self) -> int:
        return self.balance - self.held

    def spent_on(self, day: int) -> int:
        return self.spent_today if self.spend_day == day else 0


# One side of a transaction: (account, wallet id or None for a system account, posted change, change to the held
# amount, the wallet's balance after it or None for a system account). A plain tuple, not a NamedTuple: building
# two NamedTuples costs 3% of a debit job.
Entry = tuple[str, str | None, int, int, int | None]


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """A ledger request already taken: the hash of its arguments and its first result (JSON text)."""

    request_hash: str
    response: str


@dataclass(frozen=True, slots=True)
class HoldRow:
    """A hold with the agent whose wallet it is on."""

    amount: int
    status: HoldStatus
    captured: int
    expires_at: str
    resolved_at: str | None
    agent_id: str


@dataclass(frozen=True, slots=True)
class WalletSnapshot:
    """A wallet read in one snapshot with its unexpired active holds (by expiry, then id) and its latest entries
    (newest first)."""

    id: str
    agent_id: str
    customer_id: str
    balance: int
    daily_cap: int | None
    frozen: bool
    spend_day: int
    spent_today: int
    created_at: str
    updated_at: str
    holds: list[HoldView]
    recent: list[LedgerEntry]


# --- the seam ---------------------------------------------------------------------------------------------------


class LedgerStore(Protocol):
    """The ledger operations every backend provides. Times are the store's UTC ISO text (`utc_iso`)."""

    # requests (idempotency), in the job's transaction
    def find_request(self, tx: Tx, owner: str, operation: str, key: str) -> StoredRequest | None:
        """The request taken under (owner, operation, key), or None; keys of other owners or operations never match."""
        ...

    def record_request(self, tx: Tx, owner: str, operation: str, key: str, request_hash: str, response: str,
                       txn_id: str | None, now_iso: str) -> None:
        """Record a request with its first result; raises the backend's integrity error if (owner, operation, key)
        exists (callers look first with find_request, in the same transaction)."""
        ...

    # wallets, in the job's transaction
    def wallet_owner(self, tx: Tx, agent_id: str) -> str | None:
        """The customer owning the agent's wallet, or None if the agent has none."""
        ...

    def count_wallets(self, tx: Tx, customer_id: str) -> int:
        """How many wallets the customer owns."""
        ...

    def create_wallet(self, tx: Tx, wallet_id: str, agent_id: str, customer_id: str, daily_cap: int | None,
                      now_iso: str) -> None:
        """A new wallet: balance 0, nothing held, not frozen; raises an integrity error if the agent has one."""
        ...

    def load_wallet(self, tx: Tx, agent_id: str, now_iso: str) -> WalletState | None:
        """The agent's wallet as of this transaction, or None; its active holds expired at `now_iso` are listed in
        `expired` and left out of `held` (nothing is written)."""
        ...

    def save_wallet(self, tx: Tx, wallet: WalletState, now_iso: str) -> None:
        """Write the wallet's balance, held, frozen and spend counters (not its expired holds: see resolve_hold)."""
        ...

    # postings and holds, in the job's transaction
    def post(self, tx: Tx, txn_id: str, kind: TxnKind, key: str, reason: str, reference: str | None,
             hold_id: str | None, now_iso: str, first: Entry, second: Entry) -> None:
        """Append a transaction's two entries (0 and 1) under the idempotency key; the caller makes them balance.
        Raises an integrity error if entry 0's account already has a transaction under the key."""
        ...

    def place_hold(self, tx: Tx, hold_id: str, wallet_id: str, amount: int, expires_at: str, txn_id: str,
                   now_iso: str) -> None:
        """A new active hold on the wallet (its entries are posted separately)."""
        ...

    def hold_owner(self, tx: Tx, hold_id: str) -> str | None:
        """The agent whose wallet the hold is on, or None for an unknown hold."""
        ...

    def load_hold(self, tx: Tx, hold_id: str) -> HoldRow | None:
        """The hold and its wallet's agent, or None for an unknown hold."""
        ...

    def resolve_hold(self, tx: Tx, hold_id: str, status: HoldStatus, txn_id: str, now_iso: str,
                     captured: int = 0) -> None:
        """Move an active hold to `status` (one of TRANSITIONS[active]) by transaction `txn_id`; raises
        InvalidState, writing nothing, if the hold is not active (a hold resolves once) or ValueError for a status
        no active hold moves to."""
        ...

    def expired_hold_wallets(self, tx: Tx, now_iso: str, limit: int) -> list[tuple[str, int]]:
        """Up to `limit` agents whose wallets have active holds expired at `now_iso`, with how many each."""
        ...

    # reads, on the reader (no tx)
    def read_wallet(self, agent_id: str, now_iso: str, recent: int) -> WalletSnapshot | None:
        """The wallet in one snapshot with its holds unexpired at `now_iso` and its `recent` latest entries."""
        ...

    def wallet_id(self, agent_id: str) -> str | None:
        """The id of the agent's wallet, or None."""
        ...

    def wallet_customer(self, agent_id: str) -> str | None:
        """The customer owning the agent's wallet, or None if the agent has none."""
        ...

    def list_entries(self, wallet_id: str, *, kind: TxnKind | None = None, since: str | None = None,
                     until: str | None = None, before: int | None = None, limit: int = 50) -> list[LedgerEntry]:
        """The wallet's entries newest first: of `kind`, created in [since, until), with entry_id < `before`."""
        ...

    def check_ledger(self) -> list[LedgerViolation]:
        """Every invariant over the whole ledger in one consistent snapshot; empty when sound."""
        ...


# --- SQLite -----------------------------------------------------------------------------------------------------

_WALLET_COLUMNS = "id, agent_id, customer_id, balance, held, daily_cap, frozen, spend_day, spent_today"
_LOAD_WALLET = f"SELECT {_WALLET_COLUMNS} FROM agent_wallets WHERE agent_id = ?"
_EXPIRED_HOLDS = (f"SELECT id, amount FROM ledger_holds WHERE wallet_id = ? AND status = {_ACTIVE} "
                  "AND expires_at <= ?")
_SAVE_WALLET = ("UPDATE agent_wallets SET balance = ?, held = ?, frozen = ?, spend_day = ?, spent_today = ?, "
                "updated_at = ? WHERE id = ?")
_ENTRY_INSERT = (
    "INSERT INTO agent_transactions (txn_id, entry, account, wallet_id, kind, amount, pending, balance_after, "
    "idempotency_key, reason, reference, hold_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_FIND_REQUEST = ("SELECT request_hash, response FROM ledger_requests WHERE owner = ? AND operation = ? "
                 "AND idempotency_key = ?")
_RECORD_REQUEST = ("INSERT INTO ledger_requests (owner, operation, idempotency_key, request_hash, response, txn_id, "
                   "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
_ENTRY_JSON = (
    "'entry_id', t.id, 'txn_id', t.txn_id, 'kind', t.kind, 'amount', t.amount, 'held_change', t.pending, "
    "'balance_after', t.balance_after, 'hold_id', t.hold_id, 'reason', t.reason, 'reference', t.reference, "
    "'created_at', t.created_at, 'counterparty', "
    "(SELECT o.account FROM agent_transactions o WHERE o.txn_id = t.txn_id AND o.entry != t.entry)"
)
_READ_WALLET = (
    f"SELECT w.*, "
    f"(SELECT json_group_array(json_object('hold_id', h.id, 'amount', h.amount, 'expires_at', h.expires_at, "
    f"'created_at', h.created_at)) FROM ledger_holds h WHERE h.wallet_id = w.id AND h.status = {_ACTIVE} "
    f"AND h.expires_at > :now) AS holds_json, "
    f"(SELECT json_group_array(json_object({_ENTRY_JSON})) FROM (SELECT * FROM agent_transactions "
    f"WHERE wallet_id = w.id ORDER BY id DESC LIMIT :recent) t) AS recent_json "
    f"FROM agent_wallets w WHERE w.agent_id = :agent"
)


def _entry_filter(mark: str, wallet_id: str, kind: TxnKind | None, since: str | None, until: str | None,
                  before: int | None, limit: int) -> tuple[str, dict[str, Any]]:
    """A wallet's entries filter and its named parameters, `mark` spelling a parameter in the backend's style
    (`:{}` for SQLite, `%({})s` for psycopg); `limit` is among the parameters."""
    wanted = {"wallet": ("wallet_id =", wallet_id), "kind": ("kind =", kind), "since": ("created_at >=", since),
              "until": ("created_at <", until), "cursor": ("id <", before)}
    given = {name: test for name, test in wanted.items() if test[1] is not None}
    where = " AND ".join(f"{column} {mark.format(name)}" for name, (column, _) in given.items())
    return where, {**{name: value for name, (_, value) in given.items()}, "limit": limit}


def _snapshot(row: dict[str, Any] | None) -> WalletSnapshot | None:
    """A wallet with its active holds and latest entries, from one row whose holds and entries are JSON (text on
    SQLite, decoded already on PostgreSQL)."""
    if row is None:
        return None
    holds = sorted((HoldView.model_validate(h) for h in _json(row["holds_json"])),
                   key=lambda h: (h.expires_at, h.hold_id))
    entries = sorted((LedgerEntry.model_validate(e) for e in _json(row["recent_json"])), key=lambda e: -e.entry_id)
    return WalletSnapshot(
        id=row["id"], agent_id=row["agent_id"], customer_id=row["customer_id"], balance=row["balance"],
        daily_cap=row["daily_cap"], frozen=bool(row["frozen"]), spend_day=row["spend_day"],
        spent_today=row["spent_today"], created_at=row["created_at"], updated_at=row["updated_at"],
        holds=holds, recent=entries)


class SqliteLedgerStore:
    def __init__(self, core: StoreCore) -> None:
        self._core = core

    # requests
    def find_request(self, tx: Tx, owner: str, operation: str, key: str) -> StoredRequest | None:
        found = tx.execute(_FIND_REQUEST, (owner, operation, key)).fetchone()
        return None if found is None else StoredRequest(found[0], found[1])

    def record_request(self, tx: Tx, owner: str, operation: str, key: str, request_hash: str, response: str,
                       txn_id: str | None, now_iso: str) -> None:
        tx.execute(_RECORD_REQUEST, (owner, operation, key, request_hash, response, txn_id, now_iso))

    # wallets
    def wallet_owner(self, tx: Tx, agent_id: str) -> str | None:
        row = tx.execute("SELECT customer_id FROM agent_wallets WHERE agent_id = ?", (agent_id,)).fetchone()
        return None if row is None else str(row[0])

    def count_wallets(self, tx: Tx, customer_id: str) -> int:
        (count,) = tx.execute("SELECT COUNT(*) FROM agent_wallets WHERE customer_id = ?", (customer_id,)).fetchone()
        return int(count)

    def create_wallet(self, tx: Tx, wallet_id: str, agent_id: str, customer_id: str, daily_cap: int | None,
                      now_iso: str) -> None:
        tx.execute(
            "INSERT INTO agent_wallets (id, agent_id, customer_id, balance, daily_cap, frozen, created_at, "
            "updated_at) VALUES (?, ?, ?, 0, ?, 0, ?, ?)",
            (wallet_id, agent_id, customer_id, daily_cap, now_iso, now_iso),
        )

    def load_wallet(self, tx: Tx, agent_id: str, now_iso: str) -> WalletState | None:
        row = tx.execute(_LOAD_WALLET, (agent_id,)).fetchone()
        if row is None:
            return None
        wallet = WalletState(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), row[7], row[8], row[3])
        if wallet.held:
            wallet.expired = [ExpiredHold(hold_id, amount)
                              for hold_id, amount in tx.execute(_EXPIRED_HOLDS, (wallet.id, now_iso))]
            wallet.held -= sum(hold.amount for hold in wallet.expired)
        return wallet

    def save_wallet(self, tx: Tx, wallet: WalletState, now_iso: str) -> None:
        tx.execute(_SAVE_WALLET, (wallet.balance, wallet.held, int(wallet.frozen), wallet.spend_day,
                                  wallet.spent_today, now_iso, wallet.id))

    # postings and holds
    def post(self, tx: Tx, txn_id: str, kind: TxnKind, key: str, reason: str, reference: str | None,
             hold_id: str | None, now_iso: str, first: Entry, second: Entry) -> None:
        tx.executemany(_ENTRY_INSERT, [
            (txn_id, number, account, wallet_id, kind, amount, pending, after, key, reason, reference, hold_id,
             now_iso)
            for number, (account, wallet_id, amount, pending, after) in enumerate((first, second))
        ])

    def place_hold(self, tx: Tx, hold_id: str, wallet_id: str, amount: int, expires_at: str, txn_id: str,
                   now_iso: str) -> None:
        tx.execute(
            "INSERT INTO ledger_holds (id, wallet_id, amount, status, expires_at, txn_id, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (hold_id, wallet_id, amount, HoldStatus.ACTIVE, expires_at, txn_id, now_iso))

    def hold_owner(self, tx: Tx, hold_id: str) -> str | None:
        row = tx.execute("SELECT w.agent_id FROM ledger_holds h JOIN agent_wallets w ON w.id = h.wallet_id "
                         "WHERE h.id = ?", (hold_id,)).fetchone()
        return None if row is None else str(row[0])

    def load_hold(self, tx: Tx, hold_id: str) -> HoldRow | None:
        row = tx.execute(
            "SELECT h.amount, h.status, h.captured, h.expires_at, h.resolved_at, w.agent_id "
            "FROM ledger_holds h JOIN agent_wallets w ON w.id = h.wallet_id WHERE h.id = ?", (hold_id,)
        ).fetchone()
        return None if row is None else HoldRow(row[0], HoldStatus(row[1]), row[2], row[3], row[4], row[5])

    def resolve_hold(self, tx: Tx, hold_id: str, status: HoldStatus, txn_id: str, now_iso: str,
                     captured: int = 0) -> None:
        if status not in TRANSITIONS[HoldStatus.ACTIVE]:
            raise ValueError(f"a hold cannot move from {HoldStatus.ACTIVE} to {status}")
        changed = tx.execute(
            "UPDATE ledger_holds SET status = ?, captured = ?, resolved_txn_id = ?, resolved_at = ? "
            f"WHERE id = ? AND status = {_ACTIVE}", (status, captured, txn_id, now_iso, hold_id)).rowcount
        if changed != 1:
            row = tx.execute("SELECT status FROM ledger_holds WHERE id = ?", (hold_id,)).fetchone()
            now = "unknown" if row is None else f"already {row[0]}"
            raise InvalidState(f"hold {hold_id} cannot become {status}: it is {now}; a hold resolves once",
                               param="hold_id")

    def expired_hold_wallets(self, tx: Tx, now_iso: str, limit: int) -> list[tuple[str, int]]:
        return [(str(agent_id), int(count)) for agent_id, count in tx.execute(
            "SELECT w.agent_id, COUNT(*) FROM ledger_holds h JOIN agent_wallets w ON w.id = h.wallet_id "
            f"WHERE h.status = {_ACTIVE} AND h.expires_at <= ? GROUP BY w.agent_id LIMIT ?", (now_iso, limit))]

    # reads
    def read_wallet(self, agent_id: str, now_iso: str, recent: int) -> WalletSnapshot | None:
        return _snapshot(self._core.query_one(_READ_WALLET, {"now": now_iso, "recent": recent, "agent": agent_id}))

    def wallet_id(self, agent_id: str) -> str | None:
        row = self._core.query_one("SELECT id FROM agent_wallets WHERE agent_id = ?", (agent_id,))
        return None if row is None else str(row["id"])

    def wallet_customer(self, agent_id: str) -> str | None:
        row = self._core.query_one("SELECT customer_id FROM agent_wallets WHERE agent_id = ?", (agent_id,))
        return None if row is None else str(row["customer_id"])

    def list_entries(self, wallet_id: str, *, kind: TxnKind | None = None, since: str | None = None,
                     until: str | None = None, before: int | None = None, limit: int = 50) -> list[LedgerEntry]:
        where, params = _entry_filter(":{}", wallet_id, kind, since, until, before, limit)
        rows = self._core.query(
            f"SELECT json_object({_ENTRY_JSON}) AS entry FROM agent_transactions t WHERE {where} "
            "ORDER BY id DESC LIMIT :limit", params)
        return [LedgerEntry.model_validate_json(r["entry"]) for r in rows]

    def check_ledger(self) -> list[LedgerViolation]:
        rows = self._core.query(_CHECKS)
        return [LedgerViolation(rule=r["rule"], subject=str(r["subject"]), detail=r["detail"]) for r in rows]


def _checks(day_start: Callable[[str], str]) -> str:
    """Every ledger invariant as one compound statement, so every rule sees the same snapshot even while writers
    commit; one text for both backends (portable SQL: CAST, substr, aliased subqueries, no parameters) but the
    ISO timestamp of a spend day's midnight, which `day_start(days since the epoch)` writes in the backend's own
    date functions."""
    return f"""
SELECT 'txn_unbalanced' AS rule, txn_id AS subject,
       'entries sum to ' || SUM(amount) || ' posted and ' || SUM(pending) || ' held over ' || COUNT(*) || ' rows'
       AS detail
  FROM agent_transactions GROUP BY txn_id HAVING SUM(amount) != 0 OR SUM(pending) != 0 OR COUNT(*) < 2
UNION ALL
SELECT 'balance_mismatch', w.agent_id, 'balance ' || w.balance || ' but its entries sum to ' || COALESCE(s.total, 0)
  FROM agent_wallets w LEFT JOIN (SELECT wallet_id, SUM(amount) AS total, SUM(pending) AS held
                                    FROM agent_transactions WHERE wallet_id IS NOT NULL GROUP BY wallet_id) s
    ON s.wallet_id = w.id WHERE w.balance != COALESCE(s.total, 0)
UNION ALL
SELECT 'held_mismatch', w.agent_id, 'held ' || w.held || ' but its entries hold ' || COALESCE(s.held, 0)
       || ' and its active holds ' || COALESCE(a.active, 0)
  FROM agent_wallets w
  LEFT JOIN (SELECT wallet_id, SUM(pending) AS held FROM agent_transactions WHERE wallet_id IS NOT NULL
              GROUP BY wallet_id) s ON s.wallet_id = w.id
  LEFT JOIN (SELECT wallet_id, SUM(amount) AS active FROM ledger_holds WHERE status = {_ACTIVE}
              GROUP BY wallet_id) a ON a.wallet_id = w.id
 WHERE w.held != COALESCE(s.held, 0) OR w.held != COALESCE(a.active, 0)
UNION ALL
SELECT 'balance_after_mismatch', txn_id, 'entry ' || id || ' says balance_after '
       || COALESCE(CAST(balance_after AS TEXT), 'null') || ' but the running sum is ' || running
  FROM (SELECT id, txn_id, balance_after,
               SUM(amount) OVER (PARTITION BY wallet_id ORDER BY id) AS running
          FROM agent_transactions WHERE wallet_id IS NOT NULL) r
 WHERE balance_after IS NULL OR balance_after != running
UNION ALL
SELECT 'negative_balance', agent_id, 'balance ' || balance || ', held ' || held || ', available ' || (balance - held)
  FROM agent_wallets WHERE balance < 0 OR held < 0 OR balance - held < 0
UNION ALL
SELECT 'negative_balance', txn_id, 'entry ' || id || ' left balance_after ' || balance_after
  FROM agent_transactions WHERE balance_after < 0
UNION ALL
SELECT 'account_mismatch', t.txn_id, 'entry ' || t.id || ' is on ' || t.account || ' with wallet '
       || COALESCE(t.wallet_id, 'null')
  FROM agent_transactions t LEFT JOIN agent_wallets w ON w.id = t.wallet_id
 WHERE (t.wallet_id IS NULL AND substr(t.account, 1, 7) != 'system:')
    OR (t.wallet_id IS NOT NULL AND (w.id IS NULL OR t.account != 'agent:' || w.agent_id OR t.balance_after IS NULL))
UNION ALL
SELECT 'hold_resolved_twice', hold_id, COUNT(DISTINCT txn_id) || ' resolutions'
  FROM agent_transactions WHERE hold_id IS NOT NULL AND kind IN ('capture', 'release', 'expire')
 GROUP BY hold_id HAVING COUNT(DISTINCT txn_id) > 1
UNION ALL
SELECT 'hold_state_mismatch', h.id, 'status ' || h.status || ' with '
       || (SELECT COUNT(DISTINCT txn_id) FROM agent_transactions t
            WHERE t.hold_id = h.id AND t.kind IN ('capture', 'release', 'expire')) || ' resolution(s)'
  FROM ledger_holds h
 WHERE (h.status = {_ACTIVE}) = EXISTS (SELECT 1 FROM agent_transactions t
                                         WHERE t.hold_id = h.id AND t.kind IN ('capture', 'release', 'expire'))
    OR (h.status = {_CAPTURED}) != EXISTS (SELECT 1 FROM agent_transactions t
                                            WHERE t.txn_id = h.resolved_txn_id AND t.kind = 'capture'
                                              AND t.wallet_id = h.wallet_id AND -t.amount = h.captured)
UNION ALL
SELECT 'idempotency_key_reused', account || ' ' || idempotency_key,
       COUNT(DISTINCT txn_id) || ' transactions under one key of one wallet'
  FROM agent_transactions WHERE idempotency_key IS NOT NULL AND entry = 0
 GROUP BY account, idempotency_key HAVING COUNT(DISTINCT txn_id) > 1
UNION ALL
SELECT 'idempotency_key_reused', txn_id, COUNT(*) || ' requests claim one transaction'
  FROM ledger_requests WHERE txn_id IS NOT NULL GROUP BY txn_id HAVING COUNT(*) > 1
UNION ALL
SELECT 'acknowledged_txn_missing', r.owner || ' ' || r.operation || ':' || r.idempotency_key,
       'request names ' || r.txn_id || ', which has no entries'
  FROM ledger_requests r
 WHERE r.txn_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM agent_transactions t WHERE t.txn_id = r.txn_id)
UNION ALL
SELECT 'spent_today_mismatch', agent_id, 'spent_today ' || spent_today || ' but outgoing entries that day sum to '
       || counted
  FROM (SELECT w.agent_id, w.spent_today,
               COALESCE((SELECT -SUM(t.amount) FROM agent_transactions t
                          WHERE t.wallet_id = w.id AND t.amount < 0
                            AND t.created_at >= {day_start("w.spend_day")}
                            AND t.created_at < {day_start("(w.spend_day + 1)")}), 0) AS counted
          FROM agent_wallets w WHERE w.spend_day > 0) d
 WHERE spent_today != counted
"""


_CHECKS = _checks(lambda days: f"strftime('%Y-%m-%dT%H:%M:%S.000Z', {days} * 86400, 'unixepoch')")


# --- PostgreSQL -------------------------------------------------------------------------------------------------

_PG_LOAD_WALLET = f"SELECT {_WALLET_COLUMNS} FROM agent_wallets WHERE agent_id = %s FOR UPDATE"
_PG_EXPIRED_HOLDS = _EXPIRED_HOLDS.replace("?", "%s") + " ORDER BY expires_at, id"
_PG_SAVE_WALLET = _SAVE_WALLET.replace("?", "%s")
_PG_ENTRY_INSERT = (
    "INSERT INTO agent_transactions (txn_id, entry, account, wallet_id, kind, amount, pending, balance_after, "
    "idempotency_key, reason, reference, hold_id, created_at) VALUES "
    "(%s, 0, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s), (%s, 1, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_PG_FIND_REQUEST = _FIND_REQUEST.replace("?", "%s")
_PG_RECORD_REQUEST = _RECORD_REQUEST.replace("?", "%s")
_PG_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 7))"
_READ_AHEAD = "ledger.wallet"  # the key of find_request's read-ahead wallet row in the writer job's scratch dict
_BATCH = "ledger.batch"  # the key of a trusted batch's _LedgerBatch in the writer's scratch dict
# The request keys' locks (taken first: the subquery is a one-time filter, run before the scan, whether or not a
# wallet matches), then the owners' wallets locked in agent order; one statement, since a locked row is re-read at
# its newest after a wait. The keys' stored results are looked up in the next statement, on a snapshot taken after
# both. A wallet created while the statement waited is not among its rows (its snapshot is older): `load_wallet`
# then reads that one itself, FOR UPDATE.
_PG_LOCK_KEYS_AND_WALLETS = (
    f"SELECT {_WALLET_COLUMNS} FROM agent_wallets WHERE agent_id = ANY(%s::text[]) AND (SELECT "
    "count(pg_advisory_xact_lock(hashtextextended(k, 7))) FROM unnest(%s::text[]) AS k) >= 0 ORDER BY agent_id "
    "FOR UPDATE")
_PG_FIND_REQUESTS = (
    "SELECT r.owner, r.operation, r.idempotency_key, r.request_hash, r.response FROM ledger_requests r "
    "JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k(owner, operation, idempotency_key) "
    "ON r.owner = k.owner AND r.operation = k.operation AND r.idempotency_key = k.idempotency_key")
# A batch's kept writes as one statement (data-modifying CTEs, each run once): the wallets' UPDATE, the entries'
# INSERT (unnest keeps the arrays' order, so ids follow the order the jobs posted in) and the request keys' INSERT.
# One statement instead of three: psycopg's Python work per statement was most of a small transaction's CPU.
_PG_WRITE_BEHIND = (
    "WITH saved AS (UPDATE agent_wallets AS w SET balance = v.balance, held = v.held, frozen = v.frozen, "
    "spend_day = v.spend_day, spent_today = v.spent_today, updated_at = v.updated_at FROM unnest(%s::bigint[], "
    "%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::text[]) AS v(balance, held, frozen, "
    "spend_day, spent_today, updated_at, id) WHERE w.id = v.id), "
    "posted AS (INSERT INTO agent_transactions (txn_id, entry, account, wallet_id, kind, amount, pending, "
    "balance_after, idempotency_key, reason, reference, hold_id, created_at) SELECT * FROM unnest(%s::text[], "
    "%s::bigint[], %s::text[], %s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::text[], "
    "%s::text[], %s::text[], %s::text[], %s::text[])), "
    "recorded AS (INSERT INTO ledger_requests (owner, operation, idempotency_key, request_hash, response, txn_id, "
    "created_at) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], "
    "%s::text[])) "
    "SELECT 1")


def _request_lock(owner: str, operation: str, key: str) -> str:
    return f"ledger-request\x1f{owner}\x1f{operation}\x1f{key}"


@dataclass(slots=True)
class _LedgerBatch:
    """A trusted batch's ledger rows (postgres_core.PostgresWriter._trusted_batch): what `read_ahead` read for every
    job at once (request keys locked and looked up, the owners' wallets locked), kept current as the jobs write,
    and the writes the jobs made, sent by `write_behind` as one statement."""

    tx: Any
    requests: dict[tuple[str, str, str], StoredRequest | None]
    wallets: dict[str, tuple[Any, ...]]
    saves: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    entries: list[tuple[Any, ...]] = field(default_factory=list)
    new_requests: list[tuple[Any, ...]] = field(default_factory=list)
_PG_ENTRY_JSON = (
    "'entry_id', t.id, 'txn_id', t.txn_id, 'kind', t.kind, 'amount', t.amount, 'held_change', t.pending, "
    "'balance_after', t.balance_after, 'hold_id', t.hold_id, 'reason', t.reason, 'reference', t.reference, "
    "'created_at', t.created_at, 'counterparty', "
    "(SELECT o.account FROM agent_transactions o WHERE o.txn_id = t.txn_id AND o.entry != t.entry)"
)
_PG_READ_WALLET = (
    f"SELECT w.*, "
    f"(SELECT COALESCE(json_agg(json_build_object('hold_id', h.id, 'amount', h.amount, 'expires_at', h.expires_at, "
    f"'created_at', h.created_at)), '[]'::json) FROM ledger_holds h WHERE h.wallet_id = w.id AND h.status = {_ACTIVE} "
    f"AND h.expires_at > %(now)s) AS holds_json, "
    f"(SELECT COALESCE(json_agg(json_build_object({_PG_ENTRY_JSON})), '[]'::json) FROM (SELECT * FROM "
    f"agent_transactions WHERE wallet_id = w.id ORDER BY id DESC LIMIT %(recent)s) t) AS recent_json "
    f"FROM agent_wallets w WHERE w.agent_id = %(agent)s"
)


def _json(value: Any) -> Any:
    """JSON as text (SQLite's json_object) is parsed here; psycopg parses `json` columns already."""
    return json.loads(value) if isinstance(value, str) else value


class PostgresLedgerStore(SqliteLedgerStore):
    """PostgreSQL, shared by several instances, each with several writer threads: no single writer orders the jobs
    any more, so each job locks what it reads and then changes, in the writer's READ COMMITTED transaction.

    Why READ COMMITTED with row locks, not SERIALIZABLE: every ledger job is a read-decide-write on one or two
    wallet rows, so locking those rows (`load_wallet`: `SELECT ... FOR UPDATE`; `load_hold`: the hold and its
    wallet) makes two jobs on one wallet take turns, and the second reads the first's committed result (under READ
    COMMITTED a locking read returns the row's newest version, and each later statement sees every commit before
    it). Nothing is ever refused for being concurrent, only queued; under SERIALIZABLE, two batches touching one hot
    wallet would fail to serialize and be redone whole, wasting the work of every other job in the batch (and
    SERIALIZABLE's predicate locks cost on every read). What row locks cost instead: two batches locking wallets in
    opposite orders deadlock; PostgreSQL aborts one and the core retries its batch (`postgres_core`).

    Where no row exists yet, a transaction-scoped advisory lock stands in: on (owner, operation, key) in
    `find_request`, so the same idempotency key presented to two instances at once runs once and the second finds
    the first's stored result (the replay) instead of a UNIQUE violation; on the agent in `wallet_owner` and on the
    customer in `count_wallets`, so two instances cannot open one agent's wallet twice or a customer's wallets past
    its limit. The UNIQUE keys (request keys, entry-0 keys per account) stay as the last line.

    Background work: expired holds are written down by whichever job or sweep next locks the wallet; two instances
    sweeping at once take turns on each wallet, and the second finds the holds already expired (they are re-read
    after the lock), so each expiry is recorded once. No lease is needed.

    Round trips: the writer runs ledger jobs (trusted, pipelined: services/ledger.py's `_job`) as trusted batches
    (postgres_core). `read_ahead` takes, for every job of the batch at once, the keys' advisory locks (sorted) and
    the owners' wallets `FOR UPDATE` (in agent order, the order the jobs run in) in one statement, then the keys'
    stored results in a second; the jobs then find those rows in the batch (`_LedgerBatch`, kept current by their
    own writes), and their wallet updates, entries and request rows are sent by `write_behind` as one statement.
    Any other read first sends the writes kept so far (`_flush`), so it sees them. Outside a batch (a savepoint per
    job) `find_request` reads the owner's wallet `FOR UPDATE` in its own round trip, for the job's `load_wallet`.

    `check_ledger` is one statement, hence one snapshot, as on SQLite."""

    _core: Any  # a PostgresCore: its writer's scratch and batch hooks

    def __init__(self, core: Any) -> None:
        self._core = core
        if hasattr(core, "add_batch_hook"):
            core.add_batch_hook(self)

    # trusted batches (postgres_core): read ahead for every job, write behind them
    def read_ahead(self, tx: Any, requests: list[tuple[str, str, str]]) -> None:
        """Before a trusted batch's jobs run: every request key's lock (sorted), every owner's wallet locked (in
        agent order, as `_lock_order` runs the jobs), then every key's stored result, on a snapshot taken after the
        locks; queued with BEGIN, one round trip. The jobs then find these rows in the batch instead of asking."""
        keys = sorted(set(requests))
        owners = sorted({owner for owner, _, _ in keys})
        batch = _LedgerBatch(tx, dict.fromkeys(keys), {})
        self._core.scratch()[_BATCH] = batch
        if not keys:
            return
        wallets = tx.execute(_PG_LOCK_KEYS_AND_WALLETS, (array_literal(owners),
                                                         array_literal(sorted({_request_lock(*k) for k in keys}))))
        found = tx.execute(_PG_FIND_REQUESTS, array_columns(keys, 3))
        for row in wallets.fetchall():
            batch.wallets[row[1]] = row
        for owner, operation, key, request_hash, response in found.fetchall():
            batch.requests[(owner, operation, key)] = StoredRequest(request_hash, response)

    def write_behind(self, tx: Any) -> None:
        """After a trusted batch's jobs: their writes kept in the batch, one statement, queued (they go
        with COMMIT)."""
        batch = self._core.scratch().pop(_BATCH, None)
        if batch is not None:
            self._flush(tx, batch)

    def _batch(self, tx: Any) -> _LedgerBatch | None:
        batch: _LedgerBatch | None = self._core.scratch().get(_BATCH)
        return batch if batch is not None and batch.tx is tx else None

    def _wrote(self) -> _LedgerBatch | None:
        scratch = self._core.scratch()
        scratch[WROTE] = True
        batch: _LedgerBatch | None = scratch.get(_BATCH)
        return batch

    def _flush(self, tx: Any, batch: _LedgerBatch | None = None) -> None:
        """Send the batch's kept writes now (queued): before a statement that reads what they change."""
        batch = batch or self._batch(tx)
        if batch is None:
            return
        if batch.saves or batch.entries or batch.new_requests:
            tx.execute(_PG_WRITE_BEHIND, (*array_columns(list(batch.saves.values()), 7),
                                          *array_columns(batch.entries, 13), *array_columns(batch.new_requests, 7)))
            batch.saves, batch.entries, batch.new_requests = {}, [], []

    # requests
    def find_request(self, tx: Any, owner: str, operation: str, key: str) -> StoredRequest | None:
        batch = self._batch(tx)
        if batch is not None:
            if (owner, operation, key) in batch.requests:
                return batch.requests[(owner, operation, key)]
            self._flush(tx, batch)
        # One round trip: the key's lock, its lookup (run after the lock is granted, on a new snapshot), and the
        # owner's wallet locked and read ahead for this job's load_wallet (the wallet every ledger operation locks
        # first; a replay leaves it unread, holding its lock until COMMIT a moment later).
        with tx.pipeline():
            tx.execute(_PG_LOCK, (_request_lock(owner, operation, key),))
            cursor = tx.execute(_PG_FIND_REQUEST, (owner, operation, key))
            wallet = tx.execute(_PG_LOAD_WALLET, (owner,))
        found = cursor.fetchone()
        self._core.scratch()[_READ_AHEAD] = (tx, owner, wallet.fetchone())
        return None if found is None else StoredRequest(found[0], found[1])

    def record_request(self, tx: Any, owner: str, operation: str, key: str, request_hash: str, response: str,
                       txn_id: str | None, now_iso: str) -> None:
        batch = self._wrote()
        if batch is not None and batch.tx is tx:
            batch.new_requests.append((owner, operation, key, request_hash, response, txn_id, now_iso))
            batch.requests[(owner, operation, key)] = StoredRequest(request_hash, response)
            return
        tx.execute(_PG_RECORD_REQUEST, (owner, operation, key, request_hash, response, txn_id, now_iso))

    # wallets
    def wallet_owner(self, tx: Any, agent_id: str) -> str | None:
        self._flush(tx)
        tx.execute(_PG_LOCK, (f"ledger-wallet\x1f{agent_id}",))
        row = tx.execute("SELECT customer_id FROM agent_wallets WHERE agent_id = %s", (agent_id,)).fetchone()
        return None if row is None else str(row[0])

    def count_wallets(self, tx: Any, customer_id: str) -> int:
        self._flush(tx)
        tx.execute(_PG_LOCK, (f"ledger-customer\x1f{customer_id}",))
        (count,) = tx.execute("SELECT COUNT(*) FROM agent_wallets WHERE customer_id = %s", (customer_id,)).fetchone()
        return int(count)

    def create_wallet(self, tx: Any, wallet_id: str, agent_id: str, customer_id: str, daily_cap: int | None,
                      now_iso: str) -> None:
        self._wrote()
        tx.execute(
            "INSERT INTO agent_wallets (id, agent_id, customer_id, balance, daily_cap, frozen, created_at, "
            "updated_at) VALUES (%s, %s, %s, 0, %s, 0, %s, %s)",
            (wallet_id, agent_id, customer_id, daily_cap, now_iso, now_iso),
        )

    def load_wallet(self, tx: Any, agent_id: str, now_iso: str) -> WalletState | None:
        batch = self._batch(tx)
        ahead = self._core.scratch().pop(_READ_AHEAD, None)
        if batch is not None and agent_id in batch.wallets:  # locked by read_ahead, kept current by save_wallet
            row = batch.wallets[agent_id]
        elif ahead is not None and ahead[0] is tx and ahead[1] == agent_id:  # read by find_request, locked since
            row = ahead[2]
        else:
            self._flush(tx, batch)
            row = tx.execute(_PG_LOAD_WALLET, (agent_id,)).fetchone()
        if row is None:
            return None
        wallet = WalletState(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), row[7], row[8], row[3])
        if wallet.held:
            wallet.expired = [ExpiredHold(hold_id, amount)
                              for hold_id, amount in tx.execute(_PG_EXPIRED_HOLDS, (wallet.id, now_iso))]
            wallet.held -= sum(hold.amount for hold in wallet.expired)
        return wallet

    def save_wallet(self, tx: Any, wallet: WalletState, now_iso: str) -> None:
        batch = self._wrote()
        values = (wallet.balance, wallet.held, int(wallet.frozen), wallet.spend_day, wallet.spent_today, now_iso)
        if batch is not None and batch.tx is tx:
            if wallet.id in batch.saves:  # each state the wallet passes through meets the schema's CHECKs: the
                self._flush(tx, batch)    # earlier one goes first, in its own statement (queued, no round trip)
            batch.saves[wallet.id] = (*values, wallet.id)
            batch.wallets[wallet.agent_id] = (wallet.id, wallet.agent_id, wallet.customer_id, wallet.balance,
                                              wallet.held, wallet.daily_cap, int(wallet.frozen), wallet.spend_day,
                                              wallet.spent_today)
            return
        tx.execute(_PG_SAVE_WALLET, (*values, wallet.id))

    # postings and holds
    def post(self, tx: Any, txn_id: str, kind: TxnKind, key: str, reason: str, reference: str | None,
             hold_id: str | None, now_iso: str, first: Entry, second: Entry) -> None:
        batch = self._wrote()
        if batch is not None and batch.tx is tx:
            batch.entries += [(txn_id, number, account, wallet_id, kind, amount, pending, after, key, reason,
                               reference, hold_id, now_iso)
                              for number, (account, wallet_id, amount, pending, after) in enumerate((first, second))]
            return
        params: list[Any] = []
        for account, wallet_id, amount, pending, after in (first, second):
            params += [txn_id, account, wallet_id, kind, amount, pending, after, key, reason, reference, hold_id,
                       now_iso]
        tx.execute(_PG_ENTRY_INSERT, params)  # one statement, one round trip

    def place_hold(self, tx: Any, hold_id: str, wallet_id: str, amount: int, expires_at: str, txn_id: str,
                   now_iso: str) -> None:
        self._wrote()
        tx.execute(
            "INSERT INTO ledger_holds (id, wallet_id, amount, status, expires_at, txn_id, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (hold_id, wallet_id, amount, str(HoldStatus.ACTIVE), expires_at, txn_id, now_iso))

    def hold_owner(self, tx: Any, hold_id: str) -> str | None:
        self._flush(tx)
        row = tx.execute("SELECT w.agent_id FROM ledger_holds h JOIN agent_wallets w ON w.id = h.wallet_id "
                         "WHERE h.id = %s", (hold_id,)).fetchone()
        return None if row is None else str(row[0])

    def load_hold(self, tx: Any, hold_id: str) -> HoldRow | None:
        self._flush(tx)
        row = tx.execute(  # the hold and its wallet locked: both are re-read at their newest after a wait
            "SELECT h.amount, h.status, h.captured, h.expires_at, h.resolved_at, w.agent_id "
            "FROM ledger_holds h JOIN agent_wallets w ON w.id = h.wallet_id WHERE h.id = %s FOR UPDATE", (hold_id,)
        ).fetchone()
        return None if row is None else HoldRow(row[0], HoldStatus(row[1]), row[2], row[3], row[4], row[5])

    def resolve_hold(self, tx: Any, hold_id: str, status: HoldStatus, txn_id: str, now_iso: str,
                     captured: int = 0) -> None:
        if status not in TRANSITIONS[HoldStatus.ACTIVE]:
            raise ValueError(f"a hold cannot move from {HoldStatus.ACTIVE} to {status}")
        self._wrote()
        changed = tx.execute(  # RETURNING, fetched: the count is known in pipeline mode too (rowcount is not)
            "UPDATE ledger_holds SET status = %s, captured = %s, resolved_txn_id = %s, resolved_at = %s "
            f"WHERE id = %s AND status = {_ACTIVE} RETURNING id", (str(status), captured, txn_id, now_iso, hold_id)
        ).fetchall()
        if len(changed) != 1:
            row = tx.execute("SELECT status FROM ledger_holds WHERE id = %s", (hold_id,)).fetchone()
            now = "unknown" if row is None else f"already {row[0]}"
            raise InvalidState(f"hold {hold_id} cannot become {status}: it is {now}; a hold resolves once",
                               param="hold_id")

    def expired_hold_wallets(self, tx: Any, now_iso: str, limit: int) -> list[tuple[str, int]]:
        self._flush(tx)
        return [(str(agent_id), int(count)) for agent_id, count in tx.execute(
            "SELECT w.agent_id, COUNT(*) FROM ledger_holds h JOIN agent_wallets w ON w.id = h.wallet_id "
            f"WHERE h.status = {_ACTIVE} AND h.expires_at <= %s GROUP BY w.agent_id ORDER BY w.agent_id LIMIT %s",
            (now_iso, limit))]

    # reads
    def read_wallet(self, agent_id: str, now_iso: str, recent: int) -> WalletSnapshot | None:
        return _snapshot(self._core.query_one(_PG_READ_WALLET, {"now": now_iso, "recent": recent, "agent": agent_id}))

    def list_entries(self, wallet_id: str, *, kind: TxnKind | None = None, since: str | None = None,
                     until: str | None = None, before: int | None = None, limit: int = 50) -> list[LedgerEntry]:
        where, params = _entry_filter("%({})s", wallet_id, kind, since, until, before, limit)
        rows = self._core.query(
            f"SELECT json_build_object({_PG_ENTRY_JSON}) AS entry FROM agent_transactions t "
            f"WHERE {where} ORDER BY id DESC LIMIT %(limit)s", params)
        return [LedgerEntry.model_validate(_json(r["entry"])) for r in rows]

    def check_ledger(self) -> list[LedgerViolation]:
        rows = self._core.query(_PG_CHECKS)
        return [LedgerViolation(rule=r["rule"], subject=str(r["subject"]), detail=r["detail"]) for r in rows]


_PG_CHECKS = _checks(lambda days: f"to_char(DATE '1970-01-01' + {days}::int, 'YYYY-MM-DD') || 'T00:00:00.000Z'")
