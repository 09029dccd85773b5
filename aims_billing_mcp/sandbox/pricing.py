"""What a price charges for a quantity: per unit, or through graduated / volume tiers.

Amounts are computed in :class:`~decimal.Decimal` (``unit_amount_decimal`` may carry fractions of
a minor unit) and rounded half up once, at the line total, to integer minor units.

- per unit: ``quantity * unit_amount_decimal``
- graduated: each tier charges its own units at its rate, plus its ``flat_amount`` when any unit
  falls in it
- volume: every unit at the rate of the tier the total falls in, plus that tier's ``flat_amount``

A quantity of zero charges nothing (no flat fee either).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

Tier = Mapping[str, Any]


def round_half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _unit(tier: Tier) -> Decimal:
    if tier.get("unit_amount_decimal") is not None:
        return Decimal(str(tier["unit_amount_decimal"]))
    return Decimal(int(tier.get("unit_amount") or 0))


def _flat(tier: Tier) -> Decimal:
    if tier.get("flat_amount_decimal") is not None:
        return Decimal(str(tier["flat_amount_decimal"]))
    return Decimal(int(tier.get("flat_amount") or 0))


def tiered_amount(tiers: Sequence[Tier], mode: str, quantity: int) -> int:
    """The total for ``quantity`` units through ``tiers`` (ordered, the last one ``up_to: None``)."""
    if quantity <= 0:
        return 0
    if mode == "volume":
        for tier in tiers:
            if tier["up_to"] is None or quantity <= int(tier["up_to"]):
                return round_half_up(_unit(tier) * quantity + _flat(tier))
        raise ValueError("the last tier must have up_to: inf")
    total = Decimal(0)
    below = 0
    for tier in tiers:
        upper = quantity if tier["up_to"] is None else min(quantity, int(tier["up_to"]))
        units = upper - below
        if units > 0:
            total += _unit(tier) * units + _flat(tier)
        if tier["up_to"] is None or quantity <= int(tier["up_to"]):
            break
        below = int(tier["up_to"])
    return round_half_up(total)


def amount_for(price: Mapping[str, Any], quantity: int) -> int:
    """What ``price`` charges for ``quantity`` units, in integer minor units."""
    if price.get("billing_scheme") == "tiered":
        return tiered_amount(price.get("tiers") or [], str(price.get("tiers_mode")), quantity)
    decimal_text = price.get("unit_amount_decimal")
    unit = Decimal(str(decimal_text)) if decimal_text is not None else Decimal(int(price.get("unit_amount") or 0))
    return round_half_up(unit * quantity)
