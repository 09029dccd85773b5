"""The storage package: the only code that opens the database or runs SQL.

`core` holds the connections, the numbered migrations and the one writer (group commit); the other modules hold
one aggregate's operations each, as a `Protocol` (the seam a second backend implements) with its SQLite
implementation beside it.
"""

from .core import (
    BUSY_TIMEOUT_MS,
    DEFER_SECONDS,
    MAX_BATCH,
    MIGRATIONS,
    SCHEMA_VERSION,
    Store,
    StoreUnavailable,
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

__all__ = [
    "BUSY_TIMEOUT_MS", "DEFER_SECONDS", "MAX_BATCH", "MIGRATIONS", "SCHEMA_VERSION", "Store", "StoreUnavailable",
    "Writer", "check_database_file", "connect", "dumps", "load_migrations", "migrate", "monotonic_ms", "new_id",
    "schema_version", "settle", "utc_iso", "utc_now",
]
