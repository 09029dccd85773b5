"""The audit log: one row per tool call or authenticated HTTP request, bounded, pruned by age.

`AuditStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteAuditStore` is the SQLite implementation.
"""

from __future__ import annotations

from typing import Protocol

from .core import StoreCore


class AuditStore(Protocol):
    """The audit operations every backend provides."""


class SqliteAuditStore:
    def __init__(self, core: StoreCore) -> None:
        self._core = core
