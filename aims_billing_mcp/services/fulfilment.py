"""Fulfilment: who delivers what a succeeded payment bought, and who is told how a prepaid tier's start went.

One registry object, built by the composition root (state.py) and handed to the services that need it, instead of
services registering callbacks on each other in their constructors:
- payment sessions (commerce.py) record a PaymentIntent's success and, in that same writer job, ask the registry
  whether a seller owns the session (an ACP checkout's payment: ACP settles its order); otherwise they deliver the
  item themselves (credit a LUC pack to a wallet, queue a prepaid tier);
- after the COMMIT of such a job, every seller sends what the job queued (ACP: its order events and refunds);
- the prepaid outbox (prepaid.py) tells a row's source (`payment_session`, `acp`) inside the job that records the
  start, the failure or the refund of its subscription; the source may hand back an action for after COMMIT.

Sellers are registered by source name, once each, by state.py (a second registration of a source replaces the
first, as a second ACP seller built over the same payments does in tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..store import Tx
from ..store.commerce import PaymentSessionRow
from ..store.prepaid import PrepaidRow

# Fulfils a succeeded session it owns inside the recording job and says what it did (None: not its own).
Fulfiler = Callable[[Tx, PaymentSessionRow, str], dict[str, Any] | None]
# Told of a prepaid subscription's outcome inside the job that records it; may return an action for after COMMIT.
OutcomeHook = Callable[[Tx, PrepaidRow], Callable[[], None] | None]


@dataclass(frozen=True, slots=True)
class Seller:
    """What one source of payments does at each step (each optional)."""

    fulfil: Fulfiler | None = None
    after_commit: Callable[[], None] | None = None
    on_subscription: OutcomeHook | None = None


class Fulfilment:
    """The sellers by source, asked in registration order."""

    def __init__(self) -> None:
        self._sellers: dict[str, Seller] = {}

    def register(self, source: str, seller: Seller) -> None:
        self._sellers[source] = seller

    def fulfil(self, tx: Tx, session: PaymentSessionRow, payment_intent: str) -> dict[str, Any] | None:
        """The fulfilment of a succeeded payment session by the seller that owns it, or None if none does."""
        for seller in self._sellers.values():
            if seller.fulfil is not None and (done := seller.fulfil(tx, session, payment_intent)) is not None:
                return done
        return None

    def committed(self) -> None:
        """After a COMMIT that may have queued fulfilment work: each seller sends what it queued."""
        for seller in self._sellers.values():
            if seller.after_commit is not None:
                seller.after_commit()

    def subscription_outcome(self, tx: Tx, prepaid: PrepaidRow) -> Callable[[], None] | None:
        """Tell the prepaid row's source how its subscription went, inside the job that recorded it."""
        seller = self._sellers.get(prepaid.source)
        if seller is None or seller.on_subscription is None:
            return None
        return seller.on_subscription(tx, prepaid)
