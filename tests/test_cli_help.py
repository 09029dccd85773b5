"""The command line explains itself: a version, help for a bare command, and a help line on every command and
argument (a missing one fails here), and the audit log an operator can read and prune."""

from __future__ import annotations

import argparse
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from aims_billing_mcp import __version__
from aims_billing_mcp.cli import build_parser, main
from aims_billing_mcp.store import Store, utc_iso

Parsers = list[tuple[str, argparse.ArgumentParser]]


def parsers(parser: argparse.ArgumentParser, path: str = "aims-billing-mcp") -> Parsers:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += parsers(child, f"{path} {name}")
    return found


def commands_without_help() -> list[str]:
    missing = []
    for path, parser in parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions if choice.help}
                missing += [f"{path} {name}" for name in action.choices if name not in helped]
            elif not action.help and not isinstance(action, argparse._HelpAction):
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_command_and_argument_has_a_help_line() -> None:
    assert commands_without_help() == []


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"aims-billing-mcp {__version__}"


def test_a_bare_command_shows_help_and_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: aims-billing-mcp" in out and "serve" in out and "doctor" in out


def write_audit_rows(db: Path, rows: list[tuple[str, str, str, str, str | None]]) -> None:
    Store(db).close()  # migrated
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany("INSERT INTO audit_log (at, tool, caller, arguments, outcome, error_code, duration_ms) "
                         "VALUES (?, ?, 'local', ?, ?, ?, 1.5)", rows)
    conn.close()


def stamp(moment: datetime) -> str:
    return utc_iso(moment.timestamp())


@pytest.fixture
def audited(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    db = tmp_path / "audit.db"
    monkeypatch.setenv("AIMS_BILLING_DB", str(db))
    now = datetime.now(UTC)
    write_audit_rows(db, [
        (stamp(now - timedelta(days=200)), "create_customer", json.dumps({"email": "old@example.com"}), "ok", None),
        (stamp(now - timedelta(hours=3)), "debit_agent_wallet", json.dumps({"agent_id": "a1", "amount": 5}),
         "error", "insufficient_funds"),
        (stamp(now - timedelta(minutes=5)), "create_payment_link",
         json.dumps({"customer": "cus_alpha", "price": "price_1"}), "ok", None),
    ])
    return db


@pytest.mark.parametrize(("flags", "shown", "hidden"), [
    ([], ["create_payment_link", "debit_agent_wallet", "create_customer"], []),
    (["--errors"], ["insufficient_funds"], ["create_payment_link"]),
    (["--tool", "create_payment_link"], ["cus_alpha"], ["debit_agent_wallet"]),
    (["--customer", "cus_alpha"], ["create_payment_link"], ["debit_agent_wallet"]),
    (["--since", "1h"], ["create_payment_link"], ["debit_agent_wallet", "create_customer"]),
    (["--limit", "1"], ["create_payment_link"], ["debit_agent_wallet"]),
], ids=["all", "errors", "tool", "customer", "since", "limit"])
def test_report_audit_filters_what_an_agent_did(audited: Path, capsys: pytest.CaptureFixture[str],
                                                flags: list[str], shown: list[str], hidden: list[str]) -> None:
    assert main(["report", "audit", *flags]) == 0
    out = capsys.readouterr().out
    assert all(text in out for text in shown), out
    assert not any(text in out for text in hidden), out


def test_prune_audit_deletes_rows_past_the_retention_only(audited: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune-audit"]) == 0
    assert "deleted 1 audit row(s) older than 90 days" in capsys.readouterr().out
    conn = sqlite3.connect(audited)
    assert [row[0] for row in conn.execute("SELECT tool FROM audit_log ORDER BY id")] == [
        "debit_agent_wallet", "create_payment_link"]
    conn.close()


@pytest.mark.parametrize("since", ["yesterday", "5y", ""])
def test_a_bad_since_is_refused_naming_the_forms_it_takes(audited: Path, capsys: pytest.CaptureFixture[str],
                                                          since: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "audit", "--since", since])
    assert exit_info.value.code == 2
    assert "30m, 12h, 7d" in capsys.readouterr().err
