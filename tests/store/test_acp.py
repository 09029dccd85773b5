"""The ACP store's contract: what every backend's `AcpStore` must do (the `store` fixture runs each test on SQLite
and on PostgreSQL; the `acp` fixture yields the aggregate store), then the races only PostgreSQL has: two
instances (two `PostgresStore`s, two "servers") on one database."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.store import PostgresStore, Store, Tx
from aims_billing_mcp.store.acp import (
    CLAIMABLE,
    FINISHED,
    KEY_TRANSITIONS,
    OPEN,
    ORDER_TRANSITIONS,
    REFUND_TRANSITIONS,
    TRANSITIONS,
    AcpStore,
    CheckoutRow,
    CheckoutStatus,
    KeyRecord,
    KeyState,
    OrderStatus,
    PaymentRow,
    RefundStatus,
)
from tests.support.pg_turns import race

T = TypeVar("T")
pytestmark = pytest.mark.anyio
NOW = 1_800_000_000.0
ISO = "2027-01-15T08:00:00.000Z"
STORED = [status for status in CheckoutStatus if status != CheckoutStatus.EXPIRED]  # expired is derived on read


@pytest.fixture
def store(backend: Any) -> Any:
    """The store under test on each backend (conftest's `backend`), under the name this module's tests use."""
    return backend


@pytest.fixture
def acp(store: Store) -> AcpStore:
    return store.acp


def write(store: Store, job: Callable[[Tx], T]) -> T:
    return store.write_sync(job)


def session(session_id: str = "cs_1", status: CheckoutStatus = CheckoutStatus.READY_FOR_PAYMENT, *,
            completing_since: float | None = None, state: str = '{"lines":[]}') -> CheckoutRow:
    return CheckoutRow(session_id, status, "usd", "agent-1", state, None, None, ISO, ISO, NOW + 3600,
                       completing_since)


def put(store: Store, row: CheckoutRow) -> CheckoutRow:
    """A session in any stored status, reached by the store's own operations (a hold: claimed by a completion)."""
    write(store, lambda tx: store.acp.create_session(tx, replace(row, status=CheckoutStatus.READY_FOR_PAYMENT,
                                                                 completing_since=None)))
    if row.completing_since is not None:
        assert write(store, lambda tx: store.acp.claim(tx, row.id, row.completing_since or 0, None, ISO))
    elif row.status != CheckoutStatus.READY_FOR_PAYMENT:
        write(store, lambda tx: store.acp.set_status(tx, row.id, row.status, row.state, ISO))
    stored = store.acp.session(row.id)
    assert stored is not None and (stored.status, stored.completing_since) == (row.status, row.completing_since)
    return stored


def test_a_created_session_reads_back_as_written_and_a_second_create_of_its_id_keeps_the_first(
        store: Store, acp: AcpStore) -> None:
    first = session(state='{"lines":[{"item":"luc_10k","quantity":1}]}')
    write(store, lambda tx: acp.create_session(tx, first))
    write(store, lambda tx: acp.create_session(tx, replace(first, state='{"lines":[]}', currency="eur")))
    assert acp.session("cs_1") == first
    assert write(store, lambda tx: acp.session_in(tx, "cs_1")) == first
    assert acp.session("cs_missing") is None


@pytest.mark.parametrize("status", STORED)
def test_save_state_with_only_open_changes_a_session_only_while_it_is_open_and_not_held(
        store: Store, acp: AcpStore, status: CheckoutStatus) -> None:
    put(store, session(status=status))
    saved = write(store, lambda tx: acp.save_state(tx, "cs_1", '{"lines":[1]}', None, ISO, only_open=True))
    assert saved == (status in OPEN)
    assert (acp.session("cs_1") or session()).state == ('{"lines":[1]}' if saved else '{"lines":[]}')
    assert write(store, lambda tx: acp.save_state(tx, "cs_1", '{"lines":[2]}', None, ISO, only_open=False))


def test_a_completion_claims_an_open_session_once_a_stale_hold_is_taken_over_and_only_the_holder_releases_it(
        store: Store, acp: AcpStore) -> None:
    put(store, session())
    assert write(store, lambda tx: acp.claim(tx, "cs_1", 10.0, None, ISO))
    assert not write(store, lambda tx: acp.claim(tx, "cs_1", 11.0, None, ISO))  # held: a second claim fails
    assert write(store, lambda tx: acp.claim(tx, "cs_1", 12.0, 10.0, ISO))  # the hold it saw: taken over
    held = acp.session("cs_1")
    assert held is not None and held.status == CheckoutStatus.IN_PROGRESS and held.completing_since == 12.0
    write(store, lambda tx: acp.release(tx, "cs_1", 10.0, '{"lines":["x"]}', ISO))  # not the holder: nothing
    assert acp.session("cs_1") == held
    write(store, lambda tx: acp.release(tx, "cs_1", 12.0, None, ISO))
    released = acp.session("cs_1")
    assert released is not None and released.status == CheckoutStatus.READY_FOR_PAYMENT
    assert released.completing_since is None and released.state == held.state  # None keeps the state


def test_a_payment_is_linked_only_while_its_completion_holds_the_session(store: Store, acp: AcpStore) -> None:
    put(store, session())
    write(store, lambda tx: acp.claim(tx, "cs_1", 10.0, None, ISO))
    lost = PaymentRow("ps_lost", "cs_1", '{"lines":[],"subscriber":null}', 500, "usd")
    assert not write(store, lambda tx: acp.link_payment(tx, lost, 9.0, ISO))
    paid = PaymentRow("ps_1", "cs_1", '{"lines":[1],"subscriber":null}', 500, "usd")
    assert write(store, lambda tx: acp.link_payment(tx, paid, 10.0, ISO))
    assert (acp.session("cs_1") or session()).payment_session_id == "ps_1"
    assert acp.payment_carts("cs_1") == {"ps_lost": lost.lines, "ps_1": paid.lines}  # each cart kept
    assert write(store, lambda tx: acp.payment_in(tx, "ps_1")) == paid
    assert write(store, lambda tx: acp.session_paid_by(tx, "ps_1")) == acp.session("cs_1")


def test_complete_records_the_order_and_drops_the_hold(store: Store, acp: AcpStore) -> None:
    put(store, session())
    write(store, lambda tx: acp.claim(tx, "cs_1", 10.0, None, ISO))
    write(store, lambda tx: acp.complete(tx, "cs_1", "ord_1", '{"order":{}}', ISO, "ps_9"))
    done = acp.session("cs_1")
    assert done is not None and (done.status, done.order_id, done.payment_session_id, done.completing_since) == (
        CheckoutStatus.COMPLETED, "ord_1", "ps_9", None)


def test_a_payment_marked_refund_due_is_listed_until_its_refund_succeeds_and_is_marked_once(
        store: Store, acp: AcpStore) -> None:
    payment = PaymentRow("ps_1", "cs_1", '{"lines":[]}', 700, "usd")
    write(store, lambda tx: acp.mark_refund_due(tx, payment, ISO, record=True))
    write(store, lambda tx: acp.mark_refund_due(tx, payment, ISO, record=False))
    assert acp.refunds_due() == ["ps_1"]
    write(store, lambda tx: acp.record_refund(tx, "ps_1", succeeded=False, refund_id="re_1", error="pending"))
    assert acp.refunds_due() == ["ps_1"]
    write(store, lambda tx: acp.record_refund(tx, "ps_1", succeeded=True, refund_id=None, error=None))
    assert acp.refunds_due() == []
    write(store, lambda tx: acp.mark_refund_due(tx, payment, ISO, record=False))  # a refund made stays made
    assert acp.refunds_due() == []
    assert acp.refund_target("ps_unknown") is None


def test_a_request_key_is_claimed_once_then_replays_and_is_free_again_when_expired_abandoned_or_released(
        store: Store, acp: AcpStore) -> None:
    def claim(digest: str, now: float, *, retention: float = 86_400, stale: float = 120) -> KeyRecord | None:
        return write(store, lambda tx: acp.claim_key(tx, "who:/acp", "k1", digest, now,
                                                     expired_before=now - retention, abandoned_before=now - stale))

    assert claim("h1", NOW) is None
    in_flight = claim("h2", NOW + 1)
    assert in_flight is not None and (in_flight.request_hash, in_flight.state) == ("h1", KeyState.IN_FLIGHT)
    assert claim("h3", NOW + 121) is None  # abandoned in flight: claimed afresh
    write(store, lambda tx: acp.finish_key(tx, "who:/acp", "k1", 201, '{"id":"cs_1"}'))
    done = claim("h4", NOW + 122, stale=0)  # done is never abandoned
    assert done is not None and (done.request_hash, done.state, done.status, done.response) == (
        "h3", KeyState.DONE, 201, '{"id":"cs_1"}')
    write(store, lambda tx: acp.release_key(tx, "who:/acp", "k1"))  # only an in-flight key is released
    assert claim("h5", NOW + 123) is not None
    assert claim("h6", NOW + 121 + 86_401) is None  # expired: claimed afresh
    write(store, lambda tx: acp.release_key(tx, "who:/acp", "k1"))
    assert claim("h7", NOW + 121 + 86_402) is None


async def test_the_wallet_customer_is_read_committed_and_inside_a_transaction(store: Store, acp: AcpStore) -> None:
    if isinstance(store, Store):
        await LedgerService(store, luc_per_usd=1000, agent_limit=lambda customer: None).create_wallet(
            "agent-1", "cus_1", None, "w")
    else:  # the ledger's PostgreSQL store is another aggregate's: the wallet row as it writes it
        await store.write(lambda tx: tx.execute(
            "INSERT INTO agent_wallets (id, agent_id, customer_id, created_at, updated_at) VALUES (%s, %s, %s, %s, %s)",
            ("w_1", "agent-1", "cus_1", ISO, ISO)))
    assert acp.wallet_customer("agent-1") == "cus_1" and acp.wallet_customer("agent-2") is None
    assert await store.write(lambda tx: acp.wallet_customer_in(tx, "agent-1")) == "cus_1"


def test_an_order_event_is_pending_until_delivered_or_given_up(store: Store, acp: AcpStore) -> None:
    for event_id in ("evt_1", "evt_2"):
        write(store, lambda tx, e=event_id: acp.add_order_event(tx, e, "order_create", "ord_1", "cs_1", "{}", ISO))  # type: ignore[misc]
    assert acp.pending_order_events() == ["evt_1", "evt_2"]
    write(store, lambda tx: acp.record_delivery(tx, "evt_1", attempts=2, status=200, error=None, delivered=True,
                                                gave_up=False, at=ISO))
    write(store, lambda tx: acp.record_delivery(tx, "evt_2", attempts=4, status=500, error="HTTP 500",
                                                delivered=False, gave_up=True, at=ISO))
    assert acp.pending_order_events() == []
    one, two = acp.order_event("evt_1"), acp.order_event("evt_2")
    assert one is not None and (one.attempts, one.delivered, one.gave_up, one.delivered_at) == (2, True, False, ISO)
    assert two is not None and (two.last_status, two.last_error, two.delivered_at) == (500, "HTTP 500", None)
    assert acp.order_event("evt_3") is None


def _moves(store: Store, status: CheckoutStatus, hold: float | None) -> set[CheckoutStatus]:
    """Every status the store's guarded writes (save_state only_open, claim, release) move a session in `status`
    (held by `hold`) to, each tried on its own session."""
    ops: list[Callable[[Tx, str], object]] = [
        *(lambda tx, sid, to=to: store.acp.save_state(tx, sid, "{}", to, ISO, only_open=True) for to in STORED),
        lambda tx, sid: store.acp.claim(tx, sid, 99.0, None, ISO),
        lambda tx, sid: store.acp.claim(tx, sid, 99.0, hold, ISO),
        lambda tx, sid: store.acp.release(tx, sid, hold or 0, None, ISO),
    ]
    reached = set()
    for index, op in enumerate(ops):
        before = put(store, session(f"cs_{status}_{hold}_{index}", status, completing_since=hold))
        write(store, lambda tx, op=op, sid=before.id: op(tx, sid))  # type: ignore[misc]
        after = store.acp.session(before.id)
        assert after is not None
        if after != before:
            reached.add(after.status)
    return reached


@pytest.mark.parametrize("status", STORED)
def test_the_stores_guarded_writes_move_a_session_only_along_its_transitions(
        store: Store, status: CheckoutStatus) -> None:
    for hold in ([None, 5.0] if status == CheckoutStatus.IN_PROGRESS else [None]):
        assert _moves(store, status, hold) <= TRANSITIONS[status]
    if status in FINISHED:
        assert _moves(store, status, None) == set()


def test_the_state_tables_cover_every_state_and_name_only_their_own() -> None:
    for table, states in ((TRANSITIONS, CheckoutStatus), (ORDER_TRANSITIONS, OrderStatus),
                          (KEY_TRANSITIONS, KeyState), (REFUND_TRANSITIONS, RefundStatus)):
        assert set(table) == set(states)  # type: ignore[call-overload]
        assert all(targets <= set(states) for targets in table.values())  # type: ignore[call-overload]
    assert set(CLAIMABLE) == OPEN
    assert all(not TRANSITIONS[status] for status in FINISHED)


def test_an_order_event_leased_by_one_sender_is_taken_by_another_only_after_its_lease_and_the_first_records_nothing(
        store: Store, acp: AcpStore) -> None:
    for event_id in ("evt_1", "evt_2"):
        write(store, lambda tx, e=event_id: acp.add_order_event(tx, e, "order_create", "ord_1", "cs_1", "{}", ISO))  # type: ignore[misc]
    assert write(store, lambda tx: acp.lease_order_events(tx, "A", NOW, NOW + 60)) == ["evt_1", "evt_2"]
    assert write(store, lambda tx: acp.lease_order_events(tx, "B", NOW + 59, NOW + 120)) == []  # held by A
    assert write(store, lambda tx: acp.lease_order_events(tx, "B", NOW + 60, NOW + 120, event_ids=["evt_1"])) == [
        "evt_1"]  # A's lease ended: taken over (only the event asked for)

    def record(event_id: str, lease: str, *, delivered: bool) -> bool:
        return write(store, lambda tx: acp.record_delivery(tx, event_id, attempts=1, status=200 if delivered else 500,
                                                           error=None if delivered else "HTTP 500",
                                                           delivered=delivered, gave_up=False, at=ISO, lease=lease))

    assert not record("evt_1", "A", delivered=True)  # A was paused past its lease: its outcome is not recorded
    assert (acp.order_event("evt_1") or pytest.fail()).attempts == 0
    assert record("evt_1", "B", delivered=True)
    assert record("evt_2", "A", delivered=False)  # still A's: a failed attempt recorded, the event stays pending
    assert acp.pending_order_events() == ["evt_2"]
    assert write(store, lambda tx: acp.lease_order_events(tx, "C", NOW + 10_000, NOW + 10_060)) == ["evt_2"]
    assert write(store, lambda tx: acp.lease_order_events(tx, "D", NOW + 20_000, NOW + 20_060,
                                                          event_ids=["evt_1"])) == []  # delivered: never again


def test_a_refund_due_leased_by_one_sender_is_taken_by_another_only_after_its_lease_or_its_attempt(
        store: Store, acp: AcpStore) -> None:
    for ps in ("ps_1", "ps_2"):
        write(store, lambda tx, ps=ps: acp.mark_refund_due(tx, PaymentRow(ps, "cs_1", "{}", 700, "usd"), ISO,  # type: ignore[misc]
                                                           record=True))
    assert write(store, lambda tx: acp.lease_refunds(tx, "A", NOW, NOW + 300)) == ["ps_1", "ps_2"]
    assert write(store, lambda tx: acp.lease_refunds(tx, "B", NOW + 1, NOW + 301)) == []  # held by A
    # A's attempt at ps_1 failed: recorded, and its lease ends with it (the refund may be taken again at once)
    assert write(store, lambda tx: acp.record_refund(tx, "ps_1", succeeded=False, refund_id=None, error="boom",
                                                     lease="A"))
    assert write(store, lambda tx: acp.lease_refunds(tx, "B", NOW + 2, NOW + 302)) == ["ps_1"]
    assert not write(store, lambda tx: acp.record_refund(tx, "ps_1", succeeded=True, refund_id="re_A", error=None,
                                                         lease="A"))  # B holds it now: A records nothing
    assert acp.refunds_due() == ["ps_1", "ps_2"]
    assert write(store, lambda tx: acp.lease_refunds(tx, "C", NOW + 300, NOW + 600,
                                                     payment_session_ids=["ps_2"])) == ["ps_2"]  # A's lease ended
    assert not write(store, lambda tx: acp.record_refund(tx, "ps_2", succeeded=True, refund_id="re_A", error=None,
                                                         lease="A"))
    for ps, lease in (("ps_1", "B"), ("ps_2", "C")):
        assert write(store, lambda tx, ps=ps, lease=lease: acp.record_refund(  # type: ignore[misc]
            tx, ps, succeeded=True, refund_id=f"re_{lease}", error=None, lease=lease))
    assert acp.refunds_due() == []
    assert write(store, lambda tx: acp.lease_refunds(tx, "D", NOW + 10_000, NOW + 10_300)) == []  # refunded


# --- two instances on one PostgreSQL database -----------------------------------------------------------------------


@pytest.fixture
def two(postgres_url: str) -> Iterator[tuple[Any, Any]]:
    """Two "servers": two PostgresStore instances (each its own writer and pool) on one database."""
    a = PostgresStore(postgres_url, writers=1, pool_size=2)
    b = PostgresStore(postgres_url, writers=1, pool_size=2)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("first_answered", [False, True], ids=["first-in-flight", "first-answered"])
def test_one_request_key_claimed_by_two_instances_at_once_is_claimed_once_and_the_other_answers_as_sqlite_does(
        two: tuple[Any, Any], tmp_path: Path, first_answered: bool) -> None:
    a, b = two

    def first(acp: AcpStore) -> Callable[[Any], KeyRecord | None]:
        def job(tx: Any) -> KeyRecord | None:
            claimed = acp.claim_key(tx, "who:/acp", "k1", "h1", NOW, expired_before=NOW - 86_400,
                                    abandoned_before=NOW - 120)
            if first_answered:
                acp.finish_key(tx, "who:/acp", "k1", 201, '{"id":"cs_1"}')
            return claimed
        return job

    def second(acp: AcpStore) -> Callable[[Any], KeyRecord | None]:
        return lambda tx: acp.claim_key(tx, "who:/acp", "k1", "h2", NOW + 1, expired_before=NOW + 1 - 86_400,
                                        abandoned_before=NOW + 1 - 120)

    claimed, other = race(a, b, first(a.acp), second(b.acp), blocks=True)

    reference = Store(tmp_path / "reference.db")  # SQLite's one writer: the two claims one after the other
    try:
        assert (claimed, other) == (reference.write_sync(first(reference.acp)),
                                    reference.write_sync(second(reference.acp)))
    finally:
        reference.close()
    assert claimed is None and other is not None and other.request_hash == "h1"
    assert other.state == (KeyState.DONE if first_answered else KeyState.IN_FLIGHT)
    assert a.query("SELECT request_hash FROM acp_idempotency") == [{"request_hash": "h1"}]


def _cancel_unless_held(acp: AcpStore) -> Callable[[Any], str]:
    """The service's cancel: read the session in the job, cancel it unless a completion holds it or it finished."""
    def job(tx: Any) -> str:
        current = acp.session_in(tx, "cs_1")
        if current is None or current.status in FINISHED or current.completing_since is not None:
            return "refused"
        acp.set_status(tx, "cs_1", CheckoutStatus.CANCELED, current.state, ISO)
        return "canceled"
    return job


SECOND_MOVES: dict[str, tuple[Callable[[AcpStore], Callable[[Any], object]], bool]] = {
    # each move and whether it waits for the first instance's row lock (a release names a hold the committed row
    # does not have: it changes nothing without waiting)
    "claim": (lambda acp: lambda tx: acp.claim(tx, "cs_1", 11.0, None, ISO), True),
    "cancel": (_cancel_unless_held, True),
    "update": (lambda acp: lambda tx: acp.save_state(tx, "cs_1", '{"lines":["x"]}', None, ISO, only_open=True), True),
    "release by another": (lambda acp: lambda tx: acp.release(tx, "cs_1", 11.0, '{"lines":["x"]}', ISO), False),
}


@pytest.mark.parametrize("move", list(SECOND_MOVES))
def test_a_completion_claim_taken_by_one_instance_is_not_taken_canceled_or_changed_by_the_other_at_once(
        two: tuple[Any, Any], move: str) -> None:
    a, b = two
    put(a, session())
    second, blocks = SECOND_MOVES[move]

    claimed, other = race(a, b, lambda tx: a.acp.claim(tx, "cs_1", 10.0, None, ISO), second(b.acp),
                                blocks=blocks)

    assert claimed is True and other in (False, "refused", None)
    held = b.acp.session("cs_1")
    assert held is not None and (held.status, held.completing_since, held.state) == (
        CheckoutStatus.IN_PROGRESS, 10.0, '{"lines":[]}')


def test_a_session_canceled_by_one_instance_cannot_be_claimed_by_the_other_at_once(two: tuple[Any, Any]) -> None:
    a, b = two
    put(a, session())

    canceled, claimed = race(a, b, _cancel_unless_held(a.acp),
                                   lambda tx: b.acp.claim(tx, "cs_1", 11.0, None, ISO), blocks=True)

    assert (canceled, claimed) == ("canceled", False)
    after = b.acp.session("cs_1")
    assert after is not None and (after.status, after.completing_since) == (CheckoutStatus.CANCELED, None)


@pytest.mark.parametrize("outbox", ["order event", "refund due"])
def test_an_outbox_row_leased_by_one_instance_is_skipped_by_the_other_at_once_and_after(
        two: tuple[Any, Any], outbox: str) -> None:
    a, b = two
    if outbox == "order event":
        write(a, lambda tx: a.acp.add_order_event(tx, "evt_1", "order_create", "ord_1", "cs_1", "{}", ISO))

        def lease(store: Any, token: str, now: float) -> Callable[[Any], list[str]]:
            return lambda tx: store.acp.lease_order_events(tx, token, now, now + 60)
    else:
        write(a, lambda tx: a.acp.mark_refund_due(tx, PaymentRow("ps_1", "cs_1", "{}", 700, "usd"), ISO,
                                                  record=True))

        def lease(store: Any, token: str, now: float) -> Callable[[Any], list[str]]:
            return lambda tx: store.acp.lease_refunds(tx, token, now, now + 60)

    taken, skipped = race(a, b, lease(a, "A", NOW), lease(b, "B", NOW), blocks=False)

    assert (taken, skipped) == ([{"order event": "evt_1"}.get(outbox, "ps_1")], [])
    assert write(b, lease(b, "B", NOW + 59)) == []  # committed: held by A until its lease ends
    assert write(b, lease(b, "B", NOW + 60)) == taken  # then taken over
