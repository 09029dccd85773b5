"""The per-call amount ceiling (AIMS_BILLING_MAX_AMOUNT): one check for every path that asks for money.

Catalog prices, payment links and checkouts (tiered and volume prices at the quantity asked for), payment sessions (an
amount or an item), subscription checkouts, x402 payment requirements, wallet top-ups in USD cents and meter events
(the most the event's units can cost) all hold what they ask for against the same `Ceiling`, and all refuse with
one error: `amount_above_ceiling` (errors.AmountAboveCeiling), naming the field.

Currencies. The ceiling is set in the minor units of one reference currency (AIMS_BILLING_CEILING_CURRENCY, usd by
default: 1,000,000 = $10,000.00). Another currency is compared by its minor-unit exponent, major unit for major
unit: with $10,000.00 the ceiling is ¥10,000 (JPY has 0 decimals), 10,000.000 KWD (3 decimals), 10,000.000000 USDC
(6). No exchange rates are guessed: a currency worth more or less than the reference gets its own ceiling in
AIMS_BILLING_MAX_AMOUNTS (`kwd=3000000,jpy=1500000`, each in that currency's minor units), which always wins. A
currency whose exponent is not known (not one of Stripe's presentment currencies nor usdc) and has no ceiling of its
own is refused: an amount that cannot be compared is not let through.

Prices. What a price asks for in this call, worst case, at the quantity given: per-unit prices (`unit_amount`, or
`unit_amount_decimal` rounded up), tiered prices (`graduated`: each tier's units at its rate plus its flat amount;
`volume`: all units at the rate of the tier the quantity falls in plus its flat amount), pay-what-you-want prices at
their maximum. A price that cannot be bounded (customer-chosen with no maximum, tiers not returned) is refused. A
metered price charges nothing when a checkout is paid (its usage is invoiced later, and each meter event is held to
the ceiling when recorded), so it adds 0 to a checkout's total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from ..errors import AmountAboveCeiling, StripeInvalidRequest
from ..models import CURRENCIES, THREE_DECIMAL, ZERO_DECIMAL
from ..stripe_gateway import StripeRequest

if TYPE_CHECKING:
    from ..settings import Settings
    from ..stripe_gateway import StripeGateway

DEFAULT_MAX_AMOUNT = 1_000_000  # $10,000.00: the settings' default
CRYPTO_EXPONENTS = {"usdc": 6}  # x402 payments: USDC atomic units


def minor_unit_exponent(currency: str) -> int | None:
    """Decimal places of the currency's minor unit (usd 2, jpy 0, kwd 3, usdc 6); None when not known."""
    code = currency.lower()
    if code in CRYPTO_EXPONENTS:
        return CRYPTO_EXPONENTS[code]
    if code not in CURRENCIES:
        return None
    return 0 if code in ZERO_DECIMAL else 3 if code in THREE_DECIMAL else 2


def display(amount: int, currency: str) -> str:
    """Minor units shown in major units with integer arithmetic: 1999 usd -> '19.99 USD', 5 usdc -> '0.000005 USDC'."""
    digits = minor_unit_exponent(currency)
    if digits is None:
        return f"{amount:,} minor units of {currency.upper()}"
    whole, frac = divmod(abs(amount), 10**digits)
    return f"{'-' if amount < 0 else ''}{whole:,}{f'.{frac:0{digits}d}' if digits else ''} {currency.upper()}"


def _minor(value: Any, decimal: Any, what: str, field_name: str) -> Decimal:
    """A price's amount per unit in minor units: the integer field, else the decimal one."""
    if value is not None:
        return Decimal(int(value))
    if decimal is not None:
        try:
            return Decimal(str(decimal))
        except InvalidOperation:
            pass
    raise AmountAboveCeiling(f"{field_name}: {what} has no amount the ceiling can check: use a price with a unit "
                             "amount", param=field_name)


@dataclass(frozen=True)
class Ceiling:
    """`amount` minor units of `currency` per call; `per_currency` ceilings (minor units of their own currency)."""

    amount: int = DEFAULT_MAX_AMOUNT
    currency: str = "usd"
    per_currency: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Ceiling:
        return cls(settings.aims_billing_max_amount, settings.aims_billing_ceiling_currency,
                   dict(settings.aims_billing_max_amounts))

    def limit(self, currency: str, field_name: str) -> int:
        """The ceiling in `currency`'s minor units; AmountAboveCeiling when it cannot be known."""
        code = currency.lower()
        if code in self.per_currency:
            return self.per_currency[code]
        if code == self.currency:
            return self.amount
        exponent, reference = minor_unit_exponent(code), minor_unit_exponent(self.currency)
        if exponent is None or reference is None:
            raise AmountAboveCeiling(
                f"{field_name}: the ceiling cannot be applied to currency {code!r} (its minor unit is not known and "
                f"AIMS_BILLING_MAX_AMOUNTS gives it no ceiling): use a supported currency, or have the operator "
                f"set AIMS_BILLING_MAX_AMOUNTS={code}=<ceiling in minor units>", param=field_name, currency=code)
        return int(self.amount * 10**exponent // 10**reference)  # rounded down: never looser than the reference

    def check(self, amount: int, currency: str, field_name: str, *, what: str = "") -> None:
        """Refuse `amount` minor units of `currency` above the ceiling, naming `field_name` (and `what` it is)."""
        limit = self.limit(currency, field_name)
        if amount > limit:
            shown = f"{display(amount, currency)} ({amount} minor units)" if amount < 10**30 else "above 10**30"
            source = (f"AIMS_BILLING_MAX_AMOUNTS {currency.lower()}={limit}" if currency.lower() in self.per_currency
                      else f"AIMS_BILLING_MAX_AMOUNT={self.amount} {self.currency.upper()} minor units")
            raise AmountAboveCeiling(
                f"{field_name}{f' ({what})' if what else ''} is {shown}, above the per-call ceiling of "
                f"{display(limit, currency)} ({source}): use a smaller amount, or have the operator raise the "
                "ceiling",
                param=field_name, amount=amount if amount < 10**30 else None, currency=currency.lower(),
                ceiling=limit)

    # --- prices ---------------------------------------------------------------------------------------------------

    @staticmethod
    def price_cost(price: Mapping[str, Any], quantity: int, field_name: str) -> int:
        """The most `quantity` of a Stripe price asks for in one call (minor units, rounded up); see the module."""
        what = f"price {price.get('id')}"
        if (price.get("recurring") or {}).get("usage_type") == "metered":
            return 0
        if price.get("billing_scheme") == "tiered":
            return _tiered_cost(price, quantity, what, field_name)
        custom = price.get("custom_unit_amount")
        if price.get("unit_amount") is None and price.get("unit_amount_decimal") is None and custom:
            maximum = custom.get("maximum") if isinstance(custom, Mapping) else None
            if maximum is None:
                raise AmountAboveCeiling(
                    f"{field_name}: {what} lets the customer choose any amount, which the ceiling cannot bound: set "
                    "a maximum on it (custom_unit_amount.maximum), or use a fixed price", param=field_name)
            return int(maximum) * quantity
        unit = _minor(price.get("unit_amount"), price.get("unit_amount_decimal"), what, field_name)
        return int((unit * quantity).to_integral_value(ROUND_CEILING))

    async def check_line_items(
        self, gateway: StripeGateway, line_items: Sequence[Mapping[str, Any]], field_name: str = "line_items"
    ) -> dict[str, int]:
        """Look up each line's price once and hold the total per currency against the ceiling; returns the totals.
        A missing price is a clear error naming the line."""
        totals: dict[str, int] = {}
        for index, item in enumerate(line_items):
            try:
                price = (await gateway.send(StripeRequest("get", f"/v1/prices/{item['price']}",
                                                          {"expand": ["tiers"]}))).data
            except StripeInvalidRequest as exc:
                if exc.details.get("stripe_code") != "resource_missing":
                    raise
                raise StripeInvalidRequest(
                    f"line_items[{index}].price: no such price {item['price']!r}: create one with create_price "
                    "(or run `aims-billing-mcp setup-stripe`), or pass an existing price id",
                    param=f"line_items[{index}][price]", **exc.details,
                ) from None
            quantity = int(item.get("quantity") or 1)
            currency = str(price["currency"]).lower()
            totals[currency] = totals.get(currency, 0) + self.price_cost(price, quantity, field_name)
        for currency, total in totals.items():
            self.check(total, currency, field_name, what="the total of its lines")
        return totals


def _tiered_cost(price: Mapping[str, Any], quantity: int, what: str, field_name: str) -> int:
    tiers = price.get("tiers")
    if not tiers:
        raise AmountAboveCeiling(f"{field_name}: {what} is tiered but its tiers were not returned, so the ceiling "
                                 "cannot bound it: use a per-unit price", param=field_name)

    def cost(tier: Mapping[str, Any], units: int) -> Decimal:
        flat = tier.get("flat_amount")
        flat_amount = (_minor(flat, tier.get("flat_amount_decimal"), what, field_name)
                       if flat is not None or tier.get("flat_amount_decimal") is not None else Decimal(0))
        unit = tier.get("unit_amount")
        unit_amount = (_minor(unit, tier.get("unit_amount_decimal"), what, field_name)
                       if unit is not None or tier.get("unit_amount_decimal") is not None else Decimal(0))
        return unit_amount * units + flat_amount

    total = Decimal(0)
    if price.get("tiers_mode") == "volume":
        tier = next((t for t in tiers if t.get("up_to") in (None, "inf") or quantity <= int(t["up_to"])), tiers[-1])
        total = cost(tier, quantity)
    else:  # graduated
        below = 0
        for tier in tiers:
            top = quantity if tier.get("up_to") in (None, "inf") else min(quantity, int(tier["up_to"]))
            if top <= below:
                break
            total += cost(tier, top - below)
            below = top
    return int(total.to_integral_value(ROUND_CEILING))
