"""Background work that outlives the request that asked for it (outbox deliveries), always on the server's loop.

Why a loop of its own: work may be asked for from another thread's loop (the embedded sandbox delivers its signed
webhooks from its own thread), and a task created there would be dropped with that loop; so work asked for
elsewhere is handed over to the loop bound at start-up. Work is keyed (an outbox row id): asking again for a key
still in flight does nothing, so "deliver everything pending" can be asked for as often as one likes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)


class Background:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def bind(self) -> None:
        """Run background work on the current loop (the server's; called at start-up)."""
        self._loop = asyncio.get_running_loop()

    def spawn(self, work: Iterable[tuple[str, Callable[[], Awaitable[None]]]]) -> None:
        """Start each (key, work) not already running; from any thread's loop."""
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop.is_closed():
            self._loop = loop
        items = list(work)
        if loop is self._loop:
            self._start(items)
            return
        try:
            self._loop.call_soon_threadsafe(self._start, items)
        except RuntimeError:  # the server's loop closed meanwhile (shutting down): the next start-up resumes it
            log.warning("background work not started, the server is shutting down: %s", [key for key, _ in items])

    def _start(self, items: list[tuple[str, Callable[[], Awaitable[None]]]]) -> None:
        for key, make in items:
            if key in self._tasks:
                continue
            task = asyncio.get_running_loop().create_task(_run(make))
            self._tasks[key] = task
            task.add_done_callback(lambda _done, key=key: self._tasks.pop(key, None))  # type: ignore[misc]

    async def stop(self) -> None:
        """Cancel what is still running (shutdown, after a grace period): it stays in its outbox for the next
        start-up, instead of being destroyed half-way with the loop."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """Wait for the work in flight, including work another thread has just handed over."""
        await asyncio.sleep(0)
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)


async def _run(make: Callable[[], Awaitable[None]]) -> None:
    try:
        await make()
    except Exception:  # work must not die silently: it stays in its outbox, resumed by the next kick or start-up
        log.exception("background work failed; it is retried at the next kick or start-up")
