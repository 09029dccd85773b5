"""Marketplace splits (issue 17) on ACP orders, over the ACP REST path on the sandbox: a line item `plug:<id>` sells a
creator's plug; one creator is a destination charge, several creators one platform charge and a transfer each."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aims_billing_mcp.sandbox import Sandbox
from aims_billing_mcp.services.connect import ConnectService
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.state import AppState
from aims_billing_mcp.store import Store
from tests.conftest import Clock, commerce_stack, paid_outside, table_digests
from tests.services.test_acp import KEY, Env, pay

pytestmark = pytest.mark.anyio


class Market(Env):
    state: AppState
    sandbox: Sandbox

    @property
    def connect(self) -> ConnectService:
        return self.state.connect

    async def creator(self, name: str, *, onboard: bool = True) -> str:
        made = await self.connect.create_connected_account(display_name=name, email=None, country="US",
                                                           currency=None, idempotency_key=None, dry_run=False)
        assert made.account is not None
        if onboard:  # Stripe's account.updated is not delivered here: the sale asks Stripe
            self.sandbox.complete_account_onboarding(made.account.id)
        return made.account.id

    async def plug(self, plug_id: str, account: str, amount: int, **terms: int) -> str:
        product = await self.state.catalog.create_product(name=plug_id, description=None, metadata=None,
                                                          idempotency_key=None, dry_run=False)
        assert product.product is not None
        price = await self.state.catalog.create_price(
            product=product.product.id, currency="usd", unit_amount=amount, recurring=None, lookup_key=None,
            nickname=None, metadata=None, idempotency_key=None, dry_run=False)
        assert price.price is not None
        await self.connect.create_plug(plug_id=plug_id, name=None, price=price.price.id, account=account,
                                       creator_share_bp=terms.get("share"), platform_fee=terms.get("fee"),
                                       idempotency_key=None)
        return f"plug:{plug_id}"

    async def buy(self, items: list[str], token: str = "spt_test_visa_1") -> dict[str, Any]:
        created = await self.create(items)
        done: dict[str, Any] = (await self.post(f"/acp/checkout_sessions/{created['id']}/complete", pay(token),
                                                expect=200)).json()
        return done

    def splits(self, account: str | None = None) -> list[Any]:
        return self.connect.earnings(account, None, 100).splits

    def objects(self, kind: str) -> list[dict[str, Any]]:
        found, _ = self.sandbox.store.page(kind, {}, limit=100)
        return found


@pytest.fixture
async def market(make_settings: Callable[..., Settings], sandbox_app: Any, store: Store) -> AsyncIterator[Market]:
    clock = Clock()
    async with (commerce_stack(make_settings(), sandbox_app, store) as stack,
                stack.acp_seller(KEY, clock=clock, public_url="https://seller.test") as (http, acp)):
        env = Market(http, acp, stack.ledger, store, clock)
        env.state, env.sandbox = stack.state, sandbox_app.state.sandbox
        yield env


async def test_an_acp_order_of_a_plug_pays_the_creator_their_share_with_the_charge_and_shows_in_the_earnings(
        market: Market) -> None:
    account = await market.creator("Maker")
    item = await market.plug("seo-audit", account, 1000, share=7000)
    done = await market.buy([item, item, "luc_10k"])  # two plugs and a LUC pack in one cart
    assert done["status"] == "completed"
    assert [line["item"]["id"] for line in done["line_items"]] == [item, "luc_10k"]
    ps = market.store.acp.session(done["id"])
    assert ps is not None and ps.payment_session_id
    [split] = market.splits(account)
    assert (split.path, split.sale, split.status, split.gross, split.creator_amount) == (
        "acp", ps.payment_session_id, "transferred", 2000, 1400)
    pi = market.sandbox.get_object(str(split.payment_intent))
    assert pi is not None and pi["transfer_data"] == {"destination": account}
    assert pi["application_fee_amount"] == pi["amount"] - 1400  # the LUC pack and 30% of the plugs stay
    assert market.sandbox.store.account_balance_rows(account) == [("usd", 1400)]  # the charge less the fee
    (earned,) = market.connect.earnings(account, None).earnings
    assert (earned.sales, earned.gross, earned.platform_fees, earned.transferred) == (1, 2000, 600, 1400)
    assert await market.connect.check_splits() == (1, [])


async def test_refunding_an_acp_plug_order_reverses_the_transfer_and_the_fee_in_proportion(market: Market) -> None:
    account = await market.creator("Maker")
    item = await market.plug("seo-audit", account, 1000, share=7000)
    done = await market.buy([item])
    for sale, amount, key in ((done["id"], 400, "r1"), (None, 600, "r2")):  # by the ACP checkout, then its payment
        sale = sale or market.splits(account)[0].sale
        await market.connect.refund_sale(sale=sale, amount=amount, reason=None, idempotency_key=key)
    [split] = market.splits(account)
    assert (split.refunded, split.reversed, split.fee_refunded) == (1000, 700, 300)
    [transfer] = [t for t in market.objects("transfer") if t["destination"] == account]
    [fee] = market.objects("application_fee")
    assert (transfer["amount_reversed"], fee["amount_refunded"]) == (1000, 300)
    assert market.sandbox.store.account_balance_rows(account) == [("usd", 0)]
    assert await market.connect.check_splits() == (1, [])


async def test_an_acp_order_of_a_plug_whose_creator_cannot_receive_transfers_is_refused_before_any_charge(
        market: Market, tmp_path: Any) -> None:
    account = await market.creator("Maker", onboard=False)
    item = await market.plug("seo-audit", account, 1000, share=7000)
    created = await market.create([item])
    before = table_digests(tmp_path / "billing.db", skip=("audit_log", "sqlite_sequence", "acp_idempotency_keys"))
    refused = (await market.post(f"/acp/checkout_sessions/{created['id']}/complete", pay("spt_test_visa_1"),
                                 expect=400)).json()
    assert refused["code"] == "not_ready_for_payment" and refused["param"] == "$.line_items[0]"
    assert account in refused["message"] and "requires" in refused["message"]
    assert market.sandbox.count("payment_intent") == 0 and market.splits() == []
    after = table_digests(tmp_path / "billing.db", skip=("audit_log", "sqlite_sequence", "acp_idempotency_keys"))
    assert after == before
    now = (await market.get(f"/acp/checkout_sessions/{created['id']}")).json()  # Stripe's answer, recorded
    assert now["status"] == "not_ready_for_payment" and account in now["messages"][0]["content"]
    market.sandbox.complete_account_onboarding(account)  # the creator finishes; the next complete asks Stripe
    done = (await market.post(f"/acp/checkout_sessions/{created['id']}/complete", pay("spt_test_visa_2"),
                              expect=200)).json()
    assert done["status"] == "completed" and [s.status for s in market.splits()] == ["transferred"]


# --- a cart of several creators' plugs: one platform charge, one transfer per creator ---------------------------------


async def _two_creators(market: Market) -> tuple[str, str, list[str]]:
    first, second = await market.creator("A"), await market.creator("B")
    a1 = await market.plug("a-one", first, 1000, share=7000)  # 2 x 1000: the creator gets 1400
    a2 = await market.plug("a-two", first, 500, fee=100)  # 500: the creator gets 400
    b1 = await market.plug("b-one", second, 1500, share=5000)  # 1500: the creator gets 750
    return first, second, [a1, a1, a2, b1, "luc_10k"]


def _sale_transfers(market: Market, pi: dict[str, Any]) -> dict[str, tuple[int, int]]:
    found = [t for t in market.objects("transfer") if t["transfer_group"] == pi["transfer_group"]]
    assert all(t["source_transaction"] == pi["latest_charge"] for t in found)
    return {t["destination"]: (t["amount"], t["amount_reversed"]) for t in found}


async def test_a_cart_of_two_creators_plugs_is_one_charge_and_one_transfer_per_creator_of_exactly_their_share(
        market: Market) -> None:
    first, second, cart = await _two_creators(market)
    done = await market.buy(cart)
    assert done["status"] == "completed"
    splits = market.splits()
    assert {(s.account, s.plug, s.status, s.creator_amount) for s in splits} == {
        (first, "a-one", "transferred", 1400), (first, "a-two", "transferred", 400),
        (second, "b-one", "transferred", 750)}
    pi = market.sandbox.get_object(str(splits[0].payment_intent))
    assert pi is not None and pi.get("transfer_data") is None and pi["transfer_group"] == f"sale_{splits[0].sale}"
    assert _sale_transfers(market, pi) == {first: (1800, 0), second: (750, 0)}
    assert market.sandbox.store.account_balance_rows(first) == [("usd", 1800)]
    assert market.sandbox.store.account_balance_rows(second) == [("usd", 750)]
    assert market.objects("application_fee") == []  # the platform keeps the rest of its own charge
    earned = {e.account: (e.gross, e.platform_fees, e.transferred)
              for e in market.connect.earnings(None, None).earnings}
    assert earned == {first: (2500, 700, 1800), second: (1500, 750, 750)}
    assert pi["amount"] - 1800 - 750 == 700 + 750 + market.acp._items["luc_10k"].unit_price
    assert await market.connect.check_splits() == (1, [])


async def test_refunds_of_a_two_creator_cart_reverse_each_creators_transfer_in_proportion(market: Market) -> None:
    first, second, cart = await _two_creators(market)
    done = await market.buy(cart)
    first_refund = await market.connect.refund_sale(sale=done["id"], amount=1000, reason=None, idempotency_key="r1")
    assert (first_refund.amount, first_refund.reversed) == (1000, 350 + 100 + 187)  # a quarter of each plug's gross
    again = await market.connect.refund_sale(sale=done["id"], amount=1000, reason=None, idempotency_key="r1")
    assert again.replayed and again.refund == first_refund.refund and market.sandbox.count("transfer_reversal") == 2
    pi = market.sandbox.get_object(str(market.splits()[0].payment_intent))
    assert pi is not None and _sale_transfers(market, pi) == {first: (1800, 450), second: (750, 187)}
    await market.connect.refund_sale(sale=done["id"], amount=3000, reason=None, idempotency_key="r2")
    assert _sale_transfers(market, pi) == {first: (1800, 1800), second: (750, 750)}
    assert {s.plug: (s.refunded, s.reversed) for s in market.splits()} == {
        "a-one": (2000, 1400), "a-two": (500, 400), "b-one": (1500, 750)}
    assert await market.connect.check_splits() == (1, [])


@pytest.mark.parametrize("answers_lost", [1, 100])
async def test_a_creators_transfer_retried_after_a_lost_answer_is_made_once(market: Market, answers_lost: int) -> None:
    first, second, cart = await _two_creators(market)
    market.sandbox.faults.inject(status=500, count=answers_lost, mode="after", path_prefix="/v1/transfers")
    done = await market.buy(cart)  # the buyer paid: every lost answer leaves its creator's transfer pending
    market.sandbox.faults.clear()
    pending = {s.plug for s in market.splits() if s.status == "pending"}
    assert pending == (set() if answers_lost == 1 else {"a-one", "a-two", "b-one"})
    sale = market.splits()[0].sale
    await market.connect.transfer_sale("acp", sale)  # the next look (start-up, a webhook) retries with the same key
    await market.connect.transfer_sale("acp", sale)
    pi = market.sandbox.get_object(str(market.splits()[0].payment_intent))
    assert pi is not None and _sale_transfers(market, pi) == {first: (1800, 0), second: (750, 0)}
    assert market.sandbox.count("transfer") == 2 and {s.status for s in market.splits()} == {"transferred"}
    assert done["status"] == "completed" and await market.connect.check_splits() == (1, [])


@pytest.mark.parametrize("creators", [1, 2])
async def test_a_plug_payment_its_checkout_cannot_take_is_refunded_with_every_creators_part_given_back(
        market: Market, creators: int) -> None:
    first, second, cart = await _two_creators(market)
    if creators == 1:
        cart = [item for item in cart if item != "plug:b-one"]
    created = await market.create(cart)
    await market.post(f"/acp/checkout_sessions/{created['id']}/complete", pay("spt_test_declined"), expect=200)
    checkout = market.store.acp.session(created["id"])
    assert checkout is not None and checkout.payment_session_id
    await market.store.write(lambda conn: conn.execute(
        "UPDATE acp_checkout_sessions SET status = 'canceled' WHERE id = ?", (created["id"],)))
    session = await market.state.commerce.get_session(checkout.payment_session_id)
    await paid_outside(market.state.gateway, str(session.payment_intent))  # paid after all, for a canceled checkout
    await market.state.commerce.get_session(session.id)  # the success is seen: refund due, sent in the background
    await market.acp.drain()
    assert market.store.acp.refunds_due() == []
    assert {s.status for s in market.splits()} == {"transferred"}
    assert all((s.refunded, s.reversed) == (s.gross, s.creator_amount) for s in market.splits())
    assert market.sandbox.store.account_balance_rows(first) == [("usd", 0)]
    assert market.sandbox.store.account_balance_rows(second) == ([("usd", 0)] if creators == 2 else [])
    assert [t["amount"] - t["amount_reversed"] for t in market.objects("transfer")] == [0] * creators
    assert all(f["amount_refunded"] == f["amount"] for f in market.objects("application_fee"))
    assert await market.connect.check_splits() == (1, [])


async def test_a_partial_refund_of_a_plug_in_a_mixed_cart_takes_back_exactly_the_creators_part_of_it(
        market: Market) -> None:
    account = await market.creator("Maker")
    item = await market.plug("seo-audit", account, 1000, share=7000)
    done = await market.buy([item, "luc_10k"])  # the plug and a LUC pack in one destination charge
    first = await market.connect.refund_sale(sale=done["id"], amount=400, reason=None, idempotency_key="r1")
    assert (first.reversed, first.fee_refunded) == (280, 120)  # 70% of the plug's 400, not of the whole charge's
    [transfer] = [t for t in market.objects("transfer") if t["destination"] == account]
    [fee] = market.objects("application_fee")
    assert (transfer["amount_reversed"], fee["amount_refunded"]) == (280, 0)
    assert market.sandbox.store.account_balance_rows(account) == [("usd", 700 - 280)]
    assert await market.connect.check_splits() == (1, [])
    await market.connect.refund_sale(sale=done["id"], amount=600, reason=None, idempotency_key="r2")
    assert market.sandbox.store.account_balance_rows(account) == [("usd", 0)]
    [split] = market.splits(account)
    assert (split.refunded, split.reversed, split.fee_refunded) == (1000, 700, 300)
    assert await market.connect.check_splits() == (1, [])
