"""Prepaid (pay-as-you-go) subscriptions and their outbox.

`PrepaidStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqlitePrepaidStore` is the SQLite implementation.
"""

from __future__ import annotations

from typing import Protocol

from .core import StoreCore


class PrepaidStore(Protocol):
    """The prepaid operations every backend provides."""


class SqlitePrepaidStore:
    def __init__(self, core: StoreCore) -> None:
        self._core = core
