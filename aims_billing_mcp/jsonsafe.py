"""The one parser for JSON from outside (HTTP bodies, payment headers, stdio frames, webhook events).

`json.loads` recurses in C once per nesting level, and an imported library (py_ecc, under x402's EVM support) raises
Python's recursion limit to 100,000 at import: a body of a few hundred KB nested arrays then overflows the C stack and
the whole server dies with SIGSEGV, not a RecursionError. pydantic-core's Rust parser stops at 200 levels with a
ValueError, refuses NaN/Infinity (never money), lone surrogates (cannot be stored as UTF-8) and numbers beyond its
range, and is faster than the standard library's.
"""

from __future__ import annotations

from typing import Any

import pydantic_core


def loads(data: str | bytes | bytearray) -> Any:
    """Parse untrusted JSON; every refusal is a ValueError saying what and where (line and column)."""
    return pydantic_core.from_json(data, allow_inf_nan=False)
