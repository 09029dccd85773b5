"""The ConnectStore contract: what any backend's implementation must do (the fixture yields the aggregate)."""

from __future__ import annotations

import pytest

from aims_billing_mcp.store import Store
from aims_billing_mcp.store.connect import (
    ACCOUNT_TRANSITIONS,
    SPLIT_TRANSITIONS,
    AccountStatus,
    ConnectedAccount,
    ConnectStore,
    DuplicatePlug,
    Plug,
    Split,
    SplitStatus,
)

NOW = "2026-12-06T00:00:00.000Z"


@pytest.fixture
def connect(backend: Store) -> ConnectStore:
    return backend.connect


def account(account_id: str = "acct_1") -> ConnectedAccount:
    return ConnectedAccount(account_id, "m@example.com", "Maker", "US", "usd", AccountStatus.ONBOARDING,
                            ("identity.individual.dob",), None, NOW, NOW)


def plug(plug_id: str = "p1", price: str = "price_1", **terms: int | None) -> Plug:
    terms = terms or {"share_bp": 7000, "platform_fee": None}
    return Plug(plug_id, "Plug", "prod_1", price, "acct_1", "usd", 1000, terms.get("share_bp"),
                terms.get("platform_fee"), NOW)


def split(split_id: str = "spl_1", sale: str = "cs_1", status: SplitStatus = SplitStatus.DECLARED) -> Split:
    return Split(split_id, "checkout", sale, "p1", "acct_1", "usd", 1000, 300, 700, status, None, None, None, 0, 0,
                 0, None, NOW, NOW)


def test_an_account_is_recorded_once(backend: Store, connect: ConnectStore) -> None:
    assert backend.write_sync(lambda tx: connect.add_account(tx, account())) is True
    assert backend.write_sync(lambda tx: connect.add_account(tx, account())) is False
    found = connect.account("acct_1")
    assert found is not None and found.requirements_due == ("identity.individual.dob",)


def test_an_older_account_event_arriving_late_changes_nothing_and_a_read_of_stripe_always_applies(
        backend: Store, connect: ConnectStore) -> None:
    backend.write_sync(lambda tx: connect.add_account(tx, account()))
    assert backend.write_sync(lambda tx: connect.set_status(tx, "acct_1", AccountStatus.ACTIVE, (), 200))
    assert not backend.write_sync(lambda tx: connect.set_status(tx, "acct_1", AccountStatus.ONBOARDING, ("x",), 100))
    found = connect.account("acct_1")
    assert found is not None and (found.status, found.last_event_created) == (AccountStatus.ACTIVE, 200)
    assert backend.write_sync(lambda tx: connect.set_status(tx, "acct_1", AccountStatus.RESTRICTED, ("y",), None))
    found = connect.account("acct_1")
    assert found is not None and (found.status, found.requirements_due, found.last_event_created) == (
        AccountStatus.RESTRICTED, ("y",), 200)


def test_a_plug_id_or_price_is_declared_once(backend: Store, connect: ConnectStore) -> None:
    backend.write_sync(lambda tx: connect.add_account(tx, account()))
    backend.write_sync(lambda tx: connect.add_plug(tx, plug()))
    for duplicate in (plug("p1", "price_2"), plug("p2", "price_1")):
        with pytest.raises(DuplicatePlug):
            backend.write_sync(lambda tx, d=duplicate: connect.add_plug(tx, d))  # type: ignore[misc]
    assert list(connect.plugs_for_prices(["price_1", "price_x"])) == ["price_1"]


@pytest.mark.parametrize("terms", [{"share_bp": 10_001, "platform_fee": None}, {"share_bp": -1, "platform_fee": None},
                                   {"share_bp": None, "platform_fee": 1001}, {"share_bp": 5, "platform_fee": 5}])
def test_the_schema_itself_refuses_a_share_outside_0_to_10000_or_a_fee_above_the_price(
        backend: Store, connect: ConnectStore, terms: dict[str, int | None]) -> None:
    backend.write_sync(lambda tx: connect.add_account(tx, account()))
    with pytest.raises(Exception, match=r"(?i)check"):
        backend.write_sync(lambda tx: connect.add_plug(tx, plug(**terms)))
    assert connect.plugs() == []


def _ready(backend: Store, connect: ConnectStore) -> None:
    backend.write_sync(lambda tx: connect.add_account(tx, account()))
    backend.write_sync(lambda tx: connect.add_plug(tx, plug()))


def test_a_sale_is_split_once_and_moves_only_along_the_transitions(backend: Store, connect: ConnectStore) -> None:
    _ready(backend, connect)
    assert backend.write_sync(lambda tx: connect.add_split(tx, split()))
    assert not backend.write_sync(lambda tx: connect.add_split(tx, split("spl_2")))  # same (path, sale, plug)
    assert backend.write_sync(lambda tx: connect.mark_paid(tx, "spl_1", SplitStatus.TRANSFERRED, payment_intent="pi_1",
                                                           transfer_group="group_pi_1", transfer_id=None))
    assert not backend.write_sync(lambda tx: connect.mark_paid(tx, "spl_1", SplitStatus.TRANSFERRED,
                                                               payment_intent="pi_2", transfer_group=None,
                                                               transfer_id=None))
    assert [s.payment_intent for s in connect.splits_of_payment("pi_1")] == ["pi_1"]
    assert SplitStatus.TRANSFERRED not in SPLIT_TRANSITIONS[SplitStatus.TRANSFERRED]
    assert AccountStatus.ONBOARDING not in ACCOUNT_TRANSITIONS[AccountStatus.ACTIVE]


@pytest.mark.parametrize(("source", "target"), [(s, t) for s in SplitStatus for t in SplitStatus])
def test_mark_paid_follows_the_transition_table(backend: Store, connect: ConnectStore, source: SplitStatus,
                                                target: SplitStatus) -> None:
    _ready(backend, connect)
    backend.write_sync(lambda tx: connect.add_split(tx, split(status=source)))
    moved = backend.write_sync(lambda tx: connect.mark_paid(tx, "spl_1", target, payment_intent=None,
                                                            transfer_group=None, transfer_id=None))
    assert moved is (target in SPLIT_TRANSITIONS[source])


def test_refunds_never_pass_what_the_sale_took_and_earnings_add_up(backend: Store, connect: ConnectStore) -> None:
    _ready(backend, connect)
    backend.write_sync(lambda tx: connect.add_split(tx, split(status=SplitStatus.TRANSFERRED)))
    backend.write_sync(lambda tx: connect.add_split(tx, split("spl_2", "cs_2", SplitStatus.PENDING)))
    backend.write_sync(lambda tx: connect.add_split(tx, split("spl_3", "cs_3", SplitStatus.DECLARED)))
    assert backend.write_sync(lambda tx: connect.add_refund(tx, "spl_1", 500, 350, 150))
    assert not backend.write_sync(lambda tx: connect.add_refund(tx, "spl_1", 501, 351, 150))
    (earned,) = connect.earnings("acct_1", None)
    assert (earned.sales, earned.gross, earned.platform_fees, earned.transferred, earned.reversed,
            earned.fee_refunded, earned.pending) == (2, 2000, 600, 700, 350, 150, 700)


def test_a_stripe_refund_of_a_split_sale_is_claimed_once(backend: Store, connect: ConnectStore) -> None:
    assert backend.write_sync(lambda tx: connect.claim_refund(tx, "re_1", "pi_1", 500, 350, 150, "cs_1:k")) is True
    assert backend.write_sync(lambda tx: connect.claim_refund(tx, "re_1", "pi_1", 500, 350, 150, "cs_1:k")) is False
    assert backend.write_sync(lambda tx: connect.claim_refund(tx, "re_2", "pi_1", 500, 350, 150, None)) is True
    assert connect.refund_of_request("cs_1:k") == ("re_1", 500, 350, 150)
    assert connect.refund_of_request("cs_1:other") is None
