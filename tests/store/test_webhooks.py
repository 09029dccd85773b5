"""The webhooks aggregate's contract: what every backend of `WebhooksStore` must do (received events stored once,
provisions created and updated column by column, typed rows and states). The `backend` fixture is the axis a
second backend adds itself to."""

from __future__ import annotations

from dataclasses import replace

import pytest

from aims_billing_mcp.store import Store, Tx
from aims_billing_mcp.store.webhooks import (
    EVENT_TRANSITIONS,
    LIVE,
    STATUS_TRANSITIONS,
    DuplicateEvent,
    EventRecord,
    EventRef,
    EventState,
    Provision,
    SubscriptionStatus,
    WebhooksStore,
    blank_provision,
    can_move,
)

pytestmark = pytest.mark.anyio

EVENT = EventRef("evt_1", "customer.subscription.updated", 1_790_000_000)


@pytest.fixture
def webhooks(backend: Store) -> WebhooksStore:
    return backend.webhooks


async def subscribe(backend: Store, customer: str = "cus_A", event: EventRef = EVENT, **update: object) -> None:
    values = {"tier": "3mo", "status": SubscriptionStatus.ACTIVE, "subscription_id": f"sub_{customer}",
              "current_period_end": 1_792_592_000, "cancel_at_period_end": False, **update}
    await backend.write(lambda tx: backend.webhooks.apply(tx, customer, values, event))  # type: ignore[arg-type]


async def test_a_new_provision_has_the_columns_applied_and_its_event_as_the_last_one(
    backend: Store, webhooks: WebhooksStore
) -> None:
    await subscribe(backend, cancel_at_period_end=True)

    row = webhooks.provision_for("cus_A")

    assert isinstance(row, Provision)
    assert (row.tier, row.status, row.subscription_id, row.current_period_end) == (
        "3mo", "active", "sub_cus_A", 1_792_592_000)
    assert row.cancel_at_period_end is True and row.commitment_end is None
    assert (row.last_event_id, row.last_event_type, row.last_event_created) == (EVENT.id, EVENT.type, EVENT.created)
    assert webhooks.by_subscription("sub_cus_A") == row


async def test_applying_a_later_event_sets_only_its_columns(backend: Store, webhooks: WebhooksStore) -> None:
    await subscribe(backend)
    later = EventRef("evt_2", "invoice.payment_failed", EVENT.created + 60)

    await backend.write(lambda tx: webhooks.apply(tx, "cus_A", {"status": SubscriptionStatus.PAST_DUE}, later))

    row = webhooks.provision_for("cus_A")
    assert row is not None
    assert (row.status, row.tier, row.subscription_id, row.current_period_end) == (
        "past_due", "3mo", "sub_cus_A", 1_792_592_000)
    assert (row.last_event_id, row.last_event_created) == ("evt_2", later.created)


def test_an_unknown_customer_or_subscription_has_no_provision(webhooks: WebhooksStore) -> None:
    assert webhooks.provision_for("cus_nobody") is None
    assert webhooks.by_subscription("sub_nothing") is None


async def test_a_job_reads_its_own_provision_writes_before_commit(backend: Store) -> None:
    def job(tx: Tx) -> tuple[Provision | None, Provision | None]:
        before = backend.webhooks.load_provision(tx, "cus_A")
        backend.webhooks.apply(tx, "cus_A", {"tier": "6mo", "status": SubscriptionStatus.TRIALING}, EVENT)
        return before, backend.webhooks.load_provision(tx, "cus_A")

    before, after = await backend.write(job)

    assert before is None
    assert after is not None and (after.tier, after.status) == ("6mo", "trialing")


async def test_an_event_is_recorded_once_and_a_duplicate_undoes_its_job(
    backend: Store, webhooks: WebhooksStore
) -> None:
    await backend.write(lambda tx: webhooks.record_event(tx, EVENT, '{"id": "evt_1"}', customer_id="cus_A",
                                                         note=None))

    def duplicate(tx: Tx) -> None:  # the service applies first, then records: a duplicate must undo the apply
        webhooks.apply(tx, "cus_A", {"tier": "9mo", "status": SubscriptionStatus.ACTIVE}, EVENT)
        webhooks.record_event(tx, EVENT, '{"id": "evt_1"}', customer_id="cus_A", note=None)

    with pytest.raises(DuplicateEvent) as raised:
        await backend.write(duplicate)

    assert raised.value.event_id == "evt_1"
    assert webhooks.provision_for("cus_A") is None
    assert [event.id for event in webhooks.list_events()] == ["evt_1"]


async def test_recorded_events_list_newest_first_as_processed_with_their_note(
    backend: Store, webhooks: WebhooksStore
) -> None:
    for n in range(3):
        event = EventRef(f"evt_{n}", "invoice.created", EVENT.created + n)
        await backend.write(lambda tx, e=event, n=n: webhooks.record_event(  # type: ignore[misc]
            tx, e, "{}", customer_id=None if n else "cus_A", note="recorded" if n == 2 else None))

    listed = webhooks.list_events()

    assert [event.id for event in listed] == ["evt_2", "evt_1", "evt_0"]
    assert {event.state for event in listed} == {EventState.PROCESSED}
    assert (listed[0].note, listed[0].customer_id, listed[2].customer_id) == ("recorded", None, "cus_A")
    assert [event.id for event in webhooks.list_events(limit=1)] == ["evt_2"]


@pytest.mark.parametrize("status", list(SubscriptionStatus))
async def test_every_status_is_stored_as_its_own_word(
    backend: Store, webhooks: WebhooksStore, status: SubscriptionStatus
) -> None:
    await subscribe(backend, status=status)

    row = webhooks.provision_for("cus_A")

    assert row is not None and row.status == status.value


async def test_a_status_stripe_adds_later_is_stored_as_sent_and_moves_nowhere(
    backend: Store, webhooks: WebhooksStore
) -> None:
    await subscribe(backend, status="on_hold")

    row = webhooks.provision_for("cus_A")

    assert row is not None and row.status == "on_hold"
    assert not any(can_move("on_hold", target) for target in SubscriptionStatus)


# --- a batch of events: one read and one multi-row write per table ----------------------------------------------


def record(n: int, customer: str | None = "cus_A", note: str | None = None) -> EventRecord:
    return EventRecord(EventRef(f"evt_{n}", "customer.subscription.updated", EVENT.created + n), f'{{"n": {n}}}',
                       customer, note)


async def test_received_answers_which_of_the_asked_ids_are_stored(backend: Store, webhooks: WebhooksStore) -> None:
    await backend.write(lambda tx: webhooks.record_events(tx, [record(1), record(2)]))

    found = await backend.write(lambda tx: webhooks.received(tx, ["evt_2", "evt_3", "evt_1"]))

    assert found == {"evt_1", "evt_2"}
    assert await backend.write(lambda tx: webhooks.received(tx, [])) == set()


async def test_recorded_events_are_stored_as_processed_with_their_customer_and_note(
    backend: Store, webhooks: WebhooksStore
) -> None:
    await backend.write(lambda tx: webhooks.record_events(tx, [record(1), record(2, None, "recorded")]))

    listed = webhooks.list_events()

    assert [(e.id, e.customer_id, e.note, e.state) for e in listed] == [
        ("evt_2", None, "recorded", EventState.PROCESSED), ("evt_1", "cus_A", None, EventState.PROCESSED)]


async def test_recording_an_id_already_stored_raises_duplicate_and_stores_none_of_the_batch(
    backend: Store, webhooks: WebhooksStore
) -> None:
    await backend.write(lambda tx: webhooks.record_events(tx, [record(1)]))

    with pytest.raises(DuplicateEvent):
        await backend.write(lambda tx: webhooks.record_events(tx, [record(2), record(1)]))

    assert [event.id for event in webhooks.list_events()] == ["evt_1"]


async def test_subscription_owners_are_the_customers_whose_provisions_hold_them(
    backend: Store, webhooks: WebhooksStore
) -> None:
    await subscribe(backend, "cus_A")
    await subscribe(backend, "cus_B")

    owners = await backend.write(lambda tx: webhooks.subscription_owners(tx, ["sub_cus_B", "sub_none", "sub_cus_A"]))

    assert owners == {"sub_cus_A": "cus_A", "sub_cus_B": "cus_B"}


async def test_loaded_provisions_are_the_stored_ones_and_only_those(backend: Store, webhooks: WebhooksStore) -> None:
    await subscribe(backend, "cus_A")
    await subscribe(backend, "cus_B", status=SubscriptionStatus.PAST_DUE)

    loaded = await backend.write(lambda tx: webhooks.load_provisions(tx, {"cus_B", "cus_A", "cus_nobody"}))

    assert loaded == {"cus_A": webhooks.provision_for("cus_A"), "cus_B": webhooks.provision_for("cus_B")}
    assert await backend.write(lambda tx: webhooks.load_provisions(tx, set())) == {}


async def test_saved_provisions_are_created_or_overwritten_column_for_column(
    backend: Store, webhooks: WebhooksStore
) -> None:
    await subscribe(backend, "cus_A")
    stored = webhooks.provision_for("cus_A")
    assert stored is not None
    changed = replace(stored, status=SubscriptionStatus.CANCELED, cancel_at_period_end=True, ended_at=EVENT.created,
                      last_event_id="evt_9", last_event_created=EVENT.created + 9)
    new = replace(blank_provision("cus_new", "2026-12-06T00:00:00Z"), tier="9mo", subscription_id="sub_new")

    await backend.write(lambda tx: webhooks.save_provisions(tx, [changed, new]))

    assert webhooks.provision_for("cus_A") == changed
    assert webhooks.provision_for("cus_new") == new
    assert (new.status, new.cancel_at_period_end, new.current_period_end) == (SubscriptionStatus.NONE, False, None)


def test_every_state_has_its_transitions_and_moves_only_to_known_states() -> None:
    assert set(STATUS_TRANSITIONS) == set(SubscriptionStatus)
    assert set(EVENT_TRANSITIONS) == set(EventState)
    assert set(SubscriptionStatus) >= LIVE
    # invoice events move live subscriptions to past_due and unpaid ones to active, nothing else
    assert {source for source, targets in STATUS_TRANSITIONS.items() if SubscriptionStatus.PAST_DUE in targets} == LIVE
    assert {source for source, targets in STATUS_TRANSITIONS.items() if SubscriptionStatus.ACTIVE in targets} == {
        "past_due", "unpaid", "incomplete"}
