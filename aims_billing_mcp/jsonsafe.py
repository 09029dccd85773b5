"""The one parser for JSON from outside (HTTP bodies, payment headers, stdio frames, webhook events).

`json.loads` recurses in C once per nesting level, and an imported library (py_ecc, under x402's EVM support) raises
Python's recursion limit to 100,000 at import: a body of a few hundred KB nested arrays then overflows the C stack and
the whole server dies with SIGSEGV, not a RecursionError. pydantic-core's Rust parser stops at 200 levels with a
ValueError, refuses NaN/Infinity (never money), lone surrogates (cannot be stored as UTF-8) and numbers beyond its
range, and is faster than the standard library's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import pydantic_core

LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def loads(data: str | bytes | bytearray) -> Any:
    """Parse untrusted JSON; every refusal is a ValueError saying what and where (line and column)."""
    return pydantic_core.from_json(data, allow_inf_nan=False)


@dataclass(frozen=True)
class Unreadable:
    """Where an already decoded value cannot be stored or answered: `parts` is the path (keys and indexes) to it;
    `kind` says why: nested deeper than allowed (the path is cut at the limit), a lone surrogate in a text or in
    a field name (it has no UTF-8 encoding)."""

    parts: list[Any]
    kind: Literal["too_deep", "surrogate", "surrogate_key"]


def first_unreadable(value: Any, max_depth: int) -> Unreadable | None:
    """The first place in `value` (decoded JSON, or tool arguments an in-process client passed without JSON) that
    nests deeper than `max_depth` or holds a lone surrogate; None when there is none. Walked without recursion:
    first without keeping paths (every call's arguments are walked, a batch of events a thousand values), then,
    the rare time something is found, again to name where."""
    return None if _readable(value, max_depth) else _located(value, max_depth)


def _located(value: Any, max_depth: int) -> Unreadable | None:
    """`first_unreadable`'s answer, found by a walk that keeps each value's path."""
    stack: list[tuple[Any, list[Any]]] = [(value, [])]
    while stack:
        item, parts = stack.pop()
        if len(parts) > max_depth:
            return Unreadable(parts[:max_depth], "too_deep")
        if isinstance(item, str):
            if not item.isascii() and LONE_SURROGATE.search(item):
                return Unreadable(parts, "surrogate")
        elif isinstance(item, dict):
            for key, sub in item.items():
                if isinstance(key, str) and not key.isascii() and LONE_SURROGATE.search(key):
                    return Unreadable([*parts, key], "surrogate_key")
                stack.append((sub, [*parts, key]))
        elif isinstance(item, list | tuple):
            stack.extend((sub, [*parts, index]) for index, sub in enumerate(item))
    return None


def _readable(value: Any, max_depth: int) -> bool:
    """Whether `first_unreadable` finds nothing: the same checks, each text and nesting level looked at once, with
    no path kept (plain str, int, float, bool and None are checked where they stand, not stacked)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and LONE_SURROGATE.search(item):
                return False
            continue
        if isinstance(item, dict):
            children: Any = item.values()
            for key in item:
                if isinstance(key, str) and not key.isascii() and LONE_SURROGATE.search(key):
                    return False
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth >= max_depth:  # its children nest deeper than allowed
            if children:
                return False
            continue
        for sub in children:
            kind = type(sub)
            if kind is str:
                if not sub.isascii() and LONE_SURROGATE.search(sub):
                    return False
            elif kind is not int and kind is not float and kind is not bool and sub is not None:
                stack.append((sub, depth + 1))
    return True
