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
