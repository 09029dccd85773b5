"""Received Stripe webhook events and what they provisioned (tiers, subscriptions, customers).

`WebhooksStore` is the seam: the operations a backend implements (write operations take the job's `Tx`; reads use
the backend's reader). `SqliteWebhooksStore` is the SQLite implementation.
"""

from __future__ import annotations

from typing import Protocol

from .core import StoreCore


class WebhooksStore(Protocol):
    """The webhooks operations every backend provides."""


class SqliteWebhooksStore:
    def __init__(self, core: StoreCore) -> None:
        self._core = core
