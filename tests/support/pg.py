"""A throwaway PostgreSQL cluster for tests and benchmarks: Debian's server binaries (`pg_config --bindir`), a data
directory and socket in a temporary directory, a free loopback port, stopped and deleted afterwards.

`initdb` refuses to run as root, so as root every server program runs as the `postgres` user (`runuser`), which
then owns the directory. Readiness is `pg_isready -t`, which blocks until the server accepts connections.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any


def bindir() -> Path | None:
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Everything a test could change in a database's schema, as text: relations (tables, views, sequences, ...) and their
# columns (type, nullability, default), indexes, constraints, triggers, functions, schemas, and the migrations
# recorded. Read from the catalogs themselves rather than information_schema's views: half the time (~7 ms against
# ~14 ms) on the fresh session that empties a finished test's database, whose caches are cold
_NOT_OURS = "('pg_catalog'::regnamespace, 'information_schema'::regnamespace, 'pg_toast'::regnamespace)"
_SCHEMA = f"""
SELECT string_agg(part, E'\\n' ORDER BY part) FROM (
    SELECT format('column %s.%s %s %s %s', a.attrelid::regclass, a.attname, format_type(a.atttypid, a.atttypmod),
                  a.attnotnull, pg_get_expr(d.adbin, d.adrelid)) AS part
      FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE c.relnamespace NOT IN {_NOT_OURS} AND c.relkind IN ('r', 'v', 'm', 'f', 'p') AND a.attnum > 0
       AND NOT a.attisdropped
    UNION ALL SELECT format('relation %s %s', oid::regclass, relkind) FROM pg_class
     WHERE relnamespace NOT IN {_NOT_OURS}
    UNION ALL SELECT 'index ' || pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
     WHERE c.relnamespace NOT IN {_NOT_OURS}
    UNION ALL SELECT format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
      FROM pg_constraint WHERE connamespace <> 'pg_catalog'::regnamespace
    UNION ALL SELECT format('trigger %s %s', tgrelid::regclass, tgname) FROM pg_trigger WHERE NOT tgisinternal
    UNION ALL SELECT 'function ' || oid::regprocedure FROM pg_proc
      WHERE pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
    UNION ALL SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname !~ '^pg_(toast_)?temp_'
    UNION ALL SELECT format('migration %s %s', id, name) FROM migrations
) parts
"""


def _schema_of(conn: Any) -> str:
    return str(conn.execute(_SCHEMA).fetchone()[0])


class Cluster:
    """One PostgreSQL server: `url(db)` for a database in it, `create_database(name)` for a fresh one."""

    def __init__(self, *, fsync: bool = False) -> None:
        found = bindir()
        if found is None:
            raise RuntimeError("PostgreSQL's server binaries are missing: install Debian's `postgresql` package "
                               "(apt-get install -y postgresql); .ci/run does this on a fresh machine")
        self.bin = found
        self.root = Path(tempfile.mkdtemp(prefix="aims-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.port = _free_port()
        self.fsync = fsync
        self.password = "pw-" + os.urandom(6).hex()
        self._as_postgres = os.geteuid() == 0
        self._started = False
        self._template_ready = False
        self._template_schema = ""
        self._given_back: list[str] = []  # emptied, ready for the next test
        self._emptying: list[Future[str | None]] = []  # given back, being emptied in the background
        self._databases = 0  # made from the template and not dropped
        self._janitor: ThreadPoolExecutor | None = None

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        return subprocess.run([*prefix, *args], capture_output=True, text=True, check=True)

    def start(self) -> Cluster:
        self.data.mkdir()
        self.socket_dir.mkdir()
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.data, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        password_file = self.root / "password"
        password_file.write_text(self.password)
        if self._as_postgres:
            shutil.chown(password_file, "postgres")
        # the socket trusts the local user; TCP (what the URLs use) asks for the password, as a real server does, by
        # md5: SCRAM's 4,096 PBKDF2 rounds cost ~5 ms of CPU per connection (client and server), and the suite's
        # PostgreSQL tests open about five connections each on a 2-core machine; the password is checked either way
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "--auth-local=trust",
                  "--auth-host=md5", "-U", "postgres", f"--pwfile={password_file}", "-E", "UTF8",
                  "--no-locale", "--no-sync")
        options = [f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir} -c password_encryption=md5",
                   f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200 -c shared_buffers=64MB"]
        if not self.fsync:
            options.append("-c synchronous_commit=off -c full_page_writes=off")
        try:  # -w: pg_ctl returns once the server accepts connections
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                      "-t", "60", "-o", " ".join(options), "start")
        except subprocess.CalledProcessError as exc:
            log = (self.root / "server.log").read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"the throwaway PostgreSQL did not start: {exc.stderr} {log}") from None
        self._started = True
        # initdb stored the password as SCRAM (its default), with which md5 authentication answers by SCRAM again:
        # stored once more under the server's password_encryption, md5
        self._run(str(self.bin / "psql"), "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres", "-d",
                  "postgres", "-q", "-v", "ON_ERROR_STOP=1", "-c", f"ALTER ROLE postgres PASSWORD '{self.password}'")
        return self

    def url(self, database: str = "postgres", *, user: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://{user}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, *, template: str | None = None) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            copy = f' TEMPLATE "{template}"' if template else ""
            if template and conn.info.server_version >= 150000:
                # the template's files copied whole: ~2.5x faster than PostgreSQL 15's default WAL_LOG (a block at a
                # time through the WAL) for the few MB of a migrated database; its checkpoints are cheap, fsync off
                copy += " STRATEGY FILE_COPY"
            conn.execute(f'CREATE DATABASE "{name}"' + copy)
        return self.url(name)

    def migrated_database(self, name: str) -> str:
        """A database at the code's schema: a copy of one migrated once (copying a template is a file copy, far
        cheaper than running every migration per test)."""
        if not self._template_ready:
            from aims_billing_mcp.store import postgres as pg

            with pg.connect(self.create_database("aims_template")) as conn:
                pg.migrate(conn)
                conn.commit()
                self._template_schema = _schema_of(conn)
            self._template_ready = True
        return self.create_database(name, template="aims_template")

    def fresh_database(self) -> str:
        """An empty database at the code's schema for one test: one a finished test gave back (`give_back`) when
        there is one, else a new copy of the migrated template. Reusing one costs a DELETE instead of a CREATE
        DATABASE (~8 MB of files to copy, and to delete with the cluster). While the previous test's database is
        still being emptied a second one is made: two take turns, each emptied while the next test runs."""
        while not self._given_back and self._emptying and self._databases >= self.ROTATION:
            done, _ = wait(self._emptying, return_when=FIRST_COMPLETED)
            self._collect(done)
        self._collect([future for future in self._emptying if future.done()])
        if self._given_back:
            return self._given_back.pop()
        import uuid

        self._databases += 1
        return self.migrated_database(f"t_{uuid.uuid4().hex[:16]}")

    ROTATION = 2  # databases made at most before a test waits for one to be emptied

    def _collect(self, done: Any) -> None:
        for future in done:
            self._emptying.remove(future)
            emptied = future.result()  # a failure to empty or drop one is the test run's error, not silence
            if emptied is None:
                self._databases -= 1  # dropped
            else:
                self._given_back.append(emptied)

    def give_back(self, url: str) -> None:
        """Hand a finished test's database back to be emptied for a later one, in the background (`_empty`); the
        test's own sessions are closed by then. `stop` waits for every one."""
        if self._janitor is None:
            self._janitor = ThreadPoolExecutor(1, thread_name_prefix="pg-janitor")
        self._emptying.append(self._janitor.submit(self._empty, url))

    def _empty(self, url: str) -> str | None:
        """Empty a finished test's database for the next one (answers its URL), or drop it (answers None): its
        other sessions ended, every table but `migrations` emptied and its identities restarted. One whose schema
        differs from the template's in any way (a test altered it) is dropped instead, and so is one that cannot be
        emptied: no test sees another's leftovers."""
        import psycopg

        name = url.rsplit("/", 1)[1]
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                conn.execute("SET lock_timeout = '10s'")
                if _schema_of(conn) != self._template_schema:
                    raise ValueError("the test changed the schema")
                tables = [row[0] for row in conn.execute(
                    "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                    "WHERE schemaname = 'public' AND tablename <> 'migrations'")]
                with conn.transaction():  # DELETE, not TRUNCATE: a few rows each, and no files made and unlinked
                    conn.execute("SET LOCAL session_replication_role = replica")  # any order: no FK triggers
                    conn.execute("".join(f"DELETE FROM {table};" for table in tables))
                    conn.execute("SELECT setval(format('%I.%I', schemaname, sequencename), start_value, false) "
                                 "FROM pg_sequences WHERE schemaname = 'public'")
            return url
        except (psycopg.Error, ValueError):
            with psycopg.connect(self.url(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return None

    def settle(self) -> None:
        """Wait until every database given back is emptied (ready for a test, the last given back handed out
        first) or dropped."""
        wait(self._emptying)
        self._collect(list(self._emptying))

    def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.shutdown(wait=True)
            self._janitor = None
        if self._started:  # fast shutdown: open connections are closed, not waited for
            subprocess.run([*(["runuser", "-u", "postgres", "--"] if self._as_postgres else []),
                            str(self.bin / "pg_ctl"), "-D", str(self.data), "stop", "-m", "fast", "-w"],
                           capture_output=True, check=False)
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)
