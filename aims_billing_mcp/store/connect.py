"""Stripe Connect: creators' connected accounts, plugs (a price sold for a creator) and the split of each sale.

`ConnectStore` is the seam (write operations take the job's `Tx`; reads use the backend's reader);
`SqliteConnectStore` is the SQLite implementation; `PostgresConnectStore` inherits its statements.

Two state machines live here:
- `AccountStatus`, a connected account's ability to receive money, as Stripe's events report it: `onboarding`
  until the creator finished the account link, `active` when its transfers capability is, `restricted` when Stripe
  asks for more afterwards.
- `SplitStatus`, a sale's split: `declared` when a sale of a plug is offered (a checkout session, a payment link),
  `transferred` once the creator's share reached their account (a destination charge transfers with the charge),
  `pending` when the money reached the platform but the transfer to the creator is still to be made (x402).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from .core import Reader, SqliteDialect, Tx, broken_unique_key, utc_now
from .postgres_sql import PostgresDialect


class AccountStatus(StrEnum):
    ONBOARDING = "onboarding"
    ACTIVE = "active"
    RESTRICTED = "restricted"


ACCOUNT_TRANSITIONS: dict[AccountStatus, frozenset[AccountStatus]] = {
    AccountStatus.ONBOARDING: frozenset({AccountStatus.ONBOARDING, AccountStatus.ACTIVE, AccountStatus.RESTRICTED}),
    AccountStatus.ACTIVE: frozenset({AccountStatus.ACTIVE, AccountStatus.RESTRICTED}),
    AccountStatus.RESTRICTED: frozenset({AccountStatus.RESTRICTED, AccountStatus.ACTIVE}),
}
"""Stripe's events move an account between these (an account never goes back to onboarding)."""


class SplitStatus(StrEnum):
    DECLARED = "declared"
    PENDING = "pending"
    TRANSFERRED = "transferred"


SPLIT_TRANSITIONS: dict[SplitStatus, frozenset[SplitStatus]] = {
    SplitStatus.DECLARED: frozenset({SplitStatus.TRANSFERRED, SplitStatus.PENDING}),
    SplitStatus.PENDING: frozenset({SplitStatus.TRANSFERRED}),
    SplitStatus.TRANSFERRED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class ConnectedAccount:
    account_id: str
    email: str | None
    display_name: str
    country: str
    currency: str
    status: AccountStatus
    requirements_due: tuple[str, ...]
    last_event_created: int | None
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class Plug:
    plug_id: str
    name: str
    product_id: str
    price_id: str
    account_id: str
    currency: str
    unit_amount: int
    share_bp: int | None  # the creator's share in basis points, or
    platform_fee: int | None  # the platform's fixed fee per unit
    created_at: str


@dataclass(frozen=True, slots=True)
class Split:
    id: str
    path: str
    sale_ref: str
    plug_id: str
    account_id: str
    currency: str
    gross: int
    platform_fee: int
    creator_amount: int
    status: SplitStatus
    payment_intent: str | None
    transfer_id: str | None
    transfer_group: str | None
    reversed: int
    fee_refunded: int
    refunded: int
    note: str | None
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class Earnings:
    """One creator's sales in one currency (amounts in minor units)."""

    account_id: str
    currency: str
    sales: int
    gross: int
    platform_fees: int
    transferred: int  # creator amounts of transferred splits
    reversed: int
    fee_refunded: int
    pending: int  # creator amounts of splits paid but not transferred yet


class DuplicatePlug(Exception):
    def __init__(self, plug_id: str) -> None:
        super().__init__(f"plug {plug_id} (or its price) is already declared")
        self.plug_id = plug_id


class ConnectStore(Protocol):
    """The Connect operations every backend provides."""

    def add_account(self, tx: Tx, account: ConnectedAccount) -> bool:
        """Record a connected account; False (nothing changed) when its id is already recorded."""

    def set_status(self, tx: Tx, account_id: str, status: AccountStatus, due: tuple[str, ...],
                   event_created: int | None) -> bool:
        """Set the account's status and requirements unless a newer event was applied (`event_created` older than
        the stored one); None (a read of Stripe's current state) always applies. True when it applied."""

    def account(self, account_id: str) -> ConnectedAccount | None:
        """The account as last committed, or None."""

    def accounts(self, status: AccountStatus | None, limit: int) -> list[ConnectedAccount]:
        """Accounts (of one status), newest first."""

    def add_plug(self, tx: Tx, plug: Plug) -> None:
        """Declare a plug; raises DuplicatePlug (writing nothing) when its id or price is declared already."""

    def plug(self, plug_id: str) -> Plug | None:
        """The plug, or None."""

    def plugs_for_prices(self, price_ids: list[str]) -> dict[str, Plug]:
        """The plugs sold by these prices, by price id (prices of no plug are absent)."""

    def plugs(self) -> list[Plug]:
        """Every plug, oldest first."""

    def add_split(self, tx: Tx, split: Split) -> bool:
        """Record a sale's split; False (nothing written) when (path, sale_ref, plug) is recorded already."""

    def splits_of_sale(self, path: str, sale_ref: str) -> list[Split]:
        """The splits of one sale."""

    def splits_of_payment(self, payment_intent: str) -> list[Split]:
        """The splits paid by one PaymentIntent."""

    def load_split(self, tx: Tx, split_id: str) -> Split | None:
        """A split as seen inside the job's transaction."""

    def mark_paid(self, tx: Tx, split_id: str, status: SplitStatus, *, payment_intent: str | None,
                  transfer_group: str | None, transfer_id: str | None) -> bool:
        """Move a split to `status` (an allowed transition from its current one) with its Stripe ids; False when
        it is not in a state that may move there (a duplicate or late event)."""

    def add_refund(self, tx: Tx, split_id: str, refunded: int, reversed_: int, fee_refunded: int) -> bool:
        """Add a refund's amounts; False (nothing written) if the split's refunds would pass its gross."""

    def claim_refund(self, tx: Tx, refund_id: str, payment_intent: str, amount: int, reversed_: int,
                     fee_refunded: int, request_key: str | None) -> bool:
        """Record a Stripe refund of a split sale; False (nothing written) when it is recorded already: its amounts
        are added to the splits only by the caller this returns True to."""

    def refund_of_request(self, request_key: str) -> tuple[str, int, int, int] | None:
        """The refund recorded for refund_split_sale's `request_key`: (refund id, amount, reversed, fee refunded)."""

    def splits(self, account_id: str | None, since: str | None, limit: int) -> list[Split]:
        """Splits (of one account, created since), newest first."""

    def earnings(self, account_id: str | None, since: str | None) -> list[Earnings]:
        """Per account and currency: sales, gross, fees, transferred, reversed, pending (declared ones excluded)."""


ACCOUNT_COLUMNS = ("account_id, email, display_name, country, currency, status, requirements_due, "
                   "last_event_created, created_at, updated_at")
PLUG_COLUMNS = ("plug_id, name, product_id, price_id, account_id, currency, unit_amount, share_bp, platform_fee, "
                "created_at")
SPLIT_COLUMNS = ("id, path, sale_ref, plug_id, account_id, currency, gross, platform_fee, creator_amount, status, "
                 "payment_intent, transfer_id, transfer_group, reversed, fee_refunded, refunded, note, created_at, "
                 "updated_at")


def _account(row: Any) -> ConnectedAccount:
    return ConnectedAccount(row[0], row[1], row[2], row[3], row[4], AccountStatus(row[5]), tuple(json.loads(row[6])),
                            row[7], row[8], row[9])


def _plug(row: Any) -> Plug:
    return Plug(*row)


def _split(row: Any) -> Split:
    values = list(row)
    values[9] = SplitStatus(values[9])
    return Split(*values)


class SqliteConnectStore:
    dialect: type[SqliteDialect | PostgresDialect] = SqliteDialect

    def __init__(self, core: Reader) -> None:
        self._core = core

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return [tuple(row.values()) for row in self._core.query(sql, params)]

    def add_account(self, tx: Tx, account: ConnectedAccount) -> bool:
        cursor = tx.execute(
            f"INSERT INTO connected_accounts ({ACCOUNT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (account_id) DO NOTHING",
            (account.account_id, account.email, account.display_name, account.country, account.currency,
             account.status, json.dumps(list(account.requirements_due)), account.last_event_created,
             account.created_at, account.updated_at))
        return bool(cursor.rowcount == 1)

    def set_status(self, tx: Tx, account_id: str, status: AccountStatus, due: tuple[str, ...],
                   event_created: int | None) -> bool:
        cursor = tx.execute(
            "UPDATE connected_accounts SET status = ?, requirements_due = ?, updated_at = ?, "
            "last_event_created = CASE WHEN CAST(? AS BIGINT) IS NULL THEN last_event_created "
            "WHEN CAST(? AS BIGINT) > COALESCE(last_event_created, 0) THEN CAST(? AS BIGINT) "
            "ELSE COALESCE(last_event_created, 0) END "
            "WHERE account_id = ? AND (CAST(? AS BIGINT) IS NULL OR last_event_created IS NULL "
            "OR last_event_created <= CAST(? AS BIGINT))",
            (status, json.dumps(list(due)), utc_now(), event_created, event_created, event_created, account_id,
             event_created, event_created))
        return bool(cursor.rowcount == 1)

    def account(self, account_id: str) -> ConnectedAccount | None:
        rows = self._rows(f"SELECT {ACCOUNT_COLUMNS} FROM connected_accounts WHERE account_id = ?", (account_id,))
        return _account(rows[0]) if rows else None

    def accounts(self, status: AccountStatus | None, limit: int) -> list[ConnectedAccount]:
        rows = self._rows(
            f"SELECT {ACCOUNT_COLUMNS} FROM connected_accounts WHERE (CAST(? AS TEXT) IS NULL OR status = ?) "
            "ORDER BY created_at DESC, account_id LIMIT ?", (status, status, limit))
        return [_account(row) for row in rows]

    def add_plug(self, tx: Tx, plug: Plug) -> None:
        try:
            tx.execute(f"INSERT INTO plugs ({PLUG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (plug.plug_id, plug.name, plug.product_id, plug.price_id, plug.account_id, plug.currency,
                        plug.unit_amount, plug.share_bp, plug.platform_fee, plug.created_at))
        except Exception as exc:
            if broken_unique_key(exc) is None:
                raise
            raise DuplicatePlug(plug.plug_id) from exc

    def plug(self, plug_id: str) -> Plug | None:
        rows = self._rows(f"SELECT {PLUG_COLUMNS} FROM plugs WHERE plug_id = ?", (plug_id,))
        return _plug(rows[0]) if rows else None

    def plugs_for_prices(self, price_ids: list[str]) -> dict[str, Plug]:
        if not price_ids:
            return {}
        marks = ", ".join("?" for _ in price_ids)
        rows = self._rows(f"SELECT {PLUG_COLUMNS} FROM plugs WHERE price_id IN ({marks})", tuple(price_ids))
        return {plug.price_id: plug for plug in map(_plug, rows)}

    def plugs(self) -> list[Plug]:
        return [_plug(row) for row in self._rows(f"SELECT {PLUG_COLUMNS} FROM plugs ORDER BY created_at", ())]

    def add_split(self, tx: Tx, split: Split) -> bool:
        cursor = tx.execute(
            f"INSERT INTO splits ({SPLIT_COLUMNS}) VALUES ({', '.join('?' * 19)}) "
            "ON CONFLICT (path, sale_ref, plug_id) DO NOTHING",
            (split.id, split.path, split.sale_ref, split.plug_id, split.account_id, split.currency, split.gross,
             split.platform_fee, split.creator_amount, split.status, split.payment_intent, split.transfer_id,
             split.transfer_group, split.reversed, split.fee_refunded, split.refunded, split.note, split.created_at,
             split.updated_at))
        return bool(cursor.rowcount == 1)

    def splits_of_sale(self, path: str, sale_ref: str) -> list[Split]:
        rows = self._rows(f"SELECT {SPLIT_COLUMNS} FROM splits WHERE path = ? AND sale_ref = ? ORDER BY id",
                          (path, sale_ref))
        return [_split(row) for row in rows]

    def splits_of_payment(self, payment_intent: str) -> list[Split]:
        rows = self._rows(f"SELECT {SPLIT_COLUMNS} FROM splits WHERE payment_intent = ? ORDER BY id",
                          (payment_intent,))
        return [_split(row) for row in rows]

    def load_split(self, tx: Tx, split_id: str) -> Split | None:
        row = tx.execute(f"SELECT {SPLIT_COLUMNS} FROM splits WHERE id = ?{self.dialect.for_update}",
                         (split_id,)).fetchone()
        return _split(tuple(row)) if row is not None else None

    def mark_paid(self, tx: Tx, split_id: str, status: SplitStatus, *, payment_intent: str | None,
                  transfer_group: str | None, transfer_id: str | None) -> bool:
        allowed = [state for state, targets in SPLIT_TRANSITIONS.items() if status in targets]
        if not allowed:  # no state moves there: nothing to update (and PostgreSQL refuses an empty IN list)
            return False
        marks = ", ".join("?" for _ in allowed)
        cursor = tx.execute(
            "UPDATE splits SET status = ?, payment_intent = COALESCE(?, payment_intent), "
            "transfer_group = COALESCE(?, transfer_group), transfer_id = COALESCE(?, transfer_id), updated_at = ? "
            f"WHERE id = ? AND status IN ({marks})",
            (status, payment_intent, transfer_group, transfer_id, utc_now(), split_id, *allowed))
        return bool(cursor.rowcount == 1)

    def add_refund(self, tx: Tx, split_id: str, refunded: int, reversed_: int, fee_refunded: int) -> bool:
        cursor = tx.execute(
            "UPDATE splits SET refunded = refunded + ?, reversed = reversed + ?, fee_refunded = fee_refunded + ?, "
            "updated_at = ? WHERE id = ? AND refunded + ? <= gross AND reversed + ? <= creator_amount "
            "AND fee_refunded + ? <= platform_fee",
            (refunded, reversed_, fee_refunded, utc_now(), split_id, refunded, reversed_, fee_refunded))
        return bool(cursor.rowcount == 1)

    def claim_refund(self, tx: Tx, refund_id: str, payment_intent: str, amount: int, reversed_: int,
                     fee_refunded: int, request_key: str | None) -> bool:
        cursor = tx.execute(
            "INSERT INTO split_refunds (refund_id, payment_intent, amount, reversed, fee_refunded, request_key, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (refund_id) DO NOTHING",
            (refund_id, payment_intent, amount, reversed_, fee_refunded, request_key, utc_now()))
        return bool(cursor.rowcount == 1)

    def refund_of_request(self, request_key: str) -> tuple[str, int, int, int] | None:
        rows = self._rows("SELECT refund_id, amount, reversed, fee_refunded FROM split_refunds WHERE request_key = ?",
                          (request_key,))
        return (str(rows[0][0]), int(rows[0][1]), int(rows[0][2]), int(rows[0][3])) if rows else None

    def splits(self, account_id: str | None, since: str | None, limit: int) -> list[Split]:
        rows = self._rows(
            f"SELECT {SPLIT_COLUMNS} FROM splits WHERE (CAST(? AS TEXT) IS NULL OR account_id = ?) "
            "AND (CAST(? AS TEXT) IS NULL OR created_at >= ?) ORDER BY created_at DESC, id LIMIT ?",
            (account_id, account_id, since, since, limit))
        return [_split(row) for row in rows]

    def earnings(self, account_id: str | None, since: str | None) -> list[Earnings]:
        rows = self._rows(
            "SELECT account_id, currency, COUNT(DISTINCT path || ':' || sale_ref) AS sales, "  # a sale, not a line
            "SUM(gross) AS gross, SUM(platform_fee) AS fees, "
            "SUM(CASE WHEN status = ? THEN creator_amount ELSE 0 END) AS transferred, SUM(reversed) AS reversed, "
            "SUM(fee_refunded) AS fee_refunded, SUM(CASE WHEN status = ? THEN creator_amount ELSE 0 END) AS pending "
            "FROM splits "
            "WHERE status != ? AND (CAST(? AS TEXT) IS NULL OR account_id = ?) "
            "AND (CAST(? AS TEXT) IS NULL OR created_at >= ?) "
            "GROUP BY account_id, currency ORDER BY account_id, currency",
            (SplitStatus.TRANSFERRED, SplitStatus.PENDING, SplitStatus.DECLARED, account_id, account_id, since, since))
        return [Earnings(row[0], row[1], int(row[2]), int(row[3]), int(row[4]), int(row[5]), int(row[6]), int(row[7]),
                         int(row[8])) for row in rows]


class PostgresConnectStore(SqliteConnectStore):
    """PostgreSQL: the same statements (store/postgres_sql.py; the NULL tests cast their parameter, as PostgreSQL
    must know its type), and a split read inside a write job locked `FOR UPDATE` (a refund and a transfer of one
    split take turns across instances); every other write is one guarded statement, a compare-and-set at READ
    COMMITTED."""

    dialect = PostgresDialect
