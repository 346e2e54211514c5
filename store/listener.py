"""Live wake-ups: one LISTEN connection per process, fanned out to local readers.

Every append's transaction sends `NOTIFY chatlog_events '<conversation>:<first>:<last>:<principal>'`,
delivered only at COMMIT, so a wake-up never announces an uncommitted event.

NOTIFY is the fast path, not the only one: a notification is lost whenever
the LISTEN connection is (a PostgreSQL restart, a network cut). So once a
second the listener also reads the current seq of every followed conversation
in one query (the sweep) and has each tail that is behind fetch; after the
LISTEN connection comes back every tail fetches at once. A reader is thus
never left behind a commit for more than about a second while the store
answers. When it does not (no sweep has succeeded, or the tail's fetches have
failed, for STALL_SECONDS), the reader's stream ends, so its client resumes
with Last-Event-ID on this or another process instead of waiting on a
connection that says nothing.

A stream (`Listener.stream`) is the stored events first, then the live ones:
the hand-over resumes from the last seq read, and `follow` subscribes before
it reads, so nothing falls between the two and nothing comes twice.

Each followed conversation has one `Tail`, shared by all readers of it in this
process: on a wake-up the tail reads the new events from the store ONCE and
keeps the most recent batches in a bounded buffer; readers take what they need
from the buffer. A reader that has fallen behind the buffer reads from the
store itself, so a slow reader never holds memory or slows anyone else, and
never loses an event.

An erased conversation (store/erasure.py) ends its streams: the erase
function's NOTIFY `chatlog_erased` reaches every process, whose tail for it
is marked erased and woken, and each of its readers' follow() returns (the
client's reconnect is answered 410). A lost notification is made up for by
the sweep, which finds the conversation's row gone.

A buffered batch is handed to every reader as the same `LiveBatch` (a list
with a `memo` dict), so readers at the same point can share what they make of
it: api/sse.py encodes a batch's frames once per format there, and N readers
cost N socket writes, not N encodings. A reader is woken by the tail's one
asyncio.Event (no per-reader query), and heartbeats come from one timer per
tail: a waiting reader sets no timer of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable

import asyncpg

from store import metrics
from store import erasure
from store.errors import Unavailable

log = logging.getLogger("chatlog.listener")

CHANNEL = "chatlog_events"
# how the LISTEN connection shows in pg_stat_activity
APPLICATION_NAME = "chatlog-listener"

# A conversation is named by (principal, conversation id): ids are unique per principal.
Key = tuple[str, uuid.UUID]
# (key, after_seq, limit) -> committed events with seq > after_seq, in order
ReadEvents = Callable[[Key, int, int], Awaitable[list[dict]]]
# keys -> their conversations' current seq
ReadHeads = Callable[[list[Key]], Awaitable[dict[Key, int]]]
# told of every erased conversation this process hears of
OnErased = Callable[[Key], None]

SWEEP_SECONDS = 1.0
# a live reader takes one fetched batch at a time: at most this many events
READ_LIMIT = 1000
# a reader whose events cannot be fetched for this long is ended (it resumes elsewhere)
STALL_SECONDS = 2.5


class LiveBatch(list):
    """Events one tail fetch read, as every reader of the tail receives them.
    `memo` is shared by all readers of the batch and lives as long as the
    batch is buffered: what readers derive from the batch, keyed by what it
    depends on (api/sse.py: encoded frames by format). A reader whose cursor
    lies inside a batch gets a plain list of the rest, with no memo: a memo
    per cursor could hold a batch's frames once per reader."""

    __slots__ = ("memo",)


class Tail:
    """The recent events of one conversation, shared by this process's readers."""

    def __init__(self, key: Key, read: ReadEvents, buffer_size: int) -> None:
        self.key = key
        self.readers = 0
        self._read = read
        self.buffer_size = buffer_size
        self._batches: deque[LiveBatch] = deque()  # as fetched, oldest first; seqs contiguous
        self.buffered = 0  # events in _batches: at most buffer_size, or the newest batch alone
        self._fetched: int | None = None  # highest seq read (None: no baseline yet)
        self._wanted = 0  # highest seq known to be committed (announced, or seen by the sweep)
        self._probe = False  # read once even if nothing is known to be missing (notifications were lost)
        self._fetching: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self.failing_since: float | None = None  # monotonic time of the first failed fetch in a row
        self.erased = False  # the conversation was erased: its readers end
        self.beats = 0  # heartbeats so far: a reader with nothing to send at a new one sends a ping
        self._heartbeat = float("inf")
        self._beating: asyncio.Task | None = None

    def announce(self, first: int, last: int) -> None:
        """A commit wrote seqs first..last: fetch them once for every reader."""
        if self._fetched is None:
            self._fetched = first - 1
        self._want(last)

    def join(self, cursor: int, heartbeat: float) -> None:
        """A reader at `cursor` arrived: the tail looks after what follows it,
        and beats at least every `heartbeat` seconds."""
        self.readers += 1
        if self._fetched is None:
            self._fetched = cursor
        if heartbeat < self._heartbeat:
            self._heartbeat = heartbeat
            if self._beating is not None:
                self._beating.cancel()
            self._beating = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat)
            self.beats += 1
            self._wake()

    def behind(self, head: int) -> None:
        """The conversation is at seq `head` (the sweep read it): fetch what this tail lacks."""
        if self._fetched is not None:
            self._want(head)

    def refresh(self) -> None:
        """Look for events that lost notifications did not announce."""
        if self._fetched is not None:
            self._probe = True
            self._start_fetch()

    def _want(self, seq: int) -> None:
        self._wanted = max(self._wanted, seq)
        if self._wanted > self._fetched:
            self._start_fetch()

    def _start_fetch(self) -> None:
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.create_task(self._fetch())

    async def _fetch(self) -> None:
        try:
            # announcements that arrive during a read raise _wanted: the loop goes on
            while self._probe or self._wanted > self._fetched:
                self._probe = False
                events = await self._read(self.key, self._fetched, READ_LIMIT)
                if not events:
                    break
                self._keep(events)
                self._fetched = events[-1]["seq"]
                self._wake()
            self.failing_since = None
        except Exception as exc:  # the sweep retries within a second; readers end if it goes on
            log.warning("tail fetch failed for %s: %r", self.key[1], exc)
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            self._wake()

    def _keep(self, events: list[dict]) -> None:
        batch = LiveBatch(events)
        batch.memo = {}
        self._batches.append(batch)
        self.buffered += len(batch)
        while len(self._batches) > 1 and self.buffered > self.buffer_size:
            self.buffered -= len(self._batches.popleft())

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def after(self, seq: int) -> list[dict] | None:
        """The buffered events after `seq` that were fetched together with
        seq + 1 (one batch at a time, so every reader at `seq` gets the same
        LiveBatch), [] when there are none yet, or None when the reader is
        not within the buffer (behind it, or nothing buffered yet): then it
        reads the store."""
        batches = self._batches
        if not batches or seq + 1 < batches[0][0]["seq"]:
            return None
        if seq >= batches[-1][-1]["seq"]:
            return []
        # from the right: a reader usually wants the newest batch
        for batch in reversed(batches):
            if batch[0]["seq"] <= seq + 1:
                break
        if batch[0]["seq"] == seq + 1:
            return batch
        return [event for event in batch if event["seq"] > seq]

    async def wait(self) -> None:
        """Wait for new events, a failure or a heartbeat."""
        await self._changed.wait()

    def close(self) -> None:
        for task in (self._fetching, self._beating):
            if task is not None:
                task.cancel()


class Listener:
    """The process's one LISTEN connection and its tails."""

    KEEPALIVE_SECONDS = 10.0

    def __init__(self, dsn: str, read: ReadEvents, heads: ReadHeads, on_erased: OnErased = lambda key: None,
                 buffer_size: int = 1024, connect_timeout: float = 2.0) -> None:
        self._dsn = dsn
        self._read = read
        self._heads = heads
        self._on_erased = on_erased
        self._buffer_size = buffer_size
        self._connect_timeout = connect_timeout
        self.tails: dict[Key, Tail] = {}
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._healthy_at = time.monotonic()  # when the last sweep that succeeded began
        self.closing = False  # set by end_streams(): every follow() returns
        self.reconnects = 0
        # other channels carried by this one connection: [(channel, its asyncpg callback, on_connect)]
        self._channels: list[tuple[str, Callable, Callable[[], None]]] = []

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chatlog-listener")
        self._sweeper = asyncio.create_task(self._sweep(), name="chatlog-sweep")
        await asyncio.wait_for(self._connected.wait(), 30)

    async def listen(self, channel: str, on_payload: Callable[[str], None],
                     on_connect: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        """Deliver `channel`'s notifications too (the runner's `chatlog_turns`):
        one LISTEN connection per process, whoever listens. `on_connect` runs
        after every (re)connect, when notifications may have been missed.
        Returns the coroutine function that stops it."""
        entry = (channel, lambda _conn, _pid, _channel, payload: on_payload(payload), on_connect)
        self._channels.append(entry)
        conn = self._conn
        if conn is not None and not conn.is_closed():
            try:
                await conn.add_listener(channel, entry[1])
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                # its next (re)connect adds it; meanwhile the listener's user relies on its own sweeps
                log.warning("cannot LISTEN on %s now (%r)", channel, exc)

        async def stop() -> None:
            if entry in self._channels:
                self._channels.remove(entry)
            if self._conn is not None and not self._conn.is_closed():
                try:
                    await self._conn.remove_listener(channel, entry[1])
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    pass
        return stop

    def end_streams(self) -> None:
        """Shutting down: every live reader's follow() returns now, and new ones at once."""
        self.closing = True
        self._wake_all()

    async def close(self) -> None:
        self.end_streams()
        for task in (self._task, self._sweeper):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for tail in self.tails.values():
            tail.close()
        metrics.TAILS.dec(len(self.tails))
        self.tails.clear()

    async def _sweep(self) -> None:
        """Once a second: have every tail that is behind its conversation fetch.

        The sweep is also the store's pulse for live readers: while a sweep
        has not succeeded for STALL_SECONDS (the query failed, or hangs), the
        readers are woken every half second to find out that they are stalled."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            if not self.tails:
                self._healthy_at = time.monotonic()
                continue
            started = time.monotonic()
            keys = list(self.tails)
            query = asyncio.ensure_future(self._heads(keys))
            while not (await asyncio.wait({query}, timeout=0.5))[0]:
                if self._sweep_stalled():
                    self._wake_all()
            try:
                heads = query.result()
            except Exception as exc:
                if not self._sweep_stalled():
                    log.warning("cannot read the followed conversations' heads: %r", exc)
                self._wake_all()  # their readers check whether to give up
                continue
            self._healthy_at = started
            for key, head in heads.items():
                tail = self.tails.get(key)
                if tail is not None:
                    tail.behind(head)
            for key in keys:
                if key not in heads:  # followed, so it existed: its row is gone, it was erased
                    self._erase(key)

    def _sweep_stalled(self) -> bool:
        return time.monotonic() - self._healthy_at > STALL_SECONDS

    def _wake_all(self) -> None:
        for tail in list(self.tails.values()):
            tail._wake()

    def _stalled(self, tail: Tail) -> bool:
        failing = tail.failing_since is not None and time.monotonic() - tail.failing_since > STALL_SECONDS
        return failing or self._sweep_stalled()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout,
                                             server_settings={"application_name": APPLICATION_NAME})
                conn.add_termination_listener(lambda _: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                await conn.add_listener(erasure.CHANNEL, self._on_erase_notify)
                for channel, deliver, _ in list(self._channels):
                    await conn.add_listener(channel, deliver)
                self._conn, delay = conn, 0.1
                if self._connected.is_set():
                    self.reconnects += 1
                    metrics.LISTENER_RECONNECTS.inc()
                    log.warning("listener reconnected; re-checking %d followed conversations", len(self.tails))
                self._connected.set()
                for tail in self.tails.values():
                    tail.refresh()
                for _, _, on_connect in list(self._channels):
                    on_connect()
                await self._watch(conn, lost)
            except asyncio.CancelledError:
                if self._conn is not None:
                    self._conn.terminate()  # no goodbye round trip: the server may be gone
                raise
            except Exception as exc:
                log.warning("listener connection failed (%r); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2)

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
        conversation, first, last, principal = payload.split(":", 3)
        tail = self.tails.get((principal, uuid.UUID(conversation)))
        if tail is not None:
            tail.announce(int(first), int(last))

    def _on_erase_notify(self, _conn, _pid, _channel, payload: str) -> None:
        conversation, principal = payload.split(":", 1)
        self._erase((principal, uuid.UUID(conversation)))

    def _erase(self, key: Key) -> None:
        tail = self.tails.get(key)
        if tail is not None:
            if tail.erased:
                return
            tail.erased = True
            tail._wake()
        self._on_erased(key)

    async def follow(self, key: Key, after: int, heartbeat: float) -> AsyncIterator[list[dict]]:
        """Committed events after `after`, in order, until the server shuts
        down or the conversation is erased; an empty list is a heartbeat (one
        at least every `heartbeat` seconds while nothing new comes; the tail's
        one timer beats them).
        Raises Unavailable when the store has been failing for STALL_SECONDS.

        Subscribes BEFORE reading the store, so nothing committed between the
        two is missed; de-duplicates by seq, so nothing is sent twice.
        """
        if self._task is None:
            raise RuntimeError("the listener was not started")
        tail = self.tails.get(key)
        if tail is None:
            tail = self.tails[key] = Tail(key, self._read, self._buffer_size)
            metrics.TAILS.inc()
        tail.join(after, heartbeat)
        try:
            cursor, sent, beats = after, False, tail.beats
            while not self.closing and not tail.erased:
                events = tail.after(cursor)
                if events is None:
                    events = await self._read(key, cursor, READ_LIMIT)
                if events:
                    if sent:
                        # let the loop run between batches: a reader that hung
                        # up is cancelled here, instead of having the whole
                        # buffer rendered for nobody first
                        await asyncio.sleep(0)
                    cursor, sent = events[-1]["seq"], True
                    yield events
                    continue
                sent = False
                if self._stalled(tail):
                    raise Unavailable("the event store cannot be read right now; resume with Last-Event-ID")
                if tail.beats != beats:
                    beats = tail.beats
                    yield []
                    continue
                # failures wake the tail too (every second while they last),
                # so a stalled reader finds out without polling
                await tail.wait()
        finally:
            tail.readers -= 1
            if tail.readers == 0 and self.tails.get(key) is tail:
                tail.close()
                del self.tails[key]
                metrics.TAILS.dec()

    async def stream(self, key: Key, after: int, upto: int, follow: bool, heartbeat: float,
                     first: list[dict] | None = None) -> AsyncIterator[tuple[bool, list[dict]]]:
        """(live, events) batches after `after`: the stored ones up to `upto`
        (READ_LIMIT at a time; `first`: the first batch, already read by the
        caller with the conversation's head, see Store.stream_start), then
        with `follow` the live ones until shutdown (an empty live batch is a
        heartbeat). Ends quietly when the store cannot be read (Unavailable):
        the response has begun, so the client is told by the end of the
        stream and resumes with Last-Event-ID, here later or on another
        process."""
        cursor = after
        try:
            if first:
                cursor = first[-1]["seq"]
                yield False, first
            while cursor < upto:
                events = await self._read(key, cursor, min(READ_LIMIT, upto - cursor))
                if not events:
                    break
                cursor = events[-1]["seq"]
                yield False, events
            if follow:
                async with aclosing(self.follow(key, cursor, heartbeat)) as live:
                    async for events in live:
                        yield True, events
        except Unavailable as exc:
            log.warning("ending a stream: %s", exc.message)
