"""`doctor` says what the server really talks to: the embedded sandbox and its file, a sandbox at STRIPE_API_BASE
(with no local sandbox file), or Stripe."""

from __future__ import annotations

from pathlib import Path

import pytest

from aims_billing_mcp.cli import main
from aims_billing_mcp.sandbox import create_app
from tests.conftest import serving_app

pytestmark = pytest.mark.anyio


def test_doctor_names_the_embedded_sandbox_and_its_file(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "doctor.db"))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"the embedded sandbox, its file {tmp_path / 'doctor.sandbox.db'}" in out


async def test_doctor_with_only_an_api_base_names_the_external_sandbox_and_no_file(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    app = create_app(db_path=":memory:")
    try:
        async with serving_app(app) as base:
            monkeypatch.setenv("AIMS_BILLING_DB", str(tmp_path / "doctor.db"))
            monkeypatch.setenv("STRIPE_API_BASE", base)
            import anyio

            code = await anyio.to_thread.run_sync(main, ["doctor"])
    finally:
        app.state.sandbox.close()
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"stripe mode: sandbox (an external sandbox at {base}; no local sandbox file is used)" in out
    assert "key check: ok" in out
    assert not (tmp_path / "doctor.sandbox.db").exists()
