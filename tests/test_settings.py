"""Settings: every variable read from the environment or .env, malformed values stopping start-up with a message
that names the variable and never echoes a secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from aims_billing_mcp.cli import main
from aims_billing_mcp.settings import Settings, StripeMode, describe_validation_error


def load() -> Settings:
    return Settings()


def test_defaults_mean_sandbox_mode_with_a_database_in_the_user_data_directory() -> None:
    settings = load()
    assert settings.stripe_mode is StripeMode.SANDBOX
    assert settings.aims_billing_db.name == "aims_billing.db"
    assert "aims-billing-mcp" in str(settings.aims_billing_db)
    assert settings.sandbox_db_path.name == "aims_billing.sandbox.db"


def test_the_writers_setting_defaults_to_what_a_postgresql_store_opens_with() -> None:
    from aims_billing_mcp.store.postgres_core import WRITER_THREADS

    assert load().aims_billing_database_writers == WRITER_THREADS


def test_values_come_from_a_dotenv_file_in_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("AIMS_BILLING_MAX_AMOUNT=5000\nAIMS_BILLING_TOOLS=create_customer, list_invoices\n")
    settings = load()
    assert settings.aims_billing_max_amount == 5000
    assert settings.aims_billing_tools == ["create_customer", "list_invoices"]


@pytest.mark.parametrize(
    ("variable", "value", "expected_mode"),
    [("STRIPE_SECRET_KEY", "sk_test_51abc", StripeMode.TEST), ("STRIPE_SECRET_KEY", "rk_test_51abc", StripeMode.TEST),
     ("STRIPE_SECRET_KEY", "sk_live_51abc", StripeMode.LIVE), ("STRIPE_SECRET_KEY", "", StripeMode.SANDBOX)],
)
def test_the_key_decides_the_stripe_mode(monkeypatch: pytest.MonkeyPatch, variable: str, value: str,
                                         expected_mode: StripeMode) -> None:
    monkeypatch.setenv(variable, value)
    assert load().stripe_mode is expected_mode


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AIMS_BILLING_MAX_AMOUNT", "abc"),
        ("AIMS_BILLING_MAX_AMOUNT", "0"),
        ("AIMS_BILLING_HTTP_PORT", "70000"),
        ("AIMS_BILLING_READ_ONLY", "maybe"),
        ("STRIPE_SECRET_KEY", "pk_test_wrongkind"),
        ("STRIPE_PRICE_PRO", "prod_123"),
        ("STRIPE_API_BASE", "localhost:12111"),
        ("AIMS_BILLING_LOG_LEVEL", "LOUD"),
        ("AIMS_BILLING_DATABASE_WRITERS", "0"),
        ("AIMS_BILLING_DATABASE_WRITERS", "17"),
        ("AIMS_BILLING_DATABASE_WRITERS", "two"),
    ],
)
def test_a_malformed_value_fails_with_a_message_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        load()
    assert variable in describe_validation_error(caught.value)


def test_a_non_loopback_http_host_without_a_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIMS_BILLING_HTTP_HOST", "0.0.0.0")
    with pytest.raises(ValidationError, match="AIMS_BILLING_HTTP_TOKEN"):
        load()


def test_an_order_webhook_url_without_its_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIMS_BILLING_ACP_ORDER_WEBHOOK_URL", "https://platform.example/acp/webhooks")
    with pytest.raises(ValidationError, match="AIMS_BILLING_ACP_ORDER_WEBHOOK_SECRET"):
        load()


def test_a_live_key_needs_the_explicit_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_live_51abcdef")
    assert "AIMS_BILLING_ALLOW_LIVE" in (load().live_key_problem() or "")
    monkeypatch.setenv("AIMS_BILLING_ALLOW_LIVE", "true")
    assert load().live_key_problem() is None


def test_the_cli_exits_2_naming_the_bad_variable_without_echoing_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STRIPE_SECRET_KEY", "pk_live_secretvalue123456")
    monkeypatch.setenv("AIMS_BILLING_MAX_AMOUNT", "lots")
    assert main(["doctor"]) == 2
    err = capsys.readouterr().err
    assert "STRIPE_SECRET_KEY" in err and "AIMS_BILLING_MAX_AMOUNT" in err
    assert "secretvalue123456" not in err


def test_serve_refuses_a_live_key_at_startup(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_live_51abcdefghijkl")
    assert main(["serve"]) == 2
    assert "AIMS_BILLING_ALLOW_LIVE" in capsys.readouterr().err


def test_every_setting_is_listed_in_env_example() -> None:
    example = (Path(__file__).parents[1] / ".env.example").read_text()
    for name in Settings.model_fields:
        assert f"\n{name.upper()}=" in example, name


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`{name.upper()}`" in readme, name


def test_acp_api_keys_are_read_comma_separated_as_secrets_without_blanks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIMS_BILLING_ACP_API_KEYS", " platform-key-one , ,platform-key-two")
    keys = load().aims_billing_acp_api_keys
    assert [key.get_secret_value() for key in keys] == ["platform-key-one", "platform-key-two"]
    assert "platform-key" not in repr(keys)
