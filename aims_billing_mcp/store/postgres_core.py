"""The PostgreSQL store core (issue 15): what `StoreCore` is for SQLite, over a shared database that several
instances write at once.

Why several writer threads, each with its own connection, instead of SQLite's one: PostgreSQL takes concurrent
writers well (row locks, not a file lock), and a commit waits for the WAL flush, so a few transactions in flight
at once are what keeps throughput up. Each thread still commits whatever has gathered in its queue in one
transaction (group commit), a savepoint per job, so one job's failure undoes it alone.

Why retries: correctness comes from the database (UNIQUE keys written in the same transaction as the effect, row
locks taken by the aggregate operations), and under READ COMMITTED with row locks two batches can deadlock (each
locks wallets in its own order) or, under SERIALIZABLE, fail to serialize. PostgreSQL then aborts one transaction
whole; its batch is rolled back and run again, up to MAX_ATTEMPTS with a jittered pause, and then each caller gets
`DatabaseBusy` (retryable, with the same idempotency key). A connection lost mid-commit leaves the outcome unknown
to us: the callers get `DatabaseBusy` and their retry, with the same key, finds the first result if it landed.

Why pipelines and trusted batches (measured in bench/postgres.py): a debit was 8 statements in 7 round trips, and
psycopg's CPU per statement, not PostgreSQL, bounded an instance (about 1 ms of Python per debit). A job that says
it may be pipelined (`fn.pipelined`: it reads results only by fetching them) runs in psycopg's pipeline mode, so its
statements go out together and only a fetch waits. A batch of *trusted* pipelined jobs (each makes every check
before its first write, `savepoint=False`) runs without a savepoint each: the stores' hooks read ahead what every job
of the batch reads first (the ledger: the request keys' locks, the wallets locked in one order, the stored results)
and write behind them (one statement, sent with COMMIT): the whole batch is 2 round trips and 5 statements, whatever
it holds. Should a trusted job fail after it wrote (it set scratch[WROTE]) or a statement fail, the batch is
rolled back and run again with a savepoint per job, so the failure is that job's alone, as SQLite's writer does.

Reads borrow a connection from a pool; an exhausted pool answers `DatabaseBusy` after POOL_WAIT_S, never a hang.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar, cast

from ..errors import DatabaseBusy
from . import postgres as pg
from .core import BatchingWriter, Outcome, _Redo, _WriteJob
from .postgres_sql import PostgresConnection, postgres_sql

T = TypeVar("T")

MAX_ATTEMPTS = 8
WROTE = "wrote"  # the scratch key a store sets when a pipelined job wrote (or queued a write): see _trusted_batch
POOL_WAIT_S = 5.0
# The default of AIMS_BILLING_DATABASE_WRITERS. Two, not more: each writer commits what gathered while the other
# committed, so two keep a commit in flight while the next batch gathers; more writers split the same callers into
# smaller batches (more statements and WAL flushes a write) and, on a small machine, more threads contending for the
# GIL and the cores (bench/postgres.py, 3 instances: 4 writers gathered 6.7 debits a transaction, 2 gathered 11).
WRITER_THREADS = 2


def _retryable() -> tuple[type[BaseException], ...]:
    from psycopg import errors

    return errors.SerializationFailure, errors.DeadlockDetected


def _pipelined(job: _WriteJob) -> bool:
    """A job whose statements may be queued and sent together (psycopg's pipeline mode; the job says so with
    `fn.pipelined`): it reads a statement's result only by fetching it (which sends what is queued and waits for the
    answers), never `rowcount` alone, and uses no COPY. Its writes are then sent with the COMMIT (or with the next
    job's first read), and a failing write raises when they are sent, still inside the job's transaction."""
    return job.group is None and bool(getattr(job.fn, "pipelined", False))


def _operational() -> type[BaseException]:
    from psycopg import OperationalError

    return OperationalError


def _is_database_error(exc: BaseException) -> bool:
    import psycopg

    return isinstance(exc, psycopg.Error)


def _lock_order(job: _WriteJob) -> str:
    """Where a job stands in its batch: jobs naming what they lock first (`fn.lock_order`, e.g. the ledger's wallet
    owner) run in that order, so every batch of every instance takes those row locks in one global order and two
    batches cannot deadlock on them (a deadlock costs `deadlock_timeout`, 1 s by default, and the whole batch)."""
    return str(getattr(job.fn, "lock_order", ""))


class PostgresWriter(BatchingWriter):
    name = "aims-billing-pg-writer"

    def __init__(self, url: str, threads: int = WRITER_THREADS, max_batch: int | None = None) -> None:
        super().__init__(threads=threads)
        self._url = url
        self._max_batch = max_batch
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        self._retryable = _retryable()
        self._passed_on = (*self._retryable, _operational())
        self.retries = 0
        self.redone = 0  # trusted batches redone with a savepoint per job
        self.hooks: list[Any] = []  # the stores' read_ahead(conn, requests) / write_behind(conn), see _trusted_batch
        self._start()

    def scratch(self) -> dict[str, Any]:
        """A dict for the job running on this thread, emptied before each job: where a store keeps what it read
        ahead for the same job (the ledger's wallet row, read in the round trip of the request-key lookup). Outside
        a writer job it is a fresh dict each time, so nothing read ahead is ever used there."""
        found: dict[str, Any] | None = getattr(self._local, "scratch", None)
        return {} if found is None else found

    def _fresh_scratch(self) -> None:
        self._local.scratch = {}

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = PostgresConnection(pg.connect(self._url))  # the stores' `?` texts as psycopg's `%s`
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _close_connections(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    def _commit(self, batch: list[_WriteJob]) -> None:
        """One transaction for the batch, or one per `max_batch` jobs of it: row locks are held until COMMIT, so a
        smaller transaction holds a hot row for less time (the database still groups concurrent commits' WAL
        flushes)."""
        size = self._max_batch or len(batch)
        for start in range(0, len(batch), size):
            self._commit_chunk(batch[start:start + size])

    def _commit_chunk(self, batch: list[_WriteJob]) -> None:
        import psycopg

        outcomes: list[Outcome] | None = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                outcomes = self._transaction(self._connection(), batch)
                self.batches += 1
                break
            except self._retryable:
                with self._lock:
                    self.retries += 1
                time.sleep(random.uniform(0, 0.002 * 2 ** attempt))  # jitter: the other side gets through first
            except (psycopg.OperationalError, pg.PostgresUnavailable) as exc:
                busy = DatabaseBusy(f"the database connection was lost ({type(exc).__name__}); whether this call "
                                    "took effect is unknown: retry it with the same idempotency key")
                outcomes = [(job, None, busy) for job in batch]
                break
            except BaseException as exc:  # the transaction itself failed: nobody's write landed
                outcomes = [(job, None, exc) for job in batch]
                break
        if outcomes is None:
            busy = DatabaseBusy(f"the database kept reporting conflicting concurrent writes ({MAX_ATTEMPTS} attempts):"
                                " retry the call with the same idempotency key")
            outcomes = [(job, None, busy) for job in batch]
        self._resolve(outcomes)

    def _transaction(self, conn: Any, batch: list[_WriteJob]) -> list[Outcome]:
        if len(batch) == 1 and batch[0].group is None:  # the transaction is the job's: no savepoint
            return self._alone(conn, batch[0])
        if all(_pipelined(job) for job in batch):
            return self._pipelined_batch(conn, batch)
        outcomes: list[Outcome] = []
        with conn.transaction():
            for job in self._steps(sorted(batch, key=_lock_order)):
                if isinstance(job, list):
                    outcomes.extend(self._run_group(conn, cast(Callable[..., list[Any]], job[0].group), job))
                    continue
                self._fresh_scratch()
                try:
                    with conn.transaction():  # a savepoint: the job's failure undoes it alone
                        if _pipelined(job):
                            with conn.pipeline():  # its writes go with its last statement, inside the savepoint
                                result = job.fn(conn)
                        else:
                            result = job.fn(conn)
                except self._retryable:
                    raise
                except BaseException as exc:
                    outcomes.append((job, None, exc))
                else:
                    outcomes.append((job, result, None))
        return outcomes

    def _run_group(self, conn: Any, group: Callable[[Any, list[Any]], list[Any]],
                   members: list[_WriteJob]) -> list[Outcome]:
        """One savepoint for the group; should its function raise, each item again alone (see _WriteJob). A
        deadlock or serialization failure aborts the transaction (the batch is run again), and so does a lost
        connection; anything else the database refuses (a timeout, a constraint) is the group's own failure, as a
        plain job's is."""
        try:
            with conn.transaction():
                results = group(conn, [member.fn for member in members])
            return self._group_outcomes(members, results)
        except self._retryable:
            raise
        except BaseException as exc:
            if conn.broken:
                raise
            if len(members) == 1:
                return [(members[0], None, exc)]
            return [outcome for member in members for outcome in self._run_group(conn, group, [member])]

    def _pipelined_batch(self, conn: Any, batch: list[_WriteJob]) -> list[Outcome]:
        import psycopg

        ordered = sorted(batch, key=_lock_order)
        if all(job.trusted for job in ordered):
            try:
                return self._trusted_batch(conn, ordered)
            except self._retryable:
                raise
            except (psycopg.OperationalError, pg.PostgresUnavailable):
                raise
            except (_Redo, psycopg.Error):  # rolled back: run it again, a savepoint per job, to tell whose it was
                with self._lock:
                    self.redone += 1
        return self._savepoint_batch(conn, ordered)

    def _trusted_batch(self, conn: Any, ordered: list[_WriteJob]) -> list[Outcome]:
        """Trusted pipelined jobs (each makes every check before its first write): the whole batch in 2 round trips.
        The stores' `read_ahead` reads what the jobs will read first, for all of them at once (the ledger: the
        request keys' locks, the wallets locked in one order, the keys' stored results), the jobs run on those rows
        without a savepoint each, their writes are kept by the stores and sent by `write_behind` (the ledger: one
        statement for its three tables) with COMMIT. A job refused before it wrote simply has no effect; should one
        fail after writing (it set scratch[WROTE]), or a statement or a store's hook fail, the batch is rolled back
        and redone with a savepoint per job, as SQLite's writer does (`core._Redo`)."""
        outcomes: list[Outcome] = []
        with conn.pipeline(), conn.transaction():
            self._fresh_scratch()
            scratch = self._local.scratch
            requests = [request for job in ordered if (request := getattr(job.fn, "request", None)) is not None]
            self._run_hooks("read_ahead", conn, requests)
            for job in ordered:
                scratch[WROTE] = False
                try:
                    result = job.fn(conn)
                except self._passed_on:
                    raise
                except BaseException as exc:
                    if scratch[WROTE] or _is_database_error(exc):
                        raise _Redo from exc
                    outcomes.append((job, None, exc))
                else:
                    outcomes.append((job, result, None))
            self._run_hooks("write_behind", conn)
        return outcomes

    def _run_hooks(self, name: str, conn: Any, *args: Any) -> None:
        """The stores' read-ahead or write-behind for a trusted batch. Whatever they raise (other than what the
        batch's retry or the lost-connection answer handles) redoes the batch a savepoint per job, where each job
        writes for itself: a failure is then one job's, never the whole batch's."""
        for hook in self.hooks:
            try:
                getattr(hook, name)(conn, *args)
            except self._passed_on:
                raise
            except _Redo:
                raise
            except BaseException as exc:
                raise _Redo from exc

    def _savepoint_batch(self, conn: Any, ordered: list[_WriteJob]) -> list[Outcome]:
        """Every job pipelined: the whole transaction in pipeline mode. Each job has its savepoint, and its queued
        writes are sent (`sync`) before the savepoint ends, so a write's failure is the job's and undoes it alone;
        the savepoint's RELEASE and the next job's SAVEPOINT ride with the next job's first read."""
        outcomes: list[Outcome] = []
        with conn.pipeline() as pipeline, conn.transaction():
            for job in ordered:
                self._fresh_scratch()
                try:
                    with conn.transaction():
                        result = job.fn(conn)
                        pipeline.sync()
                except self._retryable:
                    raise
                except BaseException as exc:
                    outcomes.append((job, None, exc))
                else:
                    outcomes.append((job, result, None))
        return outcomes

    def _alone(self, conn: Any, job: _WriteJob) -> list[Outcome]:
        import psycopg

        passed_on: tuple[type[BaseException], ...] = (*self._retryable, psycopg.OperationalError)
        if _pipelined(job) and job.trusted:  # BEGIN rides with the reads, the writes with COMMIT (2 round trips)
            try:
                return self._trusted_batch(conn, [job])
            except passed_on:
                raise
            except BaseException as exc:  # rolled back: the job's failure (or its write's) undid it alone
                return [(job, None, exc.__cause__ if isinstance(exc, _Redo) and exc.__cause__ else exc)]
        self._fresh_scratch()
        try:
            if _pipelined(job):  # BEGIN rides with the first read, the writes with COMMIT
                with conn.pipeline(), conn.transaction():
                    result = job.fn(conn)
            else:
                with conn.transaction():
                    result = job.fn(conn)
        except passed_on:  # the batch's retry, or the lost-connection answer
            raise
        except BaseException as exc:  # rolled back: the job's failure undid it alone
            return [(job, None, exc)]
        return [(job, result, None)]


class PostgresCore:
    """Reads through a connection pool, writes through the writer threads; the schema must be the code's."""

    backend = "postgresql"

    def __init__(self, url: str, *, migrate: bool = False, writers: int = WRITER_THREADS,
                 pool_size: int = 8, pool_wait: float = POOL_WAIT_S, max_batch: int | None = None) -> None:
        from psycopg_pool import ConnectionPool

        self.url = url
        self.display_url = pg.mask_url(url)
        with pg.connect(url) as conn:
            self.applied_migrations = pg.migrate(conn) if migrate else []
            self.schema_version = pg.check_schema(conn, url)
            self.server_version = pg.server_version(conn)
        self.writers = writers
        self._pool_wait = pool_wait
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=pool_wait,
                                    kwargs={"autocommit": True, "connect_timeout": pg.CONNECT_TIMEOUT_S}, open=True)
        self._writer = PostgresWriter(url, threads=writers, max_batch=max_batch)

    # reads
    def query(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
                cursor.execute(postgres_sql(sql), params)  # type: ignore[arg-type]
                return cursor.fetchall() if cursor.description else []
        except PoolTimeout:
            raise DatabaseBusy(f"every database connection stayed busy for {self._pool_wait:g} s: retry shortly "
                               "(or raise the pool size)") from None

    def query_one(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def table_names(self) -> list[str]:
        rows = self.query("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
                          "ORDER BY table_name")
        return [row["table_name"] for row in rows]

    # writes
    async def write(self, fn: Callable[[Any], T], *, savepoint: bool = True) -> T:
        """Run `fn(conn)` in a writer's next transaction; return after COMMIT (or raise what fn raised)."""
        return await self._writer.submit_async(fn, trusted=not savepoint)

    async def write_item(self, group: Callable[[Any, list[Any]], list[Any]], item: Any, *,
                         in_order: bool = False) -> Any:
        return await self._writer.submit_item(group, item, in_order=in_order)

    def write_sync(self, fn: Callable[[Any], T]) -> T:
        return self._writer.submit(fn).result()

    def submit(self, fn: Callable[[Any], T]) -> Future[T]:
        return self._writer.submit(fn)

    def defer(self, fn: Callable[[Any], T]) -> Future[T]:
        return self._writer.defer(fn)

    def scratch(self) -> dict[str, Any]:
        """The running write job's own dict (see PostgresWriter.scratch)."""
        return self._writer.scratch()

    def add_batch_hook(self, hook: Any) -> None:
        """A store taking part in trusted pipelined batches: `hook.read_ahead(conn, requests)` before the jobs,
        `hook.write_behind(conn)` after them (see PostgresWriter._trusted_batch)."""
        self._writer.hooks.append(hook)

    @property
    def retries(self) -> int:
        return self._writer.retries

    def close(self) -> None:
        self._writer.close()
        self._pool.close()

