"""The idempotency store's contract (store/idempotency.py): a key holds its first call, per tool and owner.

The `keys` fixture yields the aggregate store of each backend (SQLite and PostgreSQL); `write` runs a job in that
backend's writer transaction. On PostgreSQL, two instances (two `PostgresStore`s on one database) record one key at
once: the first stays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from aims_billing_mcp.store import PostgresStore, Store, Tx
from aims_billing_mcp.store.idempotency import CallRecord, IdempotencyStore, StoredCall
from tests.support.pg_turns import Attempt, holding, lock_waiters

Write = Callable[[Callable[[Tx], Any]], Any]


@pytest.fixture
def keys(backend: Store) -> IdempotencyStore:
    return backend.idempotency


def call(key: str = "k1", *, tool: str = "create_product", owner: str = "", request_hash: str = "h1",
         response: str = '{"id":"prod_1"}', created_at: str = "2027-01-15T08:00:00.000Z") -> CallRecord:
    return CallRecord(tool=tool, owner=owner, key=key, request_hash=request_hash, response=response,
                      request_id="req_1", created_at=created_at)


def test_a_recorded_call_is_found_with_its_hash_and_response(keys: IdempotencyStore, write: Write) -> None:
    assert keys.find("create_product", "", "k1") is None
    assert write(lambda tx: keys.record(tx, call())) is True
    assert keys.find("create_product", "", "k1") == StoredCall("h1", '{"id":"prod_1"}')


def test_the_first_call_under_a_key_stays_and_a_second_record_changes_nothing(
        keys: IdempotencyStore, write: Write) -> None:
    write(lambda tx: keys.record(tx, call()))
    assert write(lambda tx: keys.record(tx, call(request_hash="h2", response='{"id":"prod_2"}'))) is False
    assert keys.find("create_product", "", "k1") == StoredCall("h1", '{"id":"prod_1"}')


@pytest.mark.parametrize(("tool", "owner"), [("create_product", "cus_other"), ("create_price", "")])
def test_a_key_belongs_to_its_tool_and_owner(keys: IdempotencyStore, write: Write, tool: str, owner: str) -> None:
    write(lambda tx: keys.record(tx, call()))
    assert keys.find(tool, owner, "k1") is None
    assert write(lambda tx: keys.record(tx, call(tool=tool, owner=owner, request_hash="h2"))) is True
    assert keys.find(tool, owner, "k1") == StoredCall("h2", '{"id":"prod_1"}')
    assert keys.find("create_product", "", "k1") == StoredCall("h1", '{"id":"prod_1"}')


@pytest.mark.parametrize(("since", "found"), [
    ("2027-01-15T07:59:59.999Z", True), ("2027-01-15T08:00:00.000Z", True), ("2027-01-15T08:00:00.001Z", False)])
def test_since_finds_only_calls_recorded_at_or_after_it(
        keys: IdempotencyStore, write: Write, since: str, found: bool) -> None:
    write(lambda tx: keys.record(tx, call()))
    assert (keys.find("create_product", "", "k1", since=since) is not None) is found


def test_a_find_in_a_transaction_sees_that_transactions_own_record(keys: IdempotencyStore, write: Write) -> None:
    def job(tx: Tx) -> tuple[StoredCall | None, StoredCall | None]:
        before = keys.find("create_product", "", "k1", tx=tx)
        keys.record(tx, call())
        return before, keys.find("create_product", "", "k1", tx=tx)

    assert write(job) == (None, StoredCall("h1", '{"id":"prod_1"}'))


@pytest.fixture
def two_instances(open_postgres_store: Callable[..., Any]) -> tuple[Any, Any]:
    """Two "servers" on one database, two writer threads each."""
    return open_postgres_store(writers=2), open_postgres_store(writers=2)


@pytest.mark.anyio
@pytest.mark.parametrize(("first_commits", "second_recorded", "kept"), [
    (True, False, StoredCall("h1", '{"id":"prod_1"}')),  # the first stays; the second is told it lost
    (False, True, StoredCall("h2", '{"id":"prod_2"}')),  # the first rolled back: the second is the first call
])
async def test_one_key_recorded_by_two_instances_at_once_keeps_the_first_committed_call(
        two_instances: tuple[PostgresStore, PostgresStore], postgres_url: str, first_commits: bool,
        second_recorded: bool, kept: StoredCall) -> None:
    first, second = two_instances
    theirs = Attempt()

    failure = None if first_commits else RuntimeError("the first call's transaction fails after recording")
    async with holding(first, lambda tx: first.idempotency.record(tx, call()), fail=failure) as held, \
            anyio.create_task_group() as tg:
        tg.start_soon(theirs.run, second.write(lambda tx: second.idempotency.record(
            tx, call(request_hash="h2", response='{"id":"prod_2"}'))))
        await lock_waiters(postgres_url)  # the second insert waits for the first transaction's outcome
        assert not theirs.done
        held.release()

    assert (held.result, held.error) == ((True, None) if first_commits else (None, failure))
    assert (theirs.result, theirs.error) == (second_recorded, None)
    assert first.idempotency.find("create_product", "", "k1") == kept
    assert second.idempotency.find("create_product", "", "k1") == kept
