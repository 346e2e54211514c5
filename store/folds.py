"""Fold reads: snapshot + tail, point-in-time, in-process cache.

A fold is pure (projections/history.py for messages, projections/ui.py for
the UI stream's translator); this module only decides where to start it.
Snapshots are written every SNAPSHOT_EVERY seqs as a read passes them, so any
point in a long conversation folds fewer than that many events. The newest
state of recently read conversations is also cached in process: asking for
"now" again folds only what was appended since.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import asyncpg
import orjson

import projections
from store import metrics
from projections import history, ui

SNAPSHOT_EVERY = 256

log = logging.getLogger("chatlog.folds")


@dataclass(frozen=True)
class Fold:
    table: str  # where its snapshots live (a constant, never user input)
    version: int
    initial: Callable[[], dict]
    step: Callable[[dict, dict], object]  # updates the state in place
    dumps: Callable[[dict], bytes]
    loads: Callable[[bytes], dict]  # raises ValueError for a snapshot of another version


HISTORY = Fold("history_snapshots", history.VERSION, projections.initial_state, projections.fold,
               projections.state_to_json, projections.state_from_json)
UI = Fold("ui_snapshots", ui.VERSION, ui.initial_ui_state, ui.ui_chunks, orjson.dumps, ui.ui_state_from_json)


class FoldReader:
    def __init__(self, pool: asyncpg.Pool, fold: Fold, cache_size: int = 256) -> None:
        self._pool = pool
        self._fold_def = fold
        self._latest: OrderedDict[tuple[str, uuid.UUID], dict] = OrderedDict()  # by (principal, conversation id)
        self._cache_size = cache_size
        self._writes: set[asyncio.Task] = set()
        name = fold.table.removesuffix("_snapshots")  # history, ui
        self._count_cache, self._count_advanced, self._count_snapshot, self._count_events = (
            metrics.FOLD_READS.labels(name, source) for source in ("cache", "cache_advanced", "snapshot", "events"))

    async def state_at(self, principal: str, conversation_id: uuid.UUID, seq: int) -> dict:
        """The fold state exactly at `seq` (which must exist).

        Render it before the next await: the cached state is advanced in
        place by later reads.
        """
        key = (principal, conversation_id)
        cached = self._latest.get(key)
        if cached is not None and cached["seq"] == seq:
            self._latest.move_to_end(key)
            self._count_cache.inc()
            return cached
        if cached is not None and cached["seq"] < seq <= cached["seq"] + SNAPSHOT_EVERY:
            # (a longer gap folds less from the nearest snapshot)
            start = cached["seq"]
            tail = await self._events(key, start, seq)
            # another reader may have advanced it while we awaited
            if cached["seq"] == start:
                self._count_advanced.inc()
                return self._fold(key, cached, tail)
        state, tail = await self._snapshot_and_tail(key, seq)
        (self._count_snapshot if state["seq"] else self._count_events).inc()
        state = self._fold(key, state, tail)
        current = self._latest.get(key)
        if current is None or current["seq"] < seq:
            self._latest[key] = state
            self._latest.move_to_end(key)
            while len(self._latest) > self._cache_size:
                self._latest.popitem(last=False)
        return state

    async def copy_at(self, principal: str, conversation_id: uuid.UUID, seq: int) -> dict:
        """A private copy of the state at `seq` (0: the initial state), for a
        caller that goes on folding it (the cached one is shared)."""
        if seq == 0:
            return self._fold_def.initial()
        return self._fold_def.loads(self._fold_def.dumps(await self.state_at(principal, conversation_id, seq)))

    def forget(self) -> None:
        self._latest.clear()

    async def flush(self) -> None:
        """Wait for snapshot writes under way (tests, shutdown)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def _fold(self, key: tuple[str, uuid.UUID], state: dict, events: list[dict]) -> dict:
        """Fold without awaiting; snapshots passed on the way are saved in the background."""
        fold, snapshots = self._fold_def, []
        for event in events:
            fold.step(state, event)
            if event["seq"] % SNAPSHOT_EVERY == 0:
                snapshots.append((*key, event["seq"], fold.version, fold.dumps(state)))
        if snapshots:
            task = asyncio.create_task(self._save(snapshots))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        return state

    async def _save(self, snapshots: list[tuple]) -> None:
        try:
            await self._pool.executemany(
                f"""INSERT INTO {self._fold_def.table} (principal, conversation_id, seq, version, state)
                    VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""", snapshots)
        except Exception as exc:  # derived data: a lost snapshot only costs a longer fold later
            log.warning("could not save %d %s rows: %r", len(snapshots), self._fold_def.table, exc)

    async def _snapshot_and_tail(self, key: tuple[str, uuid.UUID], seq: int) -> tuple[dict, list[dict]]:
        """The nearest snapshot at or before `seq` and the events after it up to
        `seq`, in one statement (one round trip, one snapshot of the data)."""
        fold = self._fold_def
        rows = await self._pool.fetch(
            f"""WITH s AS MATERIALIZED (
                    SELECT seq, state FROM {fold.table}
                     WHERE principal = $1 AND conversation_id = $2 AND version = $4 AND seq <= $3
                     ORDER BY seq DESC LIMIT 1)
                SELECT NULL::int AS seq, NULL::text AS type, NULL::jsonb AS data, s.state FROM s
                UNION ALL
                SELECT e.seq, e.type, e.data, NULL FROM events e
                 WHERE e.principal = $1 AND e.conversation_id = $2 AND e.seq <= $3
                   AND e.seq > coalesce((SELECT seq FROM s), 0)
                ORDER BY 1 NULLS FIRST""",
            *key, seq, fold.version)
        if rows and rows[0]["seq"] is None:
            try:
                return fold.loads(rows[0]["state"]), [_event(r) for r in rows[1:]]
            except ValueError:  # unreadable: fold from the start instead
                return fold.initial(), await self._events(key, 0, seq)
        return fold.initial(), [_event(r) for r in rows]

    async def _events(self, key: tuple[str, uuid.UUID], after: int, upto: int) -> list[dict]:
        # the fold reads only seq, type and data
        rows = await self._pool.fetch(
            """SELECT seq, type, data FROM events
                WHERE principal = $1 AND conversation_id = $2 AND seq > $3 AND seq <= $4 ORDER BY seq""",
            *key, after, upto)
        return [_event(r) for r in rows]


def _event(row) -> dict:
    # the fold reads only seq, type and data
    return {"seq": row["seq"], "type": row["type"], "data": row["data"]}
