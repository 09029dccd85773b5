"""What LUC metering returns: small pydantic models a tool can hand back as its structured result.

Usage is integer LUC units, money integer cents, times epoch seconds (UTC), as Stripe's meter API counts them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

_Model = TypeVar("_Model", bound=BaseModel)


class MeterEventResult(BaseModel):
    identifier: str = Field(description="The event's unique identifier (Stripe dedupes by it)")
    customer: str
    operation: str | None = Field(description="The operation type, or null when an explicit multiplier was given")
    multiplier: float = Field(description="The task multiplier applied (1.0-3.0)")
    tier: str = Field(description="The customer's tier when the event was recorded")
    timestamp: int = Field(description="When the usage happened (epoch seconds)")
    raw_units: int
    weighted_units: int = Field(description="raw units x multiplier, rounded half up")
    period_start: int = Field(description="The usage period containing the event: [period_start, period_end)")
    period_end: int
    period_usage: int = Field(description="Weighted units used in the period, this event included")
    allowance: int = Field(description="Weighted units included per period by the tier (P2P: 0)")
    remaining: int = Field(description="Allowance left in the period after this event")
    overage_units: int = Field(description="This event's units beyond the allowance")
    period_overage_units: int = Field(description="The period's units beyond the allowance, this event included")
    overage_rate: int = Field(description="Cents per 1,000 weighted units beyond the allowance")
    cost_cents: int = Field(
        description="What this event adds to the period's overage charge: cost(period overage after) minus cost("
        "period overage before), so the events' costs add up to the period's line total exactly")
    period_overage_cost_cents: int
    currency: str
    replayed: bool = Field(default=False, description="true when the identifier was already recorded: the first result")
    meter: str = Field(default="luc_tokens", description="The meter the usage was recorded on")


class OperationUsage(BaseModel):
    operation: str = Field(description="The operation type, or `custom` for events with an explicit multiplier")
    events: int
    raw_units: int
    weighted_units: int


class EventCounts(BaseModel):
    pending: int = Field(description="Recorded, not yet accepted by Stripe")
    sent: int = Field(description="Accepted by Stripe")
    failed: int = Field(description="Stripe can no longer take them (see get_metering_status for the reasons)")


class UsageSummary(BaseModel):
    customer: str
    period: str = Field(description="`current` or YYYY-MM (that UTC calendar month)")
    period_start: int
    period_end: int
    tier: str
    meter: str = Field(description="The meter summarised (luc_tokens unless asked)")
    unit: str = Field(description="What one unit of the meter is")
    aggregation: Literal["sum", "count", "last"] = Field(
        description="How Stripe bills the period: sum of units, count of events, or the last value reported")
    by_operation: list[OperationUsage]
    raw_units: int
    weighted_units: int
    allowance: int
    remaining: int
    overage_units: int
    overage_cost_cents: int
    overage_rate: int
    currency: str
    events: EventCounts


class UsageQuote(BaseModel):
    customer: str | None
    tier: str
    meter: str = Field(description="The meter priced")
    operation: str | None
    multiplier: float
    raw_units: int
    weighted_units: int
    period_usage: int = Field(description="Weighted units already used in the customer's current period")
    allowance: int
    remaining: int = Field(description="Allowance left before this usage")
    overage_units: int = Field(description="Units of this usage beyond the allowance")
    overage_rate: int
    cost_cents: int = Field(description="The marginal cost of this usage now")
    currency: str


class TaskSlot(BaseModel):
    customer: str
    task_id: str
    acquired_at: int
    expires_at: int
    limit: int = Field(description="Concurrent tasks the customer's tier allows")
    in_use: int = Field(description="Slots held now, this one included")
    lease: str = Field(description="Proof that this slot is yours: pass it to renew (acquire the same task_id "
                       "again) or to release it; nobody else can")
    replayed: bool = Field(default=False, description="true when this task already held the slot: renewed")


class SlotRelease(BaseModel):
    customer: str
    task_id: str
    released: bool = Field(description="false when the task held no slot (released before, expired, or unknown)")
    in_use: int


class FailureReason(BaseModel):
    reason: str
    events: int
    last_at: int | None = Field(description="Epoch seconds of the most recent event failed for this reason")


class FlushReport(BaseModel):
    started_at: float
    duration_ms: float
    sent: int = Field(description="Events Stripe accepted in this flush")
    failed: int = Field(description="Events marked failed for good in this flush")
    pending: int = Field(description="Events still pending after this flush")
    batches: int
    transport: Literal["v2", "v1", "mixed", "none"]
    error: str | None = Field(default=None, description="Why the flush stopped early; the events stay pending")
    invoiced: int = Field(default=0, description="Ended P2P periods invoiced in this flush")


class MeteringStatus(BaseModel):
    pending: int
    oldest_pending_age_seconds: int | None
    sent: int
    failed: int
    last_flush_at: int | None
    last_flush: str | None = Field(description="What the last flush did, or why it stopped")
    recent_failures: list[FailureReason]


class MeterEventInput(BaseModel):
    """One event of a batch (create_meter_events, POST /v1/usage/events), parsed strictly on its own: a wrong type or
    an unknown field refuses that event, naming the field, not the batch. Ranges are the service's (as for
    create_meter_event)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # the published bounds are create_meter_event's; the service checks them, with its own words for each field
    customer: str = Field(json_schema_extra={"minLength": 1, "maxLength": 255, "description": "Customer (cus_...)"})
    units: int = Field(json_schema_extra={"minimum": 0, "maximum": 10**12, "description": "Raw units used (a "
                                          "count meter: 1; a `last` meter: the value now, 0 allowed)"})
    meter: str | None = Field(default=None, json_schema_extra={
        "maxLength": 100, "description": "The meter: luc_tokens (default), compute_seconds, api_calls, "
        "storage_gb_hours, or another of the pricing file's meters (by id or Stripe event name)"})
    operation: str | None = Field(default=None, json_schema_extra={
        "maxLength": 64, "description": "Operation type (the pricing file's multipliers); or give multiplier"})
    multiplier: float | None = Field(default=None, json_schema_extra={
        "minimum": 1.0, "maximum": 3.0, "description": "An explicit task multiplier within 1.0-3.0"})
    identifier: str | None = Field(default=None, json_schema_extra={
        "minLength": 1, "maxLength": 100, "description": "Unique id of this usage; generated when absent"})
    timestamp: Annotated[int | None, WithJsonSchema({
        "anyOf": [{"type": "integer", "minimum": 0, "maximum": 253_402_300_799}, {"type": "null"}],
        "description": "Epoch seconds: within the past 35 days, at most 5 min ahead"})] = None
    agent_id: str | None = Field(default=None, json_schema_extra={"maxLength": 128})
    metadata: dict[str, str] | None = Field(default=None, json_schema_extra={
        "description": "String pairs kept with the event"})


class BatchEventError(BaseModel):
    code: str = Field(description="invalid_input, idempotency_conflict, not_found, amount_above_ceiling, ...")
    field: str | None = Field(description="The event's field at fault (null when the event as a whole is)")
    message: str = Field(description="What is wrong and how to fix it")


def _nullable(kind: str, description: str) -> Any:
    """`{"type": [kind, "null"]}` rather than pydantic's `anyOf`: a client validating a batch's answer against the
    output schema (the Python SDK does) checks each of up to 1,000 results with one type test, not a sub-schema per
    branch, which made that validation the largest cost of a batch call."""
    return WithJsonSchema({"type": [kind, "null"], "description": description})


class BatchEventOutcome(BaseModel):
    """One event's outcome, kept short (a batch answers up to 1,000 of them): the numbers an agent acts on; the rest
    of create_meter_event's answer is the customer's (get_usage_summary) or what the event said."""

    index: int = Field(description="The event's position in the batch (0-based)")
    status: Literal["accepted", "replayed", "refused"] = Field(
        description="accepted: recorded now; replayed: this identifier was recorded with the same content (the first "
        "result); refused: nothing recorded for it, see error")
    identifier: Annotated[str | None, _nullable("string", "The event's identifier (generated when it gave none)")]
    weighted_units: Annotated[int | None, _nullable("integer", "raw units x multiplier; null if refused")] = None
    cost_cents: Annotated[int | None, _nullable("integer", "What it adds to the period's overage charge")] = None
    period_usage: Annotated[int | None, _nullable("integer", "The period's weighted usage, this event included")] = None
    remaining: Annotated[int | None, _nullable("integer", "Allowance left in the period after this event")] = None
    error: Annotated[BatchEventError | None, WithJsonSchema({
        "type": ["object", "null"], "description": "Why it was refused (code, field, message); null otherwise",
        "properties": {"code": {"type": "string"}, "field": {"type": ["string", "null"]},
                       "message": {"type": "string"}}})] = None


class BatchTotals(BaseModel):
    events: int
    accepted: int
    replayed: int
    refused: int
    weighted_units: int = Field(description="Weighted units of the events accepted now")
    cost_cents: int = Field(description="What the events accepted now add to overage charges")


class MeterEventBatchResult(BaseModel):
    totals: BatchTotals
    results: list[BatchEventOutcome] = Field(description="One per event, in the order given")


def trusted(model: type[_Model], values: dict[str, Any], given: set[str] | None = None) -> _Model:
    """`model.model_construct(**values)` for values the service made itself: every field, in the model's field order,
    each of its field's type (nested models already built). Nothing is validated or filled in, so the instance is
    what validating the same values makes (the same `__dict__`, and `model_fields_set` the fields `given`, by
    default all), at a fraction of model_construct's cost (it looks at aliases and defaults field by field) and of
    validation's (a batch's answer holds up to 1,000 results). Only for the models `_TRUSTED` lists: plain ones (no
    extra fields kept, no private attributes, no post-init), which an import-time check holds them to.

    Every instance given all its fields shares one fields set, `_ALL[model]`: pydantic only ever adds a field's name
    to it (assigning a field), which changes nothing in a set that holds them all, and copies it for a copy. A set
    per instance was the second object the collector tracks per result: a batch's answer is kept while its caller
    sends the next batch, so its objects are promoted, and promotions make full collections due (bench/ingest.py)."""
    instance = model.__new__(model)
    _setattr(instance, "__dict__", values)
    _setattr(instance, "__pydantic_fields_set__", _ALL[model] if given is None else given)
    _setattr(instance, "__pydantic_extra__", None)
    _setattr(instance, "__pydantic_private__", None)
    return instance


_setattr = object.__setattr__
_TRUSTED = (BatchEventError, BatchEventOutcome, BatchTotals, MeterEventBatchResult)
_ALL: dict[type[BaseModel], set[str]] = {model: set(model.model_fields) for model in _TRUSTED}
for _plain in _TRUSTED:
    assert _plain.model_config.get("extra") != "allow" and not _plain.__private_attributes__, _plain
    assert not _plain.__pydantic_post_init__ and not _plain.__pydantic_root_model__, _plain
