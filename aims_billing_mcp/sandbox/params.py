"""Typed reading of decoded form params, with Stripe's validation errors.

Everything arrives as strings; each endpoint says which type a field has and gets a 400 that names
the full param path (``line_items[0][quantity]``) when the value does not parse.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from .errors import StripeError, invalid, missing, unknown

# Stripe's presentment currencies (lowercase ISO 4217), as listed in its "Invalid currency" error.
CURRENCIES: tuple[str, ...] = (
    "usd", "aed", "afn", "all", "amd", "ang", "aoa", "ars", "aud", "awg", "azn", "bam", "bbd",
    "bdt", "bgn", "bhd", "bif", "bmd", "bnd", "bob", "brl", "bsd", "bwp", "byn", "bzd", "cad",
    "cdf", "chf", "clp", "cny", "cop", "crc", "cve", "czk", "djf", "dkk", "dop", "dzd", "egp",
    "etb", "eur", "fjd", "fkp", "gbp", "gel", "gip", "gmd", "gnf", "gtq", "gyd", "hkd", "hnl",
    "htg", "huf", "idr", "ils", "inr", "isk", "jmd", "jod", "jpy", "kes", "kgs", "khr", "kmf",
    "krw", "kwd", "kyd", "kzt", "lak", "lbp", "lkr", "lrd", "lsl", "mad", "mdl", "mga", "mkd",
    "mmk", "mnt", "mop", "mur", "mvr", "mwk", "mxn", "myr", "mzn", "nad", "ngn", "nio", "nok",
    "npr", "nzd", "omr", "pab", "pen", "pgk", "php", "pkr", "pln", "pyg", "qar", "ron", "rsd",
    "rub", "rwf", "sar", "sbd", "scr", "sek", "sgd", "shp", "sle", "sos", "srd", "std", "szl",
    "thb", "tjs", "tnd", "top", "try", "ttd", "twd", "tzs", "uah", "ugx", "uyu", "uzs", "vnd",
    "vuv", "wst", "xaf", "xcd", "xof", "xpf", "yer", "zar", "zmw",
)
_CURRENCY_SET = frozenset(CURRENCIES)

ZERO_DECIMAL: frozenset[str] = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
     "xaf", "xof", "xpf"}
)


def check_currency(value: str, param: str = "currency") -> str:
    """Lowercase and validate a currency code like Stripe does."""
    cur = value.lower()
    if cur not in _CURRENCY_SET:
        raise invalid(
            param,
            f"Invalid currency: {value}. Stripe currently supports these currencies: "
            + ", ".join(CURRENCIES),
            code="parameter_invalid_string",
        )
    return cur


def check_url(value: str, param: str) -> str:
    """An absolute http(s) URL; Stripe's ``{CHECKOUT_SESSION_ID}`` template is allowed."""
    parts = urlsplit(value.replace("{CHECKOUT_SESSION_ID}", "x"))
    if parts.scheme not in ("http", "https") or not parts.netloc or " " in value:
        raise StripeError(400, "Not a valid URL", code="url_invalid", param=param)
    return value


class Params:
    """A view on one (possibly nested) params dict; ``prefix`` names it in errors."""

    def __init__(self, data: dict[str, Any], prefix: str = "") -> None:
        self.data = data
        self.prefix = prefix

    def name(self, key: str) -> str:
        """The full param path of ``key``, as Stripe reports it."""
        return f"{self.prefix}[{key}]" if self.prefix else key

    def allow(self, keys: Iterable[str]) -> None:
        """Refuse any key outside ``keys`` (``expand`` is always accepted and ignored)."""
        allowed = set(keys) | {"expand"}
        for key in self.data:
            if key not in allowed:
                raise unknown(self.name(key))

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        return self.data.get(key)

    def string(self, key: str, *, required: bool = False, choices: Iterable[str] | None = None) -> str | None:
        """A string; ``""`` counts as absent (the SDK's way to unset)."""
        value = self.data.get(key)
        if value is None or value == "":
            if required:
                raise missing(self.name(key))
            return None
        if not isinstance(value, str):
            raise invalid(self.name(key), f"Invalid string: {value!r}")
        if choices is not None:
            options = list(choices)
            if value not in options:
                raise invalid(
                    self.name(key),
                    f"Invalid {key}: must be one of {', '.join(options)}",
                )
        return value

    def req_str(self, key: str, choices: Iterable[str] | None = None) -> str:
        value = self.string(key, required=True, choices=choices)
        assert value is not None
        return value

    def integer(self, key: str, *, required: bool = False, minimum: int | None = None) -> int | None:
        """An integer (money is always integer minor units)."""
        value = self.string(key, required=required)
        if value is None:
            return None
        try:
            number = int(value, 10)
        except ValueError:
            raise invalid(
                self.name(key), f"Invalid integer: {value}", code="parameter_invalid_integer"
            ) from None
        if minimum is not None and number < minimum:
            raise invalid(
                self.name(key),
                f"Invalid {key}: must be greater than or equal to {minimum}",
                code="parameter_invalid_integer",
            )
        return number

    def boolean(self, key: str) -> bool | None:
        value = self.string(key)
        if value is None:
            return None
        if value in ("true", "false"):
            return value == "true"
        raise invalid(self.name(key), f"Invalid boolean: {value}", code="parameter_invalid_boolean")

    def set_booleans(self, obj: dict[str, Any], *keys: str) -> None:
        """Set each of these booleans that was given on ``obj``; one not given leaves its field alone."""
        for key in keys:
            value = self.boolean(key)
            if value is not None:
                obj[key] = value

    def string_filter(self, key: str, field: str | None = None, *,
                      choices: Iterable[str] | None = None) -> dict[str, str]:
        """A list filter on `field` (the param's own name by default) when the param is given, else none."""
        value = self.string(key, choices=choices)
        return {} if value is None else {field or key: value}

    def boolean_filter(self, key: str) -> dict[str, str]:
        """A boolean list filter as the store indexes it (``"true"``/``"false"``), or none when not given."""
        value = self.boolean(key)
        return {} if value is None else {key: "true" if value else "false"}

    def currency(self, key: str = "currency", *, required: bool = False) -> str | None:
        value = self.string(key, required=required)
        return None if value is None else check_currency(value, self.name(key))

    def url(self, key: str, *, required: bool = False) -> str | None:
        value = self.string(key, required=required)
        return None if value is None else check_url(value, self.name(key))

    def sub(self, key: str, *, required: bool = False) -> Params | None:
        """A nested hash such as ``recurring[...]``."""
        value = self.data.get(key)
        if value is None or value == "":
            if required:
                raise missing(self.name(key))
            return None
        if not isinstance(value, dict):
            raise invalid(self.name(key), f"Invalid object: {self.name(key)} must be a hash")
        return Params(value, self.name(key))

    def items(self, key: str, *, required: bool = False) -> list[Params]:
        """A list of hashes such as ``line_items[0][...]``, in index order."""
        value = self.data.get(key)
        if value is None or value == "":
            if required:
                raise missing(self.name(key))
            return []
        if not isinstance(value, dict) or not all(k.isdigit() for k in value):
            raise invalid(self.name(key), f"Invalid array: {self.name(key)} must be an array")
        out: list[Params] = []
        for index in sorted(value, key=int):
            item = value[index]
            name = f"{self.name(key)}[{len(out)}]"
            if not isinstance(item, dict):
                raise invalid(name, f"Invalid object: {name} must be a hash")
            out.append(Params(item, name))
        return out

    def strings(self, key: str) -> list[str]:
        """A list of strings such as ``lookup_keys[]``; a single plain value counts as one."""
        value = self.data.get(key)
        if value is None or value == "":
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            ordered = sorted(value, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
            return [str(value[k]) for k in ordered]
        raise invalid(self.name(key), f"Invalid array: {self.name(key)}")

    def metadata(self, current: dict[str, str] | None = None, key: str = "metadata") -> dict[str, str]:
        """Merge ``metadata[k]=v`` into ``current``: ``""`` unsets a key, ``metadata=""`` clears all."""
        result = dict(current or {})
        if key not in self.data:
            return result
        value = self.data[key]
        if value == "":
            return {}
        if not isinstance(value, dict):
            raise invalid(self.name(key), f"Invalid object: {self.name(key)} must be a hash")
        for k, v in value.items():
            if not isinstance(v, str):
                raise invalid(f"{self.name(key)}[{k}]", "Metadata values must be strings.")
            if v == "":
                result.pop(k, None)
            else:
                if len(k) > 40:
                    raise invalid(f"{self.name(key)}[{k}]", "Metadata keys can be at most 40 characters.")
                if len(v) > 500:
                    raise invalid(f"{self.name(key)}[{k}]", "Metadata values can be at most 500 characters.")
                result[k] = v
        if len(result) > 50:
            raise invalid(self.name(key), "Metadata can have at most 50 keys.")
        return result
