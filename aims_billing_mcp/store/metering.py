"""Meter events, the running usage totals per period and operation, task slots and the flusher's batches to Stripe.

`MeteringStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteMeteringStore` is the SQLite implementation.
"""

from __future__ import annotations

from typing import Protocol

from .core import StoreCore


class MeteringStore(Protocol):
    """The metering operations every backend provides."""


class SqliteMeteringStore:
    def __init__(self, core: StoreCore) -> None:
        self._core = core
