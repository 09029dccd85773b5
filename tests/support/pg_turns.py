"""Deterministic interleavings of two PostgreSQL instances (issue 15), without sleeps: one instance's write job does
its part and keeps its transaction open (`holding`, or `race` for synchronous tests) while the test starts the other
instance's job, waits until PostgreSQL reports that job waiting on a lock (`lock_waiters`, `wait_until_blocked`),
and only then lets the first commit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

WITHIN_S = 10.0  # how long a step may take before the test fails (a hang is a failure, not a wait)
POLL_S = 0.005  # between two looks at pg_stat_activity
LOCK_WAITERS = ("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")


@dataclass
class Attempt:
    """What one instance's write came to: its result or its exception."""

    result: Any = None
    error: BaseException | None = None
    done: bool = False

    async def run(self, write: Awaitable[Any]) -> None:
        try:
            self.result = await write
        except Exception as exc:
            self.error = exc
        self.done = True


@dataclass
class Held(Attempt):
    """A job that did its part and holds its transaction open until `release()`; `fail` makes it raise then."""

    fail: BaseException | None = None
    _release: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self._release.set()


@asynccontextmanager
async def holding(store: Any, fn: Callable[[Any], Any], *, fail: BaseException | None = None) -> AsyncIterator[Held]:
    """Run `fn(tx)` in a write job of `store` and hold that job's transaction open until the `Held` is released
    (at the latest on leaving the block); yields once `fn` has run. On leaving, waits for the commit."""
    held, did = Held(fail=fail), threading.Event()

    def job(tx: Any) -> Any:
        try:
            result = fn(tx)
        finally:
            did.set()
        if not held._release.wait(WITHIN_S):
            raise TimeoutError("the test never released the held transaction")
        if held.fail is not None:
            raise held.fail
        return result

    async with anyio.create_task_group() as tg:
        tg.start_soon(held.run, store.write(job))
        try:
            with anyio.fail_after(WITHIN_S):
                await anyio.to_thread.run_sync(did.wait)
            yield held
        finally:
            held.release()


async def lock_waiters(url: str, count: int = 1) -> None:
    """Return once `count` sessions of the database wait on a lock (a row, a transaction, an advisory lock)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn, anyio.fail_after(WITHIN_S):
        while True:
            row = conn.execute(LOCK_WAITERS).fetchone()
            if row is not None and row[0] >= count:
                return
            await anyio.sleep(POLL_S)


def wait_until_blocked(store: Any, waiting: int = 1, *, timeout: float = 20.0) -> None:
    """`lock_waiters` for synchronous tests, through the store's own reader: return once `waiting` sessions of its
    database wait on a lock (a row lock or an advisory lock)."""
    pause = threading.Event()  # never set: its wait is the pause between two looks
    deadline = time.monotonic() + timeout
    while True:
        row = store.query_one(LOCK_WAITERS)
        if row is not None and int(row["n"]) >= waiting:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {waiting} session(s) blocked on a lock within {timeout:g} s")
        pause.wait(POLL_S)


def race(a: Any, b: Any, first: Any, second: Any, *, blocks: bool = True,
         timeout: float = 20.0) -> tuple[Any, Any]:
    """Run `first(tx)` on instance a and, while its transaction is still open (its writes made, not committed),
    `second(tx)` on instance b. `blocks`: b must be seen waiting on a's lock before a commits; else b must finish
    while a's transaction is still open (it skipped what a holds). Returns both results."""
    written, go = threading.Event(), threading.Event()

    def held(tx: Any) -> Any:
        result = first(tx)
        written.set()
        go.wait(timeout)
        return result

    one = a.submit(held)
    try:
        if not written.wait(timeout):
            one.result(timeout)  # raises what the first job raised
            raise TimeoutError("the first job never got to its end")
        other = b.submit(second)
        if blocks:
            wait_until_blocked(a, timeout=timeout)
        else:
            other.result(5.0)  # a TimeoutError here: b waited for a's lock instead of skipping its rows
    finally:
        go.set()
    return one.result(timeout), other.result(timeout)
