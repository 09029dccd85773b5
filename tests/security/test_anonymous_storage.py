"""Security promise: an anonymous request costs no storage, and what an authenticated caller stores is bounded.

A 402 challenge (GET /x402/credits without a payment, purchase_luc_credits without `_meta`) writes nothing: its quote
is a signed token stored only when paid. Quotes stored by create_x402_payment_requirements expire, are swept by the
server's background sweep, and are capped in number."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from aims_billing_mcp.app import BillingServer
from aims_billing_mcp.errors import LimitReached, PaymentRejected
from aims_billing_mcp.services.ledger import LedgerService
from aims_billing_mcp.services.tiers import Pricing
from aims_billing_mcp.services.x402 import EXPIRED_QUOTE_GRACE, X402Service
from aims_billing_mcp.store import Store
from aims_billing_mcp.tasks import background_tasks
from tests.conftest import Clock, serving_http
from tests.support.x402_worker import Payer, header
from tests.tools.test_wallets import give_tier

pytestmark = pytest.mark.anyio


def row_counts(store: Store) -> dict[str, int]:
    """Rows in every table but the audit log (which records calls, not their effects) and its id counter."""
    tables = [r["name"] for r in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {t: store.query(f"SELECT COUNT(*) AS n FROM {t}")[0]["n"] for t in tables
            if t not in ("audit_log", "sqlite_sequence")}


@pytest.mark.parametrize("challenges", [
    # more than httpx's 100 connections, so requests queue for one
    pytest.param(int(os.environ.get("AIMS_ANONYMOUS_CHALLENGES", "120")), id="quick"),
    pytest.param(300, id="issue-size", marks=pytest.mark.slow),
])
async def test_anonymous_x402_challenges_at_once_write_no_rows_and_a_paid_one_stores_one_quote(
        server: BillingServer, challenges: int) -> None:
    async with serving_http(server) as base:
        assert server.state is not None
        store = server.state.store
        await give_tier(server, "cus_team", "3mo")
        await server.state.ledger.create_wallet("buyer", "cus_team", None, "w-buyer")
        before = row_counts(store)
        # the requests queue for httpx's 100 connections: on a loaded machine (or under coverage) the last wait
        # longer than the default 5 s for one (PoolTimeout), which is the machine's speed, not the server's answer;
        # each answer is still bounded (60 s)
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(60, pool=None)) as http:
            answers: dict[int, httpx.Response] = {}

            async def get(n: int) -> None:
                answers[n] = await http.get(f"/x402/credits?agent_id=buyer&luc={100 + n}")

            async with anyio.create_task_group() as tg:  # all at once, over httpx's pool of connections
                for n in range(challenges):
                    tg.start_soon(get, n)
            assert len(answers) == challenges and {a.status_code for a in answers.values()} == {402}
            assert row_counts(store) == before and before["x402_quotes"] == 0
            # every challenge is payable, and paying one stores exactly its quote (as paid) and one receipt
            required = json.loads(base64.b64decode(answers[7].headers["payment-required"]))
            paid = await http.get("/x402/credits?agent_id=buyer&luc=107",
                                  headers={"PAYMENT-SIGNATURE": header(Payer().pay(required))})
        assert paid.status_code == 200, paid.text
        assert store.query("SELECT status, luc FROM x402_quotes") == [{"status": "paid", "luc": 107}]
        assert row_counts(store)["x402_receipts"] == 1


async def test_an_unpaid_purchase_luc_credits_challenge_writes_no_rows(server: BillingServer) -> None:
    async with Client(server) as client:
        assert server.state is not None
        await give_tier(server, "cus_team", "3mo")
        await server.state.ledger.create_wallet("buyer", "cus_team", None, "w-buyer")
        before = row_counts(server.state.store)
        for luc in range(1, 31):
            challenge = await client.call_tool("purchase_luc_credits", {"agent_id": "buyer", "luc": luc})
            assert challenge.is_error and challenge.structured_content is not None
        assert row_counts(server.state.store) == before


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def service(store: Store, clock: Clock) -> X402Service:
    pricing = Pricing.load()
    ledger = LedgerService(store, luc_per_usd=pricing.luc_per_usd, agent_limit=lambda customer: None, clock=clock)
    await ledger.create_wallet("buyer", "cus_x", None, "open")
    return X402Service(store, ledger, None, pricing, clock=clock, max_open_quotes=3)


async def stored(service: X402Service, valid_seconds: int = 60) -> Any:
    return await service.create_requirements(luc=5, agent_id="buyer", description="d", resource="r",
                                             valid_seconds=valid_seconds)


async def test_expired_open_quotes_are_swept_and_paid_or_open_ones_kept(
        service: X402Service, store: Store, clock: Clock) -> None:
    expiring, lasting, paid = await stored(service), await stored(service, 86_400), await stored(service)
    await service.verify_and_settle(Payer().pay(paid.payment_required))
    late = Payer().pay(expiring.payment_required)
    clock.advance(61)
    assert await service.sweep_expired_quotes() == 0  # expired, kept a while so a late payer is told so
    with pytest.raises(PaymentRejected) as caught:
        await service.verify_and_settle(late)
    assert caught.value.details["quote_status"] == "expired"
    clock.advance(EXPIRED_QUOTE_GRACE)
    assert await service.sweep_expired_quotes() == 1
    left = {r["id"]: r["status"] for r in store.query("SELECT id, status FROM x402_quotes")}
    assert left == {lasting.quote_id: "open", paid.quote_id: "paid"}
    with pytest.raises(PaymentRejected) as caught:
        await service.verify_and_settle(late)
    assert caught.value.details["quote_status"] == "unknown"
    assert store.query("SELECT COUNT(*) AS n FROM x402_receipts") == [{"n": 1}]


async def test_stored_quotes_are_capped_until_some_are_paid_or_expire(
        service: X402Service, store: Store, clock: Clock) -> None:
    first = [await stored(service) for _ in range(3)]
    with pytest.raises(LimitReached) as caught:
        await stored(service)
    assert "3 x402 quotes are open" in caught.value.message and caught.value.param == "valid_seconds"
    assert store.query("SELECT COUNT(*) AS n FROM x402_quotes") == [{"n": 3}]
    await service.verify_and_settle(Payer().pay(first[0].payment_required))
    await stored(service)  # a paid quote frees its place
    clock.advance(61)
    await stored(service)  # so do expired ones, before they are swept


async def test_the_servers_background_sweep_removes_expired_quotes(server: BillingServer) -> None:
    async with Client(server):
        assert server.state is not None
        state = server.state
        old = int(state.x402._clock()) - EXPIRED_QUOTE_GRACE - 1

        def expired_quote(conn: Any) -> None:
            conn.execute("INSERT INTO x402_quotes (id, network, asset, pay_to, amount, agent_id, luc, description, "
                         "resource, x402_version, status, expires_at, created_at) VALUES ('q_old', 'eip155:84532', "
                         "'0x0', '0x0', 1, NULL, 0, 'd', 'r', 2, 'open', ?, '2026-01-01T00:00:00.000Z')", (old,))

        await state.store.write(expired_quote)
        async with background_tasks(state, flush_interval_seconds=0, interval_seconds=0.01):
            with anyio.fail_after(10):
                while state.store.query("SELECT 1 FROM x402_quotes WHERE id = 'q_old'"):
                    await anyio.sleep(0.01)
        assert state.store.query("SELECT 1 FROM x402_quotes WHERE id = 'q_old'") == []
