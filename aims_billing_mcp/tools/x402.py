"""x402 agent-to-agent payments as MCP tools: a 402 challenge, a receipt check, and a paid tool speaking the x402
MCP transport (`_meta["x402/payment"]` in, `_meta["x402/payment-response"]` out). The x402 package's own MCP wrapper
imports the removed `mcp.server.fastmcp`, so the `_meta` handling is done here, with the package's constants."""


import json
from typing import Annotated, Any, Literal

from mcp.types import CallToolResult, TextContent
from pydantic import Field

from ..errors import PaymentRejected
from ..models import AgentId
from ..services.x402 import decode_payment_header
from ..services.x402_models import Receipt, RequirementsResult
from .context import ToolContext, services

AgentToCredit = Annotated[AgentId, Field(description="The agent wallet to credit")]
PAID_RESOURCE = "mcp://aims-billing-mcp/tools/purchase_luc_credits"


def quote_id_of(payment: str | dict[str, Any]) -> str | None:
    """A v2 payment names its quote in the requirements it accepted (`accepted.extra.quoteId`)."""
    _, obj = decode_payment_header(payment)
    accepted = obj.get("accepted")
    extra = accepted.get("extra") if isinstance(accepted, dict) else None
    quote = extra.get("quoteId") if isinstance(extra, dict) else None
    return quote if isinstance(quote, str) else None


async def create_x402_payment_requirements(
    ctx: ToolContext,
    description: Annotated[str, Field(min_length=1, max_length=500, description="What is being paid for")],
    amount_usd: Annotated[
        str | None, Field(pattern=r"^\d{1,13}(\.\d{1,6})?$", description="Price in USD as a decimal string, e.g. 2.50")
    ] = None,
    amount_atomic: Annotated[int | None, Field(gt=0, description="Price in atomic USDC units (6 decimals)")] = None,
    luc: Annotated[int | None, Field(gt=0, description="LUC credits to sell, priced at the pricing file's rate")]
    = None,
    agent_id: Annotated[AgentId | None, Field(description="The wallet the payment credits with `luc`")] = None,
    resource: Annotated[str, Field(min_length=1, max_length=2048, description="The paid resource's URL")]
    = PAID_RESOURCE,
    network: Annotated[Literal["base", "base-sepolia"] | None, Field(description="Default by mode")] = None,
    valid_seconds: Annotated[int, Field(ge=1, le=86400, description="How long the quote can be paid")] = 300,
    x402_version: Annotated[Literal[1, 2], Field(description="2 (PAYMENT-REQUIRED) or the v1 form")] = 2,
) -> RequirementsResult:
    """Quote a price as an x402 402 challenge: the PaymentRequired (scheme exact, USDC on Base or Base Sepolia, the
    atomic amount, payTo, the EIP-712 domain) and its base64 header value, stored as a quote to pay once."""
    return await services(ctx).x402.create_requirements(
        amount_usd=amount_usd, amount_atomic=amount_atomic, luc=luc, agent_id=agent_id, description=description,
        resource=resource, network=network, valid_seconds=valid_seconds, version=x402_version,
    )


async def verify_x402_receipt(
    ctx: ToolContext,
    payment: Annotated[
        str | dict[str, Any],
        Field(description="The payment: the base64 PAYMENT-SIGNATURE (v2) or X-PAYMENT (v1) header value, or its "
              "JSON object (stripe mode: the PaymentIntent id pi_...)"),
    ],
    quote_id: Annotated[
        str | None, Field(max_length=64, description="The quote paid; read from a v2 payment when omitted")
    ] = None,
) -> Receipt:
    """Verify an x402 payment against its quote (version, scheme, network, asset, recipient, exact amount, time
    window, nonce, the EIP-712 signature), settle it, record the receipt once and credit the quote's agent wallet
    in the same transaction. The same payment again is refused (invalid_exact_evm_nonce_already_used)."""
    x402 = services(ctx).x402
    quote = quote_id or (quote_id_of(payment) if x402.mode != "stripe" else None)
    if not quote:
        raise PaymentRejected("invalid_payment_requirements", "pass quote_id: a v1 payment (and a PaymentIntent) "
                              "does not name the quote it pays", param="quote_id")
    return await x402.verify_and_settle(payment, quote_id=quote)


async def purchase_luc_credits(
    ctx: ToolContext,
    agent_id: AgentToCredit,
    luc: Annotated[int, Field(gt=0, le=10**9, description="LUC credits to buy for the agent's wallet")],
) -> Annotated[CallToolResult, Receipt]:
    """A paid tool (x402 over MCP): without `_meta["x402/payment"]` it answers isError with the PaymentRequired as
    structured content; sign it (EIP-3009 USDC transferWithAuthorization) and call again with the payment in
    `_meta["x402/payment"]` to be credited; the settlement comes back in `_meta["x402/payment-response"]`."""
    from x402.mcp import MCP_PAYMENT_META_KEY, MCP_PAYMENT_RESPONSE_META_KEY

    state = services(ctx)
    payment = (ctx.request_context.meta or {}).get(MCP_PAYMENT_META_KEY)
    if payment is not None and not isinstance(payment, str | dict):
        raise PaymentRejected("invalid_payload", "_meta x402/payment must be the PaymentPayload object (or its "
                              "base64 header value)", param="_meta.x402/payment")
    if payment is None:
        challenge = await state.x402.create_requirements(
            luc=luc, agent_id=agent_id, description=f"{luc} LUC credits for agent {agent_id}", resource=PAID_RESOURCE)
        return CallToolResult(
            content=[TextContent(type="text", text=json.dumps(challenge.payment_required))],
            structured_content=challenge.payment_required, is_error=True,
        )
    quote = quote_id_of(payment)
    if not quote:
        raise PaymentRejected("invalid_payment_requirements", "the payment does not name a quote: pay the "
                              "PaymentRequired this tool returned (x402 version 2)", param="_meta.x402/payment")
    receipt = await state.x402.verify_and_settle(payment, quote_id=quote)  # the paid quote decides the credit
    body = receipt.model_dump(mode="json")
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(body))], structured_content=body,
                          _meta={MCP_PAYMENT_RESPONSE_META_KEY: receipt.settlement})
