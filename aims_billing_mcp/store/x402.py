"""x402 quotes, receipts (settled payments) and registered payer addresses.

`X402Store` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteX402Store` is the SQLite implementation.
"""

from __future__ import annotations

from typing import Protocol

from .core import StoreCore


class X402Store(Protocol):
    """The x402 operations every backend provides."""


class SqliteX402Store:
    def __init__(self, core: StoreCore) -> None:
        self._core = core
