"""The storage package: the only code that opens the database or runs SQL.

`core` holds the connections, the numbered migrations and the one writer (group commit); the other modules hold
one aggregate's operations each, as a `Protocol` (the seam a second backend implements) with its SQLite
implementation beside it.
"""

from pathlib import Path
from typing import Any

from .acp import AcpStore, SqliteAcpStore
from .audit import AuditStore, SqliteAuditStore
from .commerce import CommerceStore, SqliteCommerceStore
from .connect import ConnectStore, SqliteConnectStore
from .core import (
    BUSY_TIMEOUT_MS,
    DEFER_SECONDS,
    MAX_BATCH,
    MIGRATIONS,
    SCHEMA_VERSION,
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
    schema_version,
    settle,
    utc_iso,
    utc_now,
)
from .idempotency import IdempotencyStore, SqliteIdempotencyStore
from .ledger import LedgerStore, SqliteLedgerStore
from .metering import MeteringStore, SqliteMeteringStore
from .postgres_core import PostgresCore
from .prepaid import PrepaidStore, SqlitePrepaidStore
from .webhooks import PostgresWebhooksStore, SqliteWebhooksStore, WebhooksStore
from .x402 import SqliteX402Store, X402Store

__all__ = [
    "BUSY_TIMEOUT_MS", "DEFER_SECONDS", "MAX_BATCH", "MIGRATIONS", "SCHEMA_VERSION", "PostgresCore",
    "PostgresStore", "Store", "StoreCore", "StoreUnavailable", "Tx", "Writer", "check_database_file", "connect",
    "dumps", "load_migrations", "migrate", "monotonic_ms", "new_id", "schema_version", "settle", "utc_iso",
    "utc_now",
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
        self.connect: ConnectStore = SqliteConnectStore(self)


class PostgresStore(PostgresCore):
    """The PostgreSQL store (issue 15): the same aggregates over one database shared by every instance. Aggregates
    gain their PostgreSQL implementation one by one; each is tested by its contract tests on both backends."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.webhooks: WebhooksStore = PostgresWebhooksStore(self)
