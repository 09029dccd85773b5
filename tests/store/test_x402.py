"""The x402 store's contract (store/x402.py): what every backend's quotes, receipts and payer operations guarantee.

The `x402` fixture yields the aggregate store of each backend (SQLite and PostgreSQL); `write` runs a job in that
backend's writer transaction. The quote state machine (`QuoteStatus`, `TRANSITIONS`) is checked against the
operations and against the schema's CHECK constraint. On PostgreSQL, two instances (two `PostgresStore`s on one
database) present one payment, pay and sweep quotes at once: the outcome is the one SQLite's single writer gives.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.store import PostgresStore, Store, Tx
from aims_billing_mcp.store.x402 import (
    STORED_QUOTE_STATUSES,
    TRANSITIONS,
    Quote,
    QuoteStatus,
    ReceiptConflict,
    ReceiptRecord,
    X402Store,
    quote_state,
)
from tests.support.pg_turns import Attempt, holding, lock_waiters

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000
NETWORK, ASSET = "eip155:84532", "0x036cbd53842c5426634e7929541ec2318f3dcf7e"
PAY_TO = "0x88905996E9aFA7565698F7d1cfC71b4D4b3840d7"
Write = Callable[[Callable[[Tx], Any]], Any]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":
        store: Any = PostgresStore(request.getfixturevalue("postgres_url"), writers=2, pool_size=2)
    else:
        store = Store(tmp_path / "x402.db")
    yield store
    store.close()


@pytest.fixture
def x402(backend: Store) -> X402Store:
    return backend.x402


def quote(quote_id: str = "q_1", *, expires_at: int = NOW + 300, **changes: Any) -> Quote:
    base = Quote(id=quote_id, network=NETWORK, asset=ASSET, pay_to=PAY_TO, amount=1_500_000, agent_id="buyer",
                 luc=1500, description="credits", resource="urn:luc", x402_version=2, status=QuoteStatus.OPEN,
                 expires_at=expires_at, created_at="2027-01-15T08:00:00.000Z")
    return replace(base, **changes)


def receipt(receipt_id: str = "rcpt_1", **changes: Any) -> ReceiptRecord:
    base = ReceiptRecord(id=receipt_id, quote_id="q_1", network=NETWORK, asset=ASSET, payer="0xpayer", pay_to=PAY_TO,
                         amount=1_500_000, nonce="0x" + "11" * 32, tx_hash="0x" + "aa" * 32, agent_id="buyer",
                         luc_credited=1500, created_at="2027-01-15T08:00:01.000Z", payment_intent=None, mode="local",
                         x402_version=2, settlement='{"success":true}')
    return replace(base, **changes)


def test_a_stored_quote_reads_back_open_and_its_id_is_taken_once(x402: X402Store, write: Write) -> None:
    assert write(lambda tx: x402.add_quote(tx, quote())) is True
    assert write(lambda tx: x402.add_quote(tx, quote(luc=9))) is False

    assert x402.find_quote("q_1") == quote()
    assert x402.find_quote("q_other") is None
    assert write(lambda tx: x402.quote_status(tx, "q_1")) == (QuoteStatus.OPEN, NOW + 300)
    assert write(lambda tx: x402.quote_status(tx, "q_other")) is None


def test_open_quotes_are_counted_until_they_expire_or_are_paid(x402: X402Store, write: Write) -> None:
    def setup(tx: Tx) -> None:
        x402.add_quote(tx, quote("q_live", expires_at=NOW + 10))
        x402.add_quote(tx, quote("q_due", expires_at=NOW))
        x402.add_quote(tx, quote("q_paid", expires_at=NOW + 10))
        x402.mark_quote_paid(tx, "q_paid", "rcpt_1", "2027-01-15T08:00:01.000Z")

    write(setup)

    assert write(lambda tx: x402.count_open_quotes(tx, NOW)) == 1
    assert write(lambda tx: x402.count_open_quotes(tx, NOW - 1)) == 2


def test_a_paid_quote_names_its_receipt_and_is_never_swept(x402: X402Store, write: Write) -> None:
    def setup(tx: Tx) -> None:
        x402.add_quote(tx, quote("q_paid", expires_at=NOW - 100))
        x402.mark_quote_paid(tx, "q_paid", "rcpt_1", "2027-01-15T08:00:01.000Z")
        x402.add_quote(tx, quote("q_old", expires_at=NOW - 100))
        x402.add_quote(tx, quote("q_recent", expires_at=NOW - 1))

    write(setup)
    swept = write(lambda tx: x402.sweep_quotes(tx, NOW - 50))

    paid = x402.find_quote("q_paid")
    assert paid is not None and (paid.status, paid.receipt_id, paid.paid_at) == (
        QuoteStatus.PAID, "rcpt_1", "2027-01-15T08:00:01.000Z")
    assert swept == 1
    assert x402.find_quote("q_old") is None and x402.find_quote("q_recent") is not None
    assert write(lambda tx: x402.sweep_quotes(tx, NOW - 50)) == 0


def test_a_recorded_receipt_marks_its_payment_used(x402: X402Store, write: Write) -> None:
    first = receipt(payment_intent="pi_1")
    assert not x402.nonce_used(NETWORK, ASSET, "0xpayer", first.nonce)

    write(lambda tx: x402.record_receipt(tx, first))

    assert x402.nonce_used(NETWORK, ASSET, "0xpayer", first.nonce)
    assert not x402.nonce_used(NETWORK, ASSET, "0xother", first.nonce)
    assert x402.payment_intent_used("pi_1") and not x402.payment_intent_used("pi_2")
    def used(nonce: str, tx_hash: str | None, payment_intent: str | None) -> bool:
        return bool(write(lambda tx: x402.payment_used(tx, NETWORK, ASSET, "0xpayer", nonce, tx_hash, payment_intent)))

    other = "0x" + "22" * 32
    assert used(first.nonce, None, None) and used(other, first.tx_hash, None) and used(other, None, "pi_1")
    assert not used(other, None, None)
    assert x402.recent_receipts(10) == [first]


@pytest.mark.parametrize(("second", "on"), [
    ({"id": "rcpt_2", "quote_id": "q_2", "tx_hash": "0x" + "bb" * 32}, "payment"),  # same payer and nonce
    ({"id": "rcpt_2", "quote_id": "q_2", "nonce": "0x" + "22" * 32}, "payment"),  # same tx hash
    ({"id": "rcpt_2", "quote_id": "q_2", "nonce": "0x" + "22" * 32, "tx_hash": None, "payment_intent": "pi_1"},
     "payment"),  # same PaymentIntent
    ({"id": "rcpt_2", "nonce": "0x" + "22" * 32, "tx_hash": "0x" + "bb" * 32}, "quote"),  # same quote
    ({"id": "rcpt_2"}, "quote"),  # the same payment for the same quote: the quote's key is named
])
def test_a_second_receipt_for_a_used_payment_or_quote_is_refused_and_writes_nothing(
        x402: X402Store, write: Write, second: dict[str, Any], on: str) -> None:
    write(lambda tx: x402.record_receipt(tx, receipt(payment_intent="pi_1")))

    with pytest.raises(ReceiptConflict) as caught:
        write(lambda tx: x402.record_receipt(tx, receipt(**second)))

    assert caught.value.on == on
    assert [r.id for r in x402.recent_receipts(10)] == ["rcpt_1"]


def test_recent_receipts_are_newest_first_and_limited(x402: X402Store, write: Write) -> None:
    def setup(tx: Tx) -> None:
        for i, at in enumerate(("2027-01-15T08:00:02.000Z", "2027-01-15T08:00:01.000Z", "2027-01-15T08:00:03.000Z")):
            x402.record_receipt(tx, receipt(f"rcpt_{i}", quote_id=f"q_{i}", nonce=f"0x{i:064x}", tx_hash=None,
                                            created_at=at))

    write(setup)

    assert [r.id for r in x402.recent_receipts(2)] == ["rcpt_2", "rcpt_0"]
    assert [r.id for r in x402.recent_receipts(10)] == ["rcpt_2", "rcpt_0", "rcpt_1"]


def test_payers_register_once_per_wallet_and_are_found_by_address_or_wallet(x402: X402Store, write: Write) -> None:
    def setup(tx: Tx) -> list[bool]:
        return [x402.register_payer(tx, "0xb", "alice", "2027-01-15T08:00:01.000Z"),
                x402.register_payer(tx, "0xa", "alice", "2027-01-15T08:00:02.000Z"),
                x402.register_payer(tx, "0xb", "alice", "2027-01-15T08:00:03.000Z"),
                x402.register_payer(tx, "0xa", "bob", "2027-01-15T08:00:04.000Z")]

    assert write(setup) == [True, True, False, True]
    assert write(lambda tx: x402.payers_of(tx, "alice")) == ["0xb", "0xa"]  # oldest first
    assert write(lambda tx: x402.payers_of(tx, "carol")) == []
    links = {(link.address, link.agent_id) for link in x402.payer_links("0xa", "carol")}
    assert links == {("0xa", "alice"), ("0xa", "bob")}
    assert {(link.address, link.agent_id) for link in x402.payer_links("0xc", "alice")} == {
        ("0xb", "alice"), ("0xa", "alice")}
    assert x402.payer_links("0xc", None) == []


def add_wallet(store: Any, agent_id: str, balance: int = 0) -> None:
    """A wallet row as the ledger writes it (PostgreSQL has no ledger store yet: the row is written directly)."""
    store.write_sync(lambda tx: tx.execute(
        "INSERT INTO agent_wallets (id, agent_id, customer_id, balance, created_at, updated_at) "
        "VALUES (%s, %s, 'cus_1', %s, '2027-01-15T08:00:00.000Z', '2027-01-15T08:00:00.000Z')",
        (f"w_{agent_id}", agent_id, balance)))


async def test_a_wallet_exists_once_the_ledger_created_it(backend: Store, x402: X402Store) -> None:
    assert not x402.wallet_exists("buyer")
    if isinstance(backend, PostgresStore):
        add_wallet(backend, "buyer")
    else:
        await LedgerService(backend, luc_per_usd=1000, agent_limit=lambda customer: None).create_wallet(
            "buyer", "cus_1", None, "w-buyer")
    assert x402.wallet_exists("buyer") and not x402.wallet_exists("seller")


@pytest.mark.parametrize(("status", "expires_at", "state"), [
    (QuoteStatus.OPEN, NOW + 1, QuoteStatus.OPEN),
    (QuoteStatus.OPEN, NOW, QuoteStatus.EXPIRED),  # expiry is exclusive: at expires_at it is over
    (QuoteStatus.PAID, NOW - 1, QuoteStatus.PAID),  # paid stays paid whatever the clock
    (None, NOW + 1, QuoteStatus.SWEPT),  # no row any more
])
def test_a_quotes_state_comes_from_its_stored_status_and_the_clock(
        status: QuoteStatus | None, expires_at: int, state: QuoteStatus) -> None:
    assert quote_state(status, expires_at, NOW) is state


def test_the_quote_state_machine_pays_only_open_quotes_and_ends_in_paid_or_swept() -> None:
    assert set(TRANSITIONS) == set(QuoteStatus)
    assert [s for s in QuoteStatus if QuoteStatus.PAID in TRANSITIONS[s]] == [QuoteStatus.OPEN]
    assert {s for s in QuoteStatus if not TRANSITIONS[s]} == {QuoteStatus.PAID, QuoteStatus.SWEPT}
    reachable, frontier = {QuoteStatus.OPEN}, [QuoteStatus.OPEN]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()] - reachable:
            reachable.add(nxt)
            frontier.append(nxt)
    assert reachable == set(QuoteStatus)


def test_the_schema_allows_exactly_the_stored_quote_statuses(backend: Store) -> None:
    if isinstance(backend, PostgresStore):  # PostgreSQL renders IN (...) as = ANY (ARRAY['open'::text, ...])
        checks = backend.query("SELECT pg_get_constraintdef(oid) AS sql FROM pg_constraint "
                               "WHERE conrelid = 'x402_quotes'::regclass AND contype = 'c'")
        sql = next(row["sql"] for row in checks if "status" in row["sql"])
        assert set(re.findall(r"'(\w+)'::text", sql)) == set(STORED_QUOTE_STATUSES)
        return
    sql = backend.query_one("SELECT sql FROM sqlite_master WHERE name = 'x402_quotes'")["sql"]  # type: ignore[index]
    check = re.search(r"CHECK \(status IN \(([^)]*)\)\)", sql)
    assert check is not None
    assert {s.strip(" '") for s in check.group(1).split(",")} == set(STORED_QUOTE_STATUSES)


# --- two instances on one PostgreSQL database -------------------------------------------------------------------

OTHER_NONCE, OTHER_HASH = "0x" + "22" * 32, "0x" + "bb" * 32


@pytest.fixture
def two_instances(open_postgres_store: Callable[..., Any]) -> tuple[Any, Any]:
    """Two "servers" on one database, two writer threads each."""
    return open_postgres_store(writers=2), open_postgres_store(writers=2)


def credit_sql(store: Any) -> str:
    mark = "%s" if isinstance(store, PostgresStore) else "?"
    return f"UPDATE agent_wallets SET balance = balance + {mark} WHERE agent_id = {mark}"


def record_and_credit(store: Any, paid: ReceiptRecord) -> Callable[[Tx], None]:
    def job(tx: Tx) -> None:
        store.x402.record_receipt(tx, paid)
        tx.execute(credit_sql(store), (paid.luc_credited, paid.agent_id))
    return job


def pay(store: Any, paid: ReceiptRecord) -> Callable[[Tx], str]:
    """The payment service's job (services/x402.py `_record`): payment unused, quote open, then receipt, quote paid,
    wallet credited, in one transaction."""
    def job(tx: Tx) -> str:
        x402 = store.x402
        if x402.payment_used(tx, paid.network, paid.asset, paid.payer, paid.nonce, paid.tx_hash, paid.payment_intent):
            return "payment used"
        found = x402.quote_status(tx, paid.quote_id)
        if found is None or found[0] is not QuoteStatus.OPEN:
            return "quote gone" if found is None else "quote paid"
        x402.record_receipt(tx, paid)
        x402.mark_quote_paid(tx, paid.quote_id, paid.id, paid.created_at)
        tx.execute(credit_sql(store), (paid.luc_credited, paid.agent_id))
        return "paid"
    return job


def balance(store: Any) -> int:
    row = store.query_one("SELECT balance FROM agent_wallets WHERE agent_id = 'buyer'")
    return int(row["balance"])


@pytest.mark.parametrize(("second_receipt", "on"), [
    ({"id": "rcpt_2"}, "quote"),  # the same payment for the same quote
    ({"id": "rcpt_2", "quote_id": "q_2"}, "payment"),  # the same payment for another quote
    ({"id": "rcpt_2", "nonce": OTHER_NONCE, "tx_hash": OTHER_HASH}, "quote"),  # another payment for the same quote
])
async def test_one_payment_or_quote_recorded_by_two_instances_at_once_is_recorded_and_credited_once(
        two_instances: tuple[PostgresStore, PostgresStore], postgres_url: str, second_receipt: dict[str, Any],
        on: str) -> None:
    first, second = two_instances
    add_wallet(first, "buyer")
    theirs = Attempt()

    async with holding(first, record_and_credit(first, receipt())) as held, anyio.create_task_group() as tg:
        tg.start_soon(theirs.run, second.write(record_and_credit(second, receipt(**second_receipt))))
        await lock_waiters(postgres_url)  # the second insert waits for the first transaction's outcome
        assert not theirs.done
        held.release()

    assert held.error is None
    assert isinstance(theirs.error, ReceiptConflict) and theirs.error.on == on  # SQLite's answer (test above)
    assert [r.id for r in second.x402.recent_receipts(10)] == ["rcpt_1"]
    assert balance(second) == 1500


@pytest.mark.parametrize(("second_receipt", "outcome"), [
    ({"id": "rcpt_2"}, "payment used"),
    ({"id": "rcpt_2", "nonce": OTHER_NONCE, "tx_hash": OTHER_HASH}, "quote paid"),
])
async def test_a_payment_job_racing_another_instance_ends_as_it_would_one_after_the_other_on_sqlite(
        two_instances: tuple[PostgresStore, PostgresStore], postgres_url: str, tmp_path: Path,
        second_receipt: dict[str, Any], outcome: str) -> None:
    sqlite = Store(tmp_path / "serial.db")
    try:
        for store in (sqlite, two_instances[0]):
            store.write_sync(lambda tx, store=store: store.x402.add_quote(tx, quote()))
        await LedgerService(sqlite, luc_per_usd=1000, agent_limit=lambda customer: None).create_wallet(
            "buyer", "cus_1", None, "w-buyer")
        serial = [sqlite.write_sync(pay(sqlite, receipt())), sqlite.write_sync(pay(sqlite, receipt(**second_receipt)))]
    finally:
        sqlite.close()
    first, second = two_instances
    add_wallet(first, "buyer")
    theirs = Attempt()

    async with holding(first, pay(first, receipt())) as held, anyio.create_task_group() as tg:
        tg.start_soon(theirs.run, second.write(pay(second, receipt(**second_receipt))))
        await lock_waiters(postgres_url)  # the second job waits on the payment's keys or the quote's row
        assert not theirs.done
        held.release()

    assert serial == ["paid", outcome]
    assert [held.result, theirs.result] == serial and (held.error, theirs.error) == (None, None)
    assert [r.id for r in second.x402.recent_receipts(10)] == ["rcpt_1"] and balance(second) == 1500
    found = second.x402.find_quote("q_1")
    assert found is not None and (found.status, found.receipt_id) == (QuoteStatus.PAID, "rcpt_1")


def expired_quotes(store: Any, count: int) -> None:
    def setup(tx: Tx) -> None:
        for n in range(count):
            store.x402.add_quote(tx, quote(f"q_old_{n}", expires_at=NOW - 100))
        store.x402.add_quote(tx, quote("q_paid", expires_at=NOW - 100))
        store.x402.mark_quote_paid(tx, "q_paid", "rcpt_1", "2027-01-15T08:00:01.000Z")
    store.write_sync(setup)


async def test_sweeps_on_two_instances_at_once_delete_each_expired_quote_once_without_waiting(
        two_instances: tuple[PostgresStore, PostgresStore]) -> None:
    first, second = two_instances
    expired_quotes(first, 5)

    async with holding(first, lambda tx: first.x402.sweep_quotes(tx, NOW)) as held:
        with anyio.fail_after(10):  # it skips the rows the first sweep holds instead of waiting for them
            theirs = await second.write(lambda tx: second.x402.sweep_quotes(tx, NOW))

    assert (held.result, theirs) == (5, 0)
    assert [q for q in ("q_old_0", "q_old_4", "q_paid") if second.x402.find_quote(q)] == ["q_paid"]
    assert await second.write(lambda tx: second.x402.sweep_quotes(tx, NOW)) == 0


async def test_a_sweep_skips_a_quote_a_payment_on_another_instance_holds_and_the_quote_stays_paid(
        two_instances: tuple[PostgresStore, PostgresStore]) -> None:
    first, second = two_instances
    expired_quotes(first, 2)

    def paying(tx: Tx) -> None:  # a payment on an instance whose clock runs behind: the quote is open to it
        assert first.x402.quote_status(tx, "q_old_0") == (QuoteStatus.OPEN, NOW - 100)
        first.x402.mark_quote_paid(tx, "q_old_0", "rcpt_2", "2027-01-15T08:00:02.000Z")

    async with holding(first, paying) as held:
        with anyio.fail_after(10):
            swept = await second.write(lambda tx: second.x402.sweep_quotes(tx, NOW))

    assert held.error is None and swept == 1
    paid = second.x402.find_quote("q_old_0")
    assert paid is not None and (paid.status, paid.receipt_id) == (QuoteStatus.PAID, "rcpt_2")
    assert second.x402.find_quote("q_old_1") is None


async def test_a_payment_reaching_a_quote_another_instance_is_sweeping_waits_and_finds_it_swept(
        two_instances: tuple[PostgresStore, PostgresStore], postgres_url: str) -> None:
    first, second = two_instances
    expired_quotes(first, 1)
    theirs = Attempt()

    async with holding(first, lambda tx: first.x402.sweep_quotes(tx, NOW)) as held, \
            anyio.create_task_group() as tg:
        tg.start_soon(theirs.run, second.write(lambda tx: second.x402.quote_status(tx, "q_old_0")))
        await lock_waiters(postgres_url)  # the quote's row is locked by the sweep
        assert not theirs.done
        held.release()

    assert (held.result, theirs.result, theirs.error) == (1, None, None)


@pytest.mark.parametrize("read", ["open quotes", "payers"])
async def test_a_limit_read_waits_for_another_instances_write_of_the_same_limit(
        two_instances: tuple[PostgresStore, PostgresStore], postgres_url: str, read: str) -> None:
    first, second = two_instances
    theirs = Attempt()

    def first_job(tx: Tx) -> object:
        if read == "open quotes":
            return first.x402.count_open_quotes(tx, NOW), first.x402.add_quote(tx, quote())
        return first.x402.payers_of(tx, "alice"), first.x402.register_payer(tx, "0xa", "alice", "2027-01-15T08:00Z")

    def second_job(tx: Tx) -> object:
        return second.x402.count_open_quotes(tx, NOW) if read == "open quotes" else second.x402.payers_of(tx, "alice")

    async with holding(first, first_job) as held, anyio.create_task_group() as tg:
        tg.start_soon(theirs.run, second.write(second_job))
        await lock_waiters(postgres_url)  # the limit is counted by one instance at a time
        assert not theirs.done
        held.release()

    assert held.result == ((0, True) if read == "open quotes" else ([], True))
    assert theirs.result == (1 if read == "open quotes" else ["0xa"])


async def test_a_challenge_issued_by_one_instance_is_paid_through_another(
        two_instances: tuple[PostgresStore, PostgresStore]) -> None:
    from aims_billing_mcp.services.tiers import Pricing
    from aims_billing_mcp.services.x402 import X402Service
    from aims_billing_mcp.settings import Settings
    from tests.support.x402_worker import Payer

    pricing = Pricing.load()
    services = []
    for store in two_instances:
        instance: Any = store  # the services take either backend's store
        ledger = LedgerService(instance, luc_per_usd=pricing.luc_per_usd, agent_limit=lambda customer: None)
        settings = Settings(_env_file=None,  # type: ignore[call-arg]
                            aims_x402_challenge_key="one-key-for-every-instance-" * 2)
        services.append((X402Service.from_settings(instance, ledger, None, pricing, settings), ledger))
    (one, one_ledger), (other, other_ledger) = services
    await one_ledger.create_wallet("buyer", "cus_1", None, "w-buyer")
    from_one = await one.challenge(agent_id="buyer", luc=5, resource="r")
    from_other = await other.challenge(agent_id="buyer", luc=7, resource="r")
    assert (await other.verify_and_settle(Payer().pay(from_one.payment_required))).luc_credited == 5
    assert (await one.verify_and_settle(Payer().pay(from_other.payment_required))).luc_credited == 7
    assert other_ledger.get_wallet("buyer").balance == 12


async def test_challenges_on_postgresql_without_a_shared_key_are_refused_naming_the_setting(
        two_instances: tuple[PostgresStore, PostgresStore]) -> None:
    from aims_billing_mcp.errors import ConfigurationError
    from aims_billing_mcp.services.tiers import Pricing
    from aims_billing_mcp.services.x402 import X402Service

    pricing = Pricing.load()
    instance: Any = two_instances[0]
    ledger = LedgerService(instance, luc_per_usd=pricing.luc_per_usd, agent_limit=lambda customer: None)
    await ledger.create_wallet("buyer", "cus_1", None, "w-buyer")
    service = X402Service(instance, ledger, None, pricing)  # sandbox mode, no AIMS_X402_CHALLENGE_KEY
    with pytest.raises(ConfigurationError) as caught:
        await service.challenge(agent_id="buyer", luc=5, resource="r")
    assert caught.value.param == "AIMS_X402_CHALLENGE_KEY" and "every instance" in caught.value.message
