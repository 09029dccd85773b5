"""Every setting, read from the environment or `.env`, validated once at start-up.

A malformed value stops the server before it serves anything, with a message naming the variable
(`describe_validation_error`), because a billing server half-configured is worse than one that refuses to start.
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .redact import register_secrets

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class StripeMode(StrEnum):
    SANDBOX = "sandbox"
    TEST = "test"
    LIVE = "live"


def default_data_dir() -> Path:
    """The user data directory, so Claude Desktop (which starts us in `/`) and a shell share one database."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "aims-billing-mcp"
    if os.name == "nt":
        return Path(os.environ.get("APPDATA", Path.home())) / "aims-billing-mcp"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "aims-billing-mcp"


class Settings(BaseSettings):
    """Field names are the environment variable names (case-insensitive); see `.env.example`."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False, populate_by_name=True
    )

    stripe_secret_key: SecretStr | None = Field(default=None, description="sk_test_/rk_test_ key; unset = sandbox")
    stripe_publishable_key: str | None = None
    stripe_webhook_secret: SecretStr | None = None
    stripe_price_starter: str | None = None
    stripe_price_pro: str | None = None
    stripe_price_enterprise: str | None = None
    stripe_api_base: str | None = Field(
        default=None, description="Send Stripe calls to this base URL instead (e.g. a standalone sandbox)"
    )
    aims_billing_db: Path = Field(default_factory=lambda: default_data_dir() / "aims_billing.db")
    aims_billing_sandbox_db: Path | None = Field(
        default=None, description="The embedded sandbox's own SQLite file; default: beside AIMS_BILLING_DB"
    )
    aims_billing_database_url: SecretStr | None = Field(
        default=None, description="postgresql://user:password@host:5432/db: every instance shares one PostgreSQL; "
        "unset = SQLite at AIMS_BILLING_DB"
    )
    aims_billing_database_writers: int = Field(
        default=2, ge=1, le=16, description="PostgreSQL only: writer connections per instance, each committing what "
        "has gathered as one transaction; fewer gather bigger batches (less CPU a write, lower latency on a small "
        "machine), more keep commits in flight when the database is far away"
    )
    aims_billing_allow_live: bool = False
    aims_billing_tools: Annotated[list[str], NoDecode] = Field(default_factory=list)
    aims_billing_toolsets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    aims_billing_read_only: bool = False
    aims_billing_max_amount: int = Field(default=1_000_000, gt=0, le=10**15)
    aims_billing_ceiling_currency: str = Field(
        default="usd", pattern=r"^[a-zA-Z]{3,4}$", description="The currency AIMS_BILLING_MAX_AMOUNT is counted in"
    )
    aims_billing_max_amounts: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict, description="Per-currency ceilings in minor units (jpy=1500000,kwd=3000000)"
    )
    aims_billing_replay_window_seconds: int = Field(default=600, ge=0)
    aims_billing_audit_retention_days: int = Field(default=90, ge=1, le=36_500)
    aims_billing_http_host: str = "127.0.0.1"
    aims_billing_http_port: int = Field(default=8765, ge=0, le=65535)
    aims_billing_http_token: SecretStr | None = None
    aims_billing_pricing: Path | None = Field(
        default=None, description="A pricing file (tiers, multipliers, rates) instead of the packaged pricing.toml"
    )
    aims_billing_p2p_agents: int = Field(
        default=0, ge=0, description="Agent wallets a P2P customer (no subscription) may have; tiers set the rest"
    )
    aims_billing_flush_interval_seconds: float = Field(
        default=5.0, ge=0, description="Seconds between deliveries of usage to Stripe meters; 0 turns it off"
    )
    aims_billing_webhook_port: int = Field(default=8766, ge=0, le=65535)
    aims_billing_acp_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys agent platforms use for the ACP seller API (comma-separated)"
    )
    aims_billing_ingest_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys for POST /v1/usage/events (comma-separated; not the MCP token)"
    )
    aims_billing_acp_signing_secret: SecretStr | None = Field(
        default=None, description="When set, ACP requests must carry a valid Signature and Timestamp (HMAC)"
    )
    aims_billing_acp_order_webhook_url: str | None = Field(
        default=None, pattern=r"^https?://", description="Where order_create/order_update events go (signed)"
    )
    aims_billing_acp_order_webhook_secret: SecretStr | None = Field(
        default=None, description="The key order webhooks are signed with"
    )
    aims_billing_public_url: str = Field(
        default="http://127.0.0.1:8765", pattern=r"^https?://",
        description="This server's public base URL, for links it hands out (ACP order permalinks)",
    )
    aims_x402_pay_to: str | None = Field(
        default=None, pattern=r"^0x[0-9a-fA-F]{40}$",
        description="The address x402 payments are made to; unset in sandbox/test mode: a fixed test address",
    )
    aims_x402_facilitator: Literal["local", "http", "stripe"] = "local"
    aims_x402_challenge_key: SecretStr | None = Field(
        default=None, description="The key 402 challenges are signed with: the same value on every instance (at "
        "least 32 characters); unset = derived from STRIPE_SECRET_KEY, or a key file beside the SQLite database",
    )
    aims_x402_facilitator_url: str | None = Field(default=None, pattern=r"^https?://")
    aims_x402_network: Literal["base", "base-sepolia"] | None = Field(
        default=None, description="Default network for payment requirements; unset = base-sepolia unless live mode"
    )
    aims_billing_log_level: str = Field(default="WARNING", pattern=r"(?i)^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")

    @field_validator("aims_billing_tools", "aims_billing_toolsets", "aims_billing_acp_api_keys",
                     "aims_billing_ingest_keys", mode="before")
    @classmethod
    def _split_tools(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("aims_billing_ceiling_currency", mode="after")
    @classmethod
    def _lower_currency(cls, value: str) -> str:
        return value.lower()

    @field_validator("aims_billing_max_amounts", mode="before")
    @classmethod
    def _split_ceilings(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        ceilings: dict[str, int] = {}
        for pair in filter(None, (part.strip() for part in value.split(","))):
            currency, _, amount = pair.partition("=")
            currency = currency.strip().lower()
            if not (3 <= len(currency) <= 4 and currency.isascii() and currency.isalpha()
                    and amount.strip().isascii() and amount.strip().isdigit() and 0 < int(amount) <= 10**15):
                raise ValueError(f"{pair!r} is not currency=ceiling: write e.g. jpy=1500000,kwd=3000000 (minor units "
                                 "of that currency, 1 to 10**15)")
            ceilings[currency] = int(amount)
        return ceilings
    @field_validator("aims_billing_acp_api_keys", "aims_billing_ingest_keys", mode="after")
    @classmethod
    def _drop_blank_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        return [key for key in value if key.get_secret_value().strip()]

    @field_validator("stripe_secret_key", mode="after")
    @classmethod
    def _check_secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        key = value.get_secret_value().strip()
        if not key.startswith(("sk_test_", "sk_live_", "rk_test_", "rk_live_")):
            raise ValueError("must start with sk_test_, rk_test_ (or sk_live_/rk_live_ with AIMS_BILLING_ALLOW_LIVE)")
        return SecretStr(key)

    @field_validator("stripe_webhook_secret", "aims_billing_http_token", "aims_billing_acp_signing_secret",
                     "aims_billing_acp_order_webhook_secret", "aims_x402_challenge_key", mode="after")
    @classmethod
    def _blank_secret_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value().strip() else None

    @field_validator("aims_x402_challenge_key", mode="after")
    @classmethod
    def _check_challenge_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 32:
            raise ValueError("must be at least 32 characters (e.g. `python -c \"import secrets; "
                             "print(secrets.token_hex(32))\"`), the same on every instance")
        return value

    @field_validator("stripe_price_starter", "stripe_price_pro", "stripe_price_enterprise", mode="after")
    @classmethod
    def _check_price_id(cls, value: str | None) -> str | None:
        if value is not None and value.strip() and not value.startswith("price_"):
            raise ValueError("must be a Stripe price id starting with price_ (run `aims-billing-mcp setup-stripe`)")
        return value or None

    @field_validator("stripe_api_base", mode="after")
    @classmethod
    def _check_api_base(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:12111")
        return value.rstrip("/") if value else None

    @model_validator(mode="after")
    def _check_order_webhooks(self) -> Settings:
        if self.aims_billing_acp_order_webhook_url and self.aims_billing_acp_order_webhook_secret is None:
            raise ValueError(
                "AIMS_BILLING_ACP_ORDER_WEBHOOK_URL is set without AIMS_BILLING_ACP_ORDER_WEBHOOK_SECRET: ACP order "
                "events must be signed; set the secret (the platform verifies Merchant-Signature with it)"
            )
        return self

    @model_validator(mode="after")
    def _check_http_exposure(self) -> Settings:
        if self.aims_billing_http_host not in LOOPBACK_HOSTS and self.aims_billing_http_token is None:
            raise ValueError(
                f"AIMS_BILLING_HTTP_HOST={self.aims_billing_http_host} is not loopback: "
                "set AIMS_BILLING_HTTP_TOKEN so the HTTP transport requires a bearer token"
            )
        return self

    @model_validator(mode="after")
    def _register_secrets(self) -> Settings:
        """Every secret held here is masked by value in whatever leaves the process (see redact.py)."""
        register_secrets(secret.get_secret_value() for secret in self.secrets())
        return self

    def secrets(self) -> list[SecretStr]:
        """Every configured secret: each field typed SecretStr, or a list of them."""
        found: list[SecretStr] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            items = value if isinstance(value, list) else [value]
            found.extend(item for item in items if isinstance(item, SecretStr))
        return found

    @property
    def database_url(self) -> str | None:
        """AIMS_BILLING_DATABASE_URL in clear, for the driver only (it holds a password: never print it)."""
        url = self.aims_billing_database_url
        return url.get_secret_value() if url is not None and url.get_secret_value() else None

    @property
    def stripe_mode(self) -> StripeMode:
        if self.stripe_secret_key is None:
            return StripeMode.SANDBOX
        key = self.stripe_secret_key.get_secret_value()
        return StripeMode.LIVE if "_live_" in key[:8] else StripeMode.TEST

    @property
    def sandbox_db_path(self) -> Path:
        if self.aims_billing_sandbox_db is not None:
            return self.aims_billing_sandbox_db
        return self.aims_billing_db.with_name(self.aims_billing_db.stem + ".sandbox.db")

    def price_id_for(self, env_name: str | None) -> str | None:
        """The configured price id behind a tier's `price_env` (STRIPE_PRICE_STARTER, ...)."""
        if env_name is None:
            return None
        value: str | None = getattr(self, env_name.lower(), None)
        return value

    def live_key_problem(self) -> str | None:
        """Why the configured key may not be used, or None; the gateway and `serve` both ask."""
        if self.stripe_mode is StripeMode.LIVE and not self.aims_billing_allow_live:
            return (
                "STRIPE_SECRET_KEY is a live-mode key and live mode is off: use an sk_test_ key, "
                "or set AIMS_BILLING_ALLOW_LIVE=true to move real money"
            )
        return None


def describe_validation_error(error: ValidationError) -> str:
    """One line per bad variable, naming it as the operator typed it, never echoing a secret value."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "settings"
        name = loc.upper()
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{name}: {message}" if loc != "settings" else message)
    return "invalid configuration:\n  " + "\n  ".join(lines)
