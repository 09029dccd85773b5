"""Operator commands for marketplace splits: `sandbox complete-onboarding`, `report creators`, `check-splits`,
`refund-split`."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest
from mcp import Client

from aims_billing_mcp.app import build_server
from aims_billing_mcp.cli import main
from aims_billing_mcp.settings import Settings
from tests.conftest import ok
from tests.test_cli import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A server's settings whose database, sandbox file and webhook port the CLI's commands open too."""
    db = tmp_path / "shared.db"
    monkeypatch.setenv("AIMS_BILLING_DB", str(db))
    port = free_port()
    monkeypatch.setenv("AIMS_BILLING_WEBHOOK_PORT", str(port))
    return Settings(_env_file=None, aims_billing_db=db, aims_billing_webhook_port=port)  # type: ignore[call-arg]


async def onboard_through_the_cli(client: Client) -> str:
    """A creator's connected account, onboarded by the CLI's sandbox command (account.updated reaches the server)."""
    account = str(ok(await client.call_tool("create_connected_account", {
        "display_name": "Maker", "country": "US"}))["account"]["id"])
    assert await anyio.to_thread.run_sync(main, ["sandbox", "complete-onboarding", account]) == 0
    return account


async def sell_plug_through_the_cli(client: Client, account: str) -> str:
    """A plug of `account` (80% to the creator) sold through a checkout session the CLI's sandbox command pays."""
    product = ok(await client.call_tool("create_product", {"name": "Plug"}))["product"]["id"]
    price = ok(await client.call_tool("create_price", {"product": product, "unit_amount": 1000,
                                                       "currency": "usd"}))["price"]["id"]
    ok(await client.call_tool("create_plug", {"plug_id": "p", "price": price, "account": account,
                                              "creator_share_bp": 8000}))
    session = str(ok(await client.call_tool("create_checkout_session", {
        "line_items": [{"price": price}], "customer_email": "b@example.com"}))["checkout_session"]["id"])
    assert await anyio.to_thread.run_sync(main, ["sandbox", "complete-checkout", session]) == 0
    return session


async def test_onboarding_from_the_cli_then_a_split_sale_reports_and_reconciles_and_drift_exits_1(
        shared: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    db = shared.aims_billing_db
    async with Client(build_server(shared, webhook_server=True)) as client:
        account = await onboard_through_the_cli(client)
        assert "transfers active" in capsys.readouterr().out
        listed = ok(await client.call_tool("list_connected_accounts", {"status": "active"}))["accounts"]
        assert [a["id"] for a in listed] == [account]  # account.updated reached the server's webhook endpoint
        session = await sell_plug_through_the_cli(client, account)
        ok(await client.call_tool("refund_split_sale", {"sale": session, "amount": 250, "idempotency_key": "r"}))
    capsys.readouterr()
    assert await anyio.to_thread.run_sync(main, ["report", "creators", "--account", account]) == 0
    out = capsys.readouterr().out
    assert account in out and session in out and "transferred" in out
    assert await anyio.to_thread.run_sync(main, ["check-splits"]) == 0
    assert "ok: 1 sale(s)" in capsys.readouterr().out
    with sqlite3.connect(db) as conn:  # our record drifts from Stripe's (a refund recorded twice, say)
        conn.execute("UPDATE splits SET reversed = reversed + 1, refunded = refunded + 1")
    assert await anyio.to_thread.run_sync(main, ["check-splits"]) == 1
    assert "1 mismatch(es)" in capsys.readouterr().out


async def test_refund_split_from_the_cli_reverses_in_proportion_once_and_refuses_more_than_is_left(
        shared: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    async with Client(build_server(shared, webhook_server=True)) as client:
        session = await sell_plug_through_the_cli(client, await onboard_through_the_cli(client))
    capsys.readouterr()

    first = await anyio.to_thread.run_sync(main, ["refund-split", session, "--amount", "500"])
    out = capsys.readouterr().out
    again = await anyio.to_thread.run_sync(main, ["refund-split", session, "--amount", "500"])
    replayed = capsys.readouterr().out
    too_much = await anyio.to_thread.run_sync(main, ["refund-split", session, "--amount", "600", "--key", "k2"])
    refused = capsys.readouterr().err

    assert first == 0 and "creator reversed 400, platform fee refunded 100" in out
    assert again == 0 and "replayed" in replayed  # the same command refunds once
    assert too_much == 1 and "refund-split:" in refused
    assert await anyio.to_thread.run_sync(main, ["check-splits"]) == 0


@pytest.mark.parametrize("amount", ["0", "-5", "2.5", "1e3", "true", "10000000000000"])
def test_refund_split_refuses_an_amount_that_is_not_whole_minor_units(
        amount: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["refund-split", "cs_x", "--amount", amount])
    assert stopped.value.code == 2 and "--amount" in capsys.readouterr().err
