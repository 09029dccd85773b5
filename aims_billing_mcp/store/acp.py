"""Agentic Commerce Protocol checkout sessions, orders and their request keys.

`AcpStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteAcpStore` is the SQLite implementation.
"""

from __future__ import annotations

from typing import Protocol

from .core import StoreCore


class AcpStore(Protocol):
    """The acp operations every backend provides."""


class SqliteAcpStore:
    def __init__(self, core: StoreCore) -> None:
        self._core = core
