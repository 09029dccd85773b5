"""The command line: the demo passes end to end, doctor reports the configuration with secrets masked and checks
the key, and the standalone sandbox serves the real SDK on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from aims_billing_mcp.cli import main
from aims_billing_mcp.demo import run_demo
from aims_billing_mcp.sandbox import SANDBOX_SECRET_KEY
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.stripe_gateway import StripeRequest, build_gateway

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


async def test_the_standalone_sandbox_serves_the_real_sdk_on_loopback(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "aims_billing_mcp", "sandbox", "--port", str(port), "--db", str(tmp_path / "sb.db")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    settings = Settings(_env_file=None, stripe_api_base=f"http://127.0.0.1:{port}",  # type: ignore[call-arg]
                        aims_billing_db=tmp_path / "b.db")
    gateway = build_gateway(settings, retry_delay_scale=0.05)
    try:
        with anyio.fail_after(30):
            while True:
                try:
                    balance = await gateway.send(StripeRequest("get", "/v1/balance"))
                    break
                except Exception:
                    if process.poll() is not None:
                        raise
                    await anyio.sleep(0.05)
            created = await gateway.send(StripeRequest("post", "/v1/customers", {"email": "lo@example.com"}, "k-1"))
    finally:
        await gateway.close()
        process.terminate()
        process.wait(10)
    assert balance.data["object"] == "balance"
    assert created.data["id"].startswith("cus_") and created.request_id
    assert SANDBOX_SECRET_KEY.startswith("sk_test_")
