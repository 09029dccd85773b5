"""Agent wallets, their double-entry postings, holds and the per-owner request keys (ledger_requests).

`LedgerStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteLedgerStore` is the SQLite implementation.
"""

from __future__ import annotations

from typing import Protocol

from .core import StoreCore


class LedgerStore(Protocol):
    """The ledger operations every backend provides."""


class SqliteLedgerStore:
    def __init__(self, core: StoreCore) -> None:
        self._core = core
