"""Usage metering tools: thin functions over MeteringService (durable usage on the pricing file's meters, summaries,
quotes, task slots)."""

from typing import Annotated, Any

from pydantic import Field

from ..models import CustomerId
from ..services.metering_models import (
    MeterEventBatchResult,
    MeterEventInput,
    MeterEventResult,
    MeteringStatus,
    SlotRelease,
    TaskSlot,
    UsageQuote,
    UsageSummary,
)
from .context import ToolContext, services
from .registry import tool

Units = Annotated[int, Field(ge=0, le=10**12, description="Raw units used: tokens (luc_tokens), seconds, ...: a "
                             "positive integer; 1 on a count meter (api_calls); a `last` meter's value now, 0 allowed")]
MeterName = Annotated[
    str | None,
    Field(min_length=1, max_length=100, description="The meter: luc_tokens (default), compute_seconds, api_calls "
          "(count), storage_gb_hours (last), or another of the pricing file's meters, by id or Stripe event name"),
]
Operation = Annotated[
    str | None,
    Field(min_length=1, max_length=64, description="Operation type: chat, tool_call, code, research, image, "
          "agent_swarm (the pricing file's multipliers); or give multiplier"),
]
Multiplier = Annotated[
    float | None, Field(ge=1.0, le=3.0, description="An explicit task multiplier within 1.0-3.0 (3 decimals at most)")
]
TaskId = Annotated[str, Field(min_length=1, max_length=128, description="Your id for the task")]
Lease = Annotated[str, Field(min_length=1, max_length=200, description="The lease acquire_task_slot answered with")]


@tool(
    "Create meter event", "write",
    summary="records usage durably (answered after COMMIT): weighted units, period usage, allowance, remaining, "
        "overage and its cost",
    params="**`customer`**, **`units`**, `meter`, `operation` or `multiplier`, `identifier`, `timestamp`, "
        "`agent_id`, `metadata`",
    hints="write, idempotent by identifier",
)
async def create_meter_event(
    ctx: ToolContext,
    customer: Annotated[CustomerId, Field(description="Customer (cus_...) whose usage this is")],
    units: Units,
    operation: Operation = None,
    multiplier: Multiplier = None,
    identifier: Annotated[
        str | None, Field(min_length=1, max_length=100, description="Unique id of this usage; repeat it to retry "
                          "safely (the first result comes back, replayed: true). Generated when absent")
    ] = None,
    timestamp: Annotated[
        int | None, Field(ge=0, le=253_402_300_799, description="When it happened, epoch seconds: within the past "
                          "35 days, at most 5 min ahead")
    ] = None,
    agent_id: Annotated[str | None, Field(max_length=128, description="The agent that used it")] = None,
    metadata: Annotated[dict[str, str] | None, Field(description="Up to 20 string pairs kept with the event")] = None,
    meter: MeterName = None,
) -> MeterEventResult:
    """Record billable usage durably (answered only after it is committed) and get back, at once, the weighted units
    (raw x task multiplier, LUC tokens only), the period's usage, the tier's allowance, what remains, and any overage
    with its cost in cents. `meter` names what is measured (LUC tokens unless given). Usage is delivered to Stripe
    Billing meters in the background, so Stripe invoices the overage."""
    return await services(ctx).metering.record(
        customer, units, operation=operation, multiplier=multiplier, identifier=identifier, timestamp=timestamp,
        agent_id=agent_id, metadata=metadata, meter=meter,
    )


MAX_TOOL_BATCH = 100  # as Stripe's v2 meter event stream takes per request
EVENT_SCHEMA = {key: value for key, value in MeterEventInput.model_json_schema().items() if key != "description"}


@tool(
    "Create meter events", "write",
    summary="records 1-100 events in one call, each accepted, replayed or refused (index, field, reason) on its "
        "own; the accepted ones committed together before the answer; results in order and totals",
    params="**`events`**, `events[{customer, units, meter, operation, multiplier, identifier, timestamp, agent_id, "
        "metadata}]`",
    hints="write, idempotent by identifier",
)
async def create_meter_events(
    ctx: ToolContext,
    events: Annotated[
        list[Any],  # each item is parsed on its own (MeterEventInput), so one bad event never refuses the rest
        Field(min_length=1, max_length=MAX_TOOL_BATCH, description="1-100 events, each an object with "
              "create_meter_event's fields: customer and units required; meter, operation or multiplier, "
              "identifier, timestamp, agent_id, metadata optional. Each is checked on its own (meters may mix)",
              json_schema_extra={"items": EVENT_SCHEMA}),
    ],
) -> MeterEventBatchResult:
    """Record up to 100 usage events in one call. Each event is accepted, replayed (its identifier was recorded
    with the same content: the first result) or refused (with its index, field and reason) on its own; the answer
    has one result per event, in order, and totals. The accepted events are committed together before the answer
    (all of them, or none and an error). Otherwise as create_meter_event: repeat an identifier to retry safely."""
    return await services(ctx).metering.record_many(events, limit=MAX_TOOL_BATCH)


@tool(
    "Get usage summary", "read", open_world=False,
    summary="one meter's usage in a period by operation type, weighted total, allowance, overage units and cost, "
        "delivery counts",
    params="**`customer`**, `period` (`current` or `YYYY-MM`), `meter`",
)
async def get_usage_summary(
    ctx: ToolContext,
    customer: Annotated[CustomerId, Field(description="Customer (cus_...)")],
    period: Annotated[
        str, Field(pattern=r"^(current|\d{4}-\d{2})$", description="current (the billing period now) or YYYY-MM")
    ] = "current",
    meter: MeterName = None,
) -> UsageSummary:
    """A customer's usage of one meter (LUC tokens unless `meter` says) in a period: units by operation type, the
    billed total (a sum, a count of events, or a `last` meter's latest value), the allowance, the overage units and
    their cost, and how many events Stripe has accepted so far. Read-only."""
    return services(ctx).metering.summary(customer, period, meter)


@tool(
    "Quote usage", "read", open_world=False,
    summary="what some usage would cost now for a customer (P2P rate without one); writes nothing",
    params="**`units`**, `meter`, `operation` or `multiplier`, `customer`",
)
async def quote_usage(
    ctx: ToolContext,
    units: Units,
    operation: Operation = None,
    multiplier: Multiplier = None,
    customer: Annotated[CustomerId | None, Field(description="Price it for this customer's tier and usage so far")]
    = None,
    meter: MeterName = None,
) -> UsageQuote:
    """What some usage of a meter (LUC tokens unless `meter` says) would cost now: weighted units and the marginal
    cost for the customer (at the P2P rate without one); a `last` meter's units are the value it would then hold.
    Writes nothing."""
    return services(ctx).metering.quote(units, operation=operation, multiplier=multiplier, customer=customer,
                                        meter=meter)


@tool(
    "Acquire task slot", "write", open_world=False,
    summary="takes a concurrent-task slot, refused beyond the tier's limit; answers the slot's lease (renew with "
        "it); expired slots free themselves",
    hints="write, local",
)
async def acquire_task_slot(
    ctx: ToolContext,
    customer: Annotated[CustomerId, Field(description="Customer (cus_...) the task runs for")],
    task_id: TaskId,
    ttl_seconds: Annotated[int, Field(ge=1, le=86400, description="The slot frees itself after this long")] = 900,
    lease: Lease | None = None,
) -> TaskSlot:
    """Take one of the customer's concurrent-task slots before starting a task; refused when the tier's limit
    (P2P 1, 3mo 2, 6mo 5, 9mo 25) is in use. The answer's lease proves the slot is yours: the same task id again
    with its lease renews the slot (expires ttl_seconds from now); without it, a held task id is refused."""
    return await services(ctx).metering.acquire_slot(customer, task_id, ttl_seconds, lease)


@tool(
    "Release task slot", "write", open_world=False,
    summary="gives your task's slot back (its lease required)",
    hints="write, local",
)
async def release_task_slot(
    ctx: ToolContext,
    customer: Annotated[CustomerId, Field(description="Customer (cus_...)")],
    task_id: TaskId,
    lease: Lease,
) -> SlotRelease:
    """Give back your task's slot when the task ends, with the lease acquire_task_slot answered (another agent's
    slot is refused; an expired slot frees itself anyway)."""
    return await services(ctx).metering.release_slot(customer, task_id, lease)


@tool(
    "Get metering status", "read", open_world=False,
    summary="operators: usage waiting for Stripe, oldest age, sent/failed, last flush, failure reasons",
)
async def get_metering_status(ctx: ToolContext) -> MeteringStatus:
    """Operators: usage waiting for Stripe (count, oldest age), sent and failed counts, the last flush and recent
    failure reasons. Read-only."""
    return services(ctx).metering.status()
