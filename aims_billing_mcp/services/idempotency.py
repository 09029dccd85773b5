"""Exactly-once for mutating tools: a repeated call returns the first result instead of creating a second object.

A call is identified by (tool, owner, key). The key is the caller's `idempotency_key`, or, when none is given, one
derived from the arguments and a time bucket (the replay window), so an agent that simply retries a timed-out call
does not pay twice. The owner is the party the call acts for (the customer a checkout or portal session is for; ''
for the operator's own catalog calls): one party's key never blocks or replays another party's call. The stored
row holds a hash of the arguments: the same key with other arguments is refused, never silently replayed.
Stripe gets a key derived deterministically from (tool, owner, key), so even a crash between Stripe's answer and our
COMMIT replays on Stripe's side instead of creating a duplicate.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..errors import IdempotencyConflict, InvalidInput
from ..store import Store, Tx, dumps, utc_iso, utc_now
from ..store.idempotency import CallRecord, IdempotencyStore


def request_hash(tool: str, arguments: dict[str, Any]) -> str:
    return hashlib.sha256(dumps({"tool": tool, "arguments": arguments}).encode()).hexdigest()


@dataclass(frozen=True)
class CallKey:
    tool: str
    key: str
    request_hash: str
    explicit: bool
    owner: str = ""

    @property
    def scoped(self) -> str:
        """The key with its owner, for the Stripe idempotency key (NUL never occurs in a key: `key_for` refuses it)."""
        return f"{self.owner}\x00{self.key}" if self.owner else self.key


@dataclass(frozen=True)
class Outcome:
    response: dict[str, Any]
    replayed: bool
    request_id: str | None = None


class IdempotencyService:
    def __init__(self, store: Store, *, replay_window_seconds: int) -> None:
        self._store = store
        self._keys: IdempotencyStore = store.idempotency
        self._window = replay_window_seconds
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        # calls whose first result their own writer job stored (`record_in`): whether it was stored (False: another
        # call stored its result first); read and dropped by `run` once the call's execute returns
        self._stored_in_job: dict[tuple[str, str, str], bool] = {}

    def key_for(
        self, tool: str, arguments: dict[str, Any], idempotency_key: str | None, owner: str | None = None
    ) -> CallKey:
        """The call's key, scoped to `owner` (the customer it acts for; None or '' for the operator)."""
        digest = request_hash(tool, arguments)
        owner = owner or ""
        if idempotency_key is not None:
            if "\x00" in idempotency_key:
                raise InvalidInput("idempotency_key contains a NUL character: use printable text",
                                   param="idempotency_key")
            return CallKey(tool, idempotency_key, digest, explicit=True, owner=owner)
        bucket = int(time.time() // self._window) if self._window else time.time_ns()
        return CallKey(tool, f"auto:{digest[:32]}:{bucket}", digest, explicit=False, owner=owner)

    def find(self, call: CallKey) -> dict[str, Any] | None:
        """The stored first result for this call, or None; raises when the key was used with other arguments."""
        row = self._keys.find(call.tool, call.owner, call.key)
        if row is None and not call.explicit and self._window:
            # A retry just after a bucket boundary still finds the first call of the window.
            prefix, _, bucket = call.key.rpartition(":")
            since = utc_iso(time.time() - self._window)
            row = self._keys.find(call.tool, call.owner, f"{prefix}:{int(bucket) - 1}", since=since)
        if row is None:
            return None
        if row.request_hash != call.request_hash:
            raise IdempotencyConflict(
                f"idempotency_key {call.key!r} was already used for {call.tool} with other arguments: "
                "repeat the first call's arguments exactly to get its result, or use a new key for a new request",
                param="idempotency_key",
            )
        stored: dict[str, Any] = json.loads(row.response)
        return stored

    def record_in(self, tx: Tx, call: CallKey, response: dict[str, Any], request_id: str | None) -> bool:
        """Store the call's first result inside the writer job that records its effect (one transaction for both,
        instead of one more after it), from within `run`'s execute: the response must be the one execute returns.
        `run` then stores nothing more. False: another call stored its result first (`run` replays that one)."""
        inserted = self._keys.record(tx, CallRecord(call.tool, call.owner, call.key, call.request_hash,
                                                    dumps(response), request_id, utc_now()))
        self._stored_in_job[(call.tool, call.owner, call.key)] = inserted  # a redone job sets it again
        return inserted

    async def run(
        self, call: CallKey, execute: Callable[[], Awaitable[tuple[dict[str, Any], str | None]]]
    ) -> Outcome:
        """Replay the stored result, or execute once and store it in the same step that acknowledges it (or in
        execute's own writer job, through `record_in`)."""
        stored = self.find(call)
        if stored is not None:
            return Outcome(stored, replayed=True)
        ident = (call.tool, call.owner, call.key)
        lock = self._locks.setdefault(ident, asyncio.Lock())
        waited = lock.locked()  # a free lock is taken without yielding: nothing here ran since the look above
        try:
            async with lock:
                stored = self.find(call) if waited else None  # a concurrent twin may have finished while we waited
                if stored is not None:
                    return Outcome(stored, replayed=True)
                self._stored_in_job.pop(ident, None)
                try:
                    response, request_id = await execute()
                finally:
                    in_job = self._stored_in_job.pop(ident, None)
                if in_job is None:
                    record = CallRecord(call.tool, call.owner, call.key, call.request_hash, dumps(response),
                                        request_id, utc_now())
                    keys = self._keys
                    inserted = await self._store.write(lambda tx: keys.record(tx, record))
                else:
                    inserted = in_job
                if not inserted:  # another process stored it first: theirs is the first result
                    stored = self.find(call)
                    if stored is not None:
                        return Outcome(stored, replayed=True)
                return Outcome(response, replayed=False, request_id=request_id)
        finally:
            if not lock.locked():
                self._locks.pop((call.tool, call.owner, call.key), None)

