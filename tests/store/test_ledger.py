"""The ledger store's operations on their own: the contract a second backend must keep (wallets, postings, holds
and their one-way states, request keys, the invariant check, the report reads). The rules built on them (funds,
caps, freezing, replay) are tested through the service in test_ledger.py."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import pytest

from aims_billing_mcp.errors import InvalidState
from aims_billing_mcp.store import PostgresStore, Store, Tx, utc_iso
from aims_billing_mcp.store.ledger import TRANSITIONS, HoldStatus, LedgerStore, WalletState
from aims_billing_mcp.store.reports import LedgerCounts, ReportsStore

Run = Callable[[Callable[[Tx], Any]], Any]  # runs one job in the writer's transaction, returns after COMMIT
NOW = 1_768_478_400.0  # 2026-01-15T12:00:00Z
ISO = utc_iso(NOW)
LATER = utc_iso(NOW + 120)


@pytest.fixture
def ledger(backend: Store) -> LedgerStore:
    return backend.ledger


@pytest.fixture
def reports(backend: Store) -> ReportsStore:
    return backend.reports


@pytest.fixture
def run(backend: Store) -> Run:
    """Run one job in the writer's transaction and return its result after COMMIT."""
    return backend.write_sync


def open_wallet(ledger: LedgerStore, tx: Tx, agent: str, balance: int = 0, customer: str = "cus_1") -> WalletState:
    """A wallet credited with `balance` from system:issuance, as the service would post it."""
    ledger.create_wallet(tx, f"wal_{agent}", agent, customer, None, ISO)
    wallet = ledger.load_wallet(tx, agent, ISO)
    assert wallet is not None
    if balance:
        wallet.balance = balance
        ledger.save_wallet(tx, wallet, ISO)
        ledger.post(tx, f"txn_seed_{agent}", "credit", f"credit:seed-{agent}", "seed", None, None, ISO,
                    (wallet.account, wallet.id, balance, 0, balance), ("system:issuance", None, -balance, 0, None))
    return wallet


def place(ledger: LedgerStore, tx: Tx, wallet: WalletState, hold_id: str, amount: int, expires_at: str) -> None:
    """A hold as the service places it: the hold row, its pending entries, the wallet's held amount."""
    wallet.held += amount
    ledger.save_wallet(tx, wallet, ISO)
    ledger.place_hold(tx, hold_id, wallet.id, amount, expires_at, f"txn_{hold_id}", ISO)
    ledger.post(tx, f"txn_{hold_id}", "hold", f"hold:{hold_id}", "task", None, hold_id, ISO,
                (wallet.account, wallet.id, 0, amount, wallet.balance), ("system:revenue", None, 0, -amount, None))


def release(ledger: LedgerStore, tx: Tx, hold_id: str, status: HoldStatus, captured: int = 0) -> None:
    """Resolve a hold as the service does: the wallet, the hold's state, the resolving entries."""
    hold = ledger.load_hold(tx, hold_id)
    assert hold is not None
    wallet = ledger.load_wallet(tx, hold.agent_id, ISO)
    assert wallet is not None
    wallet.balance -= captured
    wallet.held -= hold.amount
    wallet.spend_day, wallet.spent_today = int(NOW // 86_400), captured
    ledger.save_wallet(tx, wallet, ISO)
    ledger.resolve_hold(tx, hold_id, status, f"txn_r_{hold_id}", ISO, captured)
    kind = {HoldStatus.CAPTURED: "capture", HoldStatus.RELEASED: "release", HoldStatus.EXPIRED: "expire"}[status]
    ledger.post(tx, f"txn_r_{hold_id}", kind, f"resolve:{hold_id}", "done", None, hold_id, ISO,  # type: ignore[arg-type]
                (wallet.account, wallet.id, -captured, -hold.amount, wallet.balance),
                ("system:revenue", None, captured, hold.amount, None))


# --- wallets ------------------------------------------------------------------------------------------------------


def test_a_new_wallet_loads_empty_and_an_unknown_agent_loads_as_none(ledger: LedgerStore, run: Run) -> None:
    def job(tx: Tx) -> tuple[WalletState | None, WalletState | None, str | None, int]:
        ledger.create_wallet(tx, "wal_a", "agent-a", "cus_1", 500, ISO)
        return (ledger.load_wallet(tx, "agent-a", ISO), ledger.load_wallet(tx, "ghost", ISO),
                ledger.wallet_owner(tx, "agent-a"), ledger.count_wallets(tx, "cus_1"))

    wallet, ghost, owner, count = run(job)

    assert wallet == WalletState("wal_a", "agent-a", "cus_1", balance=0, held=0, daily_cap=500, frozen=False,
                                 spend_day=0, spent_today=0, loaded_balance=0, expired=[])
    assert (ghost, owner, count) == (None, "cus_1", 1)
    assert (ledger.wallet_id("agent-a"), ledger.wallet_customer("agent-a")) == ("wal_a", "cus_1")
    assert (ledger.wallet_id("ghost"), ledger.wallet_customer("ghost")) == (None, None)


def test_a_saved_wallet_loads_as_it_was_saved(ledger: LedgerStore, run: Run) -> None:
    def job(tx: Tx) -> WalletState | None:
        wallet = open_wallet(ledger, tx, "a", 100)
        wallet.frozen, wallet.spend_day, wallet.spent_today = True, 20_468, 40
        ledger.save_wallet(tx, wallet, ISO)
        return ledger.load_wallet(tx, "a", ISO)

    loaded = run(job)

    assert loaded is not None
    assert (loaded.balance, loaded.loaded_balance, loaded.frozen, loaded.spend_day, loaded.spent_today) == (
        100, 100, True, 20_468, 40)


# --- postings and reads -------------------------------------------------------------------------------------------


def test_posted_entries_read_back_newest_first_with_their_counterparty(ledger: LedgerStore, run: Run) -> None:
    def job(tx: Tx) -> None:
        wallet = open_wallet(ledger, tx, "a", 100)
        wallet.balance -= 30
        ledger.save_wallet(tx, wallet, ISO)
        ledger.post(tx, "txn_d", "debit", "debit:d", "task", "mev_1", None, LATER,
                    (wallet.account, wallet.id, -30, 0, 70), ("system:revenue", None, 30, 0, None))

    run(job)
    snapshot = ledger.read_wallet("a", ISO, recent=10)

    assert snapshot is not None and snapshot.balance == 70
    assert [(e.txn_id, e.kind, e.amount, e.balance_after, e.counterparty, e.reference) for e in snapshot.recent] == [
        ("txn_d", "debit", -30, 70, "system:revenue", "mev_1"),
        ("txn_seed_a", "credit", 100, 100, "system:issuance", None),
    ]
    assert ledger.read_wallet("ghost", ISO, recent=10) is None
    assert ledger.check_ledger() == []


@pytest.mark.parametrize(("filters", "expected"), [
    ({}, ["txn_d", "txn_seed_a"]),
    ({"kind": "credit"}, ["txn_seed_a"]),
    ({"since": LATER}, ["txn_d"]),
    ({"until": LATER}, ["txn_seed_a"]),
    ({"limit": 1}, ["txn_d"]),
])
def test_entries_are_listed_newest_first_within_the_filters(
    ledger: LedgerStore, run: Run, filters: dict[str, object], expected: list[str]
) -> None:
    def job(tx: Tx) -> None:
        wallet = open_wallet(ledger, tx, "a", 100)
        ledger.post(tx, "txn_d", "debit", "debit:d", "task", None, None, LATER,
                    (wallet.account, wallet.id, -30, 0, 70), ("system:revenue", None, 30, 0, None))
        wallet.balance = 70
        ledger.save_wallet(tx, wallet, LATER)

    run(job)
    entries = ledger.list_entries("wal_a", **filters)  # type: ignore[arg-type]

    assert [e.txn_id for e in entries] == expected
    older = ledger.list_entries("wal_a", before=entries[0].entry_id)
    assert all(e.entry_id < entries[0].entry_id for e in older)


# --- request keys ---------------------------------------------------------------------------------------------------


def test_a_recorded_request_is_found_only_under_its_owner_operation_and_key(ledger: LedgerStore, run: Run) -> None:
    def job(tx: Tx) -> list[object]:
        before = ledger.find_request(tx, "a", "debit", "k")
        ledger.record_request(tx, "a", "debit", "k", "hash1", '{"txn_id": "txn_1"}', "txn_1", ISO)
        found = ledger.find_request(tx, "a", "debit", "k")
        others = [ledger.find_request(tx, *other) for other in (("b", "debit", "k"), ("a", "credit", "k"),
                                                                 ("a", "debit", "k2"))]
        return [before, found, others]

    before, found, others = run(job)

    assert before is None
    assert (found.request_hash, found.response) == ("hash1", '{"txn_id": "txn_1"}')  # type: ignore[attr-defined]
    assert others == [None, None, None]


# --- holds ----------------------------------------------------------------------------------------------------------


def test_a_placed_hold_is_active_on_its_agents_wallet_until_it_expires(ledger: LedgerStore, run: Run) -> None:
    def job(tx: Tx) -> list[object]:
        wallet = open_wallet(ledger, tx, "a", 100)
        place(ledger, tx, wallet, "hold_1", 30, utc_iso(NOW + 60))
        place(ledger, tx, wallet, "hold_2", 20, utc_iso(NOW + 600))
        return [ledger.load_hold(tx, "hold_1"), ledger.hold_owner(tx, "hold_1"), ledger.hold_owner(tx, "hold_x"),
                ledger.load_hold(tx, "hold_x"), ledger.load_wallet(tx, "a", ISO), ledger.load_wallet(tx, "a", LATER),
                ledger.expired_hold_wallets(tx, ISO, 10), ledger.expired_hold_wallets(tx, LATER, 10)]

    hold, owner, no_owner, no_hold, now, later, none_expired, expired = run(job)

    assert (hold.amount, hold.status, hold.agent_id, hold.resolved_at) == (30, HoldStatus.ACTIVE, "a", None)
    assert (owner, no_owner, no_hold) == ("a", None, None)
    assert (now.held, now.expired) == (50, [])
    assert (later.held, later.expired) == (20, [("hold_1", 30)])  # counted no more, not yet written down
    assert (none_expired, expired) == ([], [("a", 1)])
    assert [h.hold_id for h in ledger.read_wallet("a", ISO, 0).holds] == ["hold_1", "hold_2"]  # type: ignore[union-attr]
    assert [h.hold_id for h in ledger.read_wallet("a", LATER, 0).holds] == ["hold_2"]  # type: ignore[union-attr]
    assert ledger.check_ledger() == []


@pytest.mark.parametrize("status", sorted(TRANSITIONS[HoldStatus.ACTIVE]))
def test_an_active_hold_resolves_once_to_each_allowed_state(
    ledger: LedgerStore, run: Run, status: HoldStatus
) -> None:
    def job(tx: Tx) -> None:
        place(ledger, tx, open_wallet(ledger, tx, "a", 100), "hold_1", 30, utc_iso(NOW + 60))
        release(ledger, tx, "hold_1", status, captured=12 if status is HoldStatus.CAPTURED else 0)

    run(job)
    hold = run(lambda tx: ledger.load_hold(tx, "hold_1"))
    assert (hold.status, hold.resolved_at) == (status, ISO)
    assert ledger.check_ledger() == []

    for again in sorted(TRANSITIONS[HoldStatus.ACTIVE]):
        with pytest.raises(InvalidState, match=f"already {status}"):
            run(functools.partial(ledger.resolve_hold, hold_id="hold_1", status=again, txn_id="txn_again",
                                  now_iso=LATER))
    assert run(lambda tx: ledger.load_hold(tx, "hold_1")) == hold


def test_a_hold_cannot_be_moved_to_a_state_outside_its_transitions(ledger: LedgerStore, run: Run) -> None:
    run(lambda tx: place(ledger, tx, open_wallet(ledger, tx, "a", 100), "hold_1", 30, utc_iso(NOW + 60)))

    with pytest.raises(ValueError, match="active to active"):
        run(lambda tx: ledger.resolve_hold(tx, "hold_1", HoldStatus.ACTIVE, "txn_x", ISO))
    with pytest.raises(InvalidState, match="unknown"):
        run(lambda tx: ledger.resolve_hold(tx, "hold_nope", HoldStatus.RELEASED, "txn_x", ISO))


def test_the_hold_states_and_transitions_match_the_schema(backend: Store) -> None:
    """The enum's values are exactly the statuses the table allows, and only `active` leads anywhere."""
    if isinstance(backend, PostgresStore):  # CHECK ((status = ANY (ARRAY['active'::text, ...])))
        sql = backend.query_one("SELECT string_agg(pg_get_constraintdef(oid), ' ') AS sql FROM pg_constraint "
                                "WHERE conrelid = 'ledger_holds'::regclass AND contype = 'c'")["sql"]  # type: ignore[index]
        allowed = re.search(r"status = ANY \(ARRAY\[([^]]*)\]", sql).group(1)  # type: ignore[union-attr]
    else:
        sql = backend.query_one("SELECT sql FROM sqlite_master WHERE name = 'ledger_holds'")["sql"]  # type: ignore[index]
        allowed = re.search(r"status IN \(([^)]*)\)", sql).group(1)  # type: ignore[union-attr]
    statuses = {s.strip().removesuffix("::text").strip("'") for s in allowed.split(",")}
    assert statuses == {str(s) for s in HoldStatus} == set(map(str, TRANSITIONS))
    assert {s for s, targets in TRANSITIONS.items() if targets} == {HoldStatus.ACTIVE}


# --- the invariant check --------------------------------------------------------------------------------------------


def test_an_unbalanced_transaction_and_a_hold_captured_without_its_entry_are_reported(
    ledger: LedgerStore, run: Run
) -> None:
    def job(tx: Tx) -> None:
        wallet = open_wallet(ledger, tx, "a", 100)
        place(ledger, tx, wallet, "hold_1", 30, utc_iso(NOW + 60))
        ledger.post(tx, "txn_bad", "credit", "credit:bad", "broken", None, None, ISO,
                    ("system:issuance", None, -5, 0, None), ("system:revenue", None, 4, 0, None))

    run(job)
    run(lambda tx: ledger.resolve_hold(tx, "hold_1", HoldStatus.CAPTURED, "txn_x", ISO, 5))  # no entries, no wallet

    assert {(v.rule, v.subject) for v in ledger.check_ledger()} == {
        ("txn_unbalanced", "txn_bad"), ("hold_state_mismatch", "hold_1"), ("held_mismatch", "a")}


# --- report reads ---------------------------------------------------------------------------------------------------


def test_reports_list_wallet_agents_by_customer_and_count_the_ledger(
    ledger: LedgerStore, reports: ReportsStore, run: Run
) -> None:
    def job(tx: Tx) -> None:
        open_wallet(ledger, tx, "b", 10, customer="cus_1")
        open_wallet(ledger, tx, "a", 10, customer="cus_2")
        open_wallet(ledger, tx, "c", 0, customer="cus_1")

    assert reports.ledger_counts() == LedgerCounts(wallets=0, transactions=0)
    run(job)

    assert reports.wallet_agents() == ["b", "c", "a"]
    assert reports.wallet_agents("cus_2") == ["a"]
    assert reports.ledger_counts() == LedgerCounts(wallets=3, transactions=2)
    assert reports.usage_customers() == []
