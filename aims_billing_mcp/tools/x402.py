"""x402 agent-to-agent payments as MCP tools: a 402 challenge, a receipt check, and a paid tool speaking the x402
MCP transport (`_meta["x402/payment"]` in, `_meta["x402/payment-response"]` out). The x402 package's own MCP wrapper
imports the removed `mcp.server.fastmcp`, so the `_meta` handling is done here, with the package's constants."""


import json
from typing import Annotated, Any, Literal

from mcp.types import CallToolResult, TextContent
from pydantic import Field

from ..errors import PaymentRejected
from ..models import AgentId
from ..services.x402 import MAX_LUC, MAX_QUOTE_ID, Challenge
from ..services.x402_models import PayerRegistration, Receipt, RequirementsResult
from .context import ToolContext, services
from .registry import tool

AgentToCredit = Annotated[AgentId, Field(description="The agent wallet to credit")]
PAID_RESOURCE = "mcp://aims-billing-mcp/tools/purchase_luc_credits"


@tool(
    "Create x402 payment requirements", "write", open_world=False,
    summary="an x402 402 challenge: stores a quote (open until `valid_seconds`, then swept; at most 10,000 open) "
        "and returns the v2 `PaymentRequired` (or v1) and its header value",
    params="**`description`**, `amount_usd` or `amount_atomic` or `luc`, `agent_id`, `network`, `valid_seconds`, "
        "`x402_version`",
    hints="write, local",
)
async def create_x402_payment_requirements(
    ctx: ToolContext,
    description: Annotated[str, Field(min_length=1, max_length=500, description="What is being paid for")],
    amount_usd: Annotated[
        str | None, Field(pattern=r"^\d{1,13}(\.\d{1,6})?$", description="Price in USD as a decimal string, e.g. 2.50")
    ] = None,
    amount_atomic: Annotated[int | None, Field(gt=0, le=10**15, description="Price in atomic USDC units (6 "
                                                                            "decimals), at most 10**15")] = None,
    luc: Annotated[int | None, Field(gt=0, le=MAX_LUC,
                                     description="LUC credits to sell, priced at the pricing file's rate")] = None,
    agent_id: Annotated[AgentId | None, Field(description="The wallet the payment credits with `luc`")] = None,
    resource: Annotated[str, Field(min_length=1, max_length=2048, description="The paid resource's URL")]
    = PAID_RESOURCE,
    network: Annotated[Literal["base", "base-sepolia"] | None, Field(description="Default by mode")] = None,
    valid_seconds: Annotated[int, Field(ge=1, le=86400, description="How long the quote can be paid")] = 300,
    x402_version: Annotated[Literal[1, 2], Field(description="2 (PAYMENT-REQUIRED) or the v1 form")] = 2,
) -> RequirementsResult:
    """Quote a price as an x402 402 challenge: the PaymentRequired (scheme exact, USDC on Base or Base Sepolia, the
    atomic amount, payTo, the EIP-712 domain) and its base64 header value, stored as a quote to pay once (open
    quotes expire after valid_seconds and are swept)."""
    return await services(ctx).x402.create_requirements(
        amount_usd=amount_usd, amount_atomic=amount_atomic, luc=luc, agent_id=agent_id, description=description,
        resource=resource, network=network, valid_seconds=valid_seconds, version=x402_version,
    )


@tool(
    "Verify x402 receipt", "write",
    summary="verifies an x402 payment against the quote it accepted, settles it, records the receipt once and "
        "credits the quote's wallet; a `quote_id` naming another quote is refused",
    params="**`payment`** (header value or JSON; stripe mode: `pi_...`), `quote_id` (v1 and stripe mode only)",
    hints="write, idempotent by nonce",
)
async def verify_x402_receipt(
    ctx: ToolContext,
    payment: Annotated[
        str | dict[str, Any],
        Field(description="The payment: the base64 PAYMENT-SIGNATURE (v2) or X-PAYMENT (v1) header value, or its "
              "JSON object (stripe mode: the PaymentIntent id pi_...)"),
    ],
    quote_id: Annotated[
        str | None,
        Field(min_length=1, max_length=MAX_QUOTE_ID, description="The quote paid, for a payment that names none "
              "(v1, a PaymentIntent); a v2 payment settles the quote it accepted, and a different quote_id is refused"),
    ] = None,
) -> Receipt:
    """Verify an x402 payment against the quote it accepted (version, scheme, network, asset, recipient, exact
    amount, time window, nonce, the EIP-712 signature, the wallet's registered payers), settle it, record the receipt
    once and credit the quote's agent wallet in the same transaction. The same payment again is refused
    (invalid_exact_evm_nonce_already_used)."""
    return await services(ctx).x402.verify_and_settle(payment, quote_id=quote_id)


@tool(
    "Purchase LUC credits (x402)", "write",
    summary='a paid tool (x402 over MCP): 402 with `PaymentRequired` without `_meta["x402/payment"]` (stores '
        'nothing); credits with it and answers `_meta["x402/payment-response"]`; a payment for another `agent_id` '
        "or `luc` is refused",
    hints="write",
)
async def purchase_luc_credits(
    ctx: ToolContext,
    agent_id: AgentToCredit,
    luc: Annotated[int, Field(gt=0, le=MAX_LUC, description="LUC credits to buy for the agent's wallet")],
) -> Annotated[CallToolResult, Receipt]:
    """A paid tool (x402 over MCP): without `_meta["x402/payment"]` it answers isError with the PaymentRequired as
    structured content; sign it (EIP-3009 USDC transferWithAuthorization) and call again with the payment in
    `_meta["x402/payment"]` to be credited; the settlement comes back in `_meta["x402/payment-response"]`. The
    payment must be for this call's challenge: a payment for another agent_id or luc is refused."""
    from x402.mcp import MCP_PAYMENT_META_KEY, MCP_PAYMENT_RESPONSE_META_KEY

    state = services(ctx)
    payment = (ctx.request_context.meta or {}).get(MCP_PAYMENT_META_KEY)
    if payment is not None and not isinstance(payment, str | dict):
        raise PaymentRejected("invalid_payload", "_meta x402/payment must be the PaymentPayload object (or its "
                              "base64 header value)", param="_meta.x402/payment")
    outcome = await state.x402.pay_or_challenge(payment, agent_id=agent_id, luc=luc, resource=PAID_RESOURCE)
    if isinstance(outcome, Challenge):
        if outcome.refusal is not None:  # answered in the tools' error shape, which names the reason and the field
            raise outcome.refusal
        required = outcome.required.payment_required
        return CallToolResult(content=[TextContent(type="text", text=json.dumps(required))],
                              structured_content=required, is_error=True)
    body = outcome.model_dump(mode="json")
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(body))], structured_content=body,
                          _meta={MCP_PAYMENT_RESPONSE_META_KEY: outcome.settlement})


@tool(
    "Register x402 payer", "write", open_world=False,
    summary="registers a payer address for an agent wallet, proven by the address's EIP-191 signature: the wallet's "
        "quotes are then paid only from its registered addresses, and the address pays only its wallets' quotes",
)
async def register_x402_payer(
    ctx: ToolContext,
    agent_id: Annotated[AgentId, Field(description="The agent wallet the address pays for")],
    address: Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{40}$", description="The payer's 0x address")],
    signature: Annotated[
        str,
        Field(pattern=r"^0x[0-9a-fA-F]{130}$", description="The address's EIP-191 (personal_sign) signature of "
              "\"aims-billing-mcp x402 payer registration\\nagent: <agent_id>\\npayer: <address, lowercase>\\n"
              "pay-to: <the requirements' payTo, lowercase>\""),
    ],
) -> PayerRegistration:
    """Register a payer address for an agent wallet, proven by the address's signature. An x402 payment header is a
    bearer instrument until redeemed (its signature does not cover the quote it names); once a wallet has registered
    payers, its quotes are paid only from them, and a registered address pays only its wallets' quotes, so an
    intercepted payment cannot be redirected to another wallet. Registering again changes nothing."""
    return await services(ctx).x402.register_payer(agent_id=agent_id, address=address, signature=signature)
