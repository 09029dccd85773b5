"""Stripe events queued together (`WebhookEventService._ingest_batch`): one read of what is stored, one multi-row
write per table, and the same outcome, event for event, as delivering them one at a time."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from aims_billing_mcp.services.webhook_events import parse_event
from aims_billing_mcp.state import AppState, open_state
from tests.conftest import copy_of, queued_together
from tests.test_webhooks import event, subscription

pytestmark = pytest.mark.anyio
START = 1_790_000_000


@pytest.fixture
def make_state(make_settings: Callable[..., Any], sandbox_app: Any, migrated_db: Path,
               tmp_path: Path) -> Callable[[str], AbstractAsyncContextManager[AppState]]:
    """A service graph on a database of its own (`name`), open for the length of an `async with`."""
    def make(name: str) -> AbstractAsyncContextManager[AppState]:
        settings = make_settings(aims_billing_db=copy_of(migrated_db, tmp_path / f"{name}.db"))
        return open_state(settings, sandbox_app=sandbox_app, retry_delay_scale=0)  # type: ignore[return-value]

    return make


def deliveries() -> list[str]:
    """Out of order, duplicated, several customers, and types applied, recorded and unhandled."""
    invoice = {"id": "in_1", "object": "invoice", "customer": "cus_A", "subscription": "sub_A"}
    return [
        event("customer.subscription.updated", subscription("past_due"), created=START + 20, event_id="evt_a2"),
        event("customer.subscription.created", subscription("active"), created=START + 10, event_id="evt_a1"),
        event("customer.subscription.created", subscription(customer="cus_B", sub_id="sub_B", tier="9mo"),
              created=START + 10, event_id="evt_b1"),
        event("customer.subscription.created", subscription(customer="cus_B", sub_id="sub_B", tier="9mo"),
              created=START + 10, event_id="evt_b1"),  # the same delivery twice in one batch
        event("invoice.paid", invoice, created=START + 30, event_id="evt_a3"),
        event("customer.subscription.deleted", subscription("canceled", customer="cus_C", sub_id="sub_C"),
              created=START + 40, event_id="evt_c1"),
        event("invoice.payment_failed", {**invoice, "customer": "cus_unknown"}, created=START, event_id="evt_u1"),
        event("customer.created", {"id": "cus_D", "object": "customer"}, created=START, event_id="evt_d1"),
    ]


async def ingest_all(state: AppState, payloads: list[str], *, together: bool) -> list[tuple[Any, ...]]:
    service = state.webhook_events
    if not together:
        answers = [await service.ingest(parse_event(p), p) for p in payloads]
    else:  # every event queued before the writer takes them: one batch
        answers = await queued_together(state.store, (service.ingest(parse_event(p), p) for p in payloads))
    return [(a.event_id, a.duplicate, a.note, a.customer_id) for a in answers]


def stored(state: AppState) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    store = state.store
    provisions = [{k: v for k, v in row.items() if k != "updated_at"}
                  for row in store.query("SELECT * FROM billing_provisions ORDER BY customer_id")]
    events = store.query("SELECT id, type, created, payload, processed, customer_id, error FROM webhook_events "
                         "ORDER BY id")
    return provisions, events


async def test_events_queued_together_end_as_if_delivered_one_at_a_time(make_state: Callable[..., Any]) -> None:
    async with make_state("one_by_one") as one_by_one, make_state("together") as together:
        batches_before = together.store._writer.batches

        expected = await ingest_all(one_by_one, deliveries(), together=False)
        answered = await ingest_all(together, deliveries(), together=True)

        batches = together.store._writer.batches - batches_before
        compared = stored(together), stored(one_by_one)

    assert batches <= 2  # all eight events in one transaction (with the blocker's, or after it)
    assert answered == expected
    assert [duplicate for _, duplicate, _, _ in answered].count(True) == 1
    assert compared[0] == compared[1]
    provisions, events = compared[0]
    assert [(p["customer_id"], p["tier"], p["status"], p["last_event_id"]) for p in provisions] == [
        ("cus_A", "6mo", "active", "evt_a3"), ("cus_B", "9mo", "active", "evt_b1"),
        ("cus_C", "6mo", "canceled", "evt_c1")]
    assert len(events) == 7 and json.loads(events[0]["payload"])["id"] == "evt_a1"


async def test_an_event_stored_before_is_answered_as_a_duplicate_from_a_batch(
    make_state: Callable[..., Any],
) -> None:
    first = deliveries()[1]
    async with make_state("db") as state:
        await ingest_all(state, [first], together=False)

        answered = await ingest_all(state, [first, deliveries()[2]], together=True)
        events = stored(state)[1]

    assert [(event_id, duplicate) for event_id, duplicate, _, _ in answered] == [("evt_a1", True), ("evt_b1", False)]
    assert [e["id"] for e in events] == ["evt_a1", "evt_b1"]


async def test_an_event_of_its_own_job_between_batched_ones_is_applied_in_arrival_order(
    make_state: Callable[..., Any],
) -> None:
    subscribed = event("customer.subscription.created", subscription("active", sub_id="sub_1"), created=START,
                       event_id="evt_old")
    checkout = {"id": "cs_2", "object": "checkout.session", "customer": "cus_A", "subscription": "sub_2",
                "mode": "subscription", "payment_status": "paid", "metadata": {"aims_tier": "6mo"}}
    queued = [  # a batched event, a checkout (its own job: Connect reads it too), the new subscription's invoice
        event("customer.created", {"id": "cus_X", "object": "customer"}, created=START + 5, event_id="evt_x"),
        event("checkout.session.completed", checkout, created=START + 30, event_id="evt_checkout"),
        event("invoice.payment_failed", {"id": "in_2", "object": "invoice", "customer": "cus_A",
                                         "subscription": "sub_2"}, created=START + 35, event_id="evt_failed"),
    ]
    ends = {}
    for together in (False, True):
        async with make_state(f"in_order_{together}") as state:
            await ingest_all(state, [subscribed], together=False)
            answers = await ingest_all(state, queued, together=together)
            ends[together] = answers, stored(state)[0]

    assert ends[True] == ends[False]
    provision = ends[True][1][0]
    assert (provision["subscription_id"], provision["status"], provision["last_event_id"]) == (
        "sub_2", "past_due", "evt_failed")


async def test_a_subscription_another_customer_holds_is_stored_with_a_note_and_not_applied(
    make_state: Callable[..., Any],
) -> None:
    held = event("customer.subscription.created", subscription(customer="cus_A", sub_id="sub_1"), created=START,
                 event_id="evt_held")
    checkout = {"id": "cs_9", "object": "checkout.session", "customer": "cus_C", "subscription": "sub_1",
                "mode": "subscription", "payment_status": "paid", "metadata": {"aims_tier": "6mo"}}
    queued = [  # each names a subscription a provision already holds, or one claimed earlier in the batch
        event("customer.subscription.updated", subscription(customer="cus_B", sub_id="sub_1"), created=START + 10,
              event_id="evt_b"),
        event("customer.subscription.created", subscription(customer="cus_D", sub_id="sub_2"), created=START + 20,
              event_id="evt_d"),
        event("customer.subscription.created", subscription(customer="cus_E", sub_id="sub_2"), created=START + 30,
              event_id="evt_e"),
        event("checkout.session.completed", checkout, created=START + 40, event_id="evt_c"),
    ]
    ends = {}
    for together in (False, True):
        async with make_state(f"held_{together}") as state:
            await ingest_all(state, [held], together=False)
            ends[together] = await ingest_all(state, queued, together=together), stored(state)

    assert ends[True] == ends[False]
    answers, (provisions, events) = ends[True]
    assert [(event_id, duplicate) for event_id, duplicate, _, _ in answers] == [
        ("evt_b", False), ("evt_d", False), ("evt_e", False), ("evt_c", False)]
    assert {(p["customer_id"], p["subscription_id"]) for p in provisions} == {("cus_A", "sub_1"), ("cus_D", "sub_2")}
    notes = {e["id"]: e["error"] for e in events}
    assert notes["evt_b"] == notes["evt_c"] == (
        "subscription sub_1 is provisioned for another customer (cus_A): stored, not applied")
    assert notes["evt_e"] == "subscription sub_2 is provisioned for another customer (cus_D): stored, not applied"
    assert notes["evt_d"] is None
