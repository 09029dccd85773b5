"""Marketplace splits (issue 17) of checkout sessions and payment links holding several creators' plugs: the
platform's charge, then one transfer per creator from it once `checkout.session.completed` says it was paid (the
machinery ACP carts of several creators use), end to end: MCP tools, the webhook endpoint, the sandbox's Connect."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from aims_billing_mcp.app import BillingServer
from aims_billing_mcp.sandbox import Sandbox
from aims_billing_mcp.state import AppState
from tests.conftest import error_of, ok, table_digests
from tests.services.test_connect import _drained, creator, plug, price

pytestmark = pytest.mark.anyio
PATHS = ["checkout", "payment_link"]


class Shop:
    def __init__(self, client: Client, server: BillingServer, sandbox: Sandbox) -> None:
        self.client, self.server, self.sandbox = client, server, sandbox

    @property
    def state(self) -> AppState:
        state = self.server.state
        assert state is not None
        return state

    async def two_creators(self) -> tuple[str, str, list[dict[str, Any]]]:
        first = await creator(self.client, self.sandbox, name="A")
        second = await creator(self.client, self.sandbox, name="B")
        a1, a2, b1, other = (await price(self.client, 1000), await price(self.client, 500),
                             await price(self.client, 1500), await price(self.client, 700))
        await plug(self.client, first, a1, "a-one", creator_share_bp=7000)  # 2 x 1000: the creator gets 1400
        await plug(self.client, first, a2, "a-two", platform_fee=100)  # 500: the creator gets 400
        await plug(self.client, second, b1, "b-one", creator_share_bp=5000)  # 1500: the creator gets 750
        lines = [{"price": a1, "quantity": 2}, {"price": a2}, {"price": b1}, {"price": other}]  # + a platform item
        return first, second, lines

    async def sell(self, path: str, lines: list[dict[str, Any]]) -> str:
        """The cart sold through `path` and paid; the checkout session that paid it."""
        if path == "checkout":
            made = ok(await self.client.call_tool("create_checkout_session", {
                "line_items": lines, "customer_email": "b@example.com"}))["checkout_session"]
            session = str(self.sandbox.complete_checkout_session(made["id"])["id"])
        else:
            link = ok(await self.client.call_tool("create_payment_link", {"line_items": lines}))["payment_link"]
            session = str(self.sandbox.pay_payment_link(link["id"])["id"])
        await self.settled()
        return session

    async def settled(self) -> None:
        """Every event delivered and applied, and the transfers they queued made."""
        await _drained(self.sandbox)
        await self.state.connect.transfers.drain()

    def splits(self) -> list[Any]:
        return self.state.connect.earnings(None, None, 100).splits

    def objects(self, kind: str) -> list[dict[str, Any]]:
        found, _ = self.sandbox.store.page(kind, {}, limit=100)
        return found

    def transfers(self, session: str) -> dict[str, tuple[int, int]]:
        pi = self.sandbox.get_object(str(self.sandbox.get_object(session)["payment_intent"]))  # type: ignore[index]
        assert pi is not None
        found = [t for t in self.objects("transfer") if t["transfer_group"] == f"sale_{session}"]
        assert all(t["source_transaction"] == pi["latest_charge"] for t in found)
        return {t["destination"]: (t["amount"], t["amount_reversed"]) for t in found}


@pytest.fixture
async def shop(make_server: Callable[..., BillingServer], sandbox: Sandbox) -> AsyncIterator[Shop]:
    server = make_server()
    async with Client(server) as client:
        yield Shop(client, server, sandbox)


@pytest.mark.parametrize("path", PATHS)
async def test_a_cart_of_two_creators_plugs_pays_each_creator_exactly_their_share_by_a_transfer_from_the_charge(
        shop: Shop, path: str, tmp_path: Path) -> None:
    first, second, lines = await shop.two_creators()
    session = await shop.sell(path, lines)
    splits = shop.splits()
    assert {(s.path, s.sale, s.account, s.plug, s.status, s.creator_amount) for s in splits} == {
        (path, session, first, "a-one", "transferred", 1400), (path, session, first, "a-two", "transferred", 400),
        (path, session, second, "b-one", "transferred", 750)}
    pi = shop.sandbox.get_object(str(splits[0].payment_intent))
    assert pi is not None and pi.get("transfer_data") is None and pi["amount"] == 2000 + 500 + 1500 + 700
    assert shop.transfers(session) == {first: (1800, 0), second: (750, 0)}
    assert shop.sandbox.store.account_balance_rows(first) == [("usd", 1800)]
    assert shop.sandbox.store.account_balance_rows(second) == [("usd", 750)]
    assert shop.objects("application_fee") == []  # the platform keeps the rest of its own charge: 700 + 750 + 700
    report = ok(await shop.client.call_tool("get_creator_earnings", {}))
    assert {e["account"]: (e["sales"], e["gross"], e["platform_fees"], e["transferred"], e["pending"])
            for e in report["earnings"]} == {first: (1, 2500, 700, 1800, 0), second: (1, 1500, 750, 750, 0)}
    assert await shop.state.connect.check_splits() == (1, [])
    with sqlite3.connect(tmp_path / "billing.db") as conn:  # our record drifts from Stripe's: check-splits says so
        conn.execute("UPDATE splits SET creator_amount = creator_amount - 1, platform_fee = platform_fee + 1 "
                     "WHERE plug_id = 'b-one'")
    checked, problems = await shop.state.connect.check_splits()
    assert checked == 1 and len(problems) == 1 and "expected transfers" in problems[0]


@pytest.mark.parametrize("path", PATHS)
async def test_a_duplicate_webhook_or_a_retry_after_a_lost_answer_transfers_each_creators_share_once(
        shop: Shop, path: str) -> None:
    first, second, lines = await shop.two_creators()
    shop.sandbox.faults.inject(status=500, count=100, mode="after", path_prefix="/v1/transfers")
    session = await shop.sell(path, lines)  # paid: every answer lost, made at Stripe, the splits left pending
    shop.sandbox.faults.clear()
    assert {s.status for s in shop.splits()} == {"pending"}
    [event] = [e for e in shop.objects("event") if e["type"] == "checkout.session.completed"]
    again = {**event, "id": f"{event['id']}_redelivered"}  # the same payment told again: no new split
    await shop.state.webhook_events.ingest(again, json.dumps(again))
    await shop.state.connect.transfer_sale(path, session)  # the next look (start-up) retries with the same keys
    await shop.settled()
    assert {s.status for s in shop.splits()} == {"transferred"} and len(shop.splits()) == 3
    assert shop.transfers(session) == {first: (1800, 0), second: (750, 0)}
    assert shop.sandbox.count("transfer") == 2
    assert await shop.state.connect.check_splits() == (1, [])


@pytest.mark.parametrize("path", PATHS)
async def test_refunds_of_a_two_creator_checkout_reverse_each_creators_transfer_in_proportion(
        shop: Shop, path: str) -> None:
    first, second, lines = await shop.two_creators()
    session = await shop.sell(path, lines)
    refund = ok(await shop.client.call_tool("refund_split_sale", {"sale": session, "amount": 1000,
                                                                  "idempotency_key": "r1"}))
    assert (refund["amount"], refund["reversed"]) == (1000, 350 + 100 + 187)  # a quarter of each plug's gross
    assert shop.transfers(session) == {first: (1800, 450), second: (750, 187)}
    ok(await shop.client.call_tool("refund_split_sale", {"sale": session, "amount": 3000, "idempotency_key": "r2"}))
    await shop.settled()
    assert shop.transfers(session) == {first: (1800, 1800), second: (750, 750)}
    assert {s.plug: (s.refunded, s.reversed) for s in shop.splits()} == {
        "a-one": (2000, 1400), "a-two": (500, 400), "b-one": (1500, 750)}
    assert shop.sandbox.count("transfer_reversal") == 4
    assert await shop.state.connect.check_splits() == (1, [])


async def test_a_two_creator_cart_with_one_creator_unable_to_receive_transfers_is_refused_before_any_stripe_write(
        shop: Shop, tmp_path: Path) -> None:
    _, second, lines = await shop.two_creators()
    shop.sandbox.complete_account_onboarding(second, onboarded=False)  # Stripe now requires more of B
    await _drained(shop.sandbox)
    await _drained(shop.sandbox)  # every event so far stored: a late one is no write of ours
    before = table_digests(tmp_path / "billing.db")
    for tool, args in (("create_checkout_session", {"customer_email": "b@example.com"}), ("create_payment_link", {})):
        err = error_of(await shop.client.call_tool(tool, {"line_items": lines, **args}))
        assert err["code"] == "refused" and second in err["message"] and "requires" in err["message"]
        assert err["account"] == second and err["requirements_due"]
    assert shop.sandbox.count("checkout.session") == 0 and shop.sandbox.count("payment_link") == 0
    assert table_digests(tmp_path / "billing.db") == before
