"""The only code that opens the database: connections, pragmas, numbered migrations, and the one writer.

Why one writer: several SQLite writer connections contending through `busy_timeout` stay correct but their worst
case reaches seconds, which no tool call can afford. So every write is a job handed to one writer thread, which
commits whatever has gathered in one transaction (group commit) and acknowledges each caller only after COMMIT.
Each job runs inside its own SAVEPOINT, so one failing job (a UNIQUE violation, say) rolls back alone and the
rest of the batch still commits. Readers use their own connection; WAL lets them read while the writer writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import queue
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from ..errors import DatabaseBusy

T = TypeVar("T")
Tx = sqlite3.Connection  # what a write job receives: the writer's transaction (services name it, never sqlite3)
Job = Callable[[Tx], T]

BUSY_TIMEOUT_MS = 5000
SQLITE_VERSION = sqlite3.sqlite_version
MAX_BATCH = 256
DEFER_SECONDS = 0.2  # the longest a deferred write (a read-only call's audit row) waits for company
# The writer thread gives up the GIL around every SQLite call and the socket write that wakes the event loop, and
# takes it back after each; while the event loop thread is busy (parsing requests), each take waits for the GIL's
# switch interval, 5 ms by default: a batch of 20 webhook events (100 statements then) spent ~14 ms waiting for ~2 ms
# of work, and every caller of the batch waited with it (a GIL convoy). A writer lowers the interval to this. Not
# lower: since the hot paths write a batch in a few statements (item groups), a shorter interval only splits the
# same callers into more, smaller batches, each handing the GIL back and forth. Measured on 2 cores, interleaved
# runs, 0.5 ms against 2 ms: webhooks 3,100 -> 3,690 events/s (writer CPU 87-130 -> 33-40 us an event), ledger
# 11,400 -> 13,300 debits/s at the same p99 (5.6 / 5.4 ms), metering 31,000 -> 36,000 events/s, stdio tool p99
# 3.15 -> 2.77 ms, usage ingestion and PostgreSQL's p99 within their run-to-run spread.
GIL_SWITCH_SECONDS = 0.002


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds: sorts as text, reads as a time."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"  # strftime's format, a third faster


def utc_iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def broken_unique_key(exc: BaseException) -> str | None:
    """The UNIQUE key a failed write broke, as its backend names it (SQLite: `table.column[, table.column]`,
    PostgreSQL: the constraint, e.g. `webhook_events_pkey`), or None for any other error: one `except` serves both
    backends, and the caller names the key it expects in both spellings."""
    if isinstance(exc, sqlite3.IntegrityError):
        prefix = "UNIQUE constraint failed: "
        text = str(exc)
        return text[len(prefix):] if text.startswith(prefix) else None
    if getattr(exc, "sqlstate", None) == "23505":  # psycopg's UniqueViolation (psycopg is imported only for it)
        return str(exc.diag.constraint_name)  # type: ignore[attr-defined]
    return None


def refused_write(exc: BaseException) -> bool:
    """Whether `exc` is the database refusing a write (SQLite's or PostgreSQL's errors, or DatabaseBusy), after which
    the job's transaction rolled back: nothing of it was stored, and the caller may send it again."""
    return (isinstance(exc, sqlite3.Error | DatabaseBusy)
            or type(exc).__module__.partition(".")[0] == "psycopg")  # psycopg is imported only with PostgreSQL


# --- migrations -------------------------------------------------------------------------------------------------
# Numbered SQL files in `migrations/` (NNNN_name.sql). Never edit a shipped one: add the next number.
# Tables follow design.md §3.


def load_migrations() -> list[tuple[int, str, str]]:
    folder = resources.files("aims_billing_mcp") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2).replace("_", " "), entry.read_text(encoding="utf-8")))
    found.sort()
    numbers = [number for number, _, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {numbers}")
    return found


MIGRATIONS = load_migrations()
SCHEMA_VERSION = MIGRATIONS[-1][0]


def connect(path: Path | str) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN ourselves) with the pragmas every connection needs."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA temp_store = MEMORY")  # savepoints (one per write job) cost a third as much
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'migrations'").fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT MAX(id) FROM migrations").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, upto: int | None = None) -> list[int]:
    """Apply every migration not yet recorded, each in its own transaction with its record; return those applied."""
    conn.execute("CREATE TABLE IF NOT EXISTS migrations (id INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT)")
    applied = []
    current = schema_version(conn)
    for number, name, sql in MIGRATIONS:
        if number <= current or (upto is not None and number > upto):
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO migrations (id, name, applied_at) VALUES (?, ?, ?)", (number, name, utc_now()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(number)
    return applied


def _statements(sql: str) -> Iterable[str]:
    """Split a migration file into statements: `;` at a line end closes one; `--` lines are comments."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return (s.strip() for s in "\n".join(lines).split(";\n") if s.strip().rstrip(";"))


# --- the writer -------------------------------------------------------------------------------------------------


class _WriteJob:
    """One write and how its caller hears the outcome: an asyncio future resolved on the caller's loop (the async
    path: no thread-safe Future and no wrap_future chain per write), or a concurrent Future (sync callers).

    A job is one of three kinds. A plain job runs in its own SAVEPOINT, so its failure undoes it alone. A *trusted*
    job (`savepoint=False`) promises to make every check before its first write, so a refusal has nothing to undo
    and the savepoint (which costs about as much as a small write: SQLite copies every page the job touches to a
    statement journal) is skipped; should a trusted job fail after writing, the writer undoes the whole batch and
    runs it again with a savepoint per job. An *item* (`group` set) is one element for a batch function: the items
    of one group in one batch are handed to it together (one SELECT for all, one executemany), inside one
    savepoint, where the first of them stood in the batch, and it answers one outcome per item; the items of an
    `in_order` group keep their place among the batch's other jobs instead: each run of consecutive items is one
    call, where the run stood (an event applied after the jobs that arrived before it). Should the batch function
    raise, its savepoint is undone and it is called again for each item alone, so an item that breaks it (a
    constraint its multi-row write hits) fails alone instead of failing, delivery after delivery, whichever items
    happened to share its batch."""

    __slots__ = ("fn", "future", "group", "in_order", "loop", "trusted", "waiter")

    def __init__(self, fn: Any, loop: asyncio.AbstractEventLoop | None = None, *, trusted: bool = False,
                 group: Callable[[sqlite3.Connection, list[Any]], list[Any]] | None = None,
                 in_order: bool = False) -> None:
        self.fn = fn
        self.loop = loop
        self.trusted = trusted
        self.group = group
        self.in_order = in_order
        self.waiter: asyncio.Future[Any] | None = loop.create_future() if loop is not None else None
        self.future: Future[Any] | None = None if loop is not None else Future()


def new_id(prefix: str) -> str:
    """Time-ordered (microseconds, then 48 random bits): new rows land at the right edge of the UNIQUE indexes on
    ids instead of on a random page each, which keeps each group commit to a few dirty pages."""
    return f"{prefix}_{time.time_ns() // 1000:013x}{os.urandom(6).hex()}"


def settle(waiter: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Answer a caller's future with a write's outcome, on the caller's loop."""
    if waiter.done():  # the caller was cancelled; the write itself stands
        return
    if error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(result)


def _settle_all(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for waiter, result, error in outcomes:
        settle(waiter, result, error)


_STOP = object()
_FLUSH = object()
Outcome = tuple[_WriteJob, Any, "BaseException | None"]


class _Redo(Exception):
    """A trusted job failed after it wrote: the batch is undone and run again, a savepoint per job."""


class BatchingWriter:
    """Writer threads fed by one queue: each takes whatever has gathered (up to MAX_BATCH jobs) and commits it in one
    transaction (group commit), answering each caller only after COMMIT. What a transaction is belongs to the
    backend (`_commit`): SQLite has one writer thread, PostgreSQL several."""

    name = "aims-billing-writer"

    def __init__(self, threads: int = 1) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._deferred: list[_WriteJob] = []
        self._deferred_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"{self.name}-{n}", daemon=True)
                         for n in range(threads)]
        self.batches = 0

    def _start(self) -> None:
        if sys.getswitchinterval() > GIL_SWITCH_SECONDS:  # see GIL_SWITCH_SECONDS: process-wide, never raised
            sys.setswitchinterval(GIL_SWITCH_SECONDS)
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[[Any], T]) -> Future[T]:
        job = _WriteJob(fn)
        self._queue.put(job)
        assert job.future is not None
        return job.future

    def submit_async(self, fn: Callable[[Any], T], *, trusted: bool = False) -> asyncio.Future[T]:
        job = _WriteJob(fn, asyncio.get_running_loop(), trusted=trusted)
        self._queue.put(job)
        assert job.waiter is not None
        return job.waiter

    def submit_item(self, group: Callable[[Any, list[Any]], list[Any]], item: Any, *,
                    in_order: bool = False) -> asyncio.Future[Any]:
        job = _WriteJob(item, asyncio.get_running_loop(), group=group, in_order=in_order)
        self._queue.put(job)
        assert job.waiter is not None
        return job.waiter

    def defer(self, fn: Callable[[Any], T]) -> Future[T]:
        """A write nobody waits for (a read-only call's audit row): it rides along with the next batch, or commits
        on its own within DEFER_SECONDS, so a stream of reads does not pay one commit each."""
        job = _WriteJob(fn)
        with self._deferred_lock:
            self._deferred.append(job)
            full = len(self._deferred) >= MAX_BATCH
        if full:
            self._queue.put(_FLUSH)
        assert job.future is not None
        return job.future

    def _take_deferred(self) -> list[_WriteJob]:
        with self._deferred_lock:
            taken, self._deferred = self._deferred, []
        return taken

    def close(self) -> None:
        alive = [thread for thread in self._threads if thread.is_alive()]
        for _ in alive:
            self._queue.put(_STOP)
        for thread in alive:
            thread.join()
        self._close_connections()

    def _close_connections(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=DEFER_SECONDS)
            except queue.Empty:
                first = _FLUSH
            batch: list[_WriteJob] = []
            item = first
            while True:
                if item is _STOP:
                    stop = True
                    break
                if item is not _FLUSH:
                    batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            batch.extend(self._take_deferred())
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[_WriteJob]) -> None:
        raise NotImplementedError

    @staticmethod
    def _steps(batch: list[_WriteJob]) -> list[_WriteJob | list[_WriteJob]]:
        """The batch in the order it runs: each plain job, and each group's items as one step (see _WriteJob)."""
        steps: list[_WriteJob | list[_WriteJob]] = []
        groups: dict[Any, list[_WriteJob]] = {}
        for job in batch:
            if job.group is None:
                steps.append(job)
            elif job.in_order:
                last = steps[-1] if steps else None
                if isinstance(last, list) and last[0].in_order and last[0].group == job.group:
                    last.append(job)
                else:
                    steps.append([job])
            elif (members := groups.get(job.group)) is not None:
                members.append(job)
            else:
                steps.append(groups.setdefault(job.group, [job]))
        return steps

    @staticmethod
    def _group_outcomes(members: list[_WriteJob], results: list[Any]) -> list[Outcome]:
        if len(results) != len(members):
            raise RuntimeError(f"a batch function answered {len(results)} outcomes for {len(members)} items")
        return [(member, None, result) if isinstance(result, BaseException) else (member, result, None)
                for member, result in zip(members, results, strict=True)]

    @staticmethod
    def _resolve(outcomes: list[Outcome]) -> None:
        """Answer every caller: one wake-up per event loop (not one per job), futures directly."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for job, result, error in outcomes:
            if job.waiter is not None and job.loop is not None:
                by_loop.setdefault(job.loop, []).append((job.waiter, result, error))
            elif job.future is not None:
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(result)
        for loop, answers in by_loop.items():
            # a closed loop means nobody is waiting any more; the writes themselves stand
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle_all, answers)


class Writer(BatchingWriter):
    """SQLite's: one thread, one connection (several writer connections would contend through busy_timeout)."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(threads=1)
        self._conn = connect(path)
        self._start()

    def _close_connections(self) -> None:
        self._conn.close()

    def _commit(self, batch: list[_WriteJob]) -> None:
        conn = self._conn
        try:
            try:
                outcomes = self._transaction(batch, trust=True)
            except _Redo:
                outcomes = self._transaction(batch, trust=False)
            self.batches += 1
        except BaseException as exc:  # the transaction itself failed: nobody's write landed
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(job, None, exc) for job in batch]
        self._resolve(outcomes)

    def _transaction(self, batch: list[_WriteJob], *, trust: bool) -> list[Outcome]:
        conn = self._conn
        outcomes: list[Outcome] = []
        conn.execute("BEGIN IMMEDIATE")
        for job in self._steps(batch):
            if isinstance(job, list):
                outcomes.extend(self._run_group(cast(Callable[..., list[Any]], job[0].group), job))
                continue
            if trust and job.trusted:
                before = conn.total_changes
                try:
                    outcomes.append((job, job.fn(conn), None))
                except BaseException as exc:
                    if conn.total_changes != before:
                        conn.execute("ROLLBACK")
                        raise _Redo from exc
                    outcomes.append((job, None, exc))
                continue
            conn.execute("SAVEPOINT job")
            try:
                result = job.fn(conn)
            except BaseException as exc:  # the job's own failure: undo it alone
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                outcomes.append((job, None, exc))
            else:
                conn.execute("RELEASE job")
                outcomes.append((job, result, None))
        conn.execute("COMMIT")
        return outcomes

    def _run_group(self, group: Callable[[sqlite3.Connection, list[Any]], list[Any]],
                   members: list[_WriteJob]) -> list[Outcome]:
        conn = self._conn
        conn.execute("SAVEPOINT job")
        try:
            outcomes = self._group_outcomes(members, group(conn, [member.fn for member in members]))
        except BaseException as exc:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            if len(members) == 1:
                return [(members[0], None, exc)]
            return [outcome for member in members for outcome in self._run_group(group, [member])]  # see _WriteJob
        conn.execute("RELEASE job")
        return outcomes


# --- multi-row statements ------------------------------------------------------------------------------------

ROWS_PER_STATEMENT = (64, 32, 16, 8, 4, 2, 1)


@functools.cache
def multi_row(sql: str, rows: int) -> str:
    """`sql` (an INSERT of one `VALUES (...)` row, maybe with its ON CONFLICT clause) for `rows` rows."""
    head, _, rest = sql.partition(" VALUES (")
    values, _, tail = rest.partition(")")
    return f"{head} VALUES {', '.join([f'({values})'] * rows)}{tail}"


def insert_rows(tx: Any, sql: str, rows: Sequence[tuple[Any, ...]]) -> int:
    """Write rows by multi-row statements of 64, 32, ... 1 rows (at most 7 statement texts a table, each prepared
    once): each statement is one sqlite3_step, so the writer thread gives the GIL up and takes it back once per
    statement, not once per row as `executemany` does: with the callers parsing their next batches meanwhile, each
    taking back may wait its turn (a profile of bench/ingest.py's service path showed the writer's executemany at
    several times its single-thread time). Answers how many rows were inserted or changed."""
    done, count, changed = 0, len(rows), 0
    for size in ROWS_PER_STATEMENT:
        while count - done >= size:
            changed += tx.execute(multi_row(sql, size), list(chain.from_iterable(rows[done:done + size]))).rowcount
            done += size
    return changed


def in_lists(values: Sequence[Any]) -> Iterator[tuple[str, list[Any]]]:
    """`values` as `IN (...)` lists of at most 64, each padded to a size of ROWS_PER_STATEMENT by repeating its
    last value (which changes no IN's answer): the `?` marks and the parameters of each, so a statement has at
    most 7 texts (the connection's statement cache keeps them prepared) whatever the batch's size."""
    for start in range(0, len(values), ROWS_PER_STATEMENT[0]):
        chunk = list(values[start:start + ROWS_PER_STATEMENT[0]])
        size = next(size for size in reversed(ROWS_PER_STATEMENT) if size >= len(chunk))
        yield ", ".join("?" * size), chunk + [chunk[-1]] * (size - len(chunk))


# --- opening errors ---------------------------------------------------------------------------------------------


class StoreUnavailable(Exception):
    """The database cannot be opened or upgraded: one line naming the path and the fix, and whether the fix is
    the configuration (`exit_code` 2: a path that cannot be a database) or the machine (1: a damaged file, a full
    disk, a lock held too long)."""

    def __init__(self, message: str, *, path: Path, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.exit_code = exit_code

    @classmethod
    def explain(cls, path: Path, exc: OSError | sqlite3.Error, setting: str = "AIMS_BILLING_DB") -> StoreUnavailable:
        where = f"the database {setting}={path}"
        other = f"or set {setting} to another path"
        if isinstance(exc, OSError):  # creating its directory failed
            blocker = next((p for p in (path, *path.parents) if p.is_file()), None)
            if blocker is not None and blocker != path:
                return cls(f"{where} cannot be created: {blocker} is a file, not a directory: set {setting} to a "
                           "file in a directory", path=path, exit_code=2)
            config = isinstance(exc, PermissionError | FileNotFoundError) or exc.errno == 30  # EROFS
            return cls(f"{where} cannot be created: {exc.strerror or exc} ({exc.filename or path.parent}): create "
                       f"the directory with write permission, {other}", path=path, exit_code=2 if config else 1)
        code = getattr(exc, "sqlite_errorcode", None)
        if path.is_dir():
            return cls(f"{where} is a directory: name a file, e.g. {setting}={path / 'aims_billing.db'}",
                       path=path, exit_code=2)
        if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH):
            return cls(f"{where} cannot be opened for writing ({exc}): its directory {path.parent} must be writable "
                       f"(SQLite writes {path.name}-wal beside it) and the file readable and writable; fix the "
                       f"permissions, {other}", path=path, exit_code=2)
        if code == sqlite3.SQLITE_NOTADB:
            return cls(f"{where} is not a SQLite database: point {setting} at the right file, or move this file "
                       "away to start a new one", path=path, exit_code=2)
        if code == sqlite3.SQLITE_CORRUPT:
            return cls(f"{where} is damaged ({exc}; a truncated or partly overwritten file): restore it from a "
                       f"backup, or recover what is left with `sqlite3 {path} .recover`", path=path, exit_code=1)
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return cls(f"{where} stayed locked by another process for {BUSY_TIMEOUT_MS // 1000} s ({exc}): stop "
                       "the process holding it (a long migration or a crashed tool) and start again",
                       path=path, exit_code=1)
        if code == sqlite3.SQLITE_FULL:
            return cls(f"{where} cannot grow: the disk is full ({exc}): free space on it and start again",
                       path=path, exit_code=1)
        return cls(f"{where} could not be opened or upgraded to schema version {SCHEMA_VERSION} "
                   f"({type(exc).__name__}: {exc}): check the file and the disk, {other}", path=path, exit_code=1)


def check_database_file(path: Path, setting: str) -> None:
    """Open (or create) the SQLite file at `path` and read its schema, or raise StoreUnavailable naming `setting`:
    for a database another part opens later (the embedded sandbox's), so a bad path stops start-up, not a call."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(path)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as exc:
        raise StoreUnavailable.explain(path, exc, setting) from exc


# --- the store --------------------------------------------------------------------------------------------------


class SqliteDialect:
    """The clauses a backend with several writers needs and SQLite's one writer does not (PostgresDialect in
    postgres_sql.py): a store written once names them, and on SQLite they are empty."""

    for_update = ""  # a row read in a write job and then changed: no one else writes meanwhile
    skip_locked = ""  # a lease: no other sender takes rows at the same time

    @staticmethod
    def lock(tx: Any, *names: str) -> None:
        """Nothing to wait for: the transaction is the only writer."""


class Reader(Protocol):
    """What an aggregate's store reads committed state through: the SQLite core or the PostgreSQL one (whose store
    inherits the SQLite store's statements, so both take the same `?` texts)."""

    def query(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]: ...

    def query_one(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> dict[str, Any] | None: ...


class StoreCore:
    """Reads on a reader connection in the caller's thread; writes through the one writer. `Store` (the package's)
    adds one object per aggregate with its named operations."""

    def __init__(self, path: Path | str, *, migrate_upto: int | None = None) -> None:
        self.path = Path(path)
        if str(path) == ":memory:":
            raise ValueError("the store needs a file (reader and writer share it); use a temporary file in tests")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            reader = connect(self.path)  # migrates, then reads: a connection's first touch of the file costs 0.4 ms
            try:
                # WAL by pragma rather than sqlite-utils' enable_wal(): importing sqlite-utils costs 20 ms of
                # start-up, and the introspection below (doctor, tests) is the only place it is needed.
                reader.execute("PRAGMA journal_mode = WAL")
                self.applied_migrations = migrate(reader, upto=migrate_upto)
            except BaseException:
                reader.close()
                raise
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable.explain(self.path, exc) from exc
        self._reader = reader
        self._read_lock = threading.Lock()
        self._db: Any = None
        self._writer = Writer(self.path)

    # reads
    def query(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        with self._read_lock:
            return [dict(row) for row in self._reader.execute(sql, params)]  # type: ignore[arg-type]

    def query_one(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @property
    def db(self) -> Any:
        """sqlite-utils' view of the database, for introspection (tables, schema); writes never go through it."""
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self._reader)
        return self._db

    @property
    def schema_version(self) -> int:
        with self._read_lock:
            return schema_version(self._reader)

    def table_names(self) -> list[str]:
        with self._read_lock:
            return self.db.table_names()  # type: ignore[no-any-return]

    # writes
    async def write(self, fn: Callable[[sqlite3.Connection], T], *, savepoint: bool = True) -> T:
        """Run `fn(conn)` in the writer's next transaction; return after COMMIT (or raise what fn raised).

        `savepoint=False` is for a job that makes every check before its first write (see `_WriteJob`)."""
        return await self._writer.submit_async(fn, trusted=not savepoint)

    async def write_item(self, group: Callable[[sqlite3.Connection, list[Any]], list[Any]], item: Any, *,
                         in_order: bool = False) -> Any:
        """Hand `item` to `group(conn, items)` together with every other item of that group in the writer's next
        transaction (`in_order`: with the items next to it, in the order the batch's jobs arrived, see _WriteJob);
        return its outcome after COMMIT (raise it, if the outcome is an exception)."""
        return await self._writer.submit_item(group, item, in_order=in_order)

    def write_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self._writer.submit(fn).result()

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Queue a write without waiting: it commits with the writer's next batch."""
        return self._writer.submit(fn)

    def defer(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Queue a write that may wait up to DEFER_SECONDS to share a commit (see Writer.defer)."""
        return self._writer.defer(fn)

    def close(self) -> None:
        self._writer.close()
        self._reader.close()


def dumps(value: Any) -> str:
    """Canonical JSON: the same value always gives the same text (request hashes depend on it)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def monotonic_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
