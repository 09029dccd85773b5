"""PostgreSQL: opening a database named by `AIMS_BILLING_DATABASE_URL`, its numbered migrations, and the checks a
server makes before it serves (issue 15).

Why its own migration files: the two dialects agree on almost everything but not on types (SQLite's INTEGER is
64-bit, PostgreSQL's is 32, so money and counters are BIGINT here) and a few functions, so `migrations/postgres/`
holds one file per SQLite migration, with the same number and name; a test applies both histories and compares
the resulting tables, columns, primary keys and UNIQUE constraints.

Why an advisory lock around migrating: several instances start at once against one database; the first migrates,
the others wait for it and then find nothing to do, instead of racing to create the same tables.

psycopg is imported inside the functions: it is the optional `postgres` extra, and the embedded SQLite default
must not need it.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from .core import MIGRATIONS, _statements, utc_now

if TYPE_CHECKING:
    import psycopg

URL_SETTING = "AIMS_BILLING_DATABASE_URL"
CONNECT_TIMEOUT_S = 5
MIGRATION_LOCK = 0x41494D53  # "AIMS": the advisory lock every migrating instance takes


class PostgresUnavailable(Exception):
    """The database cannot be used: one line naming the host (the password masked) and the fix; `exit_code` 2 when
    the fix is the configuration (a wrong URL, password, database or schema), 1 when it is the machine."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and urlsplit(str(url)).scheme in ("postgresql", "postgres")


def mask_url(url: str) -> str:
    """The URL with its password replaced by `***`, for messages and `doctor`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, parts.fragment))


def describe_target(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "the local socket"
    port = parts.port or 5432
    database = parts.path.lstrip("/") or parts.username or "postgres"
    return f"database {database!r} on {host}:{port}"


# --- migrations -------------------------------------------------------------------------------------------------


def load_postgres_migrations() -> list[tuple[int, str, str]]:
    """The PostgreSQL history: one file per SQLite migration, same number and name, nothing more or less."""
    folder = resources.files("aims_billing_mcp") / "migrations" / "postgres"
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2).replace("_", " "), entry.read_text(encoding="utf-8")))
    found.sort()
    expected = [(number, name) for number, name, _ in MIGRATIONS]
    if [(number, name) for number, name, _ in found] != expected:
        raise RuntimeError(f"migrations/postgres must mirror migrations/ one to one: found "
                           f"{[n for n, _, _ in found]}, expected {[n for n, _ in expected]}")
    return found


POSTGRES_MIGRATIONS = load_postgres_migrations()
SCHEMA_VERSION = POSTGRES_MIGRATIONS[-1][0]


def connect(url: str, **options: Any) -> psycopg.Connection[Any]:
    """An autocommit connection (transactions are explicit), or PostgresUnavailable naming the host and the fix."""
    import psycopg

    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **options)
    except psycopg.OperationalError as exc:
        raise explain(url, exc) from None


def explain(url: str, exc: Exception) -> PostgresUnavailable:
    """One line for a connection failure: what was tried (password masked), why, and the fix."""
    target = f"{URL_SETTING}={mask_url(url)} ({describe_target(url)})"
    text = " ".join(str(exc).split())[:300] or type(exc).__name__  # psycopg's lines, as one
    text = text.replace(urlsplit(url).password or "\0", "***")
    lowered = text.lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return PostgresUnavailable(f"{target}: the server refused the user name or password ({text}): fix the "
                                   "credentials in the URL", exit_code=2)
    if "does not exist" in lowered and "database" in lowered:
        return PostgresUnavailable(f"{target}: {text}: create it (`createdb`) or name an existing database in the "
                                   "URL", exit_code=2)
    if "role" in lowered and "does not exist" in lowered:
        return PostgresUnavailable(f"{target}: {text}: create the role or fix the user name in the URL",
                                   exit_code=2)
    if "invalid" in lowered and ("dsn" in lowered or "uri" in lowered or "connection option" in lowered):
        return PostgresUnavailable(f"{target}: not a valid connection URL ({text}): use "
                                   "postgresql://user:password@host:5432/database", exit_code=2)
    return PostgresUnavailable(f"{target} cannot be reached ({text}): check that the server is running and the "
                               "host and port are right, or unset the URL to use the embedded SQLite database",
                               exit_code=1)


def schema_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT to_regclass('migrations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    found = conn.execute("SELECT MAX(id) FROM migrations").fetchone()
    return int(found[0] or 0) if found else 0


def foreign_tables(conn: psycopg.Connection[Any]) -> list[str]:
    """Tables in the connection's schema that are not ours: a database another product uses."""
    ours = {"migrations"} | _our_tables()
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
        "AND table_type = 'BASE TABLE' ORDER BY table_name").fetchall()
    return [name for (name,) in rows if name not in ours]


def _our_tables() -> set[str]:
    names: set[str] = set()
    for _, _, sql in POSTGRES_MIGRATIONS:
        names.update(re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", sql))
        names.update(re.findall(r"RENAME TO (\w+)", sql))
    return names


def migrate(conn: psycopg.Connection[Any], upto: int | None = None) -> list[int]:
    """Apply every migration not yet recorded, each in its own transaction with its record, under the migration
    lock (so instances starting together apply each once); return those applied here."""
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        current = schema_version(conn)
        if current == 0:
            strangers = foreign_tables(conn)
            if strangers:
                raise PostgresUnavailable(
                    f"the database already holds tables that are not aims-billing-mcp's ({', '.join(strangers[:5])}"
                    f"{' ...' if len(strangers) > 5 else ''}) and no migrations record: point "
                    f"{URL_SETTING} at an empty database of its own (`createdb aims_billing`)", exit_code=2)
        applied = []
        for number, name, sql in POSTGRES_MIGRATIONS:
            if number <= current or (upto is not None and number > upto):
                continue
            with conn.transaction():
                conn.execute("CREATE TABLE IF NOT EXISTS migrations (id BIGINT PRIMARY KEY, name TEXT NOT NULL, "
                             "applied_at TEXT)")
                for statement in _statements(sql):
                    conn.execute(statement.encode())  # bytes: no placeholders to parse in DDL
                conn.execute("INSERT INTO migrations (id, name, applied_at) VALUES (%s, %s, %s)",
                             (number, name, utc_now()))
            applied.append(number)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def check_schema(conn: psycopg.Connection[Any], url: str) -> int:
    """The schema version, if it is exactly the code's; otherwise PostgresUnavailable with the fix (`serve` never
    runs on a schema older or newer than its code)."""
    version = schema_version(conn)
    target = f"{URL_SETTING}={mask_url(url)}"
    if version == 0 and foreign_tables(conn):
        raise PostgresUnavailable(f"{target} holds another product's tables and no aims-billing-mcp schema: point "
                                  "it at an empty database of its own", exit_code=2)
    if version < SCHEMA_VERSION:
        raise PostgresUnavailable(f"{target} is at schema version {version}, this code needs {SCHEMA_VERSION}: run "
                                  "`aims-billing-mcp migrate` (once, from any instance) and start again", exit_code=2)
    if version > SCHEMA_VERSION:
        raise PostgresUnavailable(f"{target} is at schema version {version}, newer than this code's "
                                  f"{SCHEMA_VERSION}: another instance runs a newer release; upgrade this one",
                                  exit_code=2)
    return version


def server_version(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"
