"""The agent wallet ledger: double-entry LUC accounting with holds, transfers, spend caps and idempotency.

Accounts and entries. Each wallet is the account `agent:<agent_id>`; LUC come in from `system:issuance` (credits)
and go out to `system:revenue` (debits, captured holds). A transaction is two rows of `agent_transactions` (entries
0 and 1) whose amounts sum to zero; a wallet's row carries `balance_after`. Rows are never updated or deleted: a
correction is a new transaction. `check_ledger` verifies all of this over the whole database.

Holds are two-phase, like TigerBeetle's pending transfers. Placing one moves nothing: its entries carry `pending`
(+X on the wallet, -X on system:revenue, amount 0). Capturing C ≤ X posts C and clears X in one transaction;
releasing, or expiring, clears X. Each resolution is written under the idempotency key `resolve:<hold_id>`, so the
UNIQUE index on keys makes a second resolution impossible. available = balance - held; a debit, hold or outgoing
transfer beyond it is refused (debits_must_not_exceed_credits), and the schema refuses held > balance besides.
Expiry is lazy: an expired hold is never counted (reads compare `expires_at` with the clock) and cannot be captured
or released; the next write touching its wallet, or `sweep_expired_holds`, marks it expired with its own record.

Daily spend cap: the calendar UTC day, not a rolling 24 h, because (1) it costs two counters on the wallet row
(`spend_day`, `spent_today`) updated in the statement that moves the balance, where a rolling window needs a range
sum over the wallet's history on every debit, the hot path; (2) an agent can plan with it: the whole cap comes back
at `cap_resets_at` (00:00 UTC), where a rolling window trickles back by amounts only a history scan can tell; (3)
it is the "today's spend" operators and reports speak of. The price: across midnight up to twice the cap can go
out within minutes; a cap is a budget guard, not a fraud control. Spending counts debits, captured holds and
outgoing transfers. Active holds reserve cap room as well as funds: a debit, hold or transfer must fit in
cap - spent_today - held. So spent_today + held never exceeds the cap, and a capture is never refused by the cap:
the credits and the cap room were both reserved when the hold was placed.

Frozen wallets refuse debits, holds, captures and outgoing transfers; credits, incoming transfers and releases are
allowed. Wallets per customer are limited by `agent_limit(customer_id)`: None = no limit, 0 = no wallets (P2P's 0
agents: the operator allows them by returning a number for that customer).

Idempotency: every mutation names its `idempotency_key`, scoped by the wallet it belongs to (the agent: a
transfer's source wallet, a hold's wallet for its capture or release) and by operation (a `debit` and a `credit`
may share a key), so one agent can never squat or replay another agent's keys. The (owner, operation, key) row of
`ledger_requests` is written by the same job, in the same transaction, as the
effect, holding a hash of the arguments and the first result: a retry with the same arguments gets that result with
`replayed: true`; with other arguments, IdempotencyConflict. A refused call writes nothing, so its key stays free.

Every operation is one job on the store's single writer, so concurrent callers share group commits; the jobs are
trusted ones (no savepoint each: see `store.core._WriteJob`), since each makes all its checks before its first
write. Validation that needs no data happens before the job;
everything that reads the ledger happens inside it, on the writer's connection, where no other write interleaves,
and every check comes before the job's first write.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from ..errors import (
    IdempotencyConflict,
    InsufficientFunds,
    InvalidInput,
    InvalidState,
    LimitReached,
    NotFound,
    SpendCapExceeded,
    WalletFrozen,
)
from ..store import Store, Tx, dumps, new_id, utc_iso
from ..store.ledger import KINDS, TRANSITIONS, HoldStatus, LedgerStore, TxnKind, WalletState
from .ceiling import Ceiling
from .ledger_models import (
    FreezeResult,
    HoldPlaced,
    HoldResolved,
    LedgerResult,
    LedgerViolation,
    Posting,
    TransactionPage,
    Transfer,
    UsdCredit,
    Wallet,
    WalletCreated,
)

ISSUANCE = "system:issuance"
REVENUE = "system:revenue"
DAY = 86_400
MAX_AMOUNT = 10**15  # per operation; far beyond any real top-up, far below SQLite's 2**63
MAX_BALANCE = 10**18  # per wallet: sums of balances and a day's spend stay far below 2**63
MAX_USD_CENTS = 10**12  # per top-up ($10 billion)
MAX_ROW_ID = 2**63 - 1  # SQLite's largest integer
MAX_HOLD_TTL = 30 * DAY
MAX_TEXT = 500
MAX_PAGE = 500

R = TypeVar("R", bound=LedgerResult)
Job = Callable[[Tx], tuple[dict[str, Any], bool]]


def _day_start_iso(day: int) -> str:
    return utc_iso(day * DAY)


class LedgerService:
    def __init__(
        self,
        store: Store,
        *,
        luc_per_usd: int,
        agent_limit: Callable[[str], int | None],
        clock: Callable[[], float] = time.time,
        ceiling: Ceiling | None = None,
    ) -> None:
        if isinstance(luc_per_usd, bool) or not isinstance(luc_per_usd, int) or luc_per_usd <= 0:
            raise ValueError(f"luc_per_usd must be a positive integer, got {luc_per_usd!r}")
        self._store = store
        self._ledger: LedgerStore = store.ledger
        self._luc_per_usd = luc_per_usd
        self._agent_limit = agent_limit
        self._clock = clock
        self.ceiling = ceiling or Ceiling()  # the per-call money ceiling; payment sessions and x402 apply it too

    # --- wallets ------------------------------------------------------------------------------------------------

    async def create_wallet(
        self, agent_id: str, customer_id: str, daily_cap: int | None, idempotency_key: str
    ) -> WalletCreated:
        """Open a wallet for `agent_id`, owned by `customer_id`, within the customer's agent limit."""
        _name(agent_id, "agent_id")
        _name(customer_id, "customer_id")
        if daily_cap is not None:
            _amount(daily_cap, "daily_cap")
        limit = self._agent_limit(customer_id)
        args = {"agent_id": agent_id, "customer_id": customer_id, "daily_cap": daily_cap}

        ledger = self._ledger

        def run(tx: Tx, now: float) -> dict[str, Any]:
            owner = ledger.wallet_owner(tx, agent_id)
            if owner is not None:
                raise InvalidState(
                    f"agent {agent_id} already has a wallet (owned by {owner}): use it, or choose another agent id",
                    param="agent_id",
                )
            if limit is not None:
                count = ledger.count_wallets(tx, customer_id)
                if count >= limit:
                    allows = "allows no agent wallets" if limit == 0 else f"allows {limit} agent wallet(s)"
                    raise LimitReached(
                        f"wallet for agent {agent_id} refused: customer {customer_id} has {count} wallet(s) and its "
                        f"tier {allows}: upgrade the tier, or reuse an existing agent's wallet",
                        param="customer_id", limit=limit, wallets=count,
                    )
            wallet_id = new_id("wal")
            iso = utc_iso(now)
            ledger.create_wallet(tx, wallet_id, agent_id, customer_id, daily_cap, iso)
            return {"wallet_id": wallet_id, "agent_id": agent_id, "customer_id": customer_id,
                    "daily_cap": daily_cap, "created_at": iso}

        return await self._submit(WalletCreated, self._job("create_wallet", agent_id, idempotency_key, args, run))

    def get_wallet(self, agent_id: str, recent: int = 10) -> Wallet:
        """Balance, active holds, available, cap and today's spend, and the latest entries, read in one snapshot."""
        _name(agent_id, "agent_id")
        _limit(recent, "recent", 0, MAX_PAGE)
        now = self._clock()
        snapshot = self._ledger.read_wallet(agent_id, utc_iso(now), recent)
        if snapshot is None:
            raise _unknown_wallet(agent_id)
        held = sum(h.amount for h in snapshot.holds)
        day = int(now // DAY)
        spent = snapshot.spent_today if snapshot.spend_day == day else 0
        cap = snapshot.daily_cap
        return Wallet(
            wallet_id=snapshot.id, agent_id=snapshot.agent_id, customer_id=snapshot.customer_id,
            balance=snapshot.balance, held=held, available=snapshot.balance - held, daily_cap=cap,
            spent_today=spent, cap_remaining=None if cap is None else max(0, cap - spent - held),
            cap_resets_at=_day_start_iso(day + 1), frozen=snapshot.frozen, holds=snapshot.holds,
            recent=snapshot.recent, created_at=snapshot.created_at, updated_at=snapshot.updated_at,
        )

    async def freeze(self, agent_id: str, frozen: bool, reason: str, idempotency_key: str) -> FreezeResult:
        """Freeze (or unfreeze) a wallet: a frozen wallet refuses debits, holds, captures and outgoing transfers."""
        _name(agent_id, "agent_id")
        if not isinstance(frozen, bool):
            raise InvalidInput(f"frozen must be true or false, got {frozen!r}", param="frozen")
        require_text(reason, "reason")
        args = {"agent_id": agent_id, "frozen": frozen, "reason": reason}

        ledger = self._ledger

        def run(tx: Tx, now: float) -> dict[str, Any]:
            wallet = _load(ledger, tx, agent_id, utc_iso(now))
            changed = wallet.frozen != frozen
            if changed or wallet.expired:
                wallet.frozen = frozen
                _save(ledger, tx, wallet, utc_iso(now))
            return {"agent_id": agent_id, "frozen": frozen, "changed": changed, "reason": reason}

        return await self._submit(FreezeResult, self._job("freeze", agent_id, idempotency_key, args, run))

    # --- postings -----------------------------------------------------------------------------------------------

    async def credit(
        self, agent_id: str, amount: int, *, idempotency_key: str, reason: str, reference: str | None = None,
        source: str = ISSUANCE,
    ) -> Posting:
        """Add `amount` LUC to a wallet from a system account (system:issuance unless `source` names another)."""
        if not (isinstance(source, str) and source.startswith("system:") and len(source) > len("system:")):
            raise InvalidInput(f"source must be a system account such as {ISSUANCE}, got {source!r}", param="source")
        job = self._credit_job("credit", agent_id, amount, {}, source, idempotency_key, reason, reference)
        return await self._submit(Posting, job)

    async def credit_usd(
        self, agent_id: str, cents: int, *, idempotency_key: str, reason: str, reference: str | None = None
    ) -> UsdCredit:
        """Top up a wallet paid in USD cents: LUC = cents * luc_per_usd // 100, rounded down (never more LUC than
        were paid for); a payment too small to buy 1 LUC is refused."""
        _amount(cents, "usd_cents", MAX_USD_CENTS)
        self.ceiling.check(cents, "usd", "usd_cents")
        amount = cents * self._luc_per_usd // 100
        if amount > MAX_AMOUNT:
            raise InvalidInput(
                f"{cents} cents buy {amount} LUC at {self._luc_per_usd} LUC per USD, above the per-operation maximum "
                f"of {MAX_AMOUNT} LUC: split the top-up", param="usd_cents")
        if amount == 0:
            raise InvalidInput(
                f"{cents} cent(s) buy 0 LUC at {self._luc_per_usd} LUC per USD: top up at least "
                f"{-(-100 // self._luc_per_usd)} cent(s)", param="usd_cents",
            )
        extra = {"cents": cents, "luc_per_usd": self._luc_per_usd}
        job = self._credit_job("credit_usd", agent_id, amount, extra, ISSUANCE, idempotency_key, reason, reference)
        return await self._submit(UsdCredit, job)

    def credit_in(
        self, tx: Tx, agent_id: str, amount: int, *, idempotency_key: str, reason: str,
        reference: str | None = None,
    ) -> Posting:
        """The `credit` operation applied inside a caller's own store job (`await store.write(fn)`, fn calling this
        with its `tx`), so the credit commits in the same transaction as the caller's writes, or not at all.
        Same rules, same (credit, key) idempotency as `credit`: a repeated key with the same arguments returns the
        stored posting with replayed=true. A refusal raises before the credit writes anything; the caller's job
        raising (or re-raising) it rolls back the caller's writes too."""
        job = self._credit_job("credit", agent_id, amount, {}, ISSUANCE, idempotency_key, reason, reference)
        response, replayed = job(tx)
        if replayed:
            return Posting.model_validate({**response, "replayed": True})
        return Posting.model_construct(**response)

    def _credit_job(
        self, operation: str, agent_id: str, amount: int, extra: dict[str, Any], source: str,
        idempotency_key: str, reason: str, reference: str | None,
    ) -> Job:
        _name(agent_id, "agent_id")
        _amount(amount, "amount")
        args = {"agent_id": agent_id, "amount": amount, "source": source, **extra,
                "reason": require_text(reason, "reason"), "reference": _optional_text(reference, "reference")}
        key = f"{operation}:{idempotency_key}"

        ledger = self._ledger

        def run(tx: Tx, now: float) -> dict[str, Any]:
            iso = utc_iso(now)
            wallet = _load(ledger, tx, agent_id, iso)
            if wallet.balance + amount > MAX_BALANCE:
                raise LimitReached(
                    f"credit of {amount} LUC refused: wallet {agent_id} would hold more than {MAX_BALANCE} LUC "
                    f"(balance {wallet.balance}): debit it or credit less", param="amount")
            wallet.balance += amount
            txn_id = new_id("txn")
            _save(ledger, tx, wallet, iso)
            ledger.post(tx, txn_id, "credit", key, reason, reference, None, iso,
                        (wallet.account, wallet.id, amount, 0, wallet.balance),
                        (source, None, -amount, 0, None))
            return {"txn_id": txn_id, "kind": "credit", "agent_id": agent_id, "amount": amount,
                    "balance_after": wallet.balance, "available_after": wallet.available, "counterparty": source,
                    "created_at": iso, **extra}

        return self._job(operation, agent_id, idempotency_key, args, run)

    async def debit(
        self, agent_id: str, amount: int, *, idempotency_key: str, reason: str, reference: str | None = None
    ) -> Posting:
        """Spend `amount` LUC from a wallet to system:revenue, within its available balance and daily cap."""
        return await self._submit(Posting, self.debit_job(agent_id, amount, idempotency_key=idempotency_key,
                                                          reason=reason, reference=reference))

    def debit_job(
        self, agent_id: str, amount: int, *, idempotency_key: str, reason: str, reference: str | None = None
    ) -> Job:
        """The debit as one store job (validated already). `bench/ledger.py` runs the very same job, one
        transaction each, on a plain connection as its baseline."""
        _name(agent_id, "agent_id")
        _amount(amount, "amount")
        args = {"agent_id": agent_id, "amount": amount, "reason": require_text(reason, "reason"),
                "reference": _optional_text(reference, "reference")}
        key = f"debit:{idempotency_key}"

        ledger = self._ledger

        def run(tx: Tx, now: float) -> dict[str, Any]:
            iso = utc_iso(now)
            wallet = _load(ledger, tx, agent_id, iso)
            day = int(now // DAY)
            _check_spend(wallet, amount, day, "debit")
            wallet.balance -= amount
            _spend(wallet, amount, day)
            txn_id = new_id("txn")
            _save(ledger, tx, wallet, iso)
            ledger.post(tx, txn_id, "debit", key, reason, reference, None, iso,
                        (wallet.account, wallet.id, -amount, 0, wallet.balance),
                        (REVENUE, None, amount, 0, None))
            return {"txn_id": txn_id, "kind": "debit", "agent_id": agent_id, "amount": amount,
                    "balance_after": wallet.balance, "available_after": wallet.available, "counterparty": REVENUE,
                    "created_at": iso}

        return self._job("debit", agent_id, idempotency_key, args, run)

    async def transfer(
        self, from_agent: str, to_agent: str, amount: int, *, idempotency_key: str, reason: str,
        reference: str | None = None,
    ) -> Transfer:
        """Move `amount` LUC between two wallets in one transaction; counts as spending for the sender."""
        _name(from_agent, "from_agent")
        _name(to_agent, "to_agent")
        _amount(amount, "amount")
        if from_agent == to_agent:
            raise InvalidInput(f"transfer from agent {from_agent} to itself: name two different wallets",
                               param="to_agent")
        args = {"from_agent": from_agent, "to_agent": to_agent, "amount": amount,
                "reason": require_text(reason, "reason"), "reference": _optional_text(reference, "reference")}
        key = f"transfer:{idempotency_key}"

        ledger = self._ledger

        def run(tx: Tx, now: float) -> dict[str, Any]:
            iso = utc_iso(now)
            source = _load(ledger, tx, from_agent, iso, param="from_agent")
            target = _load(ledger, tx, to_agent, iso, param="to_agent")
            day = int(now // DAY)
            _check_spend(source, amount, day, "transfer")
            if target.balance + amount > MAX_BALANCE:
                raise LimitReached(
                    f"transfer of {amount} LUC refused: wallet {to_agent} would hold more than {MAX_BALANCE} LUC "
                    f"(balance {target.balance})", param="amount")
            source.balance -= amount
            _spend(source, amount, day)
            target.balance += amount
            txn_id = new_id("txn")
            _save(ledger, tx, source, iso)
            _save(ledger, tx, target, iso)
            ledger.post(tx, txn_id, "transfer", key, reason, reference, None, iso,
                        (source.account, source.id, -amount, 0, source.balance),
                        (target.account, target.id, amount, 0, target.balance))
            return {"txn_id": txn_id, "from_agent": from_agent, "to_agent": to_agent, "amount": amount,
                    "from_balance_after": source.balance, "from_available_after": source.available,
                    "to_balance_after": target.balance, "created_at": iso}

        return await self._submit(Transfer, self._job("transfer", from_agent, idempotency_key, args, run))

    # --- holds --------------------------------------------------------------------------------------------------

    async def hold(
        self, agent_id: str, amount: int, ttl_seconds: int, *, idempotency_key: str, reason: str,
        reference: str | None = None,
    ) -> HoldPlaced:
        """Reserve `amount` LUC (funds and cap room) for up to `ttl_seconds`; returns the hold id to capture or
        release. An uncaptured hold releases itself when it expires."""
        _name(agent_id, "agent_id")
        _amount(amount, "amount")
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not 1 <= ttl_seconds <= MAX_HOLD_TTL:
            raise InvalidInput(f"ttl_seconds must be a whole number from 1 to {MAX_HOLD_TTL} (30 days), got "
                               f"{ttl_seconds!r}", param="ttl_seconds")
        args = {"agent_id": agent_id, "amount": amount, "ttl_seconds": ttl_seconds,
                "reason": require_text(reason, "reason"), "reference": _optional_text(reference, "reference")}
        key = f"hold:{idempotency_key}"

        ledger = self._ledger

        def run(tx: Tx, now: float) -> dict[str, Any]:
            iso = utc_iso(now)
            wallet = _load(ledger, tx, agent_id, iso)
            _check_spend(wallet, amount, int(now // DAY), "hold")
            wallet.held += amount
            hold_id, txn_id = new_id("hold"), new_id("txn")
            expires_at = utc_iso(now + ttl_seconds)
            _save(ledger, tx, wallet, iso)
            ledger.place_hold(tx, hold_id, wallet.id, amount, expires_at, txn_id, iso)
            ledger.post(tx, txn_id, "hold", key, reason, reference, hold_id, iso,
                        (wallet.account, wallet.id, 0, amount, wallet.balance),
                        (REVENUE, None, 0, -amount, None))
            return {"hold_id": hold_id, "txn_id": txn_id, "agent_id": agent_id, "amount": amount,
                    "expires_at": expires_at, "balance": wallet.balance, "available_after": wallet.available,
                    "created_at": iso}

        return await self._submit(HoldPlaced, self._job("hold", agent_id, idempotency_key, args, run))

    async def capture_hold(
        self, hold_id: str, amount: int, *, idempotency_key: str, reason: str, reference: str | None = None
    ) -> HoldResolved:
        """Post `amount` ≤ the hold to system:revenue and release the rest, in one transaction."""
        _name(hold_id, "hold_id")
        _amount(amount, "amount")
        return await self._resolve("capture_hold", hold_id, amount, idempotency_key, reason, reference)

    async def release_hold(
        self, hold_id: str, *, idempotency_key: str, reason: str, reference: str | None = None
    ) -> HoldResolved:
        """Give a hold's LUC back to the wallet's available balance, posting nothing."""
        _name(hold_id, "hold_id")
        return await self._resolve("release_hold", hold_id, None, idempotency_key, reason, reference)

    async def _resolve(
        self, operation: str, hold_id: str, amount: int | None, idempotency_key: str, reason: str,
        reference: str | None,
    ) -> HoldResolved:
        args = {"hold_id": hold_id, "amount": amount, "reason": require_text(reason, "reason"),
                "reference": _optional_text(reference, "reference")}
        verb: TxnKind
        verb, status_after = (("capture", HoldStatus.CAPTURED) if amount is not None
                              else ("release", HoldStatus.RELEASED))
        ledger = self._ledger

        def run(tx: Tx, now: float) -> dict[str, Any]:
            iso = utc_iso(now)
            hold = ledger.load_hold(tx, hold_id)
            if hold is None:
                raise _unknown_hold(hold_id)
            held, status, agent_id = hold.amount, hold.status, hold.agent_id
            if status_after not in TRANSITIONS[status]:
                how = f"captured ({hold.captured} LUC)" if status is HoldStatus.CAPTURED else status
                raise InvalidState(
                    f"{verb} of hold {hold_id} refused: it was already {how} at {hold.resolved_at}; a hold "
                    "resolves once: place a new hold if the task needs credits again", param="hold_id")
            if hold.expires_at <= iso:
                raise InvalidState(
                    f"{verb} of hold {hold_id} refused: it expired at {hold.expires_at} and its {held} LUC are "
                    "available again: place a new hold (or debit directly) if the task still needs them",
                    param="hold_id")
            captured = amount or 0
            if captured > held:
                raise InvalidInput(
                    f"capture of {captured} LUC refused: hold {hold_id} reserves only {held} LUC: capture at most "
                    f"{held}, and debit any extra separately", param="amount")
            wallet = _load(ledger, tx, agent_id, iso)
            if amount is not None and wallet.frozen:
                raise _frozen(wallet, "capture")
            wallet.balance -= captured
            wallet.held -= held
            if captured:
                _spend(wallet, captured, int(now // DAY))
            txn_id = new_id("txn")
            _save(ledger, tx, wallet, iso)
            ledger.resolve_hold(tx, hold_id, status_after, txn_id, iso, captured)
            ledger.post(tx, txn_id, verb, f"resolve:{hold_id}", reason, reference, hold_id, iso,
                        (wallet.account, wallet.id, -captured, -held, wallet.balance),
                        (REVENUE, None, captured, held, None))
            return {"hold_id": hold_id, "txn_id": txn_id, "agent_id": agent_id, "status": status_after.value,
                    "captured": captured, "released": held - captured, "balance_after": wallet.balance,
                    "available_after": wallet.available, "created_at": iso}

        return await self._submit(HoldResolved,
                                  self._job(operation, _hold_owner(ledger, hold_id), idempotency_key, args, run))

    async def sweep_expired_holds(self, limit: int = 1000) -> int:
        """Write down the expiry of the expired holds of up to `limit` wallets, each with its own ledger record;
        returns how many holds. (Holds expire without it, since an expired hold is never counted: this records it.)"""
        _limit(limit, "limit", 1, 100_000)
        clock, ledger = self._clock, self._ledger

        def job(tx: Tx) -> int:
            iso = utc_iso(round(clock(), 3))
            expired = ledger.expired_hold_wallets(tx, iso, limit)
            for agent_id, _ in expired:
                _save(ledger, tx, _load(ledger, tx, agent_id, iso), iso)
            return sum(count for _, count in expired)

        return await self._store.write(job)

    # --- reads --------------------------------------------------------------------------------------------------

    def list_transactions(
        self, agent_id: str, *, kind: str | None = None, since: datetime | float | str | None = None,
        until: datetime | float | str | None = None, limit: int = 50, cursor: str | None = None,
    ) -> TransactionPage:
        """A wallet's entries, newest first, optionally of one kind and within [since, until); pass `next_cursor`
        back as `cursor` for the next page."""
        _name(agent_id, "agent_id")
        _limit(limit, "limit", 1, MAX_PAGE)
        wallet_id = self._ledger.wallet_id(agent_id)
        if wallet_id is None:
            raise _unknown_wallet(agent_id)
        entries = self._ledger.list_entries(
            wallet_id, kind=None if kind is None else _kind(kind),
            since=None if since is None else _when(since, "since"),
            until=None if until is None else _when(until, "until"),
            before=None if cursor is None else _cursor(cursor), limit=limit + 1)
        next_cursor = str(entries[limit - 1].entry_id) if len(entries) > limit else None
        return TransactionPage(agent_id=agent_id, entries=entries[:limit], next_cursor=next_cursor)

    def check_ledger(self) -> list[LedgerViolation]:
        """Every invariant over the whole database, in one statement (one consistent snapshot); empty when sound."""
        return self._ledger.check_ledger()

    # --- the one mutation path ----------------------------------------------------------------------------------

    def _job(
        self, operation: str, owner: str | Callable[[Tx], str], idempotency_key: str,
        args: dict[str, Any], run: Callable[[Tx, float], dict[str, Any]],
    ) -> Job:
        """Wrap `run` so that the (owner, operation, key) row is checked and written in the same transaction as the
        effect. `owner` is the agent whose wallet the key belongs to, or a function finding it on the writer's
        connection (a hold's wallet): one wallet's keys never block or replay another wallet's calls."""
        require_text(idempotency_key, "idempotency_key")
        digest = hashlib.sha256(dumps(args).encode()).hexdigest()
        clock, ledger = self._clock, self._ledger

        def job(tx: Tx) -> tuple[dict[str, Any], bool]:
            agent = owner if isinstance(owner, str) else owner(tx)
            found = ledger.find_request(tx, agent, operation, idempotency_key)
            if found is not None:
                if found.request_hash != digest:
                    raise IdempotencyConflict(
                        f"idempotency_key {idempotency_key!r} was already used for {operation} on agent {agent}'s "
                        "wallet with other arguments: repeat the first call's arguments exactly to get its result, "
                        "or use a new key for a new request", param="idempotency_key", operation=operation)
                stored: dict[str, Any] = json.loads(found.response)
                return stored, True
            now = round(clock(), 3)  # the millisecond the ISO times show, so day and time agree
            response = run(tx, now)
            ledger.record_request(tx, agent, operation, idempotency_key, digest, dumps(response),
                                  response.get("txn_id"), utc_iso(now))
            return response, False

        job.lock_order = owner if isinstance(owner, str) else ""  # type: ignore[attr-defined]  # PostgreSQL's writer
        job.pipelined = True  # type: ignore[attr-defined]  # it reads results only by fetching them: see postgres_core
        # what the job looks up first, for a writer that reads it ahead for a whole batch (PostgreSQL's)
        job.request = (owner, operation, idempotency_key) if isinstance(owner, str) else None  # type: ignore[attr-defined]
        return job

    async def _submit(self, model: type[R], job: Job) -> R:
        response, replayed = await self._store.write(job, savepoint=False)
        if replayed:  # stored JSON, perhaps from an older version: validate it
            return model.model_validate({**response, "replayed": True})
        return model.model_construct(**response)  # built just now by our own job, field by field


# --- writer-side helpers: they run inside a store job, on the writer's connection ----------------------------------


def _load(ledger: LedgerStore, tx: Tx, agent_id: str, now_iso: str, *, param: str = "agent_id") -> WalletState:
    """The wallet as of this transaction, its expired holds no longer counted (written down by `_save`). Reads
    only: every check of every operation runs before its first write, so a refusal has nothing to undo."""
    wallet = ledger.load_wallet(tx, agent_id, now_iso)
    if wallet is None:
        raise _unknown_wallet(agent_id, param)
    return wallet


def _save(ledger: LedgerStore, tx: Tx, wallet: WalletState, now_iso: str) -> None:
    """Write down the expired holds found by `_load` (each its own transaction, before the operation's), then the
    wallet's new state."""
    for hold_id, amount in wallet.expired:
        txn_id = new_id("txn")
        ledger.resolve_hold(tx, hold_id, HoldStatus.EXPIRED, txn_id, now_iso)
        ledger.post(tx, txn_id, "expire", f"resolve:{hold_id}", "hold expired", None, hold_id, now_iso,
                    (wallet.account, wallet.id, 0, -amount, wallet.loaded_balance),
                    (REVENUE, None, 0, amount, None))
    wallet.expired = []
    ledger.save_wallet(tx, wallet, now_iso)


def _check_spend(wallet: WalletState, amount: int, day: int, verb: str) -> None:
    """Frozen, then funds (available), then the daily cap (which active holds reserve room in)."""
    if wallet.frozen:
        raise _frozen(wallet, verb)
    if amount > wallet.available:
        raise InsufficientFunds(
            f"{verb} of {amount} LUC refused: wallet {wallet.agent_id} has {wallet.available} available "
            f"(balance {wallet.balance}, {wallet.held} held): credit it first or {verb} less",
            param="amount", amount=amount, available=wallet.available, balance=wallet.balance, held=wallet.held)
    if wallet.daily_cap is not None:
        spent = wallet.spent_on(day)
        room = wallet.daily_cap - spent - wallet.held
        if amount > room:
            raise SpendCapExceeded(
                f"{verb} of {amount} LUC refused: wallet {wallet.agent_id} has a daily cap of {wallet.daily_cap} LUC "
                f"and has spent {spent} today (UTC) with {wallet.held} held, leaving {max(room, 0)}: {verb} at most "
                f"{max(room, 0)}, release unneeded holds, or wait for the cap to reset at {_day_start_iso(day + 1)}",
                param="amount", amount=amount, daily_cap=wallet.daily_cap, spent_today=spent, held=wallet.held)


def _spend(wallet: WalletState, amount: int, day: int) -> None:
    wallet.spent_today = wallet.spent_on(day) + amount
    wallet.spend_day = day


def _frozen(wallet: WalletState, verb: str) -> WalletFrozen:
    return WalletFrozen(
        f"{verb} refused: wallet {wallet.agent_id} is frozen; it still accepts credits and incoming transfers: an "
        "operator must unfreeze it first", param="agent_id")


def _unknown_wallet(agent_id: str, param: str = "agent_id") -> NotFound:
    return NotFound(f"no wallet for agent {agent_id}: create it with create_agent_wallet, or check the agent id",
                    param=param)


def _unknown_hold(hold_id: str) -> NotFound:
    return NotFound(f"no hold {hold_id}: check the id returned by hold_luc", param="hold_id")


def _hold_owner(ledger: LedgerStore, hold_id: str) -> Callable[[Tx], str]:
    """The agent whose wallet a hold is on: the owner of the keys that capture or release it."""
    def find(tx: Tx) -> str:
        agent_id = ledger.hold_owner(tx, hold_id)
        if agent_id is None:
            raise _unknown_hold(hold_id)
        return agent_id

    return find


# --- argument checks: before any job, so a bad call never reaches the writer ---------------------------------------


def _amount(value: object, field: str, maximum: int = MAX_AMOUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be a whole number of LUC, got {value!r}", param=field)
    if value <= 0:
        raise InvalidInput(f"{field} must be a positive number, got {value}: amounts are at least 1", param=field)
    if value > maximum:
        shown = value if value < 10**30 else "a number above 10**30"  # str() of a huge int raises ValueError
        raise InvalidInput(f"{field} {shown} is above the per-operation maximum of {maximum}: split it",
                           param=field)
    return value


def require_text(value: object, field: str, limit: int = MAX_TEXT) -> str:
    """A non-empty string of at most `limit` characters (reasons, descriptions), else an error naming the field."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{field} must be a non-empty string, got {value!r}", param=field)
    if len(value) > limit:
        raise InvalidInput(f"{field} is {len(value)} characters long: at most {limit}", param=field)
    return value


def _optional_text(value: object, field: str) -> str | None:
    return None if value is None else require_text(value, field)


def _name(value: object, field: str) -> str:
    text = require_text(value, field)
    if text != text.strip():
        raise InvalidInput(f"{field} {text!r} has leading or trailing spaces: pass the id exactly", param=field)
    return text


def _limit(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{field} must be a whole number from {low} to {high}, got {value!r}", param=field)
    return value


def _cursor(value: object) -> int:
    """An entry id as `next_cursor` gave it: ASCII digits, within SQLite's 64-bit integers."""
    if not (isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19
            and int(value) <= MAX_ROW_ID):
        shown = value[:40] + "..." if isinstance(value, str) and len(value) > 40 else value
        raise InvalidInput(f"cursor {shown!r} is not one this tool returned: pass next_cursor unchanged, or omit it "
                           "for the first page", param="cursor")
    return int(value)


def _kind(value: str) -> TxnKind:
    for kind in KINDS:
        if value == kind:
            return kind
    raise InvalidInput(f"kind {value!r} is not one of {', '.join(KINDS)}", param="kind")


def _when(value: datetime | float | str, field: str) -> str:
    """A time as the store writes it (UTC ISO with milliseconds), from epoch seconds, a datetime or ISO text."""
    try:
        if isinstance(value, datetime):
            moment = value if value.tzinfo else value.replace(tzinfo=UTC)
            return utc_iso(moment.timestamp())
        if isinstance(value, str):
            return _when(datetime.fromisoformat(value), field)
        if isinstance(value, bool):
            raise TypeError
        return utc_iso(float(value))
    except (TypeError, ValueError, OverflowError, OSError):
        raise InvalidInput(f"{field} {value!r} is not a time: pass epoch seconds or ISO-8601 such as "
                           "2026-01-31T00:00:00Z", param=field) from None
