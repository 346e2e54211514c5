"""Group commit: many appends, few transactions, nothing visible before commit.

Appends queue up; each of a few writer tasks takes everything waiting (up to a
cap) and runs it in ONE transaction. Under light load that is one append per
transaction and no added latency; under heavy load the batches grow by
themselves. Callers learn their result only after COMMIT returns, and readers
only ever read committed rows, so nothing is visible before it is durable.

Locks: each op locks its own conversation row. Ops of a group run in
conversation-id order (stable, so one conversation's ops keep their arrival
order), which makes lock order the same in every transaction: no deadlocks.

Before any op runs, the transaction takes a transaction-level advisory lock on
every conversation of its group (same order). Advisory locks need no xid, so
the transaction gets its xid (its feed positions, see store/feed.py) only once
it holds all of them. Hence two transactions writing one conversation get
their xids in the order they write it, and a conversation's positions follow
its seqs. Without this, a group that took its xid at its first row lock and
then waited for a later conversation's row would write that conversation's
next seq BELOW the positions of the transaction it waited for.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import asyncpg

from store.errors import OutOfRange, StoreError

log = logging.getLogger("chatlog.writer")

# position = (xid << 16) + index, so one transaction holds at most 65536 events.
MAX_EVENTS_PER_TRANSACTION = 1 << 16

# Keys sorted by the caller; unnest keeps their order, so every transaction locks in the same order.
_LOCK_CONVERSATIONS = "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest($1::text[]) AS k"


@dataclass
class Transaction:
    """What the ops of one group share: the connection and the index counter."""

    conn: asyncpg.Connection
    next_index: int = 0
    notifications: list[str] = field(default_factory=list)

    def take_indexes(self, n: int) -> list[int]:
        start = self.next_index
        self.next_index += n
        return list(range(start, start + n))


Op = Callable[[Transaction], Awaitable[Any]]


@dataclass
class _Request:
    key: str  # conversation id: the lock-order key
    size: int  # events it writes
    op: Op
    future: asyncio.Future


class GroupWriter:
    def __init__(self, pool: asyncpg.Pool, writers: int = 4, max_group_events: int = 10_000,
                 after_commit: Callable[[list[str]], None] | None = None) -> None:
        self._pool = pool
        self._waiting: deque[_Request] = deque()
        self._ready = asyncio.Condition()
        self._max_events = min(max_group_events, MAX_EVENTS_PER_TRANSACTION)
        self._after_commit = after_commit
        self._writers = writers
        self._tasks = [asyncio.create_task(self._work(), name=f"chatlog-writer-{i}") for i in range(writers)]
        self.transactions = 0  # counters, for /metrics-like introspection and the bench
        self.ops = 0

    async def submit(self, key: str, size: int, op: Op) -> Any:
        if size > MAX_EVENTS_PER_TRANSACTION:
            # its positions would run into the next transaction's (store/feed.py)
            raise OutOfRange(f"one write holds at most {MAX_EVENTS_PER_TRANSACTION} events, this one has {size}",
                             limit=MAX_EVENTS_PER_TRANSACTION)
        future = asyncio.get_running_loop().create_future()
        async with self._ready:
            self._waiting.append(_Request(key, size, op, future))
            self._ready.notify()
        return await future

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._waiting:
            self._waiting.popleft().future.set_exception(StoreError("the store is shutting down"))

    async def _work(self) -> None:
        while True:
            async with self._ready:
                await self._ready.wait_for(lambda: self._waiting)
                # Take a fair share of what waits, so the other writers get
                # work too: one huge group on one connection is slower than a
                # few in parallel whose fsyncs PostgreSQL combines anyway.
                share = -(-len(self._waiting) // self._writers)
                first = self._waiting.popleft()
                group, size = [first], first.size
                while self._waiting and len(group) < share and size + self._waiting[0].size <= self._max_events:
                    request = self._waiting.popleft()
                    group.append(request)
                    size += request.size
            try:
                await self._commit(group)
            except Exception:  # never let the writer die; _commit already answered
                log.exception("writer failed")

    async def _commit(self, group: list[_Request]) -> None:
        group = sorted(group, key=lambda r: r.key)
        outcomes: list[tuple[bool, Any]] = []
        try:
            async with self._pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute(_LOCK_CONVERSATIONS, sorted({request.key for request in group}))
                    tx = Transaction(conn)
                    for request in group:
                        try:
                            outcomes.append((True, await request.op(tx)))
                        except StoreError as refused:
                            # ops check every rule before they write, so a
                            # refused op has written nothing: the group goes on
                            outcomes.append((False, refused))
                    if tx.notifications:
                        await conn.execute("SELECT pg_notify('chatlog_events', n) FROM unnest($1::text[]) AS n",
                                           tx.notifications)
        except Exception as failure:
            if len(group) > 1:
                # one op broke the transaction for all: give each its own
                for request in group:
                    await self._commit([request])
                return
            if not group[0].future.done():
                group[0].future.set_exception(failure)
            return
        self.transactions += 1
        self.ops += len(group)
        if self._after_commit and tx.notifications:
            self._after_commit(tx.notifications)
        for request, (ok, value) in zip(group, outcomes):
            if request.future.done():
                continue  # the caller went away
            if ok:
                request.future.set_result(value)
            else:
                request.future.set_exception(value)
