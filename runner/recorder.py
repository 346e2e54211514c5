"""One turn's events on their way to the log: batched, appended in order.

Chunks arrive far faster than a transaction commits (a fast model streams
hundreds a second; a group commit takes milliseconds), so a turn's events are
appended in batches: whatever arrived while the previous append was in
flight, at most `flush_seconds` after the first of them, or at once when
`flush_events` are waiting (CHATLOG_RUNNER_FLUSH_MS / _EVENTS). One append in
flight per turn keeps the turn's events in the order the model sent them; the
store's group commit then shares each transaction among every turn flushing
at that moment. Nothing is visible before its append commits.

Bounded: when `max_pending` events wait behind the append in flight (the
store is slower than the upstream), the turn stops reading the upstream until
that append returns and they go out in the next (`room()`); TCP then holds
the model back. A turn keeps at most twice `max_pending` events in memory,
and its appends stay that size, whatever the two speeds.

Measuring (`chatlog bench`'s runner section only): with CHATLOG_RUNNER_TRACE_FILE
set, every recorder of the process notes when each batch of events was added
(the chunk that yielded them had just been read and translated) and when the
append that carried them returned (after COMMIT), and the process keeps a
histogram of those delays, written to that file as JSON whenever its last open
recorder ends. Unset (always, outside the bench), a recorder keeps no
timestamps and the only cost is one `is None` test per add and per flush.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time

TRACE_ENV = "CHATLOG_RUNNER_TRACE_FILE"
TRACE_BINS_PER_OCTAVE = 16  # histogram bins: about 4.4 % wide


class _Trace:
    """Chunk received -> committed, for every event of every recorder of this
    process: a cumulative histogram of microseconds, bin
    floor(log2(us) * TRACE_BINS_PER_OCTAVE)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.bins: dict[int, int] = {}
        self.events = 0
        self.appends = 0
        self.open = 0

    def committed(self, added: list[tuple[float, int]]) -> None:
        done = time.monotonic()
        bins = self.bins
        for at, n in added:
            b = math.floor(math.log2(max(1.0, (done - at) * 1e6)) * TRACE_BINS_PER_OCTAVE)
            bins[b] = bins.get(b, 0) + n
            self.events += n
        self.appends += 1

    def ended(self, _task: asyncio.Task) -> None:
        self.open -= 1
        if self.open == 0:
            data = {"events": self.events, "appends": self.appends, "bins_per_octave": TRACE_BINS_PER_OCTAVE,
                    "bins": {str(b): n for b, n in sorted(self.bins.items())}}
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)


_trace: _Trace | None = _Trace(os.environ[TRACE_ENV]) if os.environ.get(TRACE_ENV) else None


def _wake_up(wake: asyncio.Future | None) -> None:
    if wake is not None and not wake.done():
        wake.set_result(None)


class Recorder:
    """One turn's events on their way to the log: batched, appended in order,
    one append in flight at a time. `add` never waits; a producer awaits
    `room()` before reading more, which returns at once unless `max_pending`
    events wait."""

    def __init__(self, append, flush_seconds: float, flush_events: int, max_pending: int | None = None) -> None:
        self._append = append
        self.flush_seconds = flush_seconds
        self.flush_events = flush_events
        self.max_pending = max_pending or 16 * flush_events
        self._room = asyncio.Event()
        self._room.set()
        self.pending: list[tuple[str, dict]] = []
        self.last_seq = 0
        self.error: BaseException | None = None
        self._has = asyncio.Event()
        self._wake: asyncio.Future | None = None  # the flush wait, ended early by `flush_events` or close()
        self._closing = False
        self._added: list[tuple[float, int]] | None = None  # (when, how many events): measuring only
        self._task = asyncio.create_task(self._run())
        if _trace is not None:
            self._added = []
            _trace.open += 1
            self._task.add_done_callback(_trace.ended)

    def add(self, events: list[tuple[str, dict]]) -> None:
        if self.error is not None:
            raise self.error
        if events:
            self.pending.extend(events)
            if self._added is not None:
                self._added.append((time.monotonic(), len(events)))
            self._has.set()
            if len(self.pending) >= self.flush_events:
                _wake_up(self._wake)
                if len(self.pending) >= self.max_pending:
                    self._room.clear()

    async def room(self) -> None:
        """Return when fewer than `max_pending` events wait (at once, unless
        the store is behind); raise what a failed append raised."""
        if not self._room.is_set():
            await self._room.wait()
        if self.error is not None:
            raise self.error

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._has.wait()
            if not self._closing and len(self.pending) < self.flush_events:
                # a timer and a future: asyncio.wait_for would make a task per flush
                self._wake = loop.create_future()
                timer = loop.call_later(self.flush_seconds, _wake_up, self._wake)
                try:
                    await self._wake
                finally:
                    timer.cancel()
                    self._wake = None
            batch, self.pending = self.pending, []
            self._room.set()
            added = self._added
            if added is not None:
                self._added = []
            self._has.clear()
            if batch:
                try:
                    self.last_seq = (await self._append(batch)).last_seq
                except BaseException as exc:
                    self.error = exc
                    self._room.set()  # a producer waiting for room learns of it
                    return
                if added is not None:
                    _trace.committed(added)
            if self._closing and not self.pending:
                return

    async def close(self) -> int:
        """Append what is left; the seq of the last event written. Raises what an append raised."""
        self._closing = True
        self._has.set()
        _wake_up(self._wake)
        await asyncio.wait({self._task})
        if self.error is not None:
            raise self.error
        return self.last_seq

    def discard(self) -> None:
        self._task.cancel()
