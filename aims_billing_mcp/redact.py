"""Secret redaction for everything that leaves the process: tool output, audit rows, logs, error messages and what
the CLI prints.

Three nets, because any one alone leaks:
- fields whose *name* says secret are masked whatever their value (arguments in audit rows);
- values whose *shape* is a Stripe or webhook secret (`sk_`/`rk_` live/test, `whsec_`) are masked wherever they
  appear in a string, even glued to a prefix (`pi_sk_test_...`) or inside a URL-encoded body;
- the configured secrets (every `SecretStr` setting: settings register them on load) are masked by *value*, so an
  ACP API key or a bearer token, which have no recognisable shape, never show either.

`redact_text` is the one function every printer uses (logs, errors, tool results, the CLI's streams);
`mask_secret` the one way a single secret is shown (kind and last 4 characters); `display` how a setting is shown.
`audit_arguments` is the one shape of a call's arguments in `audit_log`: redacted, then bounded.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

from pydantic import SecretStr

SECRET_FIELD = re.compile(r"(secret|password|token|api_?key|authorization|cvc|card_?number)", re.IGNORECASE)
# SECRET_FIELD's matches, spelt out: in ASCII text, lowered, it matches exactly where one of these stands
_FIELD_WORDS = ("secret", "password", "token", "apikey", "api_key", "authorization", "cvc", "cardnumber",
                "card_number")
# No `\b` before the kind: `_` is a word character, so `pi_sk_test_...` would escape it. At least 8 characters
# after the kind: real keys have dozens, and an already masked value (`sk_test_****abcd`) is not matched again.
SECRET_VALUE = re.compile(r"((?:sk|rk)_(?:live|test)_|whsec_)([A-Za-z0-9_]{8,})")
_SHAPE_HINTS = ("_test_", "_live_", "whsec_")  # a cheap substring test before any regex runs
MIN_CONFIGURED_LENGTH = 8  # shorter configured values are not masked by value (they would blank common words)

_configured: set[str] = set()
_configured_pattern: re.Pattern[str] | None = None
_hints: tuple[str, ...] = _SHAPE_HINTS  # the shape hints, then every configured form
_hints_pattern = re.compile("|".join(map(re.escape, _hints)))  # any of them
LONG_TEXT = 512  # characters from which `in` per hint beats one regex over all of them
_public: set[str] = set()  # secret-shaped values published on purpose (the embedded sandbox's fixed credentials)


def keep_public(values: Iterable[str]) -> None:
    """Never mask these: credentials that are published on purpose (the sandbox's key, in the README)."""
    _public.update(values)


def register_secrets(values: Iterable[str]) -> None:
    """Mask these values (and their URL-encoded and JSON-escaped forms, ASCII-escaped or not: json.dumps and
    pydantic-core, which writes tool results, differ there) wherever they appear from now on."""
    global _configured_pattern, _hints, _hints_pattern
    forms = set()
    for value in values:
        if len(value) >= MIN_CONFIGURED_LENGTH:
            forms |= {value, quote_plus(value), quote(value, safe=""), json.dumps(value)[1:-1],
                      json.dumps(value, ensure_ascii=False)[1:-1]}
    if forms <= _configured:
        return
    _configured.update(forms)
    ordered = sorted(_configured, key=len, reverse=True)  # the longest form wins where one contains another
    _configured_pattern = re.compile("|".join(re.escape(form) for form in ordered))
    _hints = _SHAPE_HINTS + tuple(ordered)
    _hints_pattern = re.compile("|".join(map(re.escape, _hints)))


def forget_secrets() -> None:
    """Forget every registered and public value (tests: one test's settings must not mask the next one's output)."""
    global _configured_pattern, _hints, _hints_pattern
    _configured.clear()
    _public.clear()
    _configured_pattern = None
    _hints = _SHAPE_HINTS
    _hints_pattern = re.compile("|".join(map(re.escape, _hints)))


def may_hold_secret(text: str) -> bool:
    """True when `text` contains a substring a secret would need: the cheap test before the regex pass. One search
    for any of the hints in a short text; in a long one (a tool's result: tens of KB) a substring search per hint,
    which skips ahead where the regex tries every position that starts like a hint (half the time at 35 KB)."""
    if len(text) < LONG_TEXT:
        return _hints_pattern.search(text) is not None
    return any(hint in text for hint in _hints)


def mask_secret(value: str) -> str:
    """Keep the kind and the last 4 characters, so an operator can tell which key it was."""
    match = SECRET_VALUE.fullmatch(value)
    if match:
        return f"{match.group(1)}****{match.group(2)[-4:]}"
    return "****" + value[-4:] if len(value) > 12 else "****"


def redact_text(text: str) -> str:
    """`text` with every configured secret and every Stripe-secret shape masked, wherever it stands."""
    if not may_hold_secret(text):
        return text
    if _configured_pattern is not None:
        text = _configured_pattern.sub(lambda m: mask_secret(m.group(0)), text)
    return SECRET_VALUE.sub(_mask_shape, text)


def _mask_shape(match: re.Match[str]) -> str:
    if match.group(0) in _public:
        return match.group(0)
    return f"{match.group(1)}****{match.group(2)[-4:]}"


def redact(value: Any, key: str | None = None) -> Any:
    """Return a copy of `value` (JSON-like) with secrets masked; idempotency keys are not secrets."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if isinstance(value, SecretStr):
        return mask_secret(value.get_secret_value())
    if isinstance(value, str):
        if key is not None and SECRET_FIELD.search(key) and key != "idempotency_key":
            return mask_secret(value)
        return redact_text(value)
    return value


def redact_values(value: Any) -> Any:
    """`value` (JSON-like) with secrets masked in every string, keys included: for results, whose field names
    are ours and say nothing about a secret, but whose values may echo one (a description, a Stripe message)."""
    if isinstance(value, dict):
        return {redact_text(str(k)): redact_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_values(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^@\s/]+@")


def display(value: Any) -> str:
    """A setting's value as an operator sees it (doctor): secrets masked, URL passwords hidden, unset as `-`."""
    if isinstance(value, SecretStr):
        return mask_secret(value.get_secret_value())
    if isinstance(value, list | tuple):
        return ", ".join(display(item) for item in value) or "-"
    if value is None or value == "":
        return "-"
    return redact_text(_URL_PASSWORD.sub(r"\1****@", str(value)))


# --- audit rows -------------------------------------------------------------------------------------------------
# A refused call's arguments are stored too, so an agent (or an attacker) controls their size: bound them.

AUDIT_MAX_STRING = 4096  # characters kept of one string value; the original length is noted
AUDIT_MAX_ITEMS = 64  # items of one list, keys of one object
AUDIT_MAX_DEPTH = 8  # levels of nesting
AUDIT_MAX_KEY = 256  # characters of one object key
AUDIT_MAX_ROW = 32 * 1024  # characters of the stored JSON; beyond it only its head is kept


def audit_arguments(arguments: Any) -> str:
    """The JSON stored in `audit_log.arguments`: secrets masked (by field name, shape and value), every string
    cut to AUDIT_MAX_STRING characters with its original length, lists and objects to AUDIT_MAX_ITEMS, nesting to
    AUDIT_MAX_DEPTH, and the whole row to AUDIT_MAX_ROW characters (still valid JSON)."""
    text = json.dumps(_bounded(arguments, None, 0), sort_keys=True, separators=(",", ":"), default=str)
    if len(text) <= AUDIT_MAX_ROW:
        return text
    return json.dumps({"truncated_arguments": text[:AUDIT_MAX_ROW - 100], "original_length": len(text)},
                      separators=(",", ":"))


_SCALARS = (str, int, float, bool, type(None))


def _masks_nothing(objects: Iterable[Any]) -> bool:
    """Whether masking provably changes nothing in these objects of plain values (the events of a batch, say):
    each a dict of at most AUDIT_MAX_ITEMS names, each value a plain scalar, and none of the names or texts holds a
    secret's shape or a configured value, or says secret (a name that does masks its value). Their texts are then
    only bounded, not passed through the masks one by one (a batch's audit row: a few hundred texts, most of the
    call's audit cost). Joined, a hint found across two texts only sends them the long way."""
    texts = []
    for value in objects:
        if type(value) is not dict or len(value) > AUDIT_MAX_ITEMS:
            return False
        for key, item in value.items():
            if type(key) is not str or type(item) not in _SCALARS:
                return False
            texts.append(key)
            if type(item) is str:
                texts.append(item)
    joined = "\x00".join(texts)
    return not may_hold_secret(joined) and not _says_secret(joined)


def _says_secret(text: str) -> bool:
    """`SECRET_FIELD.search(text)`, without the regex on ASCII text: a case-insensitive alternation tries every
    position (a third of a millisecond on a batch's joined texts), a substring search of the lowered text does
    not. Other text (whose case folding reaches beyond ASCII) takes the regex."""
    if not text.isascii():
        return SECRET_FIELD.search(text) is not None
    lowered = text.lower()
    return any(word in lowered for word in _FIELD_WORDS)


def _plain_bounded(value: dict[str, Any]) -> dict[str, Any]:
    """`_bounded` of an object `_masks_nothing` passed (at most AUDIT_MAX_ITEMS names, each value a plain scalar),
    in one loop: names and texts cut to their limits, integers as `_bounded` keeps them."""
    out: dict[str, Any] = {}
    for name, item in value.items():
        kind = type(item)
        if kind is str:
            item = _cut(item, AUDIT_MAX_STRING, len(item))
        elif kind is int:
            item = _bounded_int(item)
        out[_cut(name, AUDIT_MAX_KEY, len(name))] = item
    return out


def _bounded_int(value: int) -> int | str:
    """An integer as stored (json cannot write one of more than 4,300 digits)."""
    return value if value.bit_length() <= 256 else f"[an integer of {value.bit_length():,} bits]"


def _cut(text: str, limit: int, original: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…[truncated: {original:,} characters]"


def _bounded(value: Any, key: str | None, depth: int) -> Any:
    kind = type(value)
    if kind is str:
        masked = redact(value, key)
        return masked if len(masked) <= AUDIT_MAX_STRING else _cut(masked, AUDIT_MAX_STRING, len(value))
    if kind is dict:
        if depth >= AUDIT_MAX_DEPTH:
            return f"[nested deeper than {AUDIT_MAX_DEPTH} levels: not stored]"
        if _masks_nothing((value,)):
            return _plain_bounded(value)
        out: dict[str, Any] = {}
        for index, (k, v) in enumerate(value.items()):
            if index == AUDIT_MAX_ITEMS:
                out["…"] = f"[{len(value) - AUDIT_MAX_ITEMS:,} more keys not stored]"
                break
            name = k if type(k) is str else str(k)
            shown = _cut(redact_text(name), AUDIT_MAX_KEY, len(name)) if len(name) > AUDIT_MAX_KEY else name
            out[redact_text(shown)] = _bounded(v, name, depth + 1)  # the whole name says whether to mask
        return out
    if kind is list or kind is tuple:
        if depth >= AUDIT_MAX_DEPTH:
            return f"[nested deeper than {AUDIT_MAX_DEPTH} levels: not stored]"
        head = value[:AUDIT_MAX_ITEMS]
        kept: list[Any]
        if depth + 1 < AUDIT_MAX_DEPTH and head and _masks_nothing(head):  # a list of plain objects: a batch
            kept = [_plain_bounded(v) for v in head]
        else:
            kept = [_bounded(v, key, depth + 1) for v in head]
        if len(value) > AUDIT_MAX_ITEMS:
            kept.append(f"[{len(value) - AUDIT_MAX_ITEMS:,} more items not stored]")
        return kept
    if kind is int:
        return _bounded_int(value)
    if value is None or kind is bool or kind is float:
        return value
    if isinstance(value, dict):  # subclasses as their base
        return _bounded(dict(value), key, depth)
    if isinstance(value, list | tuple):
        return _bounded(list(value), key, depth)
    if isinstance(value, int):
        return _bounded(int(value), key, depth)
    return _bounded(str(value), key, depth)


# --- logs and streams -------------------------------------------------------------------------------------------


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


class RedactingStream:
    """A text stream that masks secrets in what is written to it; everything else (`buffer`, `fileno`, the
    encoding) is the wrapped stream's, so a protocol written to `buffer` (MCP over stdio) passes untouched."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def redacted_streams() -> Iterator[None]:
    """While inside, whatever is printed to stdout or stderr has its secrets masked."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(saved[0]), RedactingStream(saved[1])  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
