"""Agent-commerce payment sessions, their fulfilment and the order-webhook outbox.

`CommerceStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteCommerceStore` is the SQLite implementation.
"""

from __future__ import annotations

from typing import Protocol

from .core import StoreCore


class CommerceStore(Protocol):
    """The commerce operations every backend provides."""


class SqliteCommerceStore:
    def __init__(self, core: StoreCore) -> None:
        self._core = core
