"""Message history reads: snapshot + tail, point-in-time, in-process cache.

The fold is pure (projections/history.py); this module only decides where to
start it. Snapshots are written every SNAPSHOT_EVERY seqs as a read passes
them, so any point in a long conversation folds fewer than that many events.
The newest state of recently read conversations is also cached in process:
asking for "now" again folds only what was appended since.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from datetime import datetime

import asyncpg

import projections
from projections.history import VERSION
from store.errors import NotFound, OutOfRange

SNAPSHOT_EVERY = 256

log = logging.getLogger("chatlog.history")


class HistoryReader:
    def __init__(self, pool: asyncpg.Pool, cache_size: int = 256) -> None:
        self._pool = pool
        self._latest: OrderedDict[uuid.UUID, dict] = OrderedDict()
        self._cache_size = cache_size
        self._writes: set[asyncio.Task] = set()

    async def resolve(self, principal: str, conversation_id: uuid.UUID, at_seq: int | None,
                      at_time: datetime | None) -> int:
        """The seq a read must reflect; OutOfRange names the valid range."""
        current = await self._pool.fetchval("SELECT seq FROM conversations WHERE id = $1 AND principal = $2",
                                            conversation_id, principal)
        if current is None:
            raise NotFound(f"conversation {conversation_id} was not found")
        if at_seq is not None:
            if not 1 <= at_seq <= current:
                raise OutOfRange(f"at_seq must be between 1 and {current}, the conversation's current seq",
                                 current_seq=current)
            return at_seq
        if at_time is not None:
            seq = await self._pool.fetchval(
                "SELECT max(seq) FROM events WHERE conversation_id = $1 AND created_at <= $2",
                conversation_id, at_time)
            if seq is None:
                raise OutOfRange("at_time is before the conversation was created", current_seq=current)
            return seq
        return current

    async def state_at(self, conversation_id: uuid.UUID, seq: int) -> dict:
        """The fold state exactly at `seq` (which must exist).

        Render it before the next await: the cached state is advanced in
        place by later reads.
        """
        cached = self._latest.get(conversation_id)
        if cached is not None and cached["seq"] == seq:
            self._latest.move_to_end(conversation_id)
            return cached
        if cached is not None and cached["seq"] < seq <= cached["seq"] + SNAPSHOT_EVERY:
            # (a longer gap folds less from the nearest snapshot)
            start = cached["seq"]
            tail = await self._events(conversation_id, start, seq)
            # another reader may have advanced it while we awaited
            if cached["seq"] == start:
                return self._fold(conversation_id, cached, tail)
        state = await self._snapshot_before(conversation_id, seq)
        state = self._fold(conversation_id, state, await self._events(conversation_id, state["seq"], seq))
        current = self._latest.get(conversation_id)
        if current is None or current["seq"] < seq:
            self._latest[conversation_id] = state
            self._latest.move_to_end(conversation_id)
            while len(self._latest) > self._cache_size:
                self._latest.popitem(last=False)
        return state

    def forget(self) -> None:
        self._latest.clear()

    async def flush(self) -> None:
        """Wait for snapshot writes under way (tests, shutdown)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def _fold(self, conversation_id: uuid.UUID, state: dict, events: list[dict]) -> dict:
        """Fold without awaiting; snapshots passed on the way are saved in the background."""
        snapshots = []
        for event in events:
            projections.fold(state, event)
            if event["seq"] % SNAPSHOT_EVERY == 0:
                snapshots.append((conversation_id, event["seq"], VERSION, projections.state_to_json(state)))
        if snapshots:
            task = asyncio.create_task(self._save(snapshots))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        return state

    async def _save(self, snapshots: list[tuple]) -> None:
        try:
            await self._pool.executemany(
                """INSERT INTO history_snapshots (conversation_id, seq, version, state)
                   VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING""", snapshots)
        except Exception as exc:  # derived data: a lost snapshot only costs a longer fold later
            log.warning("could not save %d history snapshots: %r", len(snapshots), exc)

    async def _snapshot_before(self, conversation_id: uuid.UUID, seq: int) -> dict:
        row = await self._pool.fetchrow(
            """SELECT seq, state FROM history_snapshots
                WHERE conversation_id = $1 AND seq <= $2 AND version = $3
                ORDER BY seq DESC LIMIT 1""",
            conversation_id, seq, VERSION)
        if row is not None:
            try:
                return projections.state_from_json(row["state"])
            except ValueError:
                pass
        return projections.initial_state()

    async def _events(self, conversation_id: uuid.UUID, after: int, upto: int) -> list[dict]:
        # the fold reads only seq, type and data
        rows = await self._pool.fetch(
            "SELECT seq, type, data FROM events WHERE conversation_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
            conversation_id, after, upto)
        return [dict(r) for r in rows]
