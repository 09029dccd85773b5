"""Secret redaction for everything that leaves the process: tool output, audit rows, logs and error messages.

Two nets, because either alone leaks: fields whose *name* says secret are masked whatever their value, and values
whose *shape* is a Stripe or webhook secret are masked wherever they appear (inside an error message, say).
"""

from __future__ import annotations

import logging
import re
from typing import Any

SECRET_FIELD = re.compile(r"(secret|password|token|api_?key|authorization|cvc|card_?number)", re.IGNORECASE)
SECRET_VALUE = re.compile(r"\b((?:sk|rk)_(?:live|test)_|whsec_)([A-Za-z0-9_]+)")


def mask_secret(value: str) -> str:
    """Keep the kind and the last 4 characters, so an operator can tell which key it was."""
    match = SECRET_VALUE.search(value)
    if match and match.start() == 0 and match.end() == len(value):
        return f"{match.group(1)}****{match.group(2)[-4:]}"
    return "****" + value[-4:] if len(value) > 8 else "****"


def redact_text(text: str) -> str:
    return SECRET_VALUE.sub(lambda m: f"{m.group(1)}****{m.group(2)[-4:]}", text)


def redact(value: Any, key: str | None = None) -> Any:
    """Return a copy of `value` (JSON-like) with secrets masked; idempotency keys are not secrets."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if key is not None and SECRET_FIELD.search(key) and key != "idempotency_key":
            return mask_secret(value)
        return redact_text(value)
    return value


class RedactingFilter(logging.Filter):
    """Masks secrets in every log record, including those the SDKs emit (their debug lines carry headers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction() -> None:
    """Attach the filter to every handler of the root logger, so no library's record escapes unmasked."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
