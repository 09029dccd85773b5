"""The storage package: the only code that opens the database or runs SQL.

`core` holds the connections, the numbered migrations and the one writer (group commit); the other modules hold
one aggregate's operations each, as a `Protocol` (the seam a second backend implements) with its SQLite
implementation beside it.
"""

from pathlib import Path
from typing import Any

from .acp import AcpStore, PostgresAcpStore, SqliteAcpStore
from .audit import AuditStore, PostgresAuditStore, SqliteAuditStore
from .commerce import CommerceStore, PostgresCommerceStore, SqliteCommerceStore
from .connect import ConnectStore, PostgresConnectStore, SqliteConnectStore
from .core import (
    BUSY_TIMEOUT_MS,
    DEFER_SECONDS,
    MAX_BATCH,
    MIGRATIONS,
    SCHEMA_VERSION,
    SQLITE_VERSION,
    StoreCore,
    StoreUnavailable,
    Tx,
    Writer,
    check_database_file,
    connect,
    dumps,
    load_migrations,
    migrate,
    monotonic_ms,
    new_id,
    refused_write,
    schema_version,
    settle,
    utc_iso,
    utc_now,
)
from .idempotency import IdempotencyStore, PostgresIdempotencyStore, SqliteIdempotencyStore
from .ledger import LedgerStore, PostgresLedgerStore, SqliteLedgerStore
from .metering import MeteringStore, PostgresMeteringStore, SqliteMeteringStore
from .postgres_core import WRITER_THREADS, PostgresCore
from .prepaid import PostgresPrepaidStore, PrepaidStore, SqlitePrepaidStore
from .reports import PostgresReports, ReportsStore, SqliteReports
from .webhooks import PostgresWebhooksStore, SqliteWebhooksStore, WebhooksStore
from .x402 import PostgresX402Store, SqliteX402Store, X402Store

__all__ = [
    "AGGREGATES", "BUSY_TIMEOUT_MS", "DEFER_SECONDS", "MAX_BATCH", "MIGRATIONS", "SCHEMA_VERSION", "SQLITE_VERSION",
    "PostgresCore", "PostgresStore", "Store", "StoreCore", "StoreUnavailable", "Tx", "Writer",
    "check_database_file", "connect", "dumps", "load_migrations", "migrate", "monotonic_ms",
    "new_id", "open_store", "refused_write", "schema_version", "settle", "utc_iso", "utc_now",
]


class Store(StoreCore):
    """The SQLite store: the core (connections, migrations, the writer) and one object per aggregate."""

    def __init__(self, path: Path | str, *, migrate_upto: int | None = None) -> None:
        super().__init__(path, migrate_upto=migrate_upto)
        self.ledger: LedgerStore = SqliteLedgerStore(self)
        self.metering: MeteringStore = SqliteMeteringStore(self)
        self.idempotency: IdempotencyStore = SqliteIdempotencyStore(self)
        self.audit: AuditStore = SqliteAuditStore(self)
        self.webhooks: WebhooksStore = SqliteWebhooksStore(self)
        self.x402: X402Store = SqliteX402Store(self)
        self.commerce: CommerceStore = SqliteCommerceStore(self)
        self.acp: AcpStore = SqliteAcpStore(self)
        self.prepaid: PrepaidStore = SqlitePrepaidStore(self)
        self.reports: ReportsStore = SqliteReports(self)
        self.connect: ConnectStore = SqliteConnectStore(self)


class PostgresStore(PostgresCore):
    """The PostgreSQL store (issue 15): the same aggregates over one database shared by every instance; each is
    tested by its contract tests on both backends."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.webhooks: WebhooksStore = PostgresWebhooksStore(self)
        self.idempotency: IdempotencyStore = PostgresIdempotencyStore(self)
        self.audit: AuditStore = PostgresAuditStore(self)
        self.x402: X402Store = PostgresX402Store(self)
        self.ledger: LedgerStore = PostgresLedgerStore(self)
        self.reports: ReportsStore = PostgresReports(self)
        self.acp: AcpStore = PostgresAcpStore(self)
        self.metering: MeteringStore = PostgresMeteringStore(self)
        self.commerce: CommerceStore = PostgresCommerceStore(self)
        self.prepaid: PrepaidStore = PostgresPrepaidStore(self)
        self.connect: ConnectStore = PostgresConnectStore(self)


AGGREGATES = ("ledger", "metering", "idempotency", "audit", "webhooks", "x402", "commerce", "acp", "prepaid", "reports",
              "connect")


def open_store(db: Path | str, database_url: str | None = None, *, migrate: bool = False,
               writers: int = WRITER_THREADS) -> Store:
    """The configured backend: PostgreSQL when `database_url` is set (every instance shares it; its schema must be
    the code's, or `migrate` brings it there; `writers` writer connections, AIMS_BILLING_DATABASE_WRITERS), else
    SQLite at `db` (opened and upgraded in place; one writer, always)."""
    if not database_url:
        return Store(db)
    from . import postgres

    if not postgres.is_postgres_url(database_url):
        raise postgres.PostgresUnavailable(
            f"{postgres.URL_SETTING} must be a postgresql:// URL (postgresql://user:password@host:5432/database), "
            f"not {postgres.mask_url(database_url)!r}: fix it, or unset it to use SQLite at AIMS_BILLING_DB",
            exit_code=2)
    store = PostgresStore(database_url, migrate=migrate, writers=writers)
    return store  # type: ignore[return-value]  # the same aggregates and writes: services take either
