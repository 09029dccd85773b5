"""Agent wallet tools: thin functions over LedgerService. Every mutating one requires an idempotency_key (money
moves only once per key) and a reason, and takes an optional reference (a meter event id, a receipt id, ...)."""

from typing import Annotated, Literal

from pydantic import Field

from ..errors import InvalidInput
from ..models import AgentId, CustomerId
from ..services.ledger import MAX_AMOUNT, MAX_USD_CENTS
from ..services.ledger_models import (
    FreezeResult,
    HoldPlaced,
    HoldResolved,
    Posting,
    TransactionPage,
    Transfer,
    Wallet,
    WalletCreated,
)
from .context import ToolContext, services
from .registry import tool

Agent = Annotated[AgentId, Field(description="The agent's id (letters, digits and _ . : @ -)")]
Luc = Annotated[int, Field(gt=0, le=MAX_AMOUNT, description="LUC credits, a positive integer, at most 10**15 per call")]
Key = Annotated[str, Field(min_length=1, max_length=255, description="Required: the same key returns the first "
                           "result (replayed: true) instead of moving LUC twice; other arguments with it are refused")]
Reason = Annotated[str, Field(min_length=1, max_length=500, description="Why, for the ledger and the operator")]
Reference = Annotated[str | None, Field(max_length=255, description="An id this relates to (meter event, receipt)")]
HoldId = Annotated[str, Field(pattern=r"^hold_[A-Za-z0-9_]+$", description="The hold id from hold_luc")]


@tool(
    "Create agent wallet", "write", open_world=False,
    summary="opens an agent's LUC wallet for a customer, within the tier's agent limit",
    params="**`agent_id`**, **`customer`**, `daily_cap`, **`idempotency_key`**",
    hints="write, local",
)
async def create_agent_wallet(
    ctx: ToolContext,
    agent_id: Agent,
    customer: Annotated[CustomerId, Field(description="The customer (cus_...) the agent works for")],
    idempotency_key: Key,
    daily_cap: Annotated[
        int | None, Field(gt=0, le=MAX_AMOUNT, description="LUC the wallet may spend per UTC day, at most 10**15")
    ] = None,
) -> WalletCreated:
    """Open an agent's LUC wallet for a customer. The customer's tier limits how many wallets it may have
    (3mo 5, 6mo 15, 9mo 50; P2P none unless the operator allows some)."""
    return await services(ctx).ledger.create_wallet(agent_id, customer, daily_cap, idempotency_key)


@tool(
    "Get agent wallet", "read", open_world=False,
    summary="balance, active holds, available, daily cap and today's spend, frozen, latest entries",
)
async def get_agent_wallet(
    ctx: ToolContext,
    agent_id: Agent,
    recent: Annotated[int, Field(ge=0, le=100, description="How many latest ledger entries to include")] = 10,
) -> Wallet:
    """An agent wallet: balance, active holds, available (balance minus holds), daily cap and today's spend,
    frozen or not, and the latest ledger entries. Read-only."""
    return services(ctx).ledger.get_wallet(agent_id, recent)


@tool(
    "Credit agent wallet", "write", open_world=False,
    summary="tops up a wallet in LUC, or in USD cents at the pricing file's rate",
    params="**`agent_id`**, `amount` or `usd_cents`, **`idempotency_key`**, **`reason`**, `reference`",
    hints="write, local",
)
async def credit_agent_wallet(
    ctx: ToolContext,
    agent_id: Agent,
    idempotency_key: Key,
    reason: Reason,
    amount: Annotated[
        int | None, Field(gt=0, le=MAX_AMOUNT, description="LUC to add (at most 10**15); or give usd_cents")
    ] = None,
    usd_cents: Annotated[
        int | None, Field(gt=0, le=MAX_USD_CENTS, description="A top-up paid in USD cents (at most 10**12), "
                          "converted at the pricing file's rate")
    ] = None,
    reference: Reference = None,
) -> Posting:
    """Top up an agent wallet, in LUC or in USD cents (converted at the LUC-per-USD rate, rounded down).
    At most 10**15 LUC (or 10**12 cents) per call; a wallet holds at most 10**18 LUC."""
    ledger = services(ctx).ledger
    if (amount is None) == (usd_cents is None):
        raise InvalidInput("give exactly one of amount (LUC) or usd_cents", param="amount")
    if usd_cents is not None:
        return await ledger.credit_usd(agent_id, usd_cents, idempotency_key=idempotency_key, reason=reason,
                                       reference=reference)
    assert amount is not None
    return await ledger.credit(agent_id, amount, idempotency_key=idempotency_key, reason=reason, reference=reference)


@tool(
    "Debit agent wallet", "write", open_world=False,
    summary="spends LUC, refused beyond available, the daily cap, or when frozen",
    hints="write, local",
)
async def debit_agent_wallet(
    ctx: ToolContext, agent_id: Agent, amount: Luc, idempotency_key: Key, reason: Reason, reference: Reference = None
) -> Posting:
    """Spend LUC from an agent wallet. Refused beyond the available balance (balance minus holds), beyond the
    daily cap, or when the wallet is frozen; nothing is written then."""
    return await services(ctx).ledger.debit(agent_id, amount, idempotency_key=idempotency_key, reason=reason,
                                            reference=reference)


@tool(
    "Transfer LUC", "write", open_world=False,
    summary="moves LUC between two wallets atomically",
    params="**`from_agent`**, **`to_agent`**, **`amount`**, **`idempotency_key`**, **`reason`**",
    hints="write, local",
)
async def transfer_luc(
    ctx: ToolContext,
    from_agent: Agent,
    to_agent: Agent,
    amount: Luc,
    idempotency_key: Key,
    reason: Reason,
    reference: Reference = None,
) -> Transfer:
    """Move LUC from one agent wallet to another in one transaction (both change, or neither)."""
    return await services(ctx).ledger.transfer(from_agent, to_agent, amount, idempotency_key=idempotency_key,
                                               reason=reason, reference=reference)


@tool(
    "Hold LUC", "write", open_world=False,
    summary="reserves LUC (funds and cap room) before a task, for `ttl_seconds`",
    params="**`agent_id`**, **`amount`**, `ttl_seconds`, **`idempotency_key`**, **`reason`**",
    hints="write, local",
)
async def hold_luc(
    ctx: ToolContext,
    agent_id: Agent,
    amount: Luc,
    idempotency_key: Key,
    reason: Reason,
    ttl_seconds: Annotated[
        int, Field(ge=1, le=30 * 86400, description="Seconds before the hold releases itself")
    ] = 3600,
    reference: Reference = None,
) -> HoldPlaced:
    """Reserve LUC before a long task; capture the actual cost after with capture_hold (the rest is released),
    or release_hold. An uncaptured hold releases itself when ttl_seconds pass."""
    return await services(ctx).ledger.hold(agent_id, amount, ttl_seconds, idempotency_key=idempotency_key,
                                           reason=reason, reference=reference)


@tool(
    "Capture hold", "write", open_world=False,
    summary="settles a hold: spends `amount` ≤ the hold, releases the rest",
    params="**`hold_id`**, **`amount`**, **`idempotency_key`**, **`reason`**",
    hints="write, local",
)
async def capture_hold(
    ctx: ToolContext, hold_id: HoldId, amount: Luc, idempotency_key: Key, reason: Reason, reference: Reference = None
) -> HoldResolved:
    """Settle a hold: spend `amount` (at most the hold) and release the rest. A hold resolves once."""
    return await services(ctx).ledger.capture_hold(hold_id, amount, idempotency_key=idempotency_key, reason=reason,
                                                   reference=reference)


@tool(
    "Release hold", "write", open_world=False,
    summary="cancels a hold: nothing spent",
    params="**`hold_id`**, **`idempotency_key`**, **`reason`**",
    hints="write, local",
)
async def release_hold(
    ctx: ToolContext, hold_id: HoldId, idempotency_key: Key, reason: Reason, reference: Reference = None
) -> HoldResolved:
    """Cancel a hold: its LUC is available again, nothing is spent."""
    return await services(ctx).ledger.release_hold(hold_id, idempotency_key=idempotency_key, reason=reason,
                                                   reference=reference)


@tool(
    "List agent transactions", "read", open_world=False,
    summary="a wallet's ledger entries newest first, paginated, filtered by kind and time",
)
async def list_agent_transactions(
    ctx: ToolContext,
    agent_id: Agent,
    kind: Literal["credit", "debit", "transfer", "hold", "capture", "release", "expire"] | None = None,
    since: Annotated[str | None, Field(description="ISO-8601 time or epoch seconds: entries at or after")] = None,
    until: Annotated[str | None, Field(description="ISO-8601 time or epoch seconds: entries before")] = None,
    limit: Annotated[int, Field(ge=1, le=200)] = 50,
    cursor: Annotated[
        str | None, Field(max_length=100, description="next_cursor from the previous page, unchanged")
    ] = None,
) -> TransactionPage:
    """An agent wallet's ledger entries, newest first, one page at a time (pass next_cursor back as cursor).
    Read-only."""
    return services(ctx).ledger.list_transactions(agent_id, kind=kind, since=_time(since), until=_time(until),
                                                  limit=limit, cursor=cursor)


def _time(value: str | None) -> str | float | None:
    """Epoch seconds arrive as text through the schema (one type for both forms); the ledger takes them as numbers.
    Only ASCII digits count: `isdigit()` also accepts '²', which float() refuses."""
    if value is not None and value.isascii() and value.replace(".", "", 1).isdigit():
        return float(value)
    return value


@tool(
    "Freeze agent wallet", "write", open_world=False,
    summary="operator: freeze (no debits, holds, outgoing transfers) or unfreeze a wallet",
    params="**`agent_id`**, `frozen`, **`reason`**, **`idempotency_key`**",
    hints="write, local",
)
async def freeze_agent_wallet(
    ctx: ToolContext,
    agent_id: Agent,
    reason: Reason,
    idempotency_key: Key,
    frozen: Annotated[bool, Field(description="true freezes (no debits, holds or outgoing transfers); false "
                                  "unfreezes")] = True,
) -> FreezeResult:
    """Operator: freeze or unfreeze an agent wallet. A frozen wallet still receives credits."""
    return await services(ctx).ledger.freeze(agent_id, frozen, reason, idempotency_key)
