"""The one table of tools: each with its MCP annotations and the permission it needs.

The tool sets (AIMS_BILLING_TOOLSETS: the families, one per module), the allow-list (AIMS_BILLING_TOOLS) and
read-only mode (AIMS_BILLING_READ_ONLY) filter this table *before* registration, so a tool that is off does not
exist for the client at all (and costs nothing in the client's tools/list).

The tool modules do not use `from __future__ import annotations`: the SDK reads each signature with
`eval_str=True` and `get_type_hints`, and string annotations made it compile and evaluate every parameter's
annotation twice per tool at start-up (14 ms of the time to the first tools/list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mcp.types import ToolAnnotations

from ..errors import ConfigurationError
from ..settings import Settings
from . import catalog, commerce, connect, metering, subscriptions, wallets, x402

Permission = Literal["read", "write"]


@dataclass(frozen=True)
class ToolSpec:
    fn: Callable[..., Any]
    title: str
    permission: Permission
    destructive: bool = False
    idempotent: bool = True
    open_world: bool = True

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def toolset(self) -> str:
        """The family a tool belongs to (its module: catalog, subscriptions, metering, wallets, x402, commerce)."""
        return self.fn.__module__.rsplit(".", 1)[-1]

    @property
    def annotations(self) -> ToolAnnotations:
        return ToolAnnotations(
            title=self.title,
            read_only_hint=self.permission == "read",
            destructive_hint=self.destructive,
            idempotent_hint=self.idempotent,
            open_world_hint=self.open_world,
        )


TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(catalog.create_product, "Create product", "write"),
    ToolSpec(catalog.create_price, "Create price", "write"),
    ToolSpec(catalog.create_customer, "Create customer", "write"),
    ToolSpec(catalog.create_payment_link, "Create payment link", "write"),
    ToolSpec(catalog.create_checkout_session, "Create checkout session", "write"),
    ToolSpec(catalog.create_billing_portal_session, "Create billing portal session", "write"),
    ToolSpec(catalog.list_invoices, "List invoices", "read"),
    ToolSpec(catalog.retrieve_balance, "Retrieve balance", "read"),
    ToolSpec(subscriptions.list_tiers, "List tiers", "read"),
    ToolSpec(subscriptions.create_subscription_checkout, "Create subscription checkout", "write"),
    ToolSpec(subscriptions.get_billing_status, "Get billing status", "read"),
    ToolSpec(subscriptions.cancel_subscription, "Cancel subscription", "write", destructive=True),
    ToolSpec(metering.create_meter_event, "Create meter event", "write"),
    ToolSpec(metering.create_meter_events, "Create meter events", "write"),
    ToolSpec(metering.get_usage_summary, "Get usage summary", "read", open_world=False),
    ToolSpec(metering.quote_usage, "Quote usage", "read", open_world=False),
    ToolSpec(metering.acquire_task_slot, "Acquire task slot", "write", open_world=False),
    ToolSpec(metering.release_task_slot, "Release task slot", "write", open_world=False),
    ToolSpec(metering.get_metering_status, "Get metering status", "read", open_world=False),
    ToolSpec(wallets.create_agent_wallet, "Create agent wallet", "write", open_world=False),
    ToolSpec(wallets.get_agent_wallet, "Get agent wallet", "read", open_world=False),
    ToolSpec(wallets.credit_agent_wallet, "Credit agent wallet", "write", open_world=False),
    ToolSpec(wallets.debit_agent_wallet, "Debit agent wallet", "write", open_world=False),
    ToolSpec(wallets.transfer_luc, "Transfer LUC", "write", open_world=False),
    ToolSpec(wallets.hold_luc, "Hold LUC", "write", open_world=False),
    ToolSpec(wallets.capture_hold, "Capture hold", "write", open_world=False),
    ToolSpec(wallets.release_hold, "Release hold", "write", open_world=False),
    ToolSpec(wallets.list_agent_transactions, "List agent transactions", "read", open_world=False),
    ToolSpec(wallets.freeze_agent_wallet, "Freeze agent wallet", "write", open_world=False),
    ToolSpec(x402.create_x402_payment_requirements, "Create x402 payment requirements", "write", open_world=False),
    ToolSpec(x402.verify_x402_receipt, "Verify x402 receipt", "write"),
    ToolSpec(x402.purchase_luc_credits, "Purchase LUC credits (x402)", "write"),
    ToolSpec(x402.register_x402_payer, "Register x402 payer", "write", open_world=False),
    ToolSpec(commerce.create_payment_session, "Create payment session", "write"),
    ToolSpec(commerce.confirm_payment_session, "Confirm payment session", "write"),
    ToolSpec(commerce.get_payment_session, "Get payment session", "read"),
    ToolSpec(commerce.cancel_payment_session, "Cancel payment session", "write", destructive=True),
    ToolSpec(connect.create_connected_account, "Create connected account", "write"),
    ToolSpec(connect.create_account_link, "Create account link", "write"),
    ToolSpec(connect.get_connected_account, "Get connected account", "read"),
    ToolSpec(connect.list_connected_accounts, "List connected accounts", "read", open_world=False),
    ToolSpec(connect.create_plug, "Create plug", "write"),
    ToolSpec(connect.get_creator_earnings, "Get creator earnings", "read", open_world=False),
    ToolSpec(connect.refund_split_sale, "Refund split sale", "write", destructive=True),
)


TOOLSETS: tuple[str, ...] = tuple(dict.fromkeys(spec.toolset for spec in TOOLS))


def is_tool_allowed(spec: ToolSpec, settings: Settings) -> bool:
    """Read-only mode, the tool sets and the allow-list each narrow the table; a tool must pass all three."""
    if settings.aims_billing_read_only and spec.permission != "read":
        return False
    if settings.aims_billing_toolsets and spec.toolset not in settings.aims_billing_toolsets:
        return False
    return not settings.aims_billing_tools or spec.name in settings.aims_billing_tools


def select_tools(settings: Settings, tools: tuple[ToolSpec, ...] = TOOLS) -> list[ToolSpec]:
    """The tools this configuration exposes; an unknown name in the allow-list is a start-up error, not a typo
    that silently hides a tool."""
    known = {spec.name for spec in tools}
    unknown = sorted(set(settings.aims_billing_tools) - known)
    if unknown:
        raise ConfigurationError(
            f"AIMS_BILLING_TOOLS names unknown tools {unknown}: known tools are {sorted(known)}",
            param="AIMS_BILLING_TOOLS",
        )
    unknown_sets = sorted(set(settings.aims_billing_toolsets) - {spec.toolset for spec in tools})
    if unknown_sets:
        raise ConfigurationError(
            f"AIMS_BILLING_TOOLSETS names unknown tool sets {unknown_sets}: known sets are {list(TOOLSETS)}",
            param="AIMS_BILLING_TOOLSETS",
        )
    return [spec for spec in tools if is_tool_allowed(spec, settings)]
