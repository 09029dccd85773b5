"""The tools' idempotency keys (idempotency_keys): claimed, answered, replayed per owner.

`IdempotencyStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteIdempotencyStore` is the SQLite implementation.
"""

from __future__ import annotations

from typing import Protocol

from .core import StoreCore


class IdempotencyStore(Protocol):
    """The idempotency operations every backend provides."""


class SqliteIdempotencyStore:
    def __init__(self, core: StoreCore) -> None:
        self._core = core
