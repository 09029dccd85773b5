"""Value types shared by tools and services: validated inputs (ids, URLs, currencies, amounts, line items) and what
every Stripe-mutating result carries (`MutationMeta`, a dry run's request). Each service's own results live beside
it (the catalog's in services/catalog.py).

Validators raise messages that name the rule and the fix; pydantic prefixes them with the field name, so an agent
reads e.g. "customer: Value error, must be a Stripe customer id starting with 'cus_' ...".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

# Stripe's presentment currencies (ISO 4217, lowercase). Zero-decimal ones are listed separately for display.
CURRENCIES = frozenset(
    """
    usd aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd bob brl bsd bwp byn bzd cad
    cdf chf clp cny cop crc cve czk djf dkk dop dzd egp etb eur fjd fkp gbp gel gip gmd gnf gtq gyd hkd hnl
    htg huf idr ils inr isk jmd jod jpy kes kgs khr kmf krw kwd kyd kzt lak lbp lkr lrd lsl mad mdl mga mkd
    mmk mnt mop mur mvr mwk mxn myr mzn nad ngn nio nok npr nzd omr pab pen pgk php pkr pln pyg qar ron rsd
    rub rwf sar sbd scr sek sgd shp sle sos srd std szl thb tjs tnd top try ttd twd tzs uah ugx uyu uzs vnd
    vuv wst xaf xcd xof xpf yer zar zmw
    """.split()
)
ZERO_DECIMAL = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
THREE_DECIMAL = frozenset("bhd jod kwd omr tnd".split())


def format_amount(amount: int, currency: str) -> str:
    """Minor units to a display string with integer arithmetic only: 1999 usd -> '19.99 USD'."""
    digits = 0 if currency in ZERO_DECIMAL else 3 if currency in THREE_DECIMAL else 2
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), 10**digits) if digits else (abs(amount), 0)
    text = f"{whole:,}" + (f".{frac:0{digits}d}" if digits else "")
    return f"{sign}{text} {currency.upper()}"


def _id_check(prefix: str, what: str, hint: str) -> Callable[[str], str]:
    """An id check that names the expected prefix and how to get a valid id when the prefix is wrong."""

    def check(value: str) -> str:
        value = value.strip()
        if not value.startswith(prefix) or len(value) <= len(prefix):
            raise ValueError(f"must be a Stripe {what} id starting with '{prefix}' (got {value[:40]!r}): {hint}")
        if not all(c.isalnum() or c == "_" for c in value):
            raise ValueError(f"{value[:40]!r} is not a Stripe id: ids are letters, digits and '_' only")
        return value

    return check


def _id_schema(prefix: str) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "pattern": f"^{prefix}[A-Za-z0-9_]+$"})


CustomerId = Annotated[
    str, AfterValidator(_id_check("cus_", "customer", "create one with create_customer")), _id_schema("cus_")
]
PriceId = Annotated[
    str, AfterValidator(_id_check("price_", "price", "create one with create_price")), _id_schema("price_")
]
ProductId = Annotated[
    str, AfterValidator(_id_check("prod_", "product", "create one with create_product")), _id_schema("prod_")
]


def _check_url(value: str) -> str:
    # Braces are kept as typed: Stripe expands {CHECKOUT_SESSION_ID} in success URLs.
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or " " in value.strip():
        raise ValueError(f"must be an absolute http(s) URL such as https://example.com/done (got {value[:80]!r})")
    return value.strip()


Url = Annotated[
    str, AfterValidator(_check_url), WithJsonSchema({"type": "string", "format": "uri", "maxLength": 2048})
]


def _check_currency(value: str) -> str:
    code = value.strip().lower()
    if code not in CURRENCIES:
        raise ValueError(f"{value!r} is not a currency Stripe supports: use a 3-letter ISO code such as 'usd' or 'eur'")
    return code


Currency = Annotated[
    str,
    AfterValidator(_check_currency),
    WithJsonSchema({"type": "string", "minLength": 3, "maxLength": 3, "description": "ISO 4217 code, e.g. usd"}),
]

# An agent's id, as every tool and service accepts it (wallets, payment sessions, x402, ACP metadata.agent_id).
AGENT_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
AgentId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")]

IdempotencyKey = Annotated[
    str | None,
    Field(
        min_length=1,
        max_length=255,
        description="Optional. Repeat a call with the same key to get the first result back (replayed: true) "
        "instead of a second object; the same key with other arguments is refused.",
    ),
]
DryRun = Annotated[
    bool, Field(description="true: return the exact Stripe request this call would send, sending nothing")
]


def _check_metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 50:
        raise ValueError(f"has {len(value)} keys: Stripe allows at most 50")
    for key, item in value.items():
        if not key or len(key) > 40 or "[" in key or "]" in key:
            raise ValueError(f"key {key[:50]!r} must be 1-40 characters without square brackets")
        if len(item) > 500:
            raise ValueError(f"value of {key!r} is {len(item)} characters: Stripe allows at most 500")
    return value


Metadata = Annotated[
    dict[str, str] | None,
    AfterValidator(lambda v: _check_metadata(v) if v is not None else v),
    Field(description="Up to 50 string key/value pairs stored on the Stripe object"),
]


# --- inputs with structure -----------------------------------------------------------------------------------------


class LineItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    price: PriceId = Field(description="Price id (price_...)")
    quantity: int = Field(default=1, ge=1, le=999_999, description="Units of this price")


class Recurring(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interval: Literal["day", "week", "month", "year"] = Field(description="Billing frequency")
    interval_count: int = Field(default=1, ge=1, le=365, description="Intervals between bills (at most one year)")


# --- outputs --------------------------------------------------------------------------------------------------------


class StripeRequestPreview(BaseModel):
    """What a dry run would have sent."""

    method: str
    url: str
    params: dict[str, Any]
    body: str | None = None
    idempotency_key: str | None = None
    stripe_version: str


class MutationMeta(BaseModel):
    replayed: bool = Field(default=False, description="true when this is the stored first result of a repeated call")
    dry_run: bool = Field(default=False, description="true when nothing was sent; see request")
    request: StripeRequestPreview | None = Field(default=None, description="dry runs only: the request not sent")
