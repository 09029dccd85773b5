"""Fault injection: make the next requests fail or slow down, to test clients' retry logic.

``before`` faults answer the error without running the request (like a 429 or a 500 at the
front door); ``after`` faults run it, store the idempotent result, then answer the error (like a
response lost on the wire), so a retry with the same Idempotency-Key replays the first result.

A ``gate`` (an async callable, e.g. one that sets an event and waits for another) holds the request at that
point, before running it (``before``) or after running it and before answering (``after``): tests use it to
interleave two calls deterministically (an in-process sandbox only: the gate runs on the caller's loop).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

Mode = Literal["before", "after"]
Gate = Callable[[], Awaitable[None]]


@dataclass
class Fault:
    """One armed fault; ``remaining`` counts the requests it still applies to."""

    status: int | None
    remaining: int
    mode: Mode
    delay_ms: int
    path_prefix: str | None
    gate: Gate | None = None

    def matches(self, path: str) -> bool:
        return self.path_prefix is None or path.startswith(self.path_prefix)


class FaultInjector:
    """A thread-safe queue of faults, consumed one request at a time in the order injected."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def inject(
        self,
        status: int | None = 500,
        count: int = 1,
        mode: Mode = "before",
        delay_ms: int = 0,
        path_prefix: str | None = None,
        gate: Gate | None = None,
    ) -> Fault:
        """Arm a fault for the next ``count`` matching requests.

        ``status`` must be a 4xx/5xx code, or None for a pure delay (``delay_ms`` > 0).
        """
        if status is not None and not 400 <= status <= 599:
            raise ValueError(f"fault status must be 4xx or 5xx, not {status}")
        if status is None and delay_ms <= 0 and gate is None:
            raise ValueError("a fault needs a status, a positive delay_ms or a gate")
        if mode not in ("before", "after"):
            raise ValueError(f"fault mode must be 'before' or 'after', not {mode!r}")
        if count < 1 or delay_ms < 0:
            raise ValueError("count must be >= 1 and delay_ms >= 0")
        fault = Fault(status, count, mode, delay_ms, path_prefix, gate)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def active(self) -> list[Fault]:
        with self._lock:
            return [Fault(f.status, f.remaining, f.mode, f.delay_ms, f.path_prefix, f.gate) for f in self._faults]

    def take(self, path: str) -> Fault | None:
        """Consume one use of the first fault matching ``path`` (None when nothing applies)."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(path):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return Fault(fault.status, 1, fault.mode, fault.delay_ms, fault.path_prefix, fault.gate)
        return None
