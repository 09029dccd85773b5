"""Hypothesis drives random sequences of ledger operations against a small model of the rules: after every step the
service agrees with the model, every transaction sums to zero, each balance is the sum of its wallet's entries,
available is never negative, and check_ledger finds nothing. Retries replay; conflicting retries write nothing."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

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
from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.store import Store
from tests.conftest import migrated_copy

START = 1_768_478_400  # 2026-01-15T12:00:00Z: whole seconds, so model and store agree on every expiry
AGENTS = ["a", "b", "c"]
agents = st.sampled_from(["a", "a", "a", "b", "b", "b", "c"])  # "c" starts without a wallet
CUSTOMERS = {"cus_any": None, "cus_one": 1}
amounts = st.integers(min_value=1, max_value=120)


@dataclass
class W:
    customer: str
    cap: int | None
    balance: int = 0
    frozen: bool = False
    day: int = 0
    spent: int = 0


@dataclass
class H:
    agent: str
    amount: int
    expires: int
    active: bool = True


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.store = Store(migrated_copy(Path(self.dir.name) / "ledger.db"))
        self.now = START
        self.ledger = LedgerService(self.store, luc_per_usd=1000, agent_limit=CUSTOMERS.get, clock=lambda: self.now)
        self.loop = asyncio.new_event_loop()
        self.wallets: dict[str, W] = {}
        self.holds: dict[str, H] = {}
        self.done: list[tuple[str, dict[str, Any], Any]] = []
        self.keys = 0

    def teardown(self) -> None:
        self.store.close()
        self.loop.close()
        self.dir.cleanup()

    # --- plumbing -------------------------------------------------------------------------------------------------

    def key(self) -> str:
        self.keys += 1
        return f"k{self.keys}"

    def call(self, method: str, kwargs: dict[str, Any], expected: type[BillingError] | None) -> Any:
        """Run one service call and assert it fails exactly as the model predicts (or succeeds)."""
        coro: Awaitable[Any] = getattr(self.ledger, method)(**kwargs)
        try:
            result = self.loop.run_until_complete(coro)
        except BillingError as exc:
            event(f"{method}: {type(exc).__name__}")
            assert expected is not None and type(exc) is expected, (method, kwargs, exc)
            return None
        event(f"{method}: ok")
        assert expected is None, (method, kwargs, "succeeded but the model expected", expected)
        assert not result.replayed
        self.done.append((method, kwargs, result))
        return result

    def held(self, agent: str) -> int:
        return sum(h.amount for h in self.holds.values() if h.agent == agent and h.active and h.expires > self.now)

    def spent(self, w: W) -> int:
        return w.spent if w.day == self.now // 86400 else 0

    def spend(self, w: W, amount: int) -> None:
        w.spent = self.spent(w) + amount
        w.day = self.now // 86400

    def refusal(self, agent: str, amount: int) -> type[BillingError] | None:
        w = self.wallets[agent]
        if w.frozen:
            return WalletFrozen
        if amount > w.balance - self.held(agent):
            return InsufficientFunds
        if w.cap is not None and amount > w.cap - self.spent(w) - self.held(agent):
            return SpendCapExceeded
        return None

    # --- operations -------------------------------------------------------------------------------------------------

    @initialize(cap=st.none() | st.integers(min_value=50, max_value=300), balance=st.integers(0, 400))
    def two_funded_wallets(self, cap: int | None, balance: int) -> None:
        """Start with a capped wallet and an uncapped one, so most steps reach the rules rather than NotFound."""
        self.create_wallet("a", "cus_any", cap)
        self.create_wallet("b", "cus_one", None)
        for agent in ("a", "b"):
            if balance:
                self.credit(agent, balance)

    @rule(agent=agents, customer=st.sampled_from(sorted(CUSTOMERS)),
          cap=st.none() | st.integers(min_value=1, max_value=300))
    def create_wallet(self, agent: str, customer: str, cap: int | None) -> None:
        limit = CUSTOMERS[customer]
        expected: type[BillingError] | None = None
        if agent in self.wallets:
            expected = InvalidState
        elif limit is not None and sum(w.customer == customer for w in self.wallets.values()) >= limit:
            expected = LimitReached
        if self.call("create_wallet", {"agent_id": agent, "customer_id": customer, "daily_cap": cap,
                                       "idempotency_key": self.key()}, expected):
            self.wallets[agent] = W(customer, cap)

    @rule(agent=agents, amount=st.integers(min_value=1, max_value=400))
    def credit(self, agent: str, amount: int) -> None:
        result = self.call("credit", {"agent_id": agent, "amount": amount, "idempotency_key": self.key(),
                                      "reason": "top-up"}, None if agent in self.wallets else NotFound)
        if result:
            self.wallets[agent].balance += amount

    @rule(agent=agents, amount=amounts)
    def debit(self, agent: str, amount: int) -> None:
        expected = self.refusal(agent, amount) if agent in self.wallets else NotFound
        if self.call("debit", {"agent_id": agent, "amount": amount, "idempotency_key": self.key(), "reason": "task"},
                     expected):
            w = self.wallets[agent]
            w.balance -= amount
            self.spend(w, amount)

    @rule(source=agents, receiver=agents, amount=amounts)
    def transfer(self, source: str, receiver: str, amount: int) -> None:
        target = receiver
        if source == target:
            expected: type[BillingError] | None = InvalidInput
        elif source not in self.wallets or target not in self.wallets:
            expected = NotFound
        else:
            expected = self.refusal(source, amount)
        if self.call("transfer", {"from_agent": source, "to_agent": target, "amount": amount,
                                  "idempotency_key": self.key(), "reason": "share"}, expected):
            self.wallets[source].balance -= amount
            self.spend(self.wallets[source], amount)
            self.wallets[target].balance += amount

    @rule(agent=agents, amount=amounts, ttl=st.sampled_from([5, 60, 3600, 90000]))
    def hold(self, agent: str, amount: int, ttl: int) -> None:
        expected = self.refusal(agent, amount) if agent in self.wallets else NotFound
        result = self.call("hold", {"agent_id": agent, "amount": amount, "ttl_seconds": ttl,
                                    "idempotency_key": self.key(), "reason": "task"}, expected)
        if result:
            self.holds[result.hold_id] = H(agent, amount, self.now + ttl)

    def resolution_refusal(self, hold_id: str, amount: int | None) -> type[BillingError] | None:
        h = self.holds.get(hold_id)
        if h is None:
            return NotFound
        if not h.active or h.expires <= self.now:
            return InvalidState
        if amount is not None and amount > h.amount:
            return InvalidInput
        if amount is not None and self.wallets[h.agent].frozen:
            return WalletFrozen
        return None

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def capture(self, data: st.DataObject) -> None:
        hold_id = data.draw(st.sampled_from([*self.holds, "hold_unknown"]))
        most = self.holds[hold_id].amount if hold_id in self.holds else 10
        amount = data.draw(st.integers(min_value=1, max_value=most + 2))
        result = self.call("capture_hold", {"hold_id": hold_id, "amount": amount, "idempotency_key": self.key(),
                                            "reason": "cost"}, self.resolution_refusal(hold_id, amount))
        if result:
            h = self.holds[hold_id]
            h.active = False
            w = self.wallets[h.agent]
            w.balance -= amount
            self.spend(w, amount)

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        hold_id = data.draw(st.sampled_from(list(self.holds)))
        if self.call("release_hold", {"hold_id": hold_id, "idempotency_key": self.key(), "reason": "cancel"},
                     self.resolution_refusal(hold_id, None)):
            self.holds[hold_id].active = False

    @rule(agent=agents, frozen=st.sampled_from([False, False, True]))
    def freeze(self, agent: str, frozen: bool) -> None:
        if self.call("freeze", {"agent_id": agent, "frozen": frozen, "reason": "ops", "idempotency_key": self.key()},
                     None if agent in self.wallets else NotFound):
            self.wallets[agent].frozen = frozen

    @rule(seconds=st.sampled_from([1, 4, 59, 3600, 43200, 86400]))
    def advance_clock(self, seconds: int) -> None:
        self.now += seconds

    @rule()
    def sweep(self) -> None:
        swept = self.loop.run_until_complete(self.ledger.sweep_expired_holds())
        expired = [h for h in self.holds.values() if h.active and h.expires <= self.now]
        assert swept <= len(expired)  # holds already written down by another write are not swept twice
        for h in expired:
            h.active = False

    @precondition(lambda self: self.done)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        method, kwargs, first = data.draw(st.sampled_from(self.done))
        again = self.loop.run_until_complete(getattr(self.ledger, method)(**kwargs))
        assert again.replayed
        assert again.model_dump(exclude={"replayed"}) == first.model_dump(exclude={"replayed"})

    @precondition(lambda self: any("amount" in kwargs for _, kwargs, _ in self.done))
    @rule(data=st.data())
    def conflicting_retry(self, data: st.DataObject) -> None:
        method, kwargs, _ = data.draw(st.sampled_from([d for d in self.done if "amount" in d[1]]))
        before = self.store.query("SELECT COUNT(*) AS n FROM agent_transactions")
        try:
            self.loop.run_until_complete(getattr(self.ledger, method)(**{**kwargs, "amount": kwargs["amount"] + 1}))
        except IdempotencyConflict:
            pass
        else:
            raise AssertionError(f"{method} with a reused key and another amount was not refused")
        assert self.store.query("SELECT COUNT(*) AS n FROM agent_transactions") == before

    # --- invariants -------------------------------------------------------------------------------------------------

    @invariant()
    def the_service_agrees_with_the_model(self) -> None:
        for agent, w in self.wallets.items():
            wallet = self.ledger.get_wallet(agent, recent=0)
            assert (wallet.balance, wallet.held, wallet.frozen) == (w.balance, self.held(agent), w.frozen)
            assert wallet.available == w.balance - self.held(agent) >= 0
            assert wallet.spent_today == self.spent(w)

    @invariant()
    def the_books_balance(self) -> None:
        totals = self.store.query_one("SELECT COALESCE(SUM(amount), 0) AS posted, COALESCE(SUM(pending), 0) AS held "
                                      "FROM agent_transactions")
        assert totals == {"posted": 0, "held": 0}
        for row in self.store.query(
            "SELECT w.balance, (SELECT COALESCE(SUM(amount), 0) FROM agent_transactions t WHERE t.wallet_id = w.id) "
            "AS entries FROM agent_wallets w"
        ):
            assert row["balance"] == row["entries"]
        assert self.ledger.check_ledger() == []


# 25 random runs of 50 steps in the suite (LEDGER_EXAMPLES to change it), 300 under `-m slow`
LedgerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("LEDGER_EXAMPLES", "25")), stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_ledger_state_machine = LedgerMachine.TestCase


@pytest.mark.slow
class TestLedgerStateMachineAtLength(LedgerMachine.TestCase):  # type: ignore[misc,valid-type]
    settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])
