"""Live wake-ups: one LISTEN connection per process, fanned out to local readers.

Every append's transaction sends `NOTIFY chatlog_events '<conversation>:<first>:<last>'`,
delivered only at COMMIT, so a wake-up never announces an uncommitted event.

Each followed conversation has one `Tail`, shared by all readers of it in this
process: on a wake-up the tail reads the new events from the store ONCE and
keeps the most recent ones in a bounded buffer; readers take what they need
from the buffer. A reader that has fallen behind the buffer reads from the
store itself, so a slow reader never holds memory or slows anyone else, and
never loses an event.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from typing import AsyncIterator, Awaitable, Callable

import asyncpg

log = logging.getLogger("chatlog.listener")

CHANNEL = "chatlog_events"

# (conversation_id, after_seq, limit) -> committed events with seq > after_seq, in order
ReadEvents = Callable[[uuid.UUID, int, int], Awaitable[list[dict]]]


class Tail:
    """The recent events of one conversation, shared by this process's readers."""

    def __init__(self, conversation_id: uuid.UUID, read: ReadEvents, buffer_size: int) -> None:
        self.conversation_id = conversation_id
        self.readers = 0
        self._read = read
        self._buffer: deque[dict] = deque(maxlen=buffer_size)
        self._fetched: int | None = None  # highest seq read (None: no baseline yet)
        self._more = False  # a commit was announced since the last read began
        self._fetching: asyncio.Task | None = None
        self._changed = asyncio.Event()

    def announce(self, first: int, last: int) -> None:
        """A commit wrote seqs first..last: fetch them once for every reader."""
        if self._fetched is None:
            self._fetched = first - 1
        if last > self._fetched:
            self._start_fetch()

    def refresh(self, since: int | None = None) -> None:
        """Look for events a lost notification did not announce."""
        if self._fetched is None:
            if since is None:
                return  # no reader has a position yet: nothing to look after
            self._fetched = since
        self._start_fetch()

    def _start_fetch(self) -> None:
        self._more = True
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.create_task(self._fetch())

    async def _fetch(self) -> None:
        try:
            while self._more:
                self._more = False
                events = await self._read(self.conversation_id, self._fetched, 1000)
                if events:
                    self._buffer.extend(events)
                    self._fetched = events[-1]["seq"]
                    self._more = self._more or len(events) == 1000
                    self._wake()
        except Exception:  # readers still get everything: they fall back to the store
            log.exception("tail fetch failed for %s", self.conversation_id)
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def after(self, seq: int) -> list[dict] | None:
        """Buffered events after `seq`, or None when the reader is not within
        the buffer (behind it, or nothing buffered yet): then it reads the store."""
        buffer = self._buffer
        if not buffer or seq + 1 < buffer[0]["seq"]:
            return None
        if seq >= buffer[-1]["seq"]:
            return []
        # from the right: a reader usually wants only the few newest events
        newer = []
        for event in reversed(buffer):
            if event["seq"] <= seq:
                break
            newer.append(event)
        newer.reverse()
        return newer

    async def wait(self, timeout: float) -> bool:
        """Wait for new events; False on timeout."""
        # asyncio.timeout waits in the reader's own task (wait_for would start
        # one more task per waiting reader)
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        if self._fetching is not None:
            self._fetching.cancel()


class Listener:
    """The process's one LISTEN connection and its tails."""

    KEEPALIVE_SECONDS = 10.0

    def __init__(self, dsn: str, read: ReadEvents, buffer_size: int = 1024) -> None:
        self._dsn = dsn
        self._read = read
        self._buffer_size = buffer_size
        self.tails: dict[uuid.UUID, Tail] = {}
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task | None = None
        self._connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chatlog-listener")
        await asyncio.wait_for(self._connected.wait(), 30)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for tail in self.tails.values():
            tail.close()
        self.tails.clear()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn)
                conn.add_termination_listener(lambda _: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self._conn, delay = conn, 0.1
                if self._connected.is_set():
                    log.warning("listener reconnected; re-checking %d followed conversations", len(self.tails))
                self._connected.set()
                for tail in self.tails.values():
                    tail.refresh()
                await self._watch(conn, lost)
            except asyncio.CancelledError:
                if self._conn is not None:
                    await self._conn.close()
                raise
            except Exception as exc:
                log.warning("listener connection failed (%r); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Return when the connection is gone: closed, or silently dead (no
        FIN ever arrives), which a periodic round trip finds out."""
        while not lost.is_set():
            try:
                async with asyncio.timeout(self.KEEPALIVE_SECONDS):
                    await lost.wait()
            except TimeoutError:
                try:
                    async with asyncio.timeout(self.KEEPALIVE_SECONDS):
                        await conn.fetchval("SELECT 1")
                except (TimeoutError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
                    conn.terminate()
                    return

    def _on_notify(self, _conn, _pid, _channel, payload: str) -> None:
        conversation, first, last = payload.split(":")
        tail = self.tails.get(uuid.UUID(conversation))
        if tail is not None:
            tail.announce(int(first), int(last))

    async def follow(self, conversation_id: uuid.UUID, after: int, heartbeat: float) -> AsyncIterator[list[dict]]:
        """Committed events after `after`, in order, forever; an empty list
        means `heartbeat` seconds passed with nothing new.

        Subscribes BEFORE reading the store, so nothing committed between the
        two is missed; de-duplicates by seq, so nothing is sent twice.
        """
        if self._task is None:
            raise RuntimeError("the listener was not started")
        tail = self.tails.get(conversation_id)
        if tail is None:
            tail = self.tails[conversation_id] = Tail(conversation_id, self._read, self._buffer_size)
        tail.readers += 1
        try:
            cursor = after
            while True:
                events = tail.after(cursor)
                if events is None:
                    events = await self._read(conversation_id, cursor, 1000)
                if events:
                    cursor = events[-1]["seq"]
                    yield events
                    continue
                if not await tail.wait(heartbeat):
                    # Quiet for a heartbeat: have the tail (once for all its
                    # readers) look for commits whose NOTIFY was lost.
                    tail.refresh(cursor)
                    yield []
        finally:
            tail.readers -= 1
            if tail.readers == 0 and self.tails.get(conversation_id) is tail:
                tail.close()
                del self.tails[conversation_id]
