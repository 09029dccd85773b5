"""Deterministic interleavings between PostgreSQL instances: wait until a transaction is seen blocked on a lock
another holds (rather than sleeping and hoping it got there)."""

from __future__ import annotations

import time
from typing import Any


def wait_until_blocked(store: Any, waiting: int = 1, *, timeout: float = 20.0) -> None:
    """Return once `waiting` sessions of the store's database wait on a lock (a row lock or an advisory lock)."""
    deadline = time.monotonic() + timeout
    while True:
        row = store.query_one("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
                              "AND wait_event_type = 'Lock'")
        if row is not None and int(row["n"]) >= waiting:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {waiting} session(s) blocked on a lock within {timeout:g} s")


def race(a: Any, b: Any, first: Any, second: Any, *, timeout: float = 20.0) -> tuple[Any, Any]:
    """Run `first(tx)` on instance a and, while its transaction is still open (its writes made, not committed),
    `second(tx)` on instance b; let a commit once b is seen blocked on a lock. Returns both results."""
    import threading

    written, go = threading.Event(), threading.Event()

    def held(tx: Any) -> Any:
        result = first(tx)
        written.set()
        go.wait(timeout)
        return result

    one = a.submit(held)
    if not written.wait(timeout):
        one.result(timeout)  # raises what the first job raised
        raise TimeoutError("the first job never got to its end")
    other = b.submit(second)
    try:
        wait_until_blocked(a, timeout=timeout)
    finally:
        go.set()
    return one.result(timeout), other.result(timeout)
