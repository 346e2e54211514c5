"""One turn's events on their way to the log: batched, appended in order.

Chunks arrive far faster than a transaction commits (a fast model streams
hundreds a second; a group commit takes milliseconds), so a turn's events are
appended in batches: whatever arrived while the previous append was in
flight, at most `flush_seconds` after the first of them, or at once when
`flush_events` are waiting (CHATLOG_RUNNER_FLUSH_MS / _EVENTS). One append in
flight per turn keeps the turn's events in the order the model sent them; the
store's group commit then shares each transaction among every turn flushing
at that moment. Nothing is visible before its append commits.
"""

from __future__ import annotations

import asyncio


class Recorder:
    """One turn's events on their way to the log: batched, appended in order,
    one append in flight at a time. `add` never waits."""

    def __init__(self, append, flush_seconds: float, flush_events: int) -> None:
        self._append = append
        self.flush_seconds = flush_seconds
        self.flush_events = flush_events
        self.pending: list[tuple[str, dict]] = []
        self.last_seq = 0
        self.error: BaseException | None = None
        self._has = asyncio.Event()
        self._full = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run())

    def add(self, events: list[tuple[str, dict]]) -> None:
        if self.error is not None:
            raise self.error
        if events:
            self.pending.extend(events)
            self._has.set()
            if len(self.pending) >= self.flush_events:
                self._full.set()

    async def _run(self) -> None:
        while True:
            await self._has.wait()
            if not self._closing and len(self.pending) < self.flush_events:
                try:
                    await asyncio.wait_for(self._full.wait(), self.flush_seconds)
                except TimeoutError:
                    pass
            batch, self.pending = self.pending, []
            self._has.clear()
            self._full.clear()
            if batch:
                try:
                    self.last_seq = (await self._append(batch)).last_seq
                except BaseException as exc:
                    self.error = exc
                    return
            if self._closing and not self.pending:
                return

    async def close(self) -> int:
        """Append what is left; the seq of the last event written. Raises what an append raised."""
        self._closing = True
        self._has.set()
        self._full.set()
        await asyncio.wait({self._task})
        if self.error is not None:
            raise self.error
        return self.last_seq

    def discard(self) -> None:
        self._task.cancel()
