"""The commerce store's contract: what any backend of `CommerceStore` must do. The `backend` fixture runs every test
on SQLite and on PostgreSQL; the last tests are PostgreSQL's own: two instances (two PostgresStore on one database)
racing for the same session."""

from __future__ import annotations

import threading
from typing import Any, TypeVar

import pytest

from aims_billing_mcp.store import Tx
from aims_billing_mcp.store.commerce import (
    SETTLED,
    TERMINAL,
    TRANSITIONS,
    CommerceStore,
    PaymentSessionRow,
    SessionStatus,
    session_status,
)
from aims_billing_mcp.store.core import broken_unique_key
from tests.support.pg_turns import wait_until_blocked

T = TypeVar("T")
S = SessionStatus
AT = "2026-12-06T04:00:00.000Z"


@pytest.fixture
def commerce(backend: Any) -> CommerceStore:
    store: CommerceStore = backend.commerce
    return store


def create(commerce: CommerceStore, write: Any, session_id: str, *, status: SessionStatus = S.REQUIRES_PAYMENT_METHOD,
           amount: int = 500) -> PaymentSessionRow:
    row: PaymentSessionRow = write(lambda tx: commerce.create(
        tx, session_id=session_id, customer="cus_1", agent_id="agent-1", item="luc_10k", amount=amount,
        currency="usd", description="10k LUC", status=status, payment_intent=f"pi_{session_id}",
        idempotency_key=f"key_{session_id}", amount_received=0, at=AT))
    return row


def test_create_records_a_session_once_and_a_second_create_changes_nothing(commerce: CommerceStore,
                                                                           write: Any) -> None:
    first = create(commerce, write, "ps_1")
    again = create(commerce, write, "ps_1", amount=999, status=S.SUCCEEDED)
    assert (first.status, first.amount, first.fulfilment, first.fulfilled_at) == (S.REQUIRES_PAYMENT_METHOD, 500,
                                                                                   None, None)
    assert again == first == commerce.find("ps_1")


def test_one_payment_intent_belongs_to_one_session(commerce: CommerceStore, write: Any) -> None:
    create(commerce, write, "ps_1")
    with pytest.raises(Exception) as refused:  # the backend's own IntegrityError
        write(lambda tx: commerce.create(
            tx, session_id="ps_2", customer=None, agent_id=None, item=None, amount=1, currency="usd",
            description=None, status=S.REQUIRES_PAYMENT_METHOD, payment_intent="pi_ps_1", idempotency_key="other",
            amount_received=0, at=AT))
    assert broken_unique_key(refused.value) in ("payment_sessions.payment_intent_id",
                                                "payment_sessions_payment_intent_id_key")
    found = write(lambda tx: commerce.by_payment_intent(tx, "pi_ps_1"))
    assert found is not None and found.id == "ps_1"
    assert write(lambda tx: commerce.by_payment_intent(tx, "pi_unknown")) is None
    assert commerce.find("ps_2") is None


def test_fulfilment_is_claimed_by_exactly_one_caller_until_it_is_given_back(commerce: CommerceStore,
                                                                            write: Any) -> None:
    create(commerce, write, "ps_1")
    claims = [write(lambda tx: commerce.claim_fulfilment(tx, "ps_1", AT)) for _ in range(3)]
    write(lambda tx: commerce.record_fulfilment(tx, "ps_1", {"kind": "credit", "status": "failed"}, None))
    retried = write(lambda tx: commerce.claim_fulfilment(tx, "ps_1", AT))
    write(lambda tx: commerce.record_fulfilment(tx, "ps_1", {"kind": "credit", "luc_credited": 10_000}, AT))
    row = commerce.find("ps_1")
    assert claims == [True, False, False] and retried is True
    assert row is not None and row.fulfilled_at == AT and row.fulfilment == {"kind": "credit", "luc_credited": 10_000}


@pytest.mark.parametrize("status", list(SessionStatus))
def test_recording_a_settled_status_clears_the_confirm_mark_and_an_open_one_keeps_it(
        commerce: CommerceStore, write: Any, status: SessionStatus) -> None:
    create(commerce, write, "ps_1")
    write(lambda tx: commerce.mark_confirming(tx, "ps_1", AT))
    write(lambda tx: commerce.record_status(tx, "ps_1", status, 500, "note", AT))
    row = commerce.find("ps_1")
    assert row is not None and (row.status, row.amount_received, row.last_error) == (status, 500, "note")
    assert commerce.confirming("ps_1") is (status not in SETTLED)
    assert commerce.unsettled_confirms() == ([] if status in SETTLED else ["ps_1"])


@pytest.mark.parametrize("status", list(SessionStatus))
def test_a_failed_confirm_makes_a_session_payable_again_unless_it_has_ended(
        commerce: CommerceStore, write: Any, status: SessionStatus) -> None:
    create(commerce, write, "ps_1", status=status)
    write(lambda tx: commerce.mark_confirming(tx, "ps_1", AT))
    write(lambda tx: commerce.mark_payable(tx, "ps_1", "declined", AT))
    row = commerce.find("ps_1")
    assert row is not None
    if status in TERMINAL:
        assert (row.status, row.last_error, row.confirming_since) == (status, None, AT)
    else:
        assert (row.status, row.last_error, row.confirming_since) == (S.REQUIRES_PAYMENT_METHOD, "declined", None)


def test_unsettled_confirms_are_listed_oldest_mark_first(commerce: CommerceStore, write: Any) -> None:
    for session_id, at in (("ps_b", "2026-12-06T02:00:00.000Z"), ("ps_a", "2026-12-06T03:00:00.000Z"),
                           ("ps_c", None)):
        create(commerce, write, session_id)
        if at is not None:
            write(lambda tx, s=session_id, a=at: commerce.mark_confirming(tx, s, a))
    assert commerce.unsettled_confirms() == ["ps_b", "ps_a"]


def test_a_wallets_customer_is_found_by_its_agent(backend: Any, commerce: CommerceStore, write: Any) -> None:
    write(lambda tx: tx.execute("INSERT INTO agent_wallets (id, agent_id, customer_id, created_at, updated_at) "
                                "VALUES ('w_1', 'agent-1', 'cus_1', ?, ?)", (AT, AT)))
    assert commerce.wallet_customer("agent-1") == "cus_1"
    assert commerce.wallet_customer("agent-2") is None


def test_a_session_follows_stripe_until_it_succeeds_or_is_canceled() -> None:
    assert set(TRANSITIONS) == set(SessionStatus)
    assert {status for status, after in TRANSITIONS.items() if not after} == set(TERMINAL)
    assert all(S.SUCCEEDED in after for status, after in TRANSITIONS.items() if status not in TERMINAL)
    assert all(status not in after for status, after in TRANSITIONS.items())
    assert session_status("requires_action", S.CANCELED) is S.REQUIRES_ACTION
    assert session_status("a_status_stripe_adds_later", S.PROCESSING) is S.PROCESSING


# --- PostgreSQL: two instances on one database ------------------------------------------------------------------

@pytest.mark.parametrize("second_reads_first", [False, True], ids=["claims", "reads-then-claims"])
def test_a_fulfilment_claimed_by_two_instances_at_once_is_claimed_once(two_instances: tuple[Any, Any],
                                                                        second_reads_first: bool) -> None:
    a, b = two_instances
    create(a.commerce, a.write_sync, "ps_1")
    claimed, go = threading.Event(), threading.Event()

    def first(tx: Tx) -> bool:
        won = a.commerce.claim_fulfilment(tx, "ps_1", AT)
        claimed.set()
        go.wait(20)  # the claim is made and not committed while the other instance tries
        return bool(won)

    def second(tx: Tx) -> tuple[str | None, bool]:
        seen = b.commerce.by_payment_intent(tx, "pi_ps_1").fulfilled_at if second_reads_first else None
        return seen, b.commerce.claim_fulfilment(tx, "ps_1", "2026-12-06T04:00:01.000Z")

    one = a.submit(first)
    assert claimed.wait(20)
    other = b.submit(second)
    wait_until_blocked(a)  # the second waits on the first's row lock
    go.set()
    seen, won_second = other.result(20)
    assert (one.result(20), won_second) == (True, False)
    assert seen == (AT if second_reads_first else None)  # it read the session as the first committed it
    row = b.commerce.find("ps_1")
    assert row is not None and row.fulfilled_at == AT
