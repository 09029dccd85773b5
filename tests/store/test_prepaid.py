"""The prepaid store's contract: what any backend of `PrepaidStore` must do. The `backend` fixture runs every test on
SQLite and on PostgreSQL; the last tests are PostgreSQL's own: two instances (two PostgresStore on one database)
working one outbox."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from aims_billing_mcp.store import PostgresStore, Tx
from aims_billing_mcp.store.prepaid import (
    OPEN,
    TRANSITIONS,
    PrepaidRow,
    PrepaidStatus,
    PrepaidStore,
    may_move,
)
from tests.support.pg_turns import race

T = TypeVar("T")
S = PrepaidStatus
AT = "2026-12-06T04:00:00.000Z"


@pytest.fixture
def prepaid(backend: Any) -> PrepaidStore:
    store: PrepaidStore = backend.prepaid
    return store


def enqueue(prepaid: PrepaidStore, write: Any, source_id: str, *, customer: str = "cus_1",
            at: str = AT) -> PrepaidRow:
    row: PrepaidRow = write(lambda tx: prepaid.enqueue(
        tx, row_id=f"pre_{source_id}", source="payment_session", source_id=source_id, customer=customer,
        tier="3mo", amount=9000, currency="usd", payment_intent=f"pi_{source_id}", at=at))
    return row


def test_enqueue_records_one_pending_row_per_source_and_a_second_changes_nothing(prepaid: PrepaidStore,
                                                                                write: Any) -> None:
    first = enqueue(prepaid, write, "ps_1")
    again: PrepaidRow = write(lambda tx: prepaid.enqueue(
        tx, row_id="pre_ps_1", source="payment_session", source_id="ps_1", customer="cus_other", tier="9mo",
        amount=1, currency="eur", payment_intent=None, at="2027-01-01T00:00:00.000Z"))
    assert first.status is S.PENDING and (first.tier, first.amount, first.attempts) == ("3mo", 9000, 0)
    assert again == first == prepaid.find("pre_ps_1")


def test_a_missing_row_is_none_outside_a_transaction_and_a_key_error_inside(prepaid: PrepaidStore,
                                                                            write: Any) -> None:
    assert prepaid.find("pre_nothing") is None
    with pytest.raises(KeyError):
        write(lambda tx: prepaid.read(tx, "pre_nothing"))


def test_advance_moves_only_from_an_expected_status(prepaid: PrepaidStore, write: Any) -> None:
    enqueue(prepaid, write, "ps_1")
    moved, ok = write(lambda tx: prepaid.advance(tx, "pre_ps_1", (S.PENDING,), S.CLAIMED, AT))
    stale, again = write(lambda tx: prepaid.advance(tx, "pre_ps_1", (S.PENDING,), S.CLAIMED, AT))
    credited, ok2 = write(lambda tx: prepaid.advance(tx, "pre_ps_1", (S.CLAIMED,), S.CREDITED, AT,
                                                     balance_transaction_id="cbtxn_1", starts_at=1_790_000_000))
    assert (ok, moved.status, again, stale.status) == (True, S.CLAIMED, False, S.CLAIMED)
    assert ok2 and (credited.status, credited.balance_transaction_id, credited.starts_at) == (
        S.CREDITED, "cbtxn_1", 1_790_000_000)


def test_advance_refuses_a_value_that_is_not_a_column(prepaid: PrepaidStore, write: Any) -> None:
    enqueue(prepaid, write, "ps_1")
    with pytest.raises(ValueError, match="not prepaid_subscriptions columns"):
        write(lambda tx: prepaid.advance(tx, "pre_ps_1", (S.PENDING,), S.CLAIMED, AT, **{"status = 1 --": 1}))


@pytest.mark.parametrize(("before", "after"), [(S.PENDING, S.STARTED), (S.STARTED, S.PENDING),
                                               (S.REFUNDED, S.REFUNDING), (S.CLAIMED, S.SUBSCRIBED)])
def test_a_move_the_machine_does_not_allow_is_refused_before_writing(prepaid: PrepaidStore, write: Any,
                                                                     before: PrepaidStatus,
                                                                     after: PrepaidStatus) -> None:
    enqueue(prepaid, write, "ps_1")
    with pytest.raises(ValueError, match=f"cannot go from {before} to {after}"):
        write(lambda tx: prepaid.advance(tx, "pre_ps_1", (before,), after, AT))
    with pytest.raises(ValueError, match="cannot go from"):
        write(lambda tx: prepaid.complete(tx, "pre_ps_1", before, after, 1, AT))
    row = prepaid.find("pre_ps_1")
    assert row is not None and row.status is S.PENDING


def test_pending_is_the_open_rows_oldest_first(prepaid: PrepaidStore, write: Any) -> None:
    enqueue(prepaid, write, "ps_new", at="2026-12-06T05:00:00.000Z")
    enqueue(prepaid, write, "ps_old", at="2026-12-06T01:00:00.000Z")
    enqueue(prepaid, write, "ps_done")
    write(lambda tx: prepaid.advance(tx, "pre_ps_done", (S.PENDING,), S.CLAIMED, AT))
    write(lambda tx: prepaid.advance(tx, "pre_ps_done", (S.CLAIMED,), S.CREDITED, AT))
    write(lambda tx: prepaid.advance(tx, "pre_ps_done", (S.CREDITED,), S.SUBSCRIBED, AT, subscription_id="sub_1"))
    done, completed = write(lambda tx: prepaid.complete(tx, "pre_ps_done", S.SUBSCRIBED, S.STARTED, 1_800_000_000,
                                                        AT))
    assert completed and (done.status, done.ends_at) == (S.STARTED, 1_800_000_000)
    enqueue(prepaid, write, "ps_failed")
    write(lambda tx: prepaid.fail(tx, "pre_ps_failed", S.FAILED, "no", AT))
    assert [row.id for row in prepaid.pending()] == ["pre_ps_old", "pre_ps_new"]
    assert all(row.status in OPEN for row in prepaid.pending())


def test_lease_is_compare_and_set_on_starts_at(prepaid: PrepaidStore, write: Any) -> None:
    enqueue(prepaid, write, "ps_1")
    write(lambda tx: prepaid.advance(tx, "pre_ps_1", (S.PENDING,), S.CLAIMED, AT))
    write(lambda tx: prepaid.advance(tx, "pre_ps_1", (S.CLAIMED,), S.CREDITED, AT, starts_at=100))
    won, ok = write(lambda tx: prepaid.lease(tx, "pre_ps_1", 200, 100, AT))
    lost, still_credited = write(lambda tx: prepaid.lease(tx, "pre_ps_1", 300, 100, AT))
    assert (won.starts_at, ok) == (200, True)
    assert (lost.starts_at, still_credited) == (200, True)  # the loser takes the winner's lease


@pytest.mark.parametrize(("provision_status", "holds"), [("active", True), ("canceled", False),
                                                         ("incomplete_expired", False)])
def test_a_failed_row_holds_its_customers_tier_while_its_subscription_lives(
        backend: Any, prepaid: PrepaidStore, write: Any, provision_status: str, holds: bool) -> None:
    enqueue(prepaid, write, "ps_1")
    write(lambda tx: prepaid.advance(tx, "pre_ps_1", (S.PENDING,), S.FAILED, AT, subscription_id="sub_1"))
    write(lambda tx: tx.execute("INSERT INTO billing_provisions (customer_id, tier, status, subscription_id, "
                                "updated_at) VALUES ('cus_1', '3mo', ?, 'sub_1', ?)", (provision_status, AT)))
    assert prepaid.open_tier("cus_1") == ("3mo" if holds else None)


def test_holder_names_another_row_in_progress_and_the_customers_provision(backend: Any, prepaid: PrepaidStore,
                                                                          write: Any) -> None:
    first = enqueue(prepaid, write, "ps_1")
    second = enqueue(prepaid, write, "ps_2")
    alone = write(lambda tx: prepaid.holder(tx, first))
    write(lambda tx: prepaid.advance(tx, "pre_ps_2", (S.PENDING,), S.CLAIMED, AT))
    write(lambda tx: tx.execute("INSERT INTO billing_provisions (customer_id, tier, status, updated_at) "
                                "VALUES ('cus_1', '6mo', 'active', ?)", (AT,)))
    held = write(lambda tx: prepaid.holder(tx, first))
    assert (alone.other_id, alone.provision) == (None, None)
    assert (held.other_id, held.other_tier) == (second.id, "3mo")
    assert held.provision is not None and (held.provision["tier"], held.provision["status"]) == ("6mo", "active")


def test_reopen_puts_failed_rows_back_where_they_stopped_and_refused_ones_only_when_named(
        prepaid: PrepaidStore, write: Any) -> None:
    for source, values in (("ps_a", {}), ("ps_b", {"balance_transaction_id": "cbtxn_b"}),
                           ("ps_c", {"balance_transaction_id": "cbtxn_c", "subscription_id": "sub_c"})):
        enqueue(prepaid, write, source)
        write(lambda tx, s=source, v=values: prepaid.advance(tx, f"pre_{s}", (S.PENDING,), S.FAILED, AT,
                                                             attempts=3, **v))
    enqueue(prepaid, write, "ps_r")
    write(lambda tx: prepaid.fail(tx, "pre_ps_r", S.REFUSED, "has a tier", AT))
    write(lambda tx: prepaid.reopen(tx))
    after = {row_id: prepaid.find(row_id) for row_id in ("pre_ps_a", "pre_ps_b", "pre_ps_c", "pre_ps_r")}
    assert {k: (v.status, v.attempts) for k, v in after.items() if v} == {
        "pre_ps_a": (S.PENDING, 0), "pre_ps_b": (S.CREDITED, 0), "pre_ps_c": (S.SUBSCRIBED, 0),
        "pre_ps_r": (S.REFUSED, 0)}
    write(lambda tx: prepaid.reopen(tx, ("pre_ps_r",)))
    reopened = prepaid.find("pre_ps_r")
    assert reopened is not None and reopened.status is S.PENDING


def test_a_refund_hold_is_recorded_let_go_and_its_outcome_keeps_what_it_is_not_told(prepaid: PrepaidStore,
                                                                                    write: Any) -> None:
    enqueue(prepaid, write, "ps_1")
    write(lambda tx: prepaid.fail(tx, "pre_ps_1", S.FAILED, "declined", AT))
    held = write(lambda tx: prepaid.hold_for_refund(tx, "pre_ps_1", 1_800_000_000.5, AT))
    assert (held.status, held.refund_claimed_at) == (S.REFUNDING, 1_800_000_000.5)
    write(lambda tx: prepaid.release_refund(tx, "pre_ps_1"))
    released = prepaid.find("pre_ps_1")
    assert released is not None and released.refund_claimed_at is None
    pending = write(lambda tx: prepaid.record_refund(tx, "pre_ps_1", S.REFUNDING, "re_1", None, "re_1 is pending",
                                                     AT))
    done = write(lambda tx: prepaid.record_refund(tx, "pre_ps_1", S.REFUNDED, None, 9000, None, AT))
    assert (pending.refund_id, pending.last_error) == ("re_1", "re_1 is pending")
    assert (done.status, done.refund_id, done.refunded_amount, done.last_error) == (S.REFUNDED, "re_1", 9000,
                                                                                    "re_1 is pending")


def test_a_refund_run_lets_go_only_of_its_own_hold(prepaid: PrepaidStore, write: Any) -> None:
    enqueue(prepaid, write, "ps_1")
    write(lambda tx: prepaid.fail(tx, "pre_ps_1", S.FAILED, "declined", AT))
    write(lambda tx: prepaid.hold_for_refund(tx, "pre_ps_1", 1_000.0, AT))  # a run that outlived its lease ...
    write(lambda tx: prepaid.hold_for_refund(tx, "pre_ps_1", 1_700.0, AT))  # ... and the newer run holding it now
    write(lambda tx: prepaid.release_refund(tx, "pre_ps_1", 1_000.0))
    kept = prepaid.find("pre_ps_1")
    write(lambda tx: prepaid.release_refund(tx, "pre_ps_1", 1_700.0))
    released = prepaid.find("pre_ps_1")
    assert kept is not None and released is not None
    assert (kept.refund_claimed_at, released.refund_claimed_at) == (1_700.0, None)


def test_rows_lists_every_row_or_one_customers(prepaid: PrepaidStore, write: Any) -> None:
    enqueue(prepaid, write, "ps_1", customer="cus_1")
    enqueue(prepaid, write, "ps_2", customer="cus_2")
    assert [row.id for row in prepaid.rows()] == ["pre_ps_1", "pre_ps_2"]
    assert [row.id for row in prepaid.rows("cus_2")] == ["pre_ps_2"]


def test_the_states_are_exactly_those_the_table_allows(backend: Any) -> None:
    if isinstance(backend, PostgresStore):
        found = backend.query_one("SELECT pg_get_constraintdef(oid) AS sql FROM pg_constraint WHERE conrelid = "
                                  "'prepaid_subscriptions'::regclass AND pg_get_constraintdef(oid) LIKE '%%status%%'")
    else:
        found = backend.query_one("SELECT sql FROM sqlite_master WHERE name = 'prepaid_subscriptions'")
    assert found is not None
    check = re.search(r"status\)? (?:IN \(|= ANY \(\(?ARRAY\[)([^)\]]*)", found["sql"])
    assert check is not None
    assert set(re.findall(r"'(\w+)'", check.group(1))) == {status.value for status in PrepaidStatus}


def test_the_transitions_cover_every_state_and_end_only_in_started_or_refunded() -> None:
    assert set(TRANSITIONS) == set(PrepaidStatus)
    assert {status for status, after in TRANSITIONS.items() if not after} == {S.STARTED, S.REFUNDED}
    # the worker's path and the operator's two ways out of a failure
    path = [S.PENDING, S.CLAIMED, S.CREDITED, S.SUBSCRIBED, S.STARTED]
    assert all(may_move(a, b) for a, b in itertools.pairwise(path))
    assert may_move(S.FAILED, S.REFUNDING) and may_move(S.REFUNDING, S.REFUNDED)
    assert not may_move(S.STARTED, S.PENDING) and not may_move(S.REFUNDED, S.REFUNDING)


# --- PostgreSQL: two instances on one database ------------------------------------------------------------------

def test_a_step_taken_by_two_instances_at_once_is_taken_by_one(two_instances: tuple[Any, Any]) -> None:
    a, b = two_instances
    enqueue(a.prepaid, a.write_sync, "ps_1")

    def step(store: Any, balance_transaction: str) -> Callable[[Tx], tuple[PrepaidRow, bool]]:
        return lambda tx: store.prepaid.advance(tx, "pre_ps_1", (S.PENDING,), S.CLAIMED, AT,
                                                balance_transaction_id=balance_transaction)

    (first, moved_first), (second, moved_second) = race(a, b, step(a, "cbtxn_a"), step(b, "cbtxn_b"))
    assert (moved_first, moved_second) == (True, False)
    assert first == second and second.balance_transaction_id == "cbtxn_a"  # the loser sees the winner's row


def claim(store: Any, row_id: str) -> Callable[[Tx], tuple[PrepaidRow, bool]]:
    """The worker's claim (services/prepaid.py `_claim`): pending -> claimed only when nothing else holds the tier."""
    def job(tx: Tx) -> tuple[PrepaidRow, bool]:
        row = store.prepaid.read(tx, row_id)
        if store.prepaid.holder(tx, row).other_id is not None:
            return row, False
        result: tuple[PrepaidRow, bool] = store.prepaid.advance(tx, row_id, (S.PENDING,), S.CLAIMED, AT)
        return result

    return job


def test_two_instances_claiming_two_rows_of_one_customer_at_once_start_one(two_instances: tuple[Any, Any]) -> None:
    a, b = two_instances
    enqueue(a.prepaid, a.write_sync, "ps_1")
    enqueue(a.prepaid, a.write_sync, "ps_2")

    (_, first), (_, second) = race(a, b, claim(a, "pre_ps_1"), claim(b, "pre_ps_2"))

    assert (first, second) == (True, False)  # the second waited for the customer's lock, then saw the first claim
    assert sorted((row.id, row.status) for row in a.prepaid.rows()) == [("pre_ps_1", S.CLAIMED),
                                                                        ("pre_ps_2", S.PENDING)]


def test_a_creation_lease_set_by_two_instances_at_once_is_the_first_ones(two_instances: tuple[Any, Any]) -> None:
    a, b = two_instances
    enqueue(a.prepaid, a.write_sync, "ps_1")
    a.write_sync(lambda tx: a.prepaid.advance(tx, "pre_ps_1", (S.PENDING,), S.CLAIMED, AT))
    a.write_sync(lambda tx: a.prepaid.advance(tx, "pre_ps_1", (S.CLAIMED,), S.CREDITED, AT, starts_at=100))

    (first, _), (second, credited) = race(a, b, lambda tx: a.prepaid.lease(tx, "pre_ps_1", 200, 100, AT),
                                          lambda tx: b.prepaid.lease(tx, "pre_ps_1", 300, 100, AT))

    assert (first.starts_at, second.starts_at, credited) == (200, 200, True)  # both send the one request


def refund_hold(store: Any, now: float) -> Callable[[Tx], tuple[PrepaidRow, bool]]:
    """A refund run's claim (services/prepaid.py `_refund_claim`): taken when free or its lease (600 s) expired."""
    def job(tx: Tx) -> tuple[PrepaidRow, bool]:
        row = store.prepaid.read(tx, "pre_ps_1")
        if row.refund_claimed_at is not None and now - row.refund_claimed_at < 600:
            return row, False
        return store.prepaid.hold_for_refund(tx, "pre_ps_1", now, AT), True

    return job


@pytest.mark.parametrize("earlier_hold", [None, 1_000.0], ids=["free", "expired"])
def test_a_refund_hold_taken_by_two_instances_at_once_is_taken_by_one(two_instances: tuple[Any, Any],
                                                                      earlier_hold: float | None) -> None:
    a, b = two_instances
    enqueue(a.prepaid, a.write_sync, "ps_1")
    a.write_sync(lambda tx: a.prepaid.fail(tx, "pre_ps_1", S.FAILED, "declined", AT))
    if earlier_hold is not None:  # a run that died holding it
        a.write_sync(lambda tx: a.prepaid.hold_for_refund(tx, "pre_ps_1", earlier_hold, AT))

    (_, first), (seen, second) = race(a, b, refund_hold(a, 5_000.0), refund_hold(b, 5_001.0))

    assert (first, second, seen.refund_claimed_at) == (True, False, 5_000.0)
