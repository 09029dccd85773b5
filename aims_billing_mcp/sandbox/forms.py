"""Decoding of Stripe's nested form encoding.

The SDK flattens params as ``a[b][0][c]=v`` (lists always indexed, ``a[]=x`` from other clients)
in POST bodies and GET query strings alike. This turns them back into nested dicts. Lists stay
dicts keyed by index strings here; :mod:`params` reads them as lists where a list is expected,
so ``metadata[0]=x`` remains a metadata key.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from .errors import StripeError

_SEGMENT = re.compile(r"\[([^\[\]]*)\]")

Form = dict[str, Any]


def split_key(key: str) -> list[str]:
    """``"a[b][0]"`` -> ``["a", "b", "0"]``; ``"a[]"`` -> ``["a", ""]``."""
    head, bracket, _rest = key.partition("[")
    if not bracket:
        return [key]
    tail = key[len(head):]
    segments = _SEGMENT.findall(tail)
    if "".join(f"[{s}]" for s in segments) != tail or not head:
        raise StripeError(400, f"Invalid parameter name: {key}", code="parameter_invalid_string", param=key)
    return [head, *segments]


def decode(body: str) -> Form:
    """Parse a urlencoded string into a nested dict of strings."""
    root: Form = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        segments = split_key(key)
        node: Form = root
        for i, seg in enumerate(segments):
            last = i == len(segments) - 1
            if seg == "" and i > 0:
                seg = str(len(node))  # "a[]" appends
            if last:
                node[seg] = value
                break
            child = node.get(seg)
            if not isinstance(child, dict):
                child = {}
                node[seg] = child
            node = child
    return root


def decode_json(data: Any) -> Form:
    """Turn a JSON body (used only by the sandbox control routes) into form-like strings."""
    if not isinstance(data, dict):
        raise StripeError(400, "Request body must be a JSON object.")

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return {str(i): conv(x) for i, x in enumerate(v)}
        if isinstance(v, bool):
            return "true" if v else "false"
        return "" if v is None else str(v)

    return {str(k): conv(v) for k, v in data.items()}
