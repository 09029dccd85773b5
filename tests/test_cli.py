"""The command line: the demo passes end to end, doctor reports the configuration with secrets masked and checks
the key, and the standalone sandbox serves the real SDK on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from aims_billing_mcp.app import build_server
from aims_billing_mcp.cli import main
from aims_billing_mcp.demo import run_demo
from aims_billing_mcp.sandbox import SANDBOX_SECRET_KEY, SANDBOX_WEBHOOK_SECRET
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.stripe_gateway import StripeRequest, build_gateway
from aims_billing_mcp.webhooks import sign_webhook_payload
from tests.store.test_core import BAD_DATABASES, truncated, under_a_file
from tests.support.zygote import run, spawn

pytestmark = pytest.mark.anyio


async def test_the_demo_runs_every_step_as_expected_and_prints_a_verdict() -> None:
    lines: list[str] = []
    assert await run_demo(lines.append) is True
    assert lines[-1].startswith("PASS:")
    table = "\n".join(lines)
    for tool in ("create_product", "create_price", "create_customer", "create_payment_link",
                 "create_checkout_session", "create_billing_portal_session", "list_invoices", "retrieve_balance"):
        assert tool in table
    assert "replayed" in table and "unexpected" not in table


def test_doctor_reports_sandbox_mode_and_schema_version_and_checks_the_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "doctor.db"))
    monkeypatch.setenv("AIMS_BILLING_HTTP_TOKEN", "tok_abcdefghijkl9876")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "stripe mode: sandbox" in out
    assert "schema version" in out and "key check: ok" in out
    assert "tok_abcdefghijkl9876" not in out and "9876" in out


@pytest.mark.parametrize(("env", "x402", "acp"), [
    ({}, "on", "on"),
    ({"AIMS_BILLING_READ_ONLY": "true"}, "every request refused (read-only)", "POSTs and write tools refused"),
    ({"AIMS_BILLING_TOOLS": "list_tiers"}, "off (AIMS_BILLING_TOOLS lacks purchase_luc_credits)",
     "off (AIMS_BILLING_TOOLS lacks create_payment_session)"),
])
def test_doctor_says_which_http_surfaces_read_only_and_the_allow_list_govern(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str],
    x402: str, acp: str,
) -> None:
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "doctor.db"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"GET /x402/credits (governed by purchase_luc_credits): {x402}" in out
    assert f"(governed by create_payment_session): {acp}" in out
    assert "POST /webhooks/stripe: always on" in out


def test_doctor_fails_on_a_live_key_without_opt_in(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "doctor.db"))
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_live_abcdefghijklmnop4321")
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "AIMS_BILLING_ALLOW_LIVE" in out and "abcdefghijklmnop4321" not in out


def test_tools_json_writes_every_tool_with_schemas(tmp_path: Path) -> None:
    target = tmp_path / "tools.json"
    assert main(["tools-json", "--output", str(target)]) == 0
    tools = json.loads(target.read_text())["tools"]
    assert len(tools) >= 8
    assert all({"name", "description", "inputSchema", "outputSchema", "annotations"} <= set(t) for t in tools)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def standalone_sandbox(tmp_path: Path, db: str, *extra: str,
                       env: dict[str, str] | None = None) -> tuple[Any, Any]:
    """`aims-billing-mcp sandbox` on a free port as its own process, and a gateway pointed at it."""
    port = free_port()
    process = spawn(
        [sys.executable, "-m", "aims_billing_mcp", "sandbox", "--port", str(port), "--db", str(tmp_path / db), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    settings = Settings(_env_file=None, stripe_api_base=f"http://127.0.0.1:{port}",  # type: ignore[call-arg]
                        aims_billing_db=tmp_path / "b.db")
    return process, build_gateway(settings, retry_delay_scale=0.05)


async def first_answer(process: Any, gateway: Any, request: StripeRequest) -> Any:
    """`request` sent until the process listens (a dead process fails the test with the gateway's error)."""
    while True:
        try:
            return await gateway.send(request)
        except Exception:
            if process.poll() is not None:
                raise
            await anyio.sleep(0.05)


async def test_the_standalone_sandbox_serves_the_real_sdk_on_loopback(tmp_path: Path) -> None:
    process, gateway = standalone_sandbox(tmp_path, "sb.db")
    try:
        with anyio.fail_after(30):
            balance = await first_answer(process, gateway, StripeRequest("get", "/v1/balance"))
            created = await gateway.send(StripeRequest("post", "/v1/customers", {"email": "lo@example.com"}, "k-1"))
    finally:
        await gateway.close()
        process.terminate()
        process.wait(10)
    assert balance.data["object"] == "balance"
    assert created.data["id"].startswith("cus_") and created.request_id
    assert SANDBOX_SECRET_KEY.startswith("sk_test_")



def signed_ping(event_id: str) -> tuple[str, dict[str, str]]:
    payload = json.dumps({"id": event_id, "object": "event", "type": "ping.test", "created": 1,
                          "data": {"object": {}}})
    return payload, {"Stripe-Signature": sign_webhook_payload(payload, SANDBOX_WEBHOOK_SECRET)}


async def test_stdio_mode_runs_the_webhook_endpoint_beside_mcp(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(_env_file=None, aims_billing_db=tmp_path / "b.db",  # type: ignore[call-arg]
                        aims_billing_webhook_port=port)
    payload, headers = signed_ping("evt_c1")
    async with Client(build_server(settings, webhook_server=True)) as client:
        await client.list_tools()
        async with httpx.AsyncClient() as http:
            response = await http.post(f"http://127.0.0.1:{port}/webhooks/stripe", content=payload, headers=headers)
    assert response.status_code == 200 and response.json()["id"] == "evt_c1"


async def test_the_standalone_sandbox_forwards_events_signed_with_a_configured_webhook_secret(tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from aims_billing_mcp.webhooks import verify_webhook_signature
    from tests.conftest import serving_app

    own = "whsec_operator_own_secret"
    verified: list[str] = []

    async def receive(request: Request) -> JSONResponse:
        body = await request.body()
        verify_webhook_signature(body, request.headers.get("stripe-signature"), own)  # raises on a mismatch
        verified.append(json.loads(body)["type"])
        return JSONResponse({"received": True})

    async with serving_app(Starlette(routes=[Route("/hook", receive, methods=["POST"])])) as hook:
        process, gateway = standalone_sandbox(tmp_path, "s.db", "--forward-to", f"{hook}/hook",
                                              env={**os.environ, "STRIPE_WEBHOOK_SECRET": own})
        try:
            with anyio.fail_after(30):
                await first_answer(process, gateway, StripeRequest("post", "/v1/payment_intents", {
                    "amount": 500, "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}, "pi-1"))
                while "payment_intent.succeeded" not in verified:
                    await anyio.sleep(0.05)
        finally:
            await gateway.close()
            process.terminate()
            _, err = process.communicate(timeout=10)
    assert own.encode() not in err and b"STRIPE_WEBHOOK_SECRET (from the environment)" in err


async def test_a_taken_webhook_port_is_reported_and_mcp_keeps_serving(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings(_env_file=None, aims_billing_db=tmp_path / "b.db",  # type: ignore[call-arg]
                            aims_billing_webhook_port=taken.getsockname()[1])
        async with Client(build_server(settings, webhook_server=True)) as client:
            tools = (await client.list_tools()).tools
    assert tools
    err = capsys.readouterr().err
    assert "is taken" in err and "AIMS_BILLING_WEBHOOK_PORT" in err and "--no-webhooks" in err


async def test_sandbox_trigger_from_the_cli_reaches_the_running_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "shared.db"))  # the CLI opens the same sandbox file
    port = free_port()
    monkeypatch.setenv("AIMS_BILLING_WEBHOOK_PORT", str(port))
    settings = Settings(_env_file=None, aims_billing_db=tmp_path / "shared.db",  # type: ignore[call-arg]
                        aims_billing_webhook_port=port)
    async with Client(build_server(settings, webhook_server=True)) as client:
        assert await anyio.to_thread.run_sync(main, ["setup-stripe"]) == 0
        customer = (await client.call_tool("create_customer", {"email": "cli@example.com"})).structured_content
        cus = customer["customer"]["id"]  # type: ignore[index]
        session = (await client.call_tool("create_subscription_checkout", {"tier": "3mo", "customer": cus}))
        cs = session.structured_content["checkout_session"]["id"]  # type: ignore[index]
        assert await anyio.to_thread.run_sync(main, ["sandbox", "complete-checkout", cs]) == 0
        assert await anyio.to_thread.run_sync(main, ["sandbox", "trigger", "invoice.payment_failed",
                                                     "--customer", cus]) == 0
        status = (await client.call_tool("get_billing_status", {"customer": cus})).structured_content
    assert status is not None and (status["tier"], status["status"]) == ("3mo", "past_due")
    assert "not delivered" not in capsys.readouterr().err.replace(" 0 not delivered", "")


async def test_sandbox_events_not_delivered_stay_pending_exit_1_and_resend_delivers_them_once_serve_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "shared.db"))
    port = free_port()  # nothing listens there until the server starts below
    monkeypatch.setenv("AIMS_BILLING_WEBHOOK_PORT", str(port))
    settings = Settings(_env_file=None, aims_billing_db=tmp_path / "shared.db",  # type: ignore[call-arg]
                        aims_billing_webhook_port=port)
    async with Client(build_server(settings)) as client:
        product = (await client.call_tool("create_product", {"name": "Pack"})).structured_content
        price = (await client.call_tool("create_price", {"product": product["product"]["id"],  # type: ignore[index]
                                                         "unit_amount": 900, "currency": "usd"})).structured_content
        session = (await client.call_tool("create_checkout_session", {
            "line_items": [{"price": price["price"]["id"]}], "customer_email": "p@example.com"}))  # type: ignore[index]
    cs = session.structured_content["checkout_session"]["id"]  # type: ignore[index]

    assert await anyio.to_thread.run_sync(main, ["sandbox", "complete-checkout", cs]) == 1
    err = capsys.readouterr().err
    assert "0 delivered" in err and "resend --undelivered" in err

    server = build_server(settings, webhook_server=True)
    async with Client(server):
        assert await anyio.to_thread.run_sync(main, ["sandbox", "resend", "--undelivered"]) == 0
        resent = capsys.readouterr()
        assert await anyio.to_thread.run_sync(main, ["sandbox", "resend", "--undelivered"]) == 0
        again = capsys.readouterr().out
        stored = server.state.store.query("SELECT type FROM webhook_events")  # type: ignore[union-attr]
    assert "checkout.session.completed" in resent.out and "0 not delivered" in resent.err
    assert "nothing to resend" in again
    assert {"type": "checkout.session.completed"} in stored


async def test_sandbox_resend_of_an_unknown_event_names_it_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "shared.db"))
    assert await anyio.to_thread.run_sync(main, ["sandbox", "resend", "evt_nope"]) == 2
    assert "evt_nope" in capsys.readouterr().err


async def test_report_wallets_and_check_ledger_read_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from aims_billing_mcp.services.ledger import LedgerService
    from aims_billing_mcp.store import Store

    db = tmp_path / "ops.db"
    monkeypatch.setenv("AIMS_BILLING_DB", str(db))
    store = Store(db)
    ledger = LedgerService(store, luc_per_usd=1000, agent_limit=lambda customer: None)
    await ledger.create_wallet("scout", "cus_ops", 900, "w1")
    await ledger.credit("scout", 700, idempotency_key="c1", reason="seed")
    await ledger.debit("scout", 200, idempotency_key="d1", reason="task")
    store.close()

    assert main(["report", "wallets", "--customer", "cus_ops"]) == 0
    report = capsys.readouterr().out
    assert main(["check-ledger"]) == 0
    healthy = capsys.readouterr().out

    damage = Store(db)
    damage.write_sync(lambda conn: conn.execute("UPDATE agent_wallets SET balance = balance + 1"))
    damage.close()
    assert main(["check-ledger"]) == 1
    broken = capsys.readouterr().out

    assert "scout" in report and "500" in report and "900" in report
    assert healthy.startswith("check-ledger: ok: 1 wallets")
    assert "1 violation" in broken and "balance_mismatch" in broken and "scout" in broken


async def test_report_usage_and_flush_usage_deliver_what_is_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "usage.db"))
    monkeypatch.setenv("AIMS_BILLING_FLUSH_INTERVAL_SECONDS", "0")
    assert await anyio.to_thread.run_sync(main, ["setup-stripe"]) == 0  # the meter, in the sandbox file
    settings = Settings(_env_file=None, aims_billing_db=tmp_path / "usage.db",  # type: ignore[call-arg]
                        aims_billing_flush_interval_seconds=0)
    async with Client(build_server(settings)) as client:
        made = await client.call_tool("create_customer", {"email": "usage@example.com"})
        customer = made.structured_content["customer"]["id"]  # type: ignore[index]
        for index in range(3):
            await client.call_tool("create_meter_event", {"customer": customer, "units": 1000, "operation": "code",
                                                          "identifier": f"cli-{index}"})
    capsys.readouterr()

    assert await anyio.to_thread.run_sync(main, ["report", "usage"]) == 0
    before = capsys.readouterr().out
    assert await anyio.to_thread.run_sync(main, ["flush-usage"]) == 0
    flushed = capsys.readouterr().out
    assert await anyio.to_thread.run_sync(main, ["report", "usage", "--customer", customer]) == 0
    after = capsys.readouterr().out

    assert customer in before and "4,500" in before and "p2p" in before  # 3 x 1,000 x 1.5, all over P2P's 0
    assert "3 event(s) accepted by Stripe, 0 marked failed, 0 still pending" in flushed
    pending_column = [line.split()[-2] for line in after.splitlines() if line.startswith(customer)]
    assert pending_column == ["0"]


async def test_report_receipts_lists_a_paid_x402_receipt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.x402_worker import Payer

    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "x.db"))
    settings = Settings(_env_file=None, aims_billing_db=tmp_path / "x.db",  # type: ignore[call-arg]
                        aims_billing_p2p_agents=1)
    async with Client(build_server(settings)) as client:
        await client.call_tool("create_agent_wallet", {"agent_id": "buyer", "customer": "cus_x",
                                                       "idempotency_key": "w"})
        challenge = await client.call_tool("purchase_luc_credits", {"agent_id": "buyer", "luc": 2500})
        payment = Payer().pay(challenge.structured_content)  # type: ignore[arg-type]
        paid = await client.call_tool("purchase_luc_credits", {"agent_id": "buyer", "luc": 2500},
                                      meta={"x402/payment": payment})
    assert not paid.is_error
    capsys.readouterr()

    assert await anyio.to_thread.run_sync(main, ["report", "receipts"]) == 0
    out = capsys.readouterr().out
    assert "buyer" in out and "2,500" in out and "local" in out and "2.5" in out


async def tier_paid_while_its_price_was_archived(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                item: str) -> tuple[str, str]:
    """A tier bought, then its Stripe price archived before the buyer paid: the start failed for good, before any
    credit. (Its payment session, the archived price); the CLI runs on the same database."""
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "tiers.db"))
    settings = Settings(_env_file=None, aims_billing_db=tmp_path / "tiers.db",  # type: ignore[call-arg]
                        aims_billing_flush_interval_seconds=0)
    assert await anyio.to_thread.run_sync(main, ["setup-stripe"]) == 0
    server = build_server(settings)
    async with Client(server) as client:
        made = await client.call_tool("create_customer", {"email": "ops@example.com"})
        customer = made.structured_content["customer"]["id"]  # type: ignore[index]
        created = await client.call_tool("create_payment_session", {"item": item, "customer": customer,
                                                                    "idempotency_key": "t"})
        session: str = created.structured_content["session"]["id"]  # type: ignore[index]
        assert server.state is not None
        tier = server.state.pricing.tier(server.state.pricing.items[item].tier or "")
        price, _ = await server.state.subscriptions.prices_for(tier)
        await server.state.gateway.send(StripeRequest("post", f"/v1/prices/{price}", {"active": False}))
        paid = await client.call_tool("confirm_payment_session", {"session_id": session, "idempotency_key": "p",
                                                                  "payment_method": "pm_card_visa"})
    assert paid.structured_content["fulfilment"]["status"] == "failed"  # type: ignore[index]
    return session, price


async def reactivate(tmp_path: Path, price: str) -> None:
    gateway = build_gateway(Settings(_env_file=None, aims_billing_db=tmp_path / "tiers.db"))  # type: ignore[call-arg]
    try:
        await gateway.send(StripeRequest("post", f"/v1/prices/{price}", {"active": True}))
    finally:
        await gateway.close()


async def test_start_subscriptions_retries_a_failed_prepaid_tier_once_its_cause_is_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    session, price = await tier_paid_while_its_price_was_archived(tmp_path, monkeypatch, "tier_6mo")
    capsys.readouterr()

    assert await anyio.to_thread.run_sync(main, ["start-subscriptions"]) == 0
    untouched = capsys.readouterr().out
    assert await anyio.to_thread.run_sync(main, ["report", "prepaid"]) == 0
    failed = capsys.readouterr().out
    await reactivate(tmp_path, price)
    assert await anyio.to_thread.run_sync(main, ["start-subscriptions", "--failed"]) == 0
    started = capsys.readouterr().out

    assert "nothing to start" in untouched
    assert f"pre_{session}" in failed and "failed" in failed and "setup-stripe" in failed
    row = next(line for line in started.splitlines() if line.startswith(f"pre_{session}"))
    assert " started " in row and "sub_" in row and "107.94 USD" in row


def test_importing_the_server_leaves_httpx_and_the_sandbox_app_for_later() -> None:
    """Start-up time (issue 3's target): httpx loads on the first order webhook, the sandbox on the first Stripe
    call."""
    code = ("import sys, aims_billing_mcp.app; print(sorted(m for m in sys.modules if m == 'httpx' or "
            "m.startswith(('httpx.', 'aims_billing_mcp.sandbox.app', 'aims_billing_mcp.sandbox.invoices',"
            "'aims_billing_mcp.sandbox.subscriptions'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_refund_prepaid_refunds_a_tier_that_failed_and_refuses_what_it_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    session, _price = await tier_paid_while_its_price_was_archived(tmp_path, monkeypatch, "tier_3mo")
    capsys.readouterr()

    assert await anyio.to_thread.run_sync(main, ["refund-prepaid", f"pre_{session}"]) == 0
    refunded = capsys.readouterr().out
    assert await anyio.to_thread.run_sync(main, ["refund-prepaid", "pre_ps_nosuch"]) == 1
    unknown = capsys.readouterr().err

    row = next(line for line in refunded.splitlines() if line.startswith(f"pre_{session}"))
    assert " refunded " in row and "59.97 USD" in row
    assert "no prepaid subscription 'pre_ps_nosuch'" in unknown


# --- start-up failures: one line naming the path and the fix, exit 2 (configuration) or 1 (runtime) -------------

STARTING_COMMANDS = [["serve"], ["serve", "--http", "--port", "0"], ["doctor"], ["check-ledger"],
                     ["report", "wallets"], ["report", "usage"], ["report", "receipts"], ["report", "prepaid"],
                     ["flush-usage"], ["start-subscriptions"]]


def one_line_failure(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize("case", BAD_DATABASES)
@pytest.mark.parametrize("command", STARTING_COMMANDS, ids=" ".join)
def test_a_database_that_cannot_be_opened_stops_each_command_in_one_line(
    command: list[str], case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make, exit_code, words = BAD_DATABASES[case]
    path = make(tmp_path)
    monkeypatch.setenv("AIMS_BILLING_DB", str(path))
    monkeypatch.setenv("AIMS_BILLING_SANDBOX_DB", str(tmp_path / "sandbox.db"))
    assert main(command) == exit_code
    line = one_line_failure(capsys)
    assert f"AIMS_BILLING_DB={path}" in line and words in line


@pytest.mark.parametrize("command", [["serve"], ["doctor"]], ids=" ".join)
def test_a_sandbox_database_that_cannot_be_opened_stops_start_up_naming_its_setting(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "billing.db"))
    (tmp_path / "sb.db").write_text("not a database, not at all, " * 40)
    monkeypatch.setenv("AIMS_BILLING_SANDBOX_DB", str(tmp_path / "sb.db"))
    assert main(command) == 2
    line = one_line_failure(capsys)
    assert f"AIMS_BILLING_SANDBOX_DB={tmp_path / 'sb.db'}" in line and "is not a SQLite database" in line


@pytest.mark.parametrize("command", [["serve"], ["serve", "--http", "--port", "0"]], ids=" ".join)
def test_a_real_server_process_on_a_damaged_database_exits_1_with_one_line(
    command: list[str], tmp_path: Path
) -> None:
    path = truncated(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "AIMS_"))}
    done = run([sys.executable, "-m", "aims_billing_mcp", *command], capture_output=True, text=True,
               env={**env, "AIMS_BILLING_DB": str(path)}, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr
    assert f"AIMS_BILLING_DB={path}" in done.stderr and "is damaged" in done.stderr and "backup" in done.stderr


def test_the_demo_without_a_usable_temporary_directory_stops_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(under_a_file(tmp_path).parent))  # what TMPDIR would set
    assert main(["demo"]) == 2
    line = one_line_failure(capsys)
    assert "TMPDIR" in line and str(tmp_path / "notes.txt") in line


def test_the_sandbox_on_a_database_path_under_a_file_stops_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = under_a_file(tmp_path)
    assert main(["sandbox", "--db", str(path), "--port", "0"]) == 2
    line = one_line_failure(capsys)
    assert f"--db={path}" in line and "is a file, not a directory" in line
