"""Group commit: many appends, few transactions, nothing visible before commit,
and every caller told the truth about its write, even when COMMIT's reply is lost.

Appends queue up; each of a few writer tasks takes a fair share of what waits
and runs it in ONE transaction. Under light load that is one append per
transaction and no added latency; under heavy load the batches grow by
themselves. Callers learn their result only after COMMIT returns, and readers
only ever read committed rows, so nothing is visible before it is durable.

A group costs a constant number of round trips, whatever it holds: BEGIN and
the lock statement (one message), the ops, COMMIT. Appends are Batched ops:
all of a group's appends run together (store/appends.py: one statement reads
and locks, one writes and notifies); other ops (creating, forking) run one by
one before them (so an append that came just before the creation of its
conversation finds it: both were in flight at once, either order is true). Between groups, a writer keeps its connection as long as work
waits (no acquire, no pool reset per group).

Locks: the transaction first takes a transaction-level advisory lock on every
conversation of its group, in key order, the same in every transaction: no
deadlocks. With them it takes the shared "writer" lock that tells the feed
this transaction writes the log (store/feed.py). Advisory locks need no xid,
so the transaction gets its xid (its feed positions) only once it holds all of
them. Hence two transactions writing one conversation get their xids in the
order they write it, and a conversation's positions follow its seqs. Ops of a
group run in conversation-id order (stable, so one conversation's ops keep
their arrival order); they read after the lock statement, so they see every
earlier writer of their conversations committed.

When COMMIT fails, the group may or may not have committed: the reply can be
lost after PostgreSQL made the transaction durable. Running its ops again
could write them twice, so the writer asks instead: `pg_xact_status(xid)` on
another connection says whether the transaction committed, and the row the
group wrote first confirms it was this transaction (an xid of a transaction
that never reached the WAL can be handed out again after a crash). Committed:
every caller gets its result. Aborted: nothing was written; the group runs
again. No answer within the bound: OutcomeUnknown (503, details.outcome
"unknown"); a retry with the same event ids settles it. A failure BEFORE
COMMIT was sent never commits, so those ops are simply run again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import asyncpg

from store import metrics
from store.errors import OutcomeUnknown, OutOfRange, StoreError, Unavailable
from store.pool import CONNECTION_ERRORS, LOST_CONNECTION, Pool, unavailable
from store.positions import MAX_EVENTS_PER_TRANSACTION, WRITER_LOCK, xid_of

log = logging.getLogger("chatlog.writer")

def _begin_and_lock(keys: list[str]) -> str:
    """BEGIN and the group's locks in one message (the simple protocol carries
    no parameters: each key is spelled as hex, so no key can be read as SQL).
    `keys` sorted by the caller, and taken in that order."""
    spelled = ", ".join(f"hashtextextended(convert_from('\\x{k.encode().hex()}'::bytea, 'UTF8'), 0)" for k in keys)
    # Generic plans: a group's statements take their arrays as parameters, so
    # one plan per connection serves every group. PostgreSQL's default kept
    # re-planning the appends' read (its four branches took 1.5-4 ms to plan
    # against 0.2 ms to run, measured), which made a lone append slower.
    return ("BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; "
            f"SELECT pg_advisory_xact_lock_shared({WRITER_LOCK[0]}, {WRITER_LOCK[1]}), "
            f"(SELECT count(pg_advisory_xact_lock(k)) FROM unnest(ARRAY[{spelled}]::bigint[]) AS k)")


@dataclass
class Transaction:
    """What the ops of one group share: the connection, the index counter, the
    notifications to send, and the first row written (the witness the outcome
    check looks for)."""

    conn: asyncpg.Connection
    next_index: int = 0
    notifications: list[str] = field(default_factory=list)
    witness: tuple[str, Any, int, int] | None = None  # (principal, conversation_id, seq, position)

    def take(self, n: int) -> int:
        """The first of n consecutive indexes (positions) in this transaction."""
        start = self.next_index
        self.next_index += n
        return start

    def wrote(self, principal: str, conversation_id: Any, seq: int, position: int) -> None:
        if self.witness is None:
            self.witness = (principal, conversation_id, seq, position)


Op = Callable[[Transaction], Awaitable[Any]]


class Batched:
    """An op the writer runs together with the other ops of its class in the
    group: `run_all` answers each one (ok, result or refusal), in their order,
    in a constant number of statements. Called alone (e.g. wrapped by another
    op), it runs as a group of one."""

    @classmethod
    async def run_all(cls, tx: Transaction, ops: list[Any]) -> list[tuple[bool, Any]]:
        raise NotImplementedError

    async def __call__(self, tx: Transaction) -> Any:
        [(ok, value)] = await type(self).run_all(tx, [self])
        if not ok:
            raise value
        return value


@dataclass
class _Request:
    key: str  # conversation id: the lock-order key
    size: int  # events it writes
    op: Op
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)


class _CommitUnclear(Exception):
    """COMMIT was sent and no reply came back."""

    def __init__(self, witness: tuple[str, Any, int, int] | None, cause: BaseException,
                 outcomes: list[tuple[bool, Any]]) -> None:
        super().__init__(repr(cause))
        self.witness, self.cause, self.outcomes = witness, cause, outcomes


class GroupWriter:
    def __init__(self, pool: Pool | asyncpg.Pool, writers: int = 4, max_group_events: int = 10_000,
                 outcome_timeout: float = 10.0) -> None:
        self._pool = pool if isinstance(pool, Pool) else Pool(pool)
        self._waiting: deque[_Request] = deque()
        self._ready = asyncio.Condition()
        self._max_events = min(max_group_events, MAX_EVENTS_PER_TRANSACTION)
        self._writers = writers
        self._outcome_timeout = outcome_timeout
        self._closing = False
        self._busy = 0  # groups being committed right now
        self._tasks = [asyncio.create_task(self._work(), name=f"chatlog-writer-{i}") for i in range(writers)]
        self.transactions = 0  # counters, for introspection and the bench
        self.ops = 0
        self.unclear_commits = 0  # COMMITs whose reply was lost and whose outcome was looked up

    async def submit(self, key: str, size: int, op: Op) -> Any:
        if size > MAX_EVENTS_PER_TRANSACTION:
            # its positions would run into the next transaction's (store/feed.py)
            raise OutOfRange(f"one write holds at most {MAX_EVENTS_PER_TRANSACTION} events, this one has {size}",
                             limit=MAX_EVENTS_PER_TRANSACTION)
        if self._closing:
            raise Unavailable("this server is shutting down; retry on another one")
        future = asyncio.get_running_loop().create_future()
        async with self._ready:
            self._waiting.append(_Request(key, size, op, future))
            self._ready.notify()
        return await future

    async def close(self, drain_seconds: float = 10.0) -> None:
        """Take no more writes, let the queued and running groups commit (up to
        `drain_seconds`), then stop; whatever could not run is refused."""
        self._closing = True
        deadline = time.monotonic() + drain_seconds
        while (self._waiting or self._busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*_releasing, return_exceptions=True)
        while self._waiting:
            request = self._waiting.popleft()
            if not request.future.done():
                request.future.set_exception(Unavailable("this server is shutting down; retry on another one"))

    async def _work(self) -> None:
        line = _Line(self._pool)
        try:
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
                    self._busy += 1
                # a bounded wait: what waited for a writer longer than a
                # connection may be waited for is refused, not run late
                late = time.monotonic() - self._pool.acquire_timeout
                stale = [r for r in group if r.queued_at < late]
                if stale:
                    _answer(stale, Unavailable("the event store is not keeping up right now; nothing was written, "
                                               "retry shortly"))
                    group = [r for r in group if r.queued_at >= late]
                try:
                    if group:
                        await self._commit(sorted(group, key=lambda r: r.key), line)
                except Exception as failure:  # never let the writer die; answer whoever is still waiting
                    log.exception("writer failed")
                    _answer(group, failure)
                finally:
                    self._busy -= 1
                if not self._waiting:
                    # after the callers were answered, and in the background:
                    # the pool's reset of the connection is a round trip this
                    # writer need not wait for
                    line.release_soon()
        finally:
            await line.release()

    async def _commit(self, group: list[_Request], line: "_Line", attempts: int = 3) -> None:
        """Run `group` in one transaction and answer every caller the truth."""
        started = time.perf_counter()
        try:
            outcomes = await self._run(group, line)
        except _CommitUnclear as unclear:
            self.unclear_commits += 1
            status = await self._settle(unclear.witness)
            metrics.OUTCOME_CHECKS.labels(status).inc()
            log.warning("the reply to a COMMIT was lost (%r); the transaction %s", unclear.cause, status)
            if status == "committed":
                self._count(group, unclear.outcomes)
                _deliver(group, unclear.outcomes)
            elif status == "aborted" and attempts > 1:
                await self._commit(group, line, attempts - 1)  # nothing was written: run it again
            elif status == "aborted":
                _answer(group, Unavailable("the event store kept failing; nothing was written, retry shortly"))
            else:
                _answer(group, OutcomeUnknown(
                    "the event store went away while this write was being committed and has not come back; "
                    "retry with the same event ids to settle it", outcome="unknown"), keep_refusals=unclear.outcomes)
            return
        except CONNECTION_ERRORS + (Unavailable,) as failure:
            # before COMMIT: the transaction cannot have committed. A
            # connection lost midway (a restart, a cut) is worth one more go on
            # a fresh one; a timeout or an unreachable store already took its bound.
            if attempts > 1 and not self._closing and isinstance(failure, LOST_CONNECTION):
                await asyncio.sleep(0.05)
                await self._commit(group, line, attempts - 1)
            else:
                _answer(group, failure if isinstance(failure, Unavailable) else Unavailable(
                    "the event store cannot be reached right now; nothing was written, retry shortly",
                    reason=type(failure).__name__))
            return
        except Exception as failure:
            if len(group) > 1:
                # one op broke the transaction for all (nothing committed): give each its own
                for request in group:
                    await self._commit([request], line, attempts)
                return
            _answer(group, failure)
            return
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        self._count(group, outcomes)
        _deliver(group, outcomes)

    def _count(self, group: list[_Request], outcomes: list[tuple[bool, Any]]) -> None:
        self.transactions += 1
        self.ops += len(group)
        # the metrics: a few updates per transaction, whatever it holds
        committed = events = 0
        for request, (ok, _) in zip(group, outcomes):
            if ok:
                committed += 1
                events += request.size
        metrics.GROUP_APPENDS.observe(committed)
        metrics.GROUP_EVENTS.observe(events)
        if committed:
            metrics.APPENDS_COMMITTED.inc(committed)
            metrics.EVENTS.inc(events)
        if committed < len(group):
            metrics.APPENDS_REFUSED.inc(len(group) - committed)

    async def _run(self, group: list[_Request], line: "_Line") -> list[tuple[bool, Any]]:
        conn = await line.get()
        tx = Transaction(conn)
        outcomes: list[tuple[bool, Any]] = [(False, None)] * len(group)
        try:
            await conn.execute(_begin_and_lock(sorted({request.key for request in group})))
            batched: dict[type, list[int]] = {}
            for i, request in enumerate(group):
                if isinstance(request.op, Batched):
                    batched.setdefault(type(request.op), []).append(i)
                    continue
                try:
                    outcomes[i] = (True, await request.op(tx))
                except StoreError as refused:
                    # ops check every rule before they write, so a refused
                    # op has written nothing: the group goes on
                    outcomes[i] = (False, refused)
            for kind, members in batched.items():
                for i, outcome in zip(members, await kind.run_all(tx, [group[i].op for i in members])):
                    outcomes[i] = outcome
            if tx.notifications:
                await conn.execute("SELECT pg_notify('chatlog_events', n) FROM unnest($1::text[]) AS n",
                                   tx.notifications)
        except BaseException as failure:
            if isinstance(failure, CONNECTION_ERRORS) or _closed(conn):
                await line.discard()  # a timed-out or broken connection: the server aborts with it
            else:
                try:
                    await conn.execute("ROLLBACK")
                except Exception:
                    await line.discard()  # the pool replaces it
            raise
        try:
            status = await conn.execute("COMMIT")
        except BaseException as cause:
            if isinstance(cause, asyncpg.PostgresError) and not isinstance(cause, CONNECTION_ERRORS):
                raise  # PostgreSQL answered COMMIT with an error: it rolled back
            await line.discard()
            raise _CommitUnclear(tx.witness, cause, outcomes) from cause
        if status != "COMMIT":  # an error was swallowed somewhere: PostgreSQL rolled back
            raise RuntimeError(f"COMMIT answered {status!r}: the transaction had failed and was rolled back")
        return outcomes

    async def _settle(self, witness: tuple[str, Any, int, int] | None) -> str:
        """'committed', 'aborted' or 'unknown' for the group that wrote `witness`."""
        if witness is None:
            return "committed"  # it wrote nothing: its answers hold whatever happened
        principal, conversation_id, seq, position = witness
        deadline = time.monotonic() + self._outcome_timeout
        delay = 0.05
        while True:
            try:
                async with self._pool.acquire() as conn:
                    status = await conn.fetchval("SELECT pg_xact_status($1::text::xid8)", str(xid_of(position)),
                                                 timeout=self._pool.acquire_timeout)
                    if status == "committed":
                        # a new statement, so a new snapshot: the commit is visible to it
                        written = await conn.fetchval(
                            "SELECT position FROM events WHERE principal = $1 AND conversation_id = $2 AND seq = $3",
                            principal, conversation_id, seq, timeout=self._pool.acquire_timeout)
                        return "committed" if written == position else "aborted"
                    if status in ("aborted", None):  # None: older than the status horizon, i.e. not ours
                        return "aborted"
                    # 'in progress': the server has not yet processed COMMIT or noticed the lost client
            except asyncpg.PostgresError as exc:
                if "in the future" in str(exc):  # an xid never logged before a crash: never committed
                    return "aborted"
                if not isinstance(exc, CONNECTION_ERRORS):
                    raise
            except (Unavailable, *CONNECTION_ERRORS):
                pass
            if time.monotonic() + delay > deadline:
                return "unknown"
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


class _Line:
    """A writer task's connection, kept while groups keep coming."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._conn: asyncpg.Connection | None = None

    async def get(self) -> asyncpg.Connection:
        if self._conn is not None and _closed(self._conn):
            await self.release()
        if self._conn is None:
            try:
                self._conn = await self._pool.raw.acquire(timeout=self._pool.acquire_timeout)
            except CONNECTION_ERRORS as exc:
                raise unavailable(exc) from exc
        return self._conn

    async def discard(self) -> None:
        """Never hand a half-broken connection to the next group: the pool replaces it."""
        if self._conn is not None and not _closed(self._conn):
            try:
                self._conn.terminate()
            except Exception:
                pass
        await self.release()

    def release_soon(self) -> None:
        if self._conn is not None:
            task = asyncio.create_task(self.release())
            _releasing.add(task)
            task.add_done_callback(_releasing.discard)

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await self._pool.raw.release(conn)
            except Exception:
                pass  # asyncpg terminates what it cannot reset, and took back what it lost


_releasing: set[asyncio.Task] = set()  # release_soon's tasks, kept until done


def _closed(conn: asyncpg.Connection) -> bool:
    """Closed, or lost and already taken back by the pool (whose proxy then refuses every call)."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True


def _deliver(group: list[_Request], outcomes: list[tuple[bool, Any]]) -> None:
    for request, (ok, value) in zip(group, outcomes):
        if request.future.done():
            continue  # the caller went away
        if ok:
            request.future.set_result(value)
        else:
            request.future.set_exception(value)


def _answer(group: list[_Request], failure: BaseException, keep_refusals: list[tuple[bool, Any]] | None = None) -> None:
    """Fail every caller still waiting; refusals (nothing written either way) stay refusals."""
    refused = failed = 0
    for i, request in enumerate(group):
        if request.future.done():
            continue
        if keep_refusals is not None and i < len(keep_refusals) and not keep_refusals[i][0]:
            request.future.set_exception(keep_refusals[i][1])
            refused += 1
        else:
            request.future.set_exception(failure)
            failed += 1
    if refused:
        metrics.APPENDS_REFUSED.inc(refused)
    if failed:
        outcome = ("unknown" if isinstance(failure, OutcomeUnknown) else "unavailable"
                   if isinstance(failure, Unavailable) else "refused" if isinstance(failure, StoreError) else "error")
        metrics.APPENDS.labels(outcome).inc(failed)
