"""Security promises about secrets (issue 12, items 4, 5 and 11), one test each.

Every secret setting is held as a SecretStr and shown masked; no configured secret appears in the output of any
command, in what a served process writes (protocol and logs, at DEBUG), or in any table of the database; a Stripe
key an agent passes is masked in the result and the audit row; a refused call's arguments are stored bounded.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from pydantic import SecretStr

from aims_billing_mcp.app import build_server
from aims_billing_mcp.cli import main
from aims_billing_mcp.redact import AUDIT_MAX_ROW, SECRET_FIELD
from aims_billing_mcp.routes import build_companion_app
from aims_billing_mcp.sandbox import create_app
from aims_billing_mcp.services.acp_protocol import sign_request
from aims_billing_mcp.services.x402 import challenge_key
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.store import utc_iso
from aims_billing_mcp.webhooks import sign_webhook_payload
from tests.support.zygote import spawn, stdio_command

from ..conftest import ok, serving_app

pytestmark = pytest.mark.anyio

MARK = "LeakMark"  # in the middle of every configured secret; masking keeps at most a kind and 4 last characters
STRIPE_KEY = f"sk_test_{MARK}StripeKey00000000001"
WEBHOOK_SECRET = f"whsec_{MARK}Webhook0000000000002"
HTTP_TOKEN = f"tok-{MARK}-http-0003"
ACP_KEYS = (f"acp-{MARK}-one-0004", f"acp-{MARK}-two-0005")
ACP_SIGNING = f"sig-{MARK}-acp-0006"
ORDER_SECRET = f"ord-{MARK}-hook-0007"
CHALLENGE_KEY = f"x402-{MARK}-challenge-key-000000008"
SECRET_ENV = {
    "STRIPE_SECRET_KEY": STRIPE_KEY,
    "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "AIMS_BILLING_HTTP_TOKEN": HTTP_TOKEN,
    "AIMS_BILLING_ACP_API_KEYS": ",".join(ACP_KEYS),
    "AIMS_BILLING_ACP_SIGNING_SECRET": ACP_SIGNING,
    "AIMS_BILLING_ACP_ORDER_WEBHOOK_SECRET": ORDER_SECRET,
    "AIMS_BILLING_ACP_ORDER_WEBHOOK_URL": "http://127.0.0.1:9/acp/orders",
    "AIMS_X402_CHALLENGE_KEY": CHALLENGE_KEY,
}


def leaks(*texts: str) -> list[str]:
    return [text[max(0, text.find(MARK) - 60):text.find(MARK) + 60] for text in texts if MARK in text]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def every_row(path: Path) -> str:
    """Every value of every table, as one text to search."""
    conn = sqlite3.connect(path)
    try:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return "\n".join(repr(row) for table in tables for row in conn.execute(f'SELECT * FROM "{table}"'))
    finally:
        conn.close()


def test_every_secret_setting_is_held_as_a_secretstr() -> None:
    secret_names = [name for name in Settings.model_fields if SECRET_FIELD.search(name)]
    values: dict[str, Any] = {name: f"{MARK}-{name}" for name in secret_names}
    settings = Settings(_env_file=None, **{**values, "stripe_secret_key": STRIPE_KEY})  # type: ignore[call-arg]
    assert len(secret_names) >= 6
    for name in secret_names:
        value = getattr(settings, name)
        assert all(isinstance(item, SecretStr) for item in (value if isinstance(value, list) else [value])), name
    assert MARK not in repr(settings) and MARK not in str(settings.model_dump())


def test_doctor_masks_every_secret_setting_including_the_acp_api_keys(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("STRIPE_SECRET_KEY")  # sandbox mode: doctor's key check runs offline
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "doctor.db"))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert not leaks(out)
    line = next(line for line in out.splitlines() if "AIMS_BILLING_ACP_API_KEYS" in line)
    assert line.split()[1:] == ["****0004,", "****0005"]


async def test_no_configured_secret_appears_in_the_output_of_any_command(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "billing.db"))
    monkeypatch.setenv("AIMS_BILLING_LOG_LEVEL", "DEBUG")
    commands = [["doctor"], ["setup-stripe", "--write-env", str(tmp_path / ".env.out")],
                ["tools-json", "--output", str(tmp_path / "tools.json")], ["check-ledger"], ["report", "wallets"],
                ["report", "usage"], ["report", "receipts"], ["report", "prepaid"], ["flush-usage"],
                ["start-subscriptions"], ["refund-prepaid", "pre_ps_nosuch"], ["sandbox", "advance", "--hours", "1"],
                ["demo"]]
    outputs: dict[str, str] = {}
    app = create_app(db_path=str(tmp_path / "stripe.db"), api_keys=(STRIPE_KEY,))
    with anyio.fail_after(240):
        async with serving_app(app) as base:
            monkeypatch.setenv("STRIPE_API_BASE", base)  # Stripe test mode, played by the sandbox on loopback
            for argv in commands:
                code = await anyio.to_thread.run_sync(main, argv)
                captured = capfd.readouterr()
                outputs[" ".join(argv[:2])] = captured.out + captured.err
                assert code in (0, 1), (argv, captured.err)
    app.state.sandbox.close()
    written = [(tmp_path / ".env.out").read_text(), (tmp_path / "tools.json").read_text()]
    assert {command: leaks(out) for command, out in outputs.items() if leaks(out)} == {}
    assert not leaks(*written)
    assert "****0004" in outputs["doctor"] and "key check: ok" in outputs["doctor"]  # it did run, masked
    assert "PASS" in outputs["demo"]


async def test_a_served_process_writes_no_configured_secret_to_the_wire_or_its_logs(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    env = {**SECRET_ENV, "AIMS_BILLING_DB": str(tmp_path / "billing.db"), "AIMS_BILLING_LOG_LEVEL": "DEBUG",
           "PYTHONUNBUFFERED": "1", "AIMS_BILLING_WEBHOOK_PORT": str(free_port())}
    app = create_app(db_path=str(tmp_path / "stripe.db"), api_keys=(STRIPE_KEY,))
    with anyio.fail_after(120):
        async with serving_app(app) as base:
            env["STRIPE_API_BASE"] = base
            command, args = stdio_command([sys.executable, "-m", "aims_billing_mcp", "serve"])
            params = StdioServerParameters(command=command, args=args, env=env, cwd=str(tmp_path))
            with (tmp_path / "stdio.log").open("w") as errlog:
                async with Client(stdio_client(params, errlog=errlog)) as client:
                    dry = await client.call_tool("create_product", {
                        "name": "echo", "description": f"keys {STRIPE_KEY} {ACP_KEYS[0]} pi_{STRIPE_KEY}",
                        "dry_run": True})
                    made = ok(await client.call_tool("create_customer", {"email": "wire@example.com"}))
            http_out = await served_over_http(env, tmp_path)
    app.state.sandbox.close()
    captured = capfd.readouterr()
    wire = json.dumps(dry.model_dump(mode="json"))
    stdio_log = (tmp_path / "stdio.log").read_text()
    assert not leaks(wire, captured.out, captured.err, stdio_log, http_out)
    assert "DEBUG" in stdio_log and "DEBUG" in http_out  # the logs were written, at their most talkative
    assert made["customer"]["id"].startswith("cus_") and "sk_test_****0001" in wire
    assert not leaks(every_row(tmp_path / "billing.db"))


async def served_over_http(env: dict[str, str], tmp_path: Path) -> str:
    """`serve --http` in a process: the bearer token used, an ACP call with an API key; everything it wrote."""
    port = free_port()
    log = tmp_path / "http.log"
    with log.open("w") as sink:
        process = spawn([sys.executable, "-m", "aims_billing_mcp", "serve", "--http", "--port", str(port)], env=env,
                        cwd=str(tmp_path), stdout=sink, stderr=sink)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                while True:
                    try:
                        listed = await http.post("/mcp", headers={
                            "Authorization": f"Bearer {HTTP_TOKEN}", "Accept": "application/json, text/event-stream"},
                            json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                                "protocolVersion": "2025-06-18", "capabilities": {},
                                "clientInfo": {"name": "t", "version": "1"}}})
                        break
                    except httpx.ConnectError:
                        assert process.poll() is None, log.read_text()
                        await anyio.sleep(0.05)
                wrong = await http.post("/mcp", headers={"Authorization": f"Bearer {HTTP_TOKEN}x"}, json={})
                body = b'{"currency": "usd", "line_items": [{"id": "luc_10k"}], "capabilities": {}}'
                stamp = utc_iso(time.time())
                acp = await http.post("/acp/checkout_sessions", content=body, headers={
                    "Authorization": f"Bearer {ACP_KEYS[1]}", "API-Version": "2026-04-17", "Idempotency-Key": "k1",
                    "Content-Type": "application/json", "Timestamp": stamp,
                    "Signature": sign_request(ACP_SIGNING, stamp, body)})
        finally:
            process.terminate()
            process.wait(30)
    assert listed.status_code == 200 and wrong.status_code == 401 and acp.status_code in (201, 400), acp.text
    return log.read_text() + listed.text + wrong.text + acp.text


async def test_no_configured_secret_is_stored_in_any_table_after_a_session(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, **{name.lower(): value for name, value in SECRET_ENV.items()},  # type: ignore[arg-type]
                        aims_billing_db=tmp_path / "billing.db", aims_billing_p2p_agents=2)
    sandbox_app = create_app(db_path=":memory:", api_keys=(STRIPE_KEY,))
    server = build_server(settings, sandbox_app=sandbox_app, retry_delay_scale=0)
    async with Client(server) as client:
        customer = ok(await client.call_tool("create_customer", {"email": "s@example.com"}))["customer"]["id"]
        ok(await client.call_tool("create_agent_wallet", {"agent_id": "a1", "customer": customer,
                                                          "idempotency_key": "w1"}))
        ok(await client.call_tool("credit_agent_wallet", {"agent_id": "a1", "amount": 500, "reason": "seed",
                                                          "idempotency_key": "c1"}))
        ok(await client.call_tool("create_product", {"name": "p", "description": f"see {STRIPE_KEY}",
                                                     "dry_run": True}))
        refused = await client.call_tool("create_product", {"name": ACP_KEYS[0], "api_key": HTTP_TOKEN,
                                                            "note": f"x{WEBHOOK_SECRET}"})
        assert refused.is_error
        challenged = await client.call_tool("purchase_luc_credits", {"agent_id": "a1", "luc": 1000})
        assert "qt_" in str(challenged.structured_content or challenged.content)  # signed with the challenge key
        webhooks = build_companion_app(lambda: server.state)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=webhooks), base_url="http://t") as http:
            event = json.dumps({"id": "evt_s1", "object": "event", "type": "ping.test", "created": 1,
                                "data": {"object": {}}})
            hooked = await http.post("/webhooks/stripe", content=event,
                                     headers={"Stripe-Signature": sign_webhook_payload(event, WEBHOOK_SECRET)})
            body = json.dumps({"currency": "usd", "line_items": [{"id": "luc_10k"}], "capabilities": {},
                               "metadata": {"agent_id": "a1"}}).encode()
            stamp = utc_iso(time.time())
            checkout = await http.post("/acp/checkout_sessions", content=body, headers={
                "Authorization": f"Bearer {ACP_KEYS[0]}", "API-Version": "2026-04-17", "Idempotency-Key": "k1",
                "Content-Type": "application/json", "Timestamp": stamp,
                "Signature": sign_request(ACP_SIGNING, stamp, body)})
        assert hooked.status_code == 200 and checkout.status_code == 201, checkout.text
    sandbox_app.state.sandbox.close()
    stored = every_row(tmp_path / "billing.db")
    assert not leaks(stored)
    derived = challenge_key(settings)
    assert derived is not None and derived.hex() not in stored
    assert "sk_test_****0001" in stored and "whsec_****0002" in stored  # the session did store what it was sent


async def test_a_stripe_key_an_agent_passes_is_masked_in_the_result_and_the_audit_row(
    client: Client, make_settings: Any
) -> None:
    glued = f"pi_{STRIPE_KEY}"
    result = await client.call_tool("create_product", {"name": "x", "description": f"{glued} and {WEBHOOK_SECRET}",
                                                       "dry_run": True})
    shown = json.dumps(ok(result)) + "".join(getattr(c, "text", "") for c in result.content)
    assert not leaks(shown) and "pi_sk_test_****0001" in shown
    path = make_settings().aims_billing_db
    with anyio.fail_after(10):
        while "create_product" not in every_row(path):
            await anyio.sleep(0.01)
    assert not leaks(every_row(path))


async def test_a_refused_call_stores_its_arguments_bounded_in_the_audit_log(
    client: Client, make_settings: Any
) -> None:
    huge = "n" * 10_000_000
    refused = await client.call_tool("create_product", {"name": huge, "unknown": list(range(100_000))})
    assert refused.is_error
    path = make_settings().aims_billing_db
    with anyio.fail_after(10):
        while not (rows := sqlite3.connect(path).execute("SELECT arguments FROM audit_log").fetchall()):
            await anyio.sleep(0.01)
    stored = rows[0][0]
    assert len(stored) <= AUDIT_MAX_ROW
    arguments = json.loads(stored)
    assert "10,000,000 characters" in arguments["name"] and "99,936 more items" in arguments["unknown"][-1]
