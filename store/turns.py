"""The runner's SQL (migration 010): turn requests and their queue, process
leases, continuations, and the reads behind GET /turns/{turn_id}.

Writes to the log itself still go through `Store.append` (group commit); this
module only keeps the runner's bookkeeping beside it. Its notifications
(channel `chatlog_turns`: "a request was queued", "turn X was cancelled")
reach every process over the listener's one LISTEN connection
(store/listener.py `Listener.listen`). A lost notification only delays: the
runner's sweep claims the queue every few seconds, and a cancelled turn's next
append is refused by the log's rules.
"""

from __future__ import annotations

import logging
import uuid

import asyncpg

from store.pool import CONNECTION_ERRORS, Pool, unavailable

log = logging.getLogger("chatlog.turns")

CHANNEL = "chatlog_turns"
LIVE = ("starting", "running", "waiting_for_tools")

_CLAIM = """
UPDATE turn_runs t SET status = 'running', owner = $1
  FROM (SELECT q.principal, q.conversation_id, q.turn_id
          FROM turn_runs q
          JOIN conversations c ON c.principal = q.principal AND c.id = q.conversation_id
         WHERE q.status = 'queued' AND c.open_turn_id IS NULL
           -- a conversation's requests start in arrival order, one at a time
           AND NOT EXISTS (SELECT 1 FROM turn_runs b
                            WHERE b.principal = q.principal AND b.conversation_id = q.conversation_id
                              AND (b.status IN ('starting', 'running', 'waiting_for_tools')
                                   OR (b.status = 'queued' AND b.arrival < q.arrival)))
         ORDER BY q.arrival
         LIMIT 1
         FOR UPDATE OF q SKIP LOCKED) n
 WHERE t.principal = n.principal AND t.conversation_id = n.conversation_id AND t.turn_id = n.turn_id
RETURNING t.*
"""

# Turns whose owner's lease has passed (or who never had one).
_ORPHANS = f"""
SELECT t.* FROM turn_runs t
 WHERE t.status IN {LIVE}
   AND NOT EXISTS (SELECT 1 FROM runners r WHERE r.id = t.owner AND r.lease_until > clock_timestamp())
 LIMIT 100
"""


def run_dict(row: asyncpg.Record | None) -> dict | None:
    return None if row is None else {**dict(row), "conversation_id": row["conversation_id"]}


class Turns:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    # -- leases -----------------------------------------------------------------

    async def heartbeat(self, runner_id: str, ttl: float) -> None:
        await self.pool.execute(
            """INSERT INTO runners (id, lease_until) VALUES ($1, clock_timestamp() + make_interval(secs => $2))
               ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until""", runner_id, ttl)

    async def retire(self, runner_id: str) -> None:
        await self.pool.execute("DELETE FROM runners WHERE id = $1", runner_id)

    async def forget_dead(self, ttl: float) -> None:
        """Drop lease rows long past (a process killed without retiring); a turn whose
        owner has no row counts as orphaned all the same."""
        await self.pool.execute("DELETE FROM runners WHERE lease_until < clock_timestamp() - make_interval(secs => $1)",
                                ttl * 10)

    async def live_of(self, owner: str) -> list[dict]:
        return [run_dict(r) for r in await self.pool.fetch(
            f"SELECT * FROM turn_runs WHERE owner = $1 AND status IN {LIVE} LIMIT 1000", owner)]

    async def orphans(self) -> list[dict]:
        """Live turns whose process is dead (its lease passed)."""
        return [run_dict(r) for r in await self.pool.fetch(_ORPHANS)]

    # -- requests -----------------------------------------------------------------

    async def by_request_id(self, principal: str, conversation_id: uuid.UUID, request_id: str) -> dict | None:
        return run_dict(await self.pool.fetchrow(
            "SELECT * FROM turn_runs WHERE principal = $1 AND conversation_id = $2 AND request_id = $3",
            principal, conversation_id, request_id))

    async def get(self, principal: str, conversation_id: uuid.UUID, turn_id: str) -> dict | None:
        return run_dict(await self.pool.fetchrow(
            "SELECT * FROM turn_runs WHERE principal = $1 AND conversation_id = $2 AND turn_id = $3",
            principal, conversation_id, turn_id))

    async def add(self, principal: str, conversation_id: uuid.UUID, turn_id: str, request_id: str | None,
                  request: dict, status: str, owner: str | None) -> tuple[dict, bool]:
        """(the row, True) or, when `request_id` was taken meanwhile, (that row, False)."""
        row = await self.pool.fetchrow(
            """INSERT INTO turn_runs (principal, conversation_id, turn_id, request_id, request, status, owner)
               VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING *""",
            principal, conversation_id, turn_id, request_id, request, status, owner)
        if row is not None:
            return run_dict(row), True
        if request_id is not None:
            existing = await self.by_request_id(principal, conversation_id, request_id)
            if existing is not None:
                return existing, False
        raise RuntimeError(f"turn {turn_id!r} is already recorded in conversation {conversation_id}")

    async def remove(self, principal: str, conversation_id: uuid.UUID, turn_id: str) -> None:
        await self.pool.execute("DELETE FROM turn_runs WHERE principal = $1 AND conversation_id = $2 AND turn_id = $3",
                                principal, conversation_id, turn_id)

    async def set_status(self, principal: str, conversation_id: uuid.UUID, turn_id: str, status: str,
                         owner: str | None = None, only_from: tuple[str, ...] | None = None) -> bool:
        """Set a run's status (and owner when given). `only_from`: only if it is now one of these."""
        result = await self.pool.execute(
            """UPDATE turn_runs SET status = $4, owner = coalesce($5, owner)
                WHERE principal = $1 AND conversation_id = $2 AND turn_id = $3
                  AND ($6::text[] IS NULL OR status = ANY($6::text[]))""",
            principal, conversation_id, turn_id, status, owner, list(only_from) if only_from else None)
        return result != "UPDATE 0"

    async def requeue(self, principal: str, conversation_id: uuid.UUID, turn_id: str) -> None:
        """A claimed request that could not begin goes back to the queue, in its place."""
        await self.pool.execute(
            """UPDATE turn_runs SET status = 'queued', owner = NULL
                WHERE principal = $1 AND conversation_id = $2 AND turn_id = $3 AND status IN ('starting', 'running')""",
            principal, conversation_id, turn_id)

    async def end(self, principal: str, conversation_id: uuid.UUID, turn_id: str) -> None:
        """The turn is closed in the log: so is its run; processes are told when
        the conversation's next request may start (one statement)."""
        await self.pool.execute(
            f"""WITH ended AS (
                    UPDATE turn_runs SET status = 'ended'
                     WHERE principal = $1 AND conversation_id = $2 AND turn_id = $3 AND status IN {LIVE})
                SELECT pg_notify('{CHANNEL}', 'queued')
                 WHERE EXISTS (SELECT 1 FROM turn_runs WHERE principal = $1 AND conversation_id = $2
                                                         AND status = 'queued')""",
            principal, conversation_id, turn_id)

    async def first_waiting(self, principal: str, conversation_id: uuid.UUID) -> str | None:
        """The turn id of the conversation's oldest queued (or claimed, not yet begun) request."""
        return await self.pool.fetchval(
            """SELECT turn_id FROM turn_runs WHERE principal = $1 AND conversation_id = $2
                 AND status IN ('queued', 'starting') ORDER BY arrival LIMIT 1""", principal, conversation_id)

    async def claim(self, owner: str) -> dict | None:
        """Take the oldest queued request that may start now (its conversation
        has no open turn and no older request), or None."""
        return run_dict(await self.pool.fetchrow(_CLAIM, owner))

    async def continue_after(self, principal: str, conversation_id: uuid.UUID, turn_id: str, step: int,
                             pending: list[str], request: dict) -> None:
        """Calls of `turn_id`'s `step` got `pending` results: queue a continuation
        once they all have their final result (migration 010's trigger), or now
        if they already do. Under the conversation's row lock, as appends take
        it, so no final result can slip between the check and the insert."""
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    await conn.execute("SELECT 1 FROM conversations WHERE principal = $1 AND id = $2 FOR UPDATE",
                                       principal, conversation_id)
                    waiting = await conn.fetchval(
                        """SELECT coalesce(array_agg(c), '{}') FROM unnest($3::text[]) AS c
                            WHERE NOT EXISTS (
                                SELECT 1 FROM events e WHERE e.principal = $1 AND e.conversation_id = $2
                                   AND e.data ->> 'tool_call_id' = c AND e.type = 'tool.result'
                                   AND e.data ->> 'status' <> 'pending')""",
                        principal, conversation_id, pending)
                    if waiting:
                        await conn.execute(
                            """INSERT INTO turn_continuations (principal, conversation_id, turn_id, step, waiting, request)
                               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
                            principal, conversation_id, turn_id, step, waiting, request)
                    else:
                        await conn.execute(
                            """INSERT INTO turn_runs (principal, conversation_id, turn_id, request_id, request, status)
                               VALUES ($1, $2, $3, $4, $5, 'queued') ON CONFLICT DO NOTHING""",
                            principal, conversation_id, str(uuid.uuid4()), f"continuation:{turn_id}:{step}", request)
                        await conn.execute("SELECT pg_notify($1, 'queued')", CHANNEL)
            except CONNECTION_ERRORS as exc:
                raise unavailable(exc) from exc

    async def notify(self, payload: str) -> None:
        await self.pool.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

    # -- reads for GET /turns/{turn_id} -----------------------------------------------

    async def turn_events(self, principal: str, conversation_id: uuid.UUID, start: int,
                          end: int | None) -> list[dict]:
        """The turn's turn.started, model.requested and closing events (seq, type, data, created_at)."""
        rows = await self.pool.fetch(
            """SELECT seq, type, data, created_at FROM events
                WHERE principal = $1 AND conversation_id = $2 AND seq >= $3 AND ($4::int IS NULL OR seq <= $4)
                  AND type IN ('turn.started', 'model.requested', 'turn.finished', 'turn.cancelled', 'turn.failed')
                  AND data ->> 'turn_id' = (SELECT data ->> 'turn_id' FROM events
                                             WHERE principal = $1 AND conversation_id = $2 AND seq = $3)
                ORDER BY seq""",
            principal, conversation_id, start, end)
        return [dict(r) for r in rows]
