"""The wallet ledger, through its service on a real store: double entry, holds, caps, freezing, agent limits,
idempotency, history, and the invariant check. Every refusal names its cause and numbers and writes nothing."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from aims_billing_mcp.errors import (
    BillingError,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidInput,
    InvalidState,
    LimitReached,
    NotFound,
    SpendCapExceeded,
    WalletFrozen,
)
from aims_billing_mcp.services.ledger import ISSUANCE, REVENUE, LedgerService
from aims_billing_mcp.store import Store
from tests.conftest import Clock

pytestmark = pytest.mark.anyio

NOON = datetime(2026, 1, 15, 12, 0, tzinfo=UTC).timestamp()
LIMITS = {"cus_two": 2, "cus_p2p": 0}
TABLES = ("agent_wallets", "agent_transactions", "ledger_holds", "ledger_requests")


@pytest.fixture
def clock() -> Clock:
    return Clock(NOON)


@pytest.fixture
def ledger(store: Store, clock: Clock) -> LedgerService:
    return LedgerService(store, luc_per_usd=1000, agent_limit=LIMITS.get, clock=clock)


async def open_wallet(ledger: LedgerService, agent: str, balance: int = 0, *, cap: int | None = None,
                      customer: str = "cus_1") -> None:
    await ledger.create_wallet(agent, customer, cap, f"open-{agent}")
    if balance:
        await ledger.credit(agent, balance, idempotency_key=f"seed-{agent}", reason="seed")


def snapshot(store: Store) -> dict[str, list[dict[str, Any]]]:
    return {table: store.query(f"SELECT * FROM {table} ORDER BY 1") for table in TABLES}


async def refused(store: Store, call: Awaitable[Any], error: type[BillingError], *words: str) -> BillingError:
    """Assert the call fails with `error`, its message names every word, and nothing was written."""
    before = snapshot(store)
    with pytest.raises(error) as caught:
        await call
    for word in words:
        assert word in caught.value.message, (word, caught.value.message)
    assert snapshot(store) == before
    return caught.value


def entries_of(store: Store, txn_id: str) -> list[dict[str, Any]]:
    return store.query("SELECT account, amount, pending, balance_after, kind FROM agent_transactions "
                       "WHERE txn_id = ? ORDER BY entry", (txn_id,))


# --- wallets ------------------------------------------------------------------------------------------------------


async def test_a_new_wallet_starts_empty_with_its_owner_and_cap(ledger: LedgerService) -> None:
    created = await ledger.create_wallet("agent-1", "cus_1", 500, "k")

    wallet = ledger.get_wallet("agent-1")
    assert (created.agent_id, created.customer_id, created.daily_cap, created.replayed) == ("agent-1", "cus_1", 500,
                                                                                            False)
    assert (wallet.balance, wallet.held, wallet.available, wallet.spent_today, wallet.cap_remaining) == (0, 0, 0, 0,
                                                                                                         500)
    assert wallet.wallet_id == created.wallet_id and not wallet.frozen and wallet.recent == []
    assert wallet.cap_resets_at == "2026-01-16T00:00:00.000Z"


async def test_creating_a_wallet_again_with_the_same_key_replays_the_first_result(ledger: LedgerService) -> None:
    first = await ledger.create_wallet("agent-1", "cus_1", None, "k")
    again = await ledger.create_wallet("agent-1", "cus_1", None, "k")
    assert again.replayed and again.model_dump(exclude={"replayed"}) == first.model_dump(exclude={"replayed"})


async def test_a_second_wallet_for_the_same_agent_is_refused(ledger: LedgerService, store: Store) -> None:
    await ledger.create_wallet("agent-1", "cus_1", None, "k1")
    await refused(store, ledger.create_wallet("agent-1", "cus_9", None, "k2"), InvalidState, "agent-1", "cus_1")


async def test_a_wallet_beyond_the_customers_agent_limit_is_refused_naming_the_limit(
    ledger: LedgerService, store: Store
) -> None:
    await ledger.create_wallet("a", "cus_two", None, "k1")
    await ledger.create_wallet("b", "cus_two", None, "k2")
    err = await refused(store, ledger.create_wallet("c", "cus_two", None, "k3"), LimitReached,
                        "cus_two", "2 wallet(s)", "allows 2")
    assert err.to_dict()["limit"] == 2


async def test_a_customer_whose_tier_allows_no_agents_gets_no_wallet(ledger: LedgerService, store: Store) -> None:
    await refused(store, ledger.create_wallet("a", "cus_p2p", None, "k"), LimitReached, "allows no agent wallets")


async def test_a_customer_without_a_limit_may_open_many_wallets(ledger: LedgerService) -> None:
    await asyncio.gather(*(ledger.create_wallet(f"a{i}", "cus_free", None, f"k{i}") for i in range(20)))
    assert len(ledger._store.query("SELECT id FROM agent_wallets WHERE customer_id = 'cus_free'")) == 20


@pytest.mark.parametrize(("args", "param"), [
    (("", "cus_1", None), "agent_id"),
    ((" a", "cus_1", None), "agent_id"),
    (("a", "", None), "customer_id"),
    (("a", "cus_1", 0), "daily_cap"),
    (("a", "cus_1", -5), "daily_cap"),
    (("a", "cus_1", 1.5), "daily_cap"),
])
async def test_bad_wallet_arguments_are_refused_by_name(
    ledger: LedgerService, store: Store, args: tuple[Any, ...], param: str
) -> None:
    err = await refused(store, ledger.create_wallet(*args, "k"), InvalidInput, param)
    assert err.param == param


async def test_an_unknown_wallet_is_not_found(ledger: LedgerService) -> None:
    with pytest.raises(NotFound, match="ghost"):
        ledger.get_wallet("ghost")
    with pytest.raises(NotFound, match="ghost"):
        ledger.list_transactions("ghost")


# --- credits and debits -------------------------------------------------------------------------------------------


async def test_a_credit_comes_from_issuance_as_two_entries_that_sum_to_zero(ledger: LedgerService,
                                                                            store: Store) -> None:
    await open_wallet(ledger, "a")
    posted = await ledger.credit("a", 400, idempotency_key="c1", reason="top-up", reference="inv_1")

    assert (posted.amount, posted.balance_after, posted.counterparty) == (400, 400, ISSUANCE)
    assert entries_of(store, posted.txn_id) == [
        {"account": "agent:a", "amount": 400, "pending": 0, "balance_after": 400, "kind": "credit"},
        {"account": ISSUANCE, "amount": -400, "pending": 0, "balance_after": None, "kind": "credit"},
    ]
    assert ledger.get_wallet("a").recent[0].reference == "inv_1"


async def test_a_debit_goes_to_revenue_and_leaves_the_balance_after_on_the_row(ledger: LedgerService,
                                                                               store: Store) -> None:
    await open_wallet(ledger, "a", 400)
    posted = await ledger.debit("a", 150, idempotency_key="d1", reason="task")

    assert (posted.balance_after, posted.available_after, posted.counterparty) == (250, 250, REVENUE)
    assert [e["amount"] for e in entries_of(store, posted.txn_id)] == [-150, 150]
    assert ledger.get_wallet("a").balance == 250
    assert ledger.check_ledger() == []


async def test_a_usd_top_up_converts_at_the_rate_rounding_down(ledger: LedgerService) -> None:
    await open_wallet(ledger, "a")
    topped = await ledger.credit_usd("a", 1999, idempotency_key="u1", reason="card")
    assert (topped.amount, topped.cents, topped.luc_per_usd, topped.kind) == (19990, 1999, 1000, "credit")

    coarse = LedgerService(ledger._store, luc_per_usd=150, agent_limit=LIMITS.get)
    assert (await coarse.credit_usd("a", 3, idempotency_key="u2", reason="card")).amount == 4  # 4.5 rounds down


async def test_a_usd_top_up_too_small_for_one_luc_is_refused(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "a")
    coarse = LedgerService(store, luc_per_usd=50, agent_limit=LIMITS.get)
    await refused(store, coarse.credit_usd("a", 1, idempotency_key="u", reason="card"), InvalidInput,
                  "1 cent(s) buy 0 LUC", "at least 2 cent(s)")


async def test_a_debit_beyond_the_balance_is_refused_naming_the_numbers(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "agent-7", 400)
    err = await refused(store, ledger.debit("agent-7", 500, idempotency_key="d", reason="task"), InsufficientFunds,
                        "debit of 500 LUC", "400 available", "balance 400", "credit it first")
    assert err.to_dict() | {"available": 400} == err.to_dict()


async def test_a_debit_beyond_available_is_refused_even_when_the_balance_covers_it(
    ledger: LedgerService, store: Store
) -> None:
    await open_wallet(ledger, "agent-7", 400)
    await ledger.hold("agent-7", 80, 600, idempotency_key="h", reason="task")
    await refused(store, ledger.debit("agent-7", 321, idempotency_key="d", reason="task"), InsufficientFunds,
                  "321 LUC", "320 available (balance 400, 80 held)")
    assert (await ledger.debit("agent-7", 320, idempotency_key="d", reason="task")).available_after == 0


async def test_a_debit_of_everything_leaves_zero_and_the_next_one_is_refused(ledger: LedgerService,
                                                                              store: Store) -> None:
    await open_wallet(ledger, "a", 10)
    await ledger.debit("a", 10, idempotency_key="d1", reason="x")
    await refused(store, ledger.debit("a", 1, idempotency_key="d2", reason="x"), InsufficientFunds, "0 available")


def every_mutation(ledger: LedgerService, amount: Any) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "credit": lambda: ledger.credit("a", amount, idempotency_key="k", reason="r"),
        "credit_usd": lambda: ledger.credit_usd("a", amount, idempotency_key="k", reason="r"),
        "debit": lambda: ledger.debit("a", amount, idempotency_key="k", reason="r"),
        "transfer": lambda: ledger.transfer("a", "b", amount, idempotency_key="k", reason="r"),
        "hold": lambda: ledger.hold("a", amount, 60, idempotency_key="k", reason="r"),
        "capture": lambda: ledger.capture_hold("hold_x", amount, idempotency_key="k", reason="r"),
    }


@pytest.mark.parametrize("operation", ["credit", "credit_usd", "debit", "transfer", "hold", "capture"])
@pytest.mark.parametrize("amount", [0, -5, 2.5, "10", True, None, 10**16])
async def test_amounts_that_are_not_positive_whole_numbers_are_refused_for_every_operation(
    ledger: LedgerService, store: Store, operation: str, amount: Any
) -> None:
    await open_wallet(ledger, "a", 100)
    await open_wallet(ledger, "b")
    err = await refused(store, every_mutation(ledger, amount)[operation](), InvalidInput)
    assert err.param in {"amount", "usd_cents"}
    assert str(amount) in err.message


async def test_a_usd_top_up_above_its_maximum_is_refused_naming_usd_cents(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "a")
    for cents in (10**12 + 1, 10**30, 10**5000):
        err = await refused(store, ledger.credit_usd("a", cents, idempotency_key="k", reason="r"), InvalidInput,
                            "maximum")
        assert err.param == "usd_cents"


@pytest.mark.parametrize("field", ["reason", "idempotency_key"])
@pytest.mark.parametrize("value", ["", "   ", None, "x" * 501])
async def test_a_missing_or_oversized_reason_or_key_is_refused(
    ledger: LedgerService, store: Store, field: str, value: Any
) -> None:
    await open_wallet(ledger, "a", 100)
    kwargs: dict[str, Any] = {"idempotency_key": "k", "reason": "r", field: value}
    err = await refused(store, ledger.debit("a", 5, **kwargs), InvalidInput, field)
    assert err.param == field


async def test_a_mistaken_debit_is_corrected_by_a_new_credit_and_both_stay_in_history(ledger: LedgerService) -> None:
    await open_wallet(ledger, "a", 100)
    wrong = await ledger.debit("a", 30, idempotency_key="d", reason="task")
    await ledger.credit("a", 30, idempotency_key="fix", reason="refund", reference=wrong.txn_id)

    history = ledger.list_transactions("a").entries
    assert [(e.kind, e.amount, e.balance_after) for e in history] == [("credit", 30, 100), ("debit", -30, 70),
                                                                       ("credit", 100, 100)]
    assert history[0].reference == wrong.txn_id


# --- idempotency --------------------------------------------------------------------------------------------------


async def test_a_retried_debit_returns_the_first_result_and_debits_once(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "a", 100)
    first = await ledger.debit("a", 40, idempotency_key="d", reason="task")
    await ledger.credit("a", 5, idempotency_key="c", reason="tip")
    again = await ledger.debit("a", 40, idempotency_key="d", reason="task")

    assert again.replayed and not first.replayed
    assert again.model_dump(exclude={"replayed"}) == first.model_dump(exclude={"replayed"})
    assert ledger.get_wallet("a").balance == 65
    assert len(store.query("SELECT 1 FROM agent_transactions WHERE kind = 'debit'")) == 2


async def test_concurrent_twins_with_one_key_take_effect_once(ledger: LedgerService) -> None:
    await open_wallet(ledger, "a", 100)
    results = await asyncio.gather(*(ledger.debit("a", 7, idempotency_key="d", reason="t") for _ in range(20)))

    assert sum(not r.replayed for r in results) == 1
    assert {r.txn_id for r in results} == {results[0].txn_id}
    assert ledger.get_wallet("a").balance == 93


@pytest.mark.parametrize("change", [{"amount": 41}, {"reason": "other"}, {"reference": "ref"}])
async def test_the_same_key_with_other_arguments_is_a_conflict_and_writes_nothing(
    ledger: LedgerService, store: Store, change: dict[str, Any]
) -> None:
    await open_wallet(ledger, "a", 100)
    await open_wallet(ledger, "b", 100)
    await ledger.debit("a", 40, idempotency_key="d", reason="task")
    args: dict[str, Any] = {"agent_id": "a", "amount": 40, "reason": "task", "reference": None} | change
    await refused(store, ledger.debit(**args, idempotency_key="d"), IdempotencyConflict, "'d'", "debit",
                  "other arguments")


async def test_keys_are_scoped_per_operation(ledger: LedgerService) -> None:
    await open_wallet(ledger, "a")
    await ledger.credit("a", 100, idempotency_key="same", reason="r")
    debited = await ledger.debit("a", 30, idempotency_key="same", reason="r")
    held = await ledger.hold("a", 20, 60, idempotency_key="same", reason="r")

    assert not debited.replayed and not held.replayed
    assert ledger.get_wallet("a").available == 50


async def test_keys_are_scoped_per_wallet_so_one_agent_cannot_squat_anothers(ledger: LedgerService) -> None:
    await open_wallet(ledger, "alice", 100)
    await open_wallet(ledger, "mallory", 100)
    squatted = await ledger.debit("mallory", 5, idempotency_key="task-1", reason="squat")

    mine = await ledger.debit("alice", 40, idempotency_key="task-1", reason="task")

    assert not mine.replayed and mine.txn_id != squatted.txn_id and mine.agent_id == "alice"
    assert (ledger.get_wallet("alice").balance, ledger.get_wallet("mallory").balance) == (60, 95)
    assert ledger.check_ledger() == []


async def test_a_refused_call_leaves_its_key_free_for_the_retry(ledger: LedgerService) -> None:
    await open_wallet(ledger, "a", 10)
    with pytest.raises(InsufficientFunds):
        await ledger.debit("a", 50, idempotency_key="d", reason="task")
    await ledger.credit("a", 100, idempotency_key="c", reason="top-up")

    retried = await ledger.debit("a", 50, idempotency_key="d", reason="task")
    assert not retried.replayed and retried.balance_after == 60


async def test_a_replay_is_returned_even_when_the_call_would_now_be_refused(ledger: LedgerService) -> None:
    await open_wallet(ledger, "a", 50)
    first = await ledger.debit("a", 50, idempotency_key="d", reason="task")
    await ledger.freeze("a", True, "audit", "f")
    again = await ledger.debit("a", 50, idempotency_key="d", reason="task")
    assert again.replayed and again.txn_id == first.txn_id


# --- transfers ----------------------------------------------------------------------------------------------------


async def test_a_transfer_moves_credits_between_two_wallets_in_one_transaction(ledger: LedgerService,
                                                                               store: Store) -> None:
    await open_wallet(ledger, "a", 100)
    await open_wallet(ledger, "b", 5)
    moved = await ledger.transfer("a", "b", 60, idempotency_key="t", reason="share")

    assert (moved.from_balance_after, moved.to_balance_after) == (40, 65)
    assert entries_of(store, moved.txn_id) == [
        {"account": "agent:a", "amount": -60, "pending": 0, "balance_after": 40, "kind": "transfer"},
        {"account": "agent:b", "amount": 60, "pending": 0, "balance_after": 65, "kind": "transfer"},
    ]
    assert ledger.list_transactions("b").entries[0].counterparty == "agent:a"


async def test_a_transfer_to_itself_is_refused(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "a", 100)
    await refused(store, ledger.transfer("a", "a", 5, idempotency_key="t", reason="r"), InvalidInput, "to itself")


@pytest.mark.parametrize(("source", "target", "param"), [("a", "ghost", "to_agent"), ("ghost", "a", "from_agent")])
async def test_a_transfer_with_an_unknown_wallet_is_refused_naming_it(
    ledger: LedgerService, store: Store, source: str, target: str, param: str
) -> None:
    await open_wallet(ledger, "a", 100)
    err = await refused(store, ledger.transfer(source, target, 5, idempotency_key="t", reason="r"), NotFound, "ghost")
    assert err.param == param


async def test_a_transfer_beyond_available_is_refused(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "a", 100)
    await open_wallet(ledger, "b")
    await refused(store, ledger.transfer("a", "b", 101, idempotency_key="t", reason="r"), InsufficientFunds,
                  "transfer of 101 LUC", "100 available")


# --- holds --------------------------------------------------------------------------------------------------------


async def test_a_hold_reserves_credits_without_moving_them(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "a", 100)
    placed = await ledger.hold("a", 30, 600, idempotency_key="h", reason="task")

    wallet = ledger.get_wallet("a")
    assert (wallet.balance, wallet.held, wallet.available) == (100, 30, 70)
    assert [(h.hold_id, h.amount, h.expires_at) for h in wallet.holds] == [
        (placed.hold_id, 30, "2026-01-15T12:10:00.000Z")]
    assert [(e["amount"], e["pending"]) for e in entries_of(store, placed.txn_id)] == [(0, 30), (0, -30)]


async def test_capturing_part_of_a_hold_posts_it_and_releases_the_rest(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "a", 100)
    placed = await ledger.hold("a", 30, 600, idempotency_key="h", reason="task")
    done = await ledger.capture_hold(placed.hold_id, 12, idempotency_key="c", reason="actual cost")

    assert (done.status, done.captured, done.released, done.balance_after, done.available_after) == (
        "captured", 12, 18, 88, 88)
    assert [(e["amount"], e["pending"]) for e in entries_of(store, done.txn_id)] == [(-12, -30), (12, 30)]
    assert ledger.get_wallet("a").holds == []
    assert ledger.check_ledger() == []


async def test_releasing_a_hold_returns_all_of_it(ledger: LedgerService) -> None:
    await open_wallet(ledger, "a", 100)
    placed = await ledger.hold("a", 30, 600, idempotency_key="h", reason="task")
    done = await ledger.release_hold(placed.hold_id, idempotency_key="r", reason="cancelled")
    assert (done.status, done.captured, done.released, done.available_after) == ("released", 0, 30, 100)


async def test_capturing_more_than_the_hold_is_refused(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "a", 100)
    placed = await ledger.hold("a", 30, 600, idempotency_key="h", reason="task")
    await refused(store, ledger.capture_hold(placed.hold_id, 31, idempotency_key="c", reason="r"), InvalidInput,
                  "capture of 31 LUC", "reserves only 30")


@pytest.mark.parametrize("first", ["capture", "release"])
@pytest.mark.parametrize("second", ["capture", "release"])
async def test_a_hold_resolves_only_once(ledger: LedgerService, store: Store, first: str, second: str) -> None:
    await open_wallet(ledger, "a", 100)
    hold_id = (await ledger.hold("a", 30, 600, idempotency_key="h", reason="task")).hold_id

    def resolve(how: str, key: str) -> Awaitable[Any]:
        if how == "capture":
            return ledger.capture_hold(hold_id, 10, idempotency_key=key, reason="r")
        return ledger.release_hold(hold_id, idempotency_key=key, reason="r")

    await resolve(first, "one")
    await refused(store, resolve(second, "two"), InvalidState, hold_id, "already", "resolves once")


async def test_an_expired_hold_is_not_counted_and_cannot_be_captured_or_released(
    ledger: LedgerService, store: Store, clock: Clock
) -> None:
    await open_wallet(ledger, "a", 100)
    hold_id = (await ledger.hold("a", 30, 60, idempotency_key="h", reason="task")).hold_id
    clock.advance(60)

    assert (ledger.get_wallet("a").available, ledger.get_wallet("a").holds) == (100, [])
    await refused(store, ledger.capture_hold(hold_id, 5, idempotency_key="c", reason="r"), InvalidState,
                  "expired at 2026-01-15T12:01:00.000Z")
    await refused(store, ledger.release_hold(hold_id, idempotency_key="r", reason="r"), InvalidState, "expired")


async def test_an_expired_hold_is_written_down_by_the_next_write_to_its_wallet(
    ledger: LedgerService, store: Store, clock: Clock
) -> None:
    await open_wallet(ledger, "a", 100)
    hold_id = (await ledger.hold("a", 30, 60, idempotency_key="h", reason="task")).hold_id
    clock.advance(61)
    assert (await ledger.debit("a", 100, idempotency_key="d", reason="all of it")).balance_after == 0

    assert store.query_one("SELECT status FROM ledger_holds WHERE id = ?", (hold_id,)) == {"status": "expired"}
    assert [(e.kind, e.held_change) for e in ledger.list_transactions("a").entries][:2] == [("debit", 0),
                                                                                             ("expire", -30)]
    assert ledger.check_ledger() == []


async def test_the_sweep_writes_down_every_expired_hold_once(ledger: LedgerService, clock: Clock) -> None:
    await open_wallet(ledger, "a", 100)
    await open_wallet(ledger, "b", 100)
    for i, agent in enumerate(["a", "a", "b"]):
        await ledger.hold(agent, 10, 60, idempotency_key=f"h{i}", reason="task")
    await ledger.hold("b", 10, 600, idempotency_key="long", reason="task")
    clock.advance(120)

    assert await ledger.sweep_expired_holds() == 3
    assert await ledger.sweep_expired_holds() == 0
    assert ledger.get_wallet("b").held == 10
    assert ledger.check_ledger() == []


async def test_a_hold_beyond_available_is_refused(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "a", 100)
    await ledger.hold("a", 60, 60, idempotency_key="h1", reason="task")
    await refused(store, ledger.hold("a", 41, 60, idempotency_key="h2", reason="task"), InsufficientFunds,
                  "hold of 41 LUC", "40 available (balance 100, 60 held)")


@pytest.mark.parametrize("ttl", [0, -1, 30 * 86400 + 1, 1.5])
async def test_a_hold_with_a_bad_ttl_is_refused(ledger: LedgerService, store: Store, ttl: Any) -> None:
    await open_wallet(ledger, "a", 100)
    err = await refused(store, ledger.hold("a", 5, ttl, idempotency_key="h", reason="r"), InvalidInput, "ttl_seconds")
    assert err.param == "ttl_seconds"


async def test_an_unknown_hold_is_not_found(ledger: LedgerService, store: Store) -> None:
    await refused(store, ledger.capture_hold("hold_nope", 5, idempotency_key="c", reason="r"), NotFound, "hold_nope")


async def test_a_retried_capture_returns_the_first_result(ledger: LedgerService) -> None:
    await open_wallet(ledger, "a", 100)
    hold_id = (await ledger.hold("a", 30, 60, idempotency_key="h", reason="task")).hold_id
    first = await ledger.capture_hold(hold_id, 10, idempotency_key="c", reason="r")
    again = await ledger.capture_hold(hold_id, 10, idempotency_key="c", reason="r")
    assert again.replayed and again.txn_id == first.txn_id and ledger.get_wallet("a").balance == 90


# --- daily spend cap ----------------------------------------------------------------------------------------------


async def test_a_debit_over_the_daily_cap_is_refused_naming_cap_and_spend(ledger: LedgerService,
                                                                           store: Store) -> None:
    await open_wallet(ledger, "a", 1000, cap=300)
    await ledger.debit("a", 250, idempotency_key="d1", reason="task")
    await refused(store, ledger.debit("a", 51, idempotency_key="d2", reason="task"), SpendCapExceeded,
                  "debit of 51 LUC", "daily cap of 300", "spent 250 today", "leaving 50", "2026-01-16T00:00:00.000Z")


async def test_an_amount_over_the_whole_cap_is_refused(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "a", 1000, cap=300)
    await refused(store, ledger.debit("a", 301, idempotency_key="d", reason="task"), SpendCapExceeded,
                  "daily cap of 300", "leaving 300")


async def test_the_cap_counts_debits_captured_holds_and_outgoing_transfers_but_not_credits(
    ledger: LedgerService, store: Store
) -> None:
    await open_wallet(ledger, "a", 1000, cap=100)
    await open_wallet(ledger, "b", 1000)
    await ledger.debit("a", 10, idempotency_key="d", reason="r")
    hold_id = (await ledger.hold("a", 50, 600, idempotency_key="h", reason="r")).hold_id
    await ledger.capture_hold(hold_id, 20, idempotency_key="c", reason="r")
    await ledger.transfer("a", "b", 30, idempotency_key="t", reason="r")
    await ledger.transfer("b", "a", 500, idempotency_key="t-in", reason="r")
    await ledger.credit("a", 500, idempotency_key="cr", reason="r")

    wallet = ledger.get_wallet("a")
    assert (wallet.spent_today, wallet.cap_remaining) == (60, 40)
    await refused(store, ledger.transfer("a", "b", 41, idempotency_key="t2", reason="r"), SpendCapExceeded,
                  "spent 60 today")


async def test_active_holds_reserve_cap_room_so_their_capture_always_fits(ledger: LedgerService,
                                                                          store: Store) -> None:
    await open_wallet(ledger, "a", 1000, cap=100)
    hold_id = (await ledger.hold("a", 70, 600, idempotency_key="h", reason="r")).hold_id
    await refused(store, ledger.debit("a", 31, idempotency_key="d", reason="r"), SpendCapExceeded, "with 70 held",
                  "leaving 30")
    await ledger.debit("a", 30, idempotency_key="d", reason="r")
    assert (await ledger.capture_hold(hold_id, 70, idempotency_key="c", reason="r")).captured == 70
    assert ledger.get_wallet("a").spent_today == 100


async def test_the_cap_resets_at_midnight_utc(ledger: LedgerService, clock: Clock) -> None:
    await open_wallet(ledger, "a", 1000, cap=100)
    await ledger.debit("a", 100, idempotency_key="d1", reason="r")
    clock.now = datetime(2026, 1, 15, 23, 59, 59, tzinfo=UTC).timestamp()
    with pytest.raises(SpendCapExceeded):
        await ledger.debit("a", 1, idempotency_key="d2", reason="r")
    clock.advance(1)

    assert ledger.get_wallet("a").spent_today == 0
    assert (await ledger.debit("a", 100, idempotency_key="d2", reason="r")).balance_after == 800
    assert ledger.get_wallet("a").cap_resets_at == "2026-01-17T00:00:00.000Z"
    assert ledger.check_ledger() == []


# --- freezing -----------------------------------------------------------------------------------------------------


async def test_a_frozen_wallet_refuses_spending_but_accepts_credits(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "a", 100)
    await open_wallet(ledger, "b", 100)
    hold_id = (await ledger.hold("a", 10, 600, idempotency_key="h", reason="r")).hold_id
    frozen = await ledger.freeze("a", True, "suspicious spend", "f1")
    assert (frozen.frozen, frozen.changed) == (True, True)

    for call in [ledger.debit("a", 1, idempotency_key="d", reason="r"),
                 ledger.hold("a", 1, 60, idempotency_key="h2", reason="r"),
                 ledger.transfer("a", "b", 1, idempotency_key="t", reason="r"),
                 ledger.capture_hold(hold_id, 1, idempotency_key="c", reason="r")]:
        await refused(store, call, WalletFrozen, "wallet a is frozen", "unfreeze")
    await ledger.credit("a", 5, idempotency_key="c", reason="r")
    await ledger.transfer("b", "a", 5, idempotency_key="t", reason="r")
    await ledger.release_hold(hold_id, idempotency_key="r", reason="r")
    assert ledger.get_wallet("a").available == 110

    await ledger.freeze("a", False, "cleared", "f2")
    assert (await ledger.debit("a", 1, idempotency_key="d", reason="r")).balance_after == 109


async def test_freezing_twice_changes_nothing_the_second_time(ledger: LedgerService) -> None:
    await open_wallet(ledger, "a")
    await ledger.freeze("a", True, "r", "f1")
    assert not (await ledger.freeze("a", True, "r", "f2")).changed
    assert (await ledger.freeze("a", True, "r", "f1")).replayed


# --- history ------------------------------------------------------------------------------------------------------


async def test_history_pages_newest_first_with_a_cursor_and_no_overlap(ledger: LedgerService) -> None:
    await open_wallet(ledger, "a")
    for i in range(7):
        await ledger.credit("a", i + 1, idempotency_key=f"c{i}", reason=f"n{i}")

    seen, cursor, pages = [], None, 0
    while True:
        page = ledger.list_transactions("a", limit=3, cursor=cursor)
        seen += [e.amount for e in page.entries]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert (seen, pages) == ([7, 6, 5, 4, 3, 2, 1], 3)


async def test_history_filters_by_kind_and_time(ledger: LedgerService, clock: Clock) -> None:
    await open_wallet(ledger, "a", 100)
    clock.advance(3600)
    await ledger.debit("a", 1, idempotency_key="d1", reason="r")
    clock.advance(3600)
    await ledger.debit("a", 2, idempotency_key="d2", reason="r")

    assert [e.amount for e in ledger.list_transactions("a", kind="debit").entries] == [-2, -1]
    assert [e.amount for e in ledger.list_transactions("a", since=NOON + 1800).entries] == [-2, -1]
    assert [e.amount for e in ledger.list_transactions("a", since="2026-01-15T12:30:00Z",
                                                       until=datetime(2026, 1, 15, 14, tzinfo=UTC)).entries] == [-1]


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"kind": "charge"}, "kind"), ({"cursor": "abc"}, "cursor"), ({"limit": 0}, "limit"),
    ({"limit": 501}, "limit"), ({"since": "yesterday"}, "since"), ({"until": True}, "until"),
    ({"cursor": "9" * 100}, "cursor"), ({"cursor": str(2**63)}, "cursor"), ({"cursor": "²"}, "cursor"),
    ({"cursor": "-1"}, "cursor"), ({"cursor": ""}, "cursor"),
])
async def test_bad_history_arguments_are_refused_by_name(ledger: LedgerService, kwargs: dict[str, Any],
                                                         param: str) -> None:
    await open_wallet(ledger, "a", 100)
    with pytest.raises(InvalidInput) as caught:
        ledger.list_transactions("a", **kwargs)
    assert caught.value.param == param


async def test_the_wallet_shows_its_last_transactions_newest_first(ledger: LedgerService) -> None:
    await open_wallet(ledger, "a", 100)
    for i in range(5):
        await ledger.debit("a", 1, idempotency_key=f"d{i}", reason="r")
    recent = ledger.get_wallet("a", recent=3).recent
    assert [e.balance_after for e in recent] == [95, 96, 97]


# --- the invariant check ------------------------------------------------------------------------------------------


async def test_a_busy_ledger_checks_clean(ledger: LedgerService, clock: Clock) -> None:
    await open_wallet(ledger, "a", 1000, cap=500)
    await open_wallet(ledger, "b", 10)
    await ledger.transfer("a", "b", 100, idempotency_key="t", reason="r")
    h1 = await ledger.hold("b", 50, 60, idempotency_key="h1", reason="r")
    await ledger.hold("a", 50, 60, idempotency_key="h2", reason="r")
    await ledger.capture_hold(h1.hold_id, 25, idempotency_key="c", reason="r")
    clock.advance(86400)
    await ledger.debit("a", 400, idempotency_key="d", reason="r")
    assert ledger.check_ledger() == []


# Each kind of damage a bug or a hand edit could do, and the rule of `check_ledger` that must name it (the same
# statements damage either backend: tests/services/test_ledger_postgres.py runs them on PostgreSQL)
DAMAGE = [
    ("UPDATE agent_wallets SET balance = balance + 1 WHERE agent_id = 'a'", "balance_mismatch"),
    ("UPDATE agent_transactions SET amount = amount + 1 WHERE kind = 'debit' AND entry = 1", "txn_unbalanced"),
    ("UPDATE agent_transactions SET balance_after = 1 WHERE kind = 'debit' AND entry = 0", "balance_after_mismatch"),
    ("UPDATE agent_wallets SET held = 0", "held_mismatch"),
    ("UPDATE ledger_holds SET status = 'active'", "hold_state_mismatch"),
    ("INSERT INTO agent_transactions (txn_id, entry, account, wallet_id, kind, amount, pending, balance_after, "
     "hold_id, created_at) SELECT 'txn_x', entry, account, wallet_id, 'release', 0, -pending, balance_after, hold_id, "
     "created_at FROM agent_transactions WHERE kind = 'capture'", "hold_resolved_twice"),
    ("DROP INDEX agent_transactions_idempotency; "
     "UPDATE agent_transactions SET idempotency_key = 'debit:d' WHERE kind = 'credit'", "idempotency_key_reused"),
    ("DELETE FROM agent_transactions WHERE kind = 'debit'", "acknowledged_txn_missing"),
    ("UPDATE agent_wallets SET spent_today = spent_today + 1", "spent_today_mismatch"),
    ("UPDATE agent_transactions SET account = 'agent:b' WHERE kind = 'debit' AND entry = 0", "account_mismatch"),
]


async def books_with_every_kind_of_row(ledger: LedgerService) -> None:
    """A wallet with a debit, a captured hold and an active one: rows for every rule to look at, all sound."""
    await open_wallet(ledger, "a", 100, cap=1000)
    await ledger.debit("a", 10, idempotency_key="d", reason="r")
    hold_id = (await ledger.hold("a", 30, 60, idempotency_key="h", reason="r")).hold_id
    await ledger.capture_hold(hold_id, 5, idempotency_key="c", reason="r")
    await ledger.hold("a", 7, 60, idempotency_key="h2", reason="r")
    assert ledger.check_ledger() == []


@pytest.mark.parametrize(("tamper", "rule"), DAMAGE)
async def test_check_ledger_names_each_kind_of_damage(ledger: LedgerService, store: Store, tamper: str,
                                                      rule: str) -> None:
    await books_with_every_kind_of_row(ledger)

    def damage(conn: sqlite3.Connection) -> None:
        for statement in tamper.split("; "):
            conn.execute(statement)

    await store.write(damage)

    assert rule in {v.rule for v in ledger.check_ledger()}


# --- batching: concurrent calls share one transaction, without a savepoint each ----------------------------------


async def test_refused_and_accepted_calls_in_one_batch_each_get_their_own_outcome(ledger: LedgerService,
                                                                                  store: Store) -> None:
    await open_wallet(ledger, "a", 100)
    outcomes = await asyncio.gather(*(ledger.debit("a", 30, idempotency_key=f"d{i}", reason="r") for i in range(5)),
                                    ledger.debit("ghost", 1, idempotency_key="g", reason="r"),
                                    return_exceptions=True)

    assert [type(o).__name__ for o in outcomes] == ["Posting"] * 3 + ["InsufficientFunds"] * 2 + ["NotFound"]
    assert ledger.get_wallet("a").balance == 10
    assert store.query_one("SELECT COUNT(*) AS n FROM ledger_requests WHERE operation = 'debit'") == {"n": 3}
    assert ledger.check_ledger() == []


async def test_a_batch_that_fails_as_a_whole_is_rerun_job_by_job(ledger: LedgerService, store: Store) -> None:
    await open_wallet(ledger, "a", 100)

    def writes_then_refuses(conn: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
        conn.execute("UPDATE agent_wallets SET balance = 0")
        raise InvalidState("refused after writing")

    good = [ledger.debit_job("a", 10, idempotency_key=f"d{i}", reason="r") for i in range(2)]
    jobs = (good[0], writes_then_refuses, good[1])
    outcomes = await asyncio.gather(*(store.write(job, savepoint=False) for job in jobs), return_exceptions=True)

    assert isinstance(outcomes[1], InvalidState)
    assert [o[0]["balance_after"] for o in (outcomes[0], outcomes[2])] == [90, 80]  # type: ignore[index]
    assert ledger.get_wallet("a").balance == 80
    assert ledger.check_ledger() == []


async def test_a_refusal_on_a_wallet_with_an_expired_hold_writes_not_even_the_expiry(
    ledger: LedgerService, store: Store, clock: Clock
) -> None:
    await open_wallet(ledger, "a", 100)
    await ledger.hold("a", 30, 60, idempotency_key="h", reason="task")
    clock.advance(61)
    await refused(store, ledger.debit("a", 101, idempotency_key="d", reason="r"), InsufficientFunds, "100 available")
    assert store.query_one("SELECT status FROM ledger_holds") == {"status": "active"}
