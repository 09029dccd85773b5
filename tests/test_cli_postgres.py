"""The PostgreSQL backend from the operator's side (issue 15 parts 1 and 3): `migrate`, `doctor` naming the backend,
and start-up refusing what it cannot run on, in one line, with the password never shown."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from aims_billing_mcp import cli
from aims_billing_mcp.settings import Settings
from aims_billing_mcp.state import open_state
from aims_billing_mcp.store import AGGREGATES, PostgresStore
from aims_billing_mcp.store import postgres as pg
from tests.support import zygote
from tests.support.pg import Cluster


@pytest.fixture
def empty_database(pg_cluster: Cluster) -> str:
    import uuid

    return pg_cluster.create_database(f"e_{uuid.uuid4().hex[:16]}")


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str,
        *argv: str) -> tuple[int, str]:
    monkeypatch.setenv("AIMS_BILLING_DATABASE_URL", url)
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_migrate_brings_an_empty_database_to_the_schema_and_a_second_run_applies_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], empty_database: str, pg_cluster: Cluster,
) -> None:
    first = run(monkeypatch, capsys, empty_database, "migrate")
    second = run(monkeypatch, capsys, empty_database, "migrate")

    assert first[0] == 0 and "applied 0001" in first[1] and f"schema version {pg.SCHEMA_VERSION}" in first[1]
    assert second[0] == 0 and "nothing to apply" in second[1]
    assert pg_cluster.password not in first[1] + second[1] and "***" in first[1]


def test_doctor_names_postgresql_its_server_version_and_the_schema_version(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], postgres_url: str, pg_cluster: Cluster,
) -> None:
    _, out = run(monkeypatch, capsys, postgres_url, "doctor")

    line = next(line for line in out.splitlines() if line.strip().startswith("database:"))
    assert "PostgreSQL 1" in line and f"schema version {pg.SCHEMA_VERSION}" in line
    assert pg_cluster.password not in out


@pytest.mark.parametrize(("url", "code", "says"), [
    ("mysql://app:hunter2pw@127.0.0.1/db", 2, "must be a postgresql:// URL"),
    ("postgresql://app:hunter2pw@127.0.0.1:1/db", 1, "cannot be reached"),
])
def test_a_url_that_cannot_serve_stops_start_up_in_one_line_naming_the_host_with_the_password_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, code: int, says: str,
) -> None:
    exit_code, out = run(monkeypatch, capsys, url, "serve")

    assert exit_code == code and says in out and "127.0.0.1" in out
    assert "hunter2pw" not in out and len(out.strip().splitlines()) == 1


COMMANDS = [["doctor"], ["migrate"], ["check-ledger"], ["report", "wallets"], ["report", "usage"],
            ["report", "receipts"], ["report", "prepaid"], ["report", "audit"], ["report", "creators"],
            ["prune-audit"], ["flush-usage"], ["start-subscriptions"], ["check-splits"]]


def test_every_command_runs_on_postgresql_and_nothing_goes_to_the_sqlite_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], postgres_url: str, pg_cluster: Cluster,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "unused.db"))
    outputs = {" ".join(argv): run(monkeypatch, capsys, postgres_url, *argv) for argv in COMMANDS}
    refund = run(monkeypatch, capsys, postgres_url, "refund-prepaid", "pre_nosuch")

    assert {command: code for command, (code, _) in outputs.items() if code != 0} == {}
    assert refund[0] == 1 and "pre_nosuch" in refund[1]  # refused by the PostgreSQL store: no such row
    assert "PostgreSQL" in outputs["doctor"][1] and "check-ledger: ok" in outputs["check-ledger"][1]
    assert not (tmp_path / "unused.db").exists()
    assert all(pg_cluster.password not in out for _, out in outputs.values())


@pytest.mark.parametrize("writers", [1, 3])
def test_the_graph_opens_as_many_writer_connections_as_the_writers_setting_says(
    monkeypatch: pytest.MonkeyPatch, postgres_url: str, writers: int
) -> None:
    monkeypatch.setenv("AIMS_BILLING_DATABASE_URL", postgres_url)
    monkeypatch.setenv("AIMS_BILLING_DATABASE_WRITERS", str(writers))
    before = _writer_threads()

    with open_state(Settings()) as state:
        opened = _writer_threads() - before

    assert len(opened) == writers and state.store.writers == writers


def _writer_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("aims-billing-pg-writer")}


def test_the_postgresql_store_has_every_aggregate(postgres_url: str) -> None:
    store = PostgresStore(postgres_url, writers=1, pool_size=1)
    try:
        assert [name for name in AGGREGATES if not hasattr(store, name)] == []
    finally:
        store.close()


@pytest.mark.parametrize("argv", [["serve"], ["check-ledger"], ["report", "wallets"], ["flush-usage"]])
def test_every_command_on_a_database_at_an_older_schema_says_to_run_migrate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], empty_database: str, argv: list[str],
) -> None:
    exit_code, out = run(monkeypatch, capsys, empty_database, *argv)

    assert exit_code == 2 and "aims-billing-mcp migrate" in out and len(out.strip().splitlines()) == 1


def test_the_demo_passes_every_step_on_postgresql_and_leaves_a_ledger_that_checks(
    postgres_url: str, tmp_path: Path, pg_cluster: Cluster,
) -> None:
    import os
    import sys

    env = {**os.environ, "AIMS_BILLING_DATABASE_URL": postgres_url, "HOME": str(tmp_path),
           "AIMS_BILLING_DB": str(tmp_path / "unused.db"),
           "AIMS_X402_CHALLENGE_KEY": "the-demo-deployments-challenge-key-0123"}  # sandbox mode on PostgreSQL
    env.pop("STRIPE_SECRET_KEY", None)
    env.pop("STRIPE_API_BASE", None)
    demo = zygote.run([sys.executable, "-m", "aims_billing_mcp", "demo"], env=env, cwd=tmp_path, capture_output=True,
               text=True, timeout=300)
    checked = zygote.run([sys.executable, "-m", "aims_billing_mcp", "check-ledger"], env=env, cwd=tmp_path,
                  capture_output=True, text=True, timeout=120)

    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-2000:]
    assert "PASS:" in demo.stdout and "FAIL" not in demo.stdout and "(PostgreSQL at " in demo.stdout
    assert checked.returncode == 0 and "check-ledger: ok" in checked.stdout, checked.stdout + checked.stderr
    wallets = int(checked.stdout.split("ok: ")[1].split()[0])
    assert wallets >= 1  # the demo's wallets are in PostgreSQL, not in a temporary SQLite file
    assert not (tmp_path / "unused.db").exists()
    assert pg_cluster.password not in demo.stdout + demo.stderr + checked.stdout + checked.stderr


@pytest.mark.anyio
async def test_serve_over_stdio_writes_to_postgresql(postgres_url: str, tmp_path: Path) -> None:
    import os
    import sys

    import anyio
    import psycopg
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMS_", "STRIPE_"))}
    env.update({"AIMS_BILLING_DATABASE_URL": postgres_url, "HOME": str(tmp_path), "AIMS_BILLING_P2P_AGENTS": "1",
                "AIMS_BILLING_DB": str(tmp_path / "unused.db")})
    command, args = zygote.stdio_command([sys.executable, "-m", "aims_billing_mcp", "serve", "--no-webhooks"])
    params = StdioServerParameters(command=command, args=args, env=env, cwd=str(tmp_path))
    with anyio.fail_after(120), (tmp_path / "stdio.log").open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            made = await client.call_tool("create_customer", {"email": "stdio@example.com"})
            customer = made.structured_content["customer"]["id"]  # type: ignore[index]
            wallet = await client.call_tool("create_agent_wallet", {"agent_id": "stdio-agent", "customer": customer,
                                                                    "idempotency_key": "w"})
    assert not wallet.is_error, wallet.content
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT customer_id FROM agent_wallets WHERE agent_id = 'stdio-agent'").fetchall() == [
            (customer,)]
    assert not (tmp_path / "unused.db").exists()
