"""The tier table (pricing.toml) as validated data, and the arithmetic of commitments.

Why the commitment is carried the way it is: Stripe Checkout creates a plain subscription, so the commitment rides
on two of Stripe's own subscription fields rather than on a schedule we would have to attach after checkout:
- months delivered beyond months billed (9mo: 12 delivered, 9 billed) are a trial (`subscription_data.
  trial_period_days`) at the start, so Stripe itself bills nothing for them and the invoices show it;
- the commitment end is written into the subscription's metadata, and `cancel_subscription` never lets the
  subscription end before it: it sets Stripe's `cancel_at` to the commitment end (Stripe keeps billing until then)
  unless an operator explicitly asks for an immediate cancellation.
"""

from __future__ import annotations

import calendar
import functools
import re
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import InvalidInput, UnknownTier

TIER_METADATA = "aims_tier"


class Tier(BaseModel):
    id: str = Field(description="p2p, 3mo, 6mo or 9mo")
    name: str
    description: str = ""
    monthly_price: int = Field(ge=0, description="Cents per month")
    commitment_months: int = Field(ge=0, description="Months billed")
    delivered_months: int = Field(ge=0, description="Months of service")
    tokens_per_month: int = Field(ge=0)
    agents: int = Field(ge=0)
    concurrent: int = Field(ge=1)
    overage_rate: int = Field(ge=0, description="Cents per 1,000 weighted units beyond the allowance (P2P: all)")
    price_env: str | None = None
    aliases: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Tier:
        if self.delivered_months < self.commitment_months:
            raise ValueError(f"tier {self.id}: delivered_months must be at least commitment_months")
        if (self.monthly_price > 0) != (self.price_env is not None):
            raise ValueError(f"tier {self.id}: a paid tier needs price_env, a free one must not have it")
        return self

    @property
    def paid(self) -> bool:
        return self.monthly_price > 0

    @property
    def prepaid_price(self) -> int:
        """The whole commitment paid at once: the months billed at the monthly price (free months cost nothing)."""
        return self.monthly_price * self.commitment_months

    @property
    def free_months(self) -> int:
        return self.delivered_months - self.commitment_months

    @property
    def lookup_key(self) -> str:
        """The Stripe price lookup key `setup-stripe` creates and finds this tier's price by."""
        return f"aims_tier_{self.id}_monthly"

    @property
    def overage_lookup_key(self) -> str:
        """The lookup key of this tier's metered price (allowance free, then the overage rate)."""
        return f"aims_tier_{self.id}_overage"


@dataclass(frozen=True)
class UsagePeriod:
    """The usage period containing a moment: [start, end), and the terms usage in it is billed on.

    `tier` is None when the caller only knows the window (the customer's tier then applies); `free` marks a trial
    period, whose usage Stripe does not bill (its rate is 0). `until`, when set, is the moment inside the period
    from which the same question gets another answer although nothing changed (a cancellation taking effect, a
    subscription period starting): the answer holds for moments before it only, and metering reuses it no longer."""

    start: int
    end: int
    tier: Tier | None = None
    free: bool = False
    until: int | None = None

    @property
    def holds_until(self) -> int:
        """The end of the moments this answer is the answer for: `until` when set, else the period's end."""
        return self.end if self.until is None else self.until

    def terms(self, fallback: Tier) -> Tier:
        """The tier usage in this period is priced at: the period's own, at rate 0 in a free (trial) period."""
        tier = self.tier or fallback
        return tier.model_copy(update={"overage_rate": 0}) if self.free else tier


class Item(BaseModel):
    """A sellable item (pricing.toml `[items.<id>]`): its price, and what fulfilment does once it is paid.

    A tier item ("subscribe") is the tier's whole commitment, prepaid: its price is monthly_price x months billed
    (computed from the tier when the file leaves it out, refused when it says otherwise), because the buyer pays once
    (an agent's Shared Payment Token is single-use, so nothing can be charged later) and Stripe then bills the
    months from that prepaid credit."""

    id: str = Field(pattern=r"^[a-z0-9_]{1,64}$")
    title: str = Field(min_length=1, max_length=250)
    description: str = ""
    unit_price: int = Field(default=0, ge=0, description="Minor units of currency (cents for usd)")
    currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")
    fulfil: Literal["credit", "subscribe"] = Field(
        description="credit: add `luc` LUC to the buying agent's wallet; subscribe: start `tier`, prepaid")
    luc: int = Field(default=0, ge=0, description="LUC credited on fulfilment (credit items)")
    tier: str | None = Field(default=None, description="The tier a subscribe item starts")

    @model_validator(mode="after")
    def _fulfilment_named(self) -> Item:
        if self.fulfil == "credit" and (self.luc <= 0 or self.tier is not None or self.unit_price <= 0):
            raise ValueError(f"item {self.id}: a credit item needs unit_price > 0, luc > 0 and no tier")
        if self.fulfil == "subscribe" and (self.tier is None or self.luc):
            raise ValueError(f"item {self.id}: a subscribe item needs a tier and no luc")
        return self

    @property
    def subscribes(self) -> bool:
        return self.fulfil == "subscribe"


LUC_METER = "luc_tokens"  # the meter of every event that names none: LUC tokens, priced by the tiers themselves
Aggregation = Literal["sum", "count", "last"]


class MeterTerms(BaseModel):
    """What one tier includes of a meter per period, and the rate beyond it."""

    model_config = ConfigDict(extra="forbid")

    included: int = Field(ge=0, description="Units included per usage period")
    rate: int = Field(ge=0, description="Cents per 1,000 units beyond `included`")


class Meter(BaseModel):
    """A usage meter (pricing.toml `[meters.<id>]`): the Stripe meter its events go to, how Stripe aggregates them in
    a period (sum of values, count of events, or the last value), its unit, and per tier the units included and the
    overage rate in cents per 1,000 units. `luc_tokens` takes its terms from the tiers (tokens_per_month,
    overage_rate) and is the only meter the task multipliers weigh."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    event_name: str = Field(pattern=r"^[a-z0-9_]{1,100}$", description="The Stripe billing meter's event name")
    aggregation: Aggregation = "sum"
    unit: str = Field(min_length=1, max_length=64)
    display_name: str = Field(default="", max_length=250)
    weighted: bool = Field(default=False, description="Task multipliers apply (luc_tokens only)")
    tiers: dict[str, MeterTerms] = Field(default_factory=dict, description="Tier id -> included units and rate")

    def terms(self, tier: Tier) -> Tier:
        """The tier with this meter's allowance and rate in place of LUC's (a period's terms are a Tier)."""
        if self.id == LUC_METER:
            return tier
        own = self.tiers.get(tier.id)
        if own is None:  # a tier of stored terms no longer in the file: nothing included, P2P's rate
            own = self.tiers.get("p2p", MeterTerms(included=0, rate=0))
            own = own.model_copy(update={"included": 0})
        return tier.model_copy(update={"tokens_per_month": own.included, "overage_rate": own.rate})

    def overage_lookup_key(self, tier: Tier) -> str:
        """The lookup key of the tier's metered price on this meter (LUC's keeps the key it always had)."""
        return tier.overage_lookup_key if self.id == LUC_METER else f"aims_tier_{tier.id}_{self.id}_overage"


MIN_MULTIPLIER_MILLI, MAX_MULTIPLIER_MILLI = 1000, 3000


def to_milli(value: float | int | str) -> int:
    """A multiplier as an exact integer of thousandths (1.5 -> 1500); more than 3 decimals is refused."""
    exact = Decimal(str(value)) * 1000
    if exact != exact.to_integral_value():
        raise ValueError(f"multiplier {value} has more than 3 decimals")
    return int(exact)


def weighted_units(raw_units: int, multiplier_milli: int) -> int:
    """raw x multiplier, rounded half up to an integer, in integer arithmetic (no float ever touches usage)."""
    return (raw_units * multiplier_milli + 500) // 1000


def cost_cents(units: int, rate_per_thousand: int) -> int:
    """Cents for `units` at `rate` cents per 1,000 units, rounded half up (as Stripe rounds a line total)."""
    return (units * rate_per_thousand + 500) // 1000


def marginal_overage(used: int, added: int, tier: Tier) -> tuple[int, int]:
    """(overage units, cents) that `added` weighted units cost on top of `used` in the period: the cost of the period's
    whole overage after, minus before, so the events' costs always add up to what the period is charged (each
    event's rounding never drifts from the total's)."""
    allowance, rate = tier.tokens_per_month, tier.overage_rate
    over_before, over_after = max(0, used - allowance), max(0, used + added - allowance)
    return over_after - over_before, cost_cents(over_after, rate) - cost_cents(over_before, rate)


class Pricing(BaseModel):
    currency: str = "usd"
    tiers: dict[str, Tier]
    luc_per_usd: int = Field(gt=0)
    meter_event_name: str = Field(default="aims_luc_units", pattern=r"^[a-z0-9_]{1,100}$")
    multipliers: dict[str, int] = Field(default_factory=dict, description="Operation type -> multiplier in milli")
    items: dict[str, Item] = Field(default_factory=dict, description="Sellable items by id")
    meters: dict[str, Meter] = Field(default_factory=dict, description="Usage meters by id (luc_tokens first)")

    @model_validator(mode="after")
    def _multipliers_in_range(self) -> Pricing:
        for operation, milli in self.multipliers.items():
            if not MIN_MULTIPLIER_MILLI <= milli <= MAX_MULTIPLIER_MILLI:
                raise ValueError(f"multiplier of {operation!r} is {milli / 1000}: it must be within 1.0-3.0")
        return self

    @classmethod
    def load(cls, path: Path | None = None) -> Pricing:
        text = path.read_text("utf-8") if path else (resources.files("aims_billing_mcp") / "pricing.toml").read_text(
            "utf-8"
        )
        data: dict[str, Any] = tomllib.loads(text)
        tiers = {key: {"id": key, **value} for key, value in data.get("tiers", {}).items()}
        return cls.model_validate({
            "currency": data.get("currency", "usd"), "tiers": tiers, "luc_per_usd": data.get("luc", {}).get("per_usd"),
            "meter_event_name": data.get("metering", {}).get("event_name", "aims_luc_units"),
            "multipliers": {op: to_milli(value) for op, value in data.get("multipliers", {}).items()},
            "items": {key: _item(key, value, data.get("tiers", {})) for key, value in data.get("items", {}).items()},
            "meters": _meters(data),
        })

    @model_validator(mode="after")
    def _meters_complete(self) -> Pricing:
        if LUC_METER not in self.meters:  # a file from before meters: LUC's meter, as it always was
            self.meters = {LUC_METER: _luc_meter(self.meter_event_name), **self.meters}
        luc = self.meters[LUC_METER]
        if luc.tiers or not luc.weighted or luc.aggregation != "sum":
            raise ValueError("meters.luc_tokens: its allowance and rate are the tiers' tokens_per_month and "
                             "overage_rate, it is weighted and sums: remove its tiers, weighted and aggregation")
        self.meter_event_name = luc.event_name
        names: dict[str, str] = {}
        for meter in self.meters.values():
            if meter.event_name in names:
                raise ValueError(f"meters {names[meter.event_name]} and {meter.id} share the Stripe event name "
                                 f"{meter.event_name!r}: each meter needs its own")
            names[meter.event_name] = meter.id
            if meter.id == LUC_METER:
                continue
            if meter.weighted:
                raise ValueError(f"meters.{meter.id}: only luc_tokens is weighted by the task multipliers")
            missing = [tier for tier in self.tiers if tier not in meter.tiers]
            extra = [tier for tier in meter.tiers if tier not in self.tiers]
            if missing or extra:
                raise ValueError(f"meters.{meter.id}.tiers must give included and rate for every tier ("
                                 f"{', '.join(self.tiers)})" + (f"; missing: {', '.join(missing)}" if missing else "")
                                 + (f"; not tiers of this file: {', '.join(extra)}" if extra else ""))
        return self

    def meter(self, name: Any, *, param: str = "meter") -> Meter:
        """A meter by its id or its Stripe event name; InvalidInput naming `param` and the known meters otherwise."""
        if name is None:
            return self.meters[LUC_METER]
        if isinstance(name, str):
            wanted = name.strip().lower()
            found = self.meters.get(wanted) or next(
                (m for m in self.meters.values() if m.event_name == wanted), None)
            if found is not None:
                return found
        known = ", ".join(f"{m.id} ({m.aggregation} of {m.unit}s)" for m in self.meters.values())
        raise InvalidInput(f"unknown meter {str(name)[:64]!r}: the meters are {known}", param=param)

    @model_validator(mode="after")
    def _has_p2p(self) -> Pricing:
        if "p2p" not in self.tiers:
            raise ValueError("pricing must define tiers.p2p, the tier of every customer without a subscription")
        return self

    @model_validator(mode="after")
    def _tier_items_priced(self) -> Pricing:
        for item in self.items.values():
            if not item.subscribes:
                continue
            tier = self.tiers.get(item.tier or "")
            if tier is None or not tier.paid:
                raise ValueError(f"item {item.id}: tier {item.tier!r} is not a paid tier of this file")
            if item.unit_price != tier.prepaid_price or item.currency != self.currency:
                raise ValueError(f"item {item.id}: a {tier.id} subscription prepaid costs {tier.prepaid_price} "
                                 f"{self.currency} ({tier.commitment_months} x {tier.monthly_price}), not "
                                 f"{item.unit_price} {item.currency}: leave unit_price out to have it computed")
        return self

    def tier(self, name: str, *, param: str = "tier") -> Tier:
        wanted = name.strip().lower()
        for tier in self.tiers.values():
            if wanted == tier.id or wanted in tier.aliases:
                return tier
        valid = ", ".join(f"{t.id}" + (f" ({'/'.join(t.aliases)})" if t.aliases else "") for t in self.tiers.values())
        raise UnknownTier(f"unknown tier {name!r}: valid tiers are {valid}", param=param)

    def item(self, item_id: str, *, param: str = "item") -> Item:
        found = self.items.get(item_id.strip().lower())
        if found is None:
            valid = ", ".join(f"{i.id} ({i.title})" for i in self.items.values()) or "none are configured"
            raise InvalidInput(f"unknown item {item_id!r}: valid items are {valid}", param=param)
        return found

    @property
    def p2p(self) -> Tier:
        return self.tiers["p2p"]

    def paid_tiers(self) -> list[Tier]:
        return [tier for tier in self.tiers.values() if tier.paid]


def _item(key: str, value: dict[str, Any], tiers: dict[str, Any]) -> dict[str, Any]:
    """An item's raw data with its id, and a tier item's price computed from its tier when the file leaves it out."""
    item = {"id": key, **value}
    tier = tiers.get(str(value.get("tier"))) if value.get("fulfil") == "subscribe" else None
    if isinstance(tier, dict) and "unit_price" not in item:
        item["unit_price"] = int(tier.get("monthly_price", 0)) * int(tier.get("commitment_months", 0))
    return item


def _luc_meter(event_name: str) -> Meter:
    return Meter(id=LUC_METER, event_name=event_name, unit="weighted LUC unit", display_name="AIMS LUC units",
                 weighted=True)


def _meters(data: dict[str, Any]) -> dict[str, Any]:
    """The `[meters.<id>]` tables with their ids; luc_tokens' event name defaults to `[metering] event_name`."""
    legacy = data.get("metering", {}).get("event_name", "aims_luc_units")
    meters: dict[str, Any] = {}
    for key, value in data.get("meters", {}).items():
        meter = {"id": key, **value} if isinstance(value, dict) else value
        if key == LUC_METER and isinstance(meter, dict):
            meter = {"event_name": legacy, "unit": "weighted LUC unit", "display_name": "AIMS LUC units",
                     "weighted": True, **meter}
        meters[key] = meter
    return meters


def add_months(epoch: int, months: int) -> int:
    """Calendar months, clamping the day (Jan 31 + 1 month = Feb 28/29), as Stripe bills monthly periods."""
    start = datetime.fromtimestamp(epoch, UTC)
    month_index = start.month - 1 + months
    year, month = start.year + month_index // 12, month_index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return int(start.replace(year=year, month=month, day=day).timestamp())


PERIOD_PATTERN = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")
DAY = 86400


def month_bounds(period: str) -> tuple[int, int]:
    """[start, end) of a UTC calendar month given as YYYY-MM."""
    match = PERIOD_PATTERN.fullmatch(period)
    if match is None:
        raise InvalidInput(f"period {period!r} is not `current` or a month as YYYY-MM (e.g. 2026-03)", param="period")
    year, month = int(match.group(1)), int(match.group(2))
    start = calendar.timegm((year, month, 1, 0, 0, 0))
    end = calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0))
    return start, end


def calendar_month_of(timestamp: int) -> tuple[int, int]:
    """The UTC calendar month containing `timestamp`: the usage period of a customer without a subscription."""
    return _month_of_day(timestamp // DAY)


@functools.lru_cache(maxsize=128)
def _month_of_day(day: int) -> tuple[int, int]:
    moment = datetime.fromtimestamp(day * DAY, UTC)
    return month_bounds(f"{moment.year:04d}-{moment.month:02d}")


def trial_days(start: int, months: int) -> int:
    """The whole days from `start` to the same time `months` calendar months later."""
    return (add_months(start, months) - start) // 86400
