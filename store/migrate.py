"""Apply the numbered SQL files in `migrations/` in order, each once; then the steps in Python.

Each file runs in its own transaction together with its row in
`schema_migrations`, under an advisory lock, so several processes starting at
once (``chatlog serve --workers 4``) apply each file exactly once.

A step is what SQL cannot sensibly do (the hash chain's backfill: JCS). It
runs after the files, under the same lock, and is recorded in `schema_steps`
once done. It is idempotent and resumable: interrupted, it starts again where
its committed work ends.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from importlib import resources

import asyncpg
import orjson

from domain import chain
from store.rows import rfc3339

log = logging.getLogger("chatlog.migrate")

_LOCK_KEY = 0x636861746C6F67  # "chatlog"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration file, in order."""
    found = []
    for entry in resources.files("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migration files share a number: {versions}")
    return found


async def applied(conn: asyncpg.Connection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply what is missing; return the names applied now."""
    done: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
    for version, name, sql in available():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            if await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", version):
                continue
            log.info("applying migration %s", name)
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            done.append(name)
    await conn.execute(_STEPS_TABLE)
    for name, step in STEPS:
        # a session lock: a step commits as it goes, in many transactions
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            if await conn.fetchval("SELECT 1 FROM schema_steps WHERE name = $1", name):
                continue
            log.info("running migration step %s", name)
            await step(conn)
            await conn.execute("INSERT INTO schema_steps (name) VALUES ($1)", name)
            done.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return done


async def migrate_url(url: str, retry_seconds: float = 30.0) -> list[str]:
    """Connect to `url` and apply what is missing. A server that is starting,
    restarting or unreachable for a moment is waited for, up to
    `retry_seconds`: a file whose COMMIT reply was lost is simply checked again
    on the retry (its row in schema_migrations says whether it was applied)."""
    from store.pool import CONNECTION_ERRORS

    deadline = time.monotonic() + retry_seconds
    delay = 0.2
    while True:
        try:
            conn = await asyncpg.connect(url, timeout=5)
            try:
                return await migrate(conn)
            finally:
                conn.terminate()
        except CONNECTION_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("cannot migrate yet (%r); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def pending(conn: asyncpg.Connection) -> list[str]:
    have = await applied(conn)
    files = [name for version, name, _ in available() if version not in have]
    steps = set()
    if await conn.fetchval("SELECT to_regclass('schema_steps') IS NOT NULL"):
        steps = {r["name"] for r in await conn.fetch("SELECT name FROM schema_steps")}
    return files + [name for name, _ in STEPS if name not in steps]


# -- steps ------------------------------------------------------------------------

_STEPS_TABLE = """CREATE TABLE IF NOT EXISTS schema_steps (
                      name       text PRIMARY KEY,
                      applied_at timestamptz NOT NULL DEFAULT now())"""

_BACKFILL_EVENTS = 20_000  # about this many events per backfill transaction (its lock on events is held that long)
_PAGE = 2_000


async def backfill_hashes(conn: asyncpg.Connection, batch_events: int = _BACKFILL_EVENTS) -> None:
    """Migration 011: chain the events stored before it, then make events.hash NOT NULL.

    The conversations still without a head hash are taken in (principal, id)
    order, a batch of about `batch_events` events per transaction; each
    conversation's events are read a page at a time (memory stays flat),
    hashed as an append would have, and its head set, all in that batch's
    transaction. Interrupted, it resumes at the first conversation without a
    head hash. The append-only guard is switched off for the batch's UPDATE
    and on again (ENABLE ALWAYS, as migration 005 has it) in the same
    transaction: the lock that takes keeps every other session off the
    events table until COMMIT, so nobody ever sees the guard off.
    """
    todo = await conn.fetchval("SELECT count(*) FROM conversations WHERE head_hash IS NULL")
    if todo:
        log.info("hash chain: %d conversations were stored before migration 011; hashing their events", todo)
    started, done_conversations, done_events, last_log = time.monotonic(), 0, 0, time.monotonic()
    after: tuple[str, object] | None = None
    while True:
        async with conn.transaction():
            await conn.execute("ALTER TABLE events DISABLE TRIGGER events_append_only")
            batch = await conn.fetch(
                """SELECT principal, id, seq FROM conversations
                    WHERE head_hash IS NULL AND ($1::text IS NULL OR (principal, id) > ($1, $2::uuid))
                    ORDER BY principal, id LIMIT 1000 FOR UPDATE""",
                *(after or (None, None)))
            size = 0
            for row in batch:
                if size and size + row["seq"] > batch_events:
                    break
                done_events += await _chain_one(conn, row["principal"], row["id"])
                size += row["seq"]
                done_conversations += 1
                after = (row["principal"], row["id"])
            await conn.execute("ALTER TABLE events ENABLE ALWAYS TRIGGER events_append_only")
        if not batch:
            break
        if time.monotonic() - last_log > 5:
            last_log = time.monotonic()
            log.info("hash chain: %d of %d conversations hashed (%d events, %.0f events/s)", done_conversations,
                     todo, done_events, done_events / max(last_log - started, 1e-9))
    if todo:
        log.info("hash chain: all %d conversations hashed (%d events in %.1f s)", done_conversations, done_events,
                 time.monotonic() - started)
    # every event has its hash now: NOT NULL for good. VALIDATE scans under a
    # lock that lets reads and writes go on; SET NOT NULL then trusts it.
    async with conn.transaction():
        if await conn.fetchval("SELECT 1 FROM pg_constraint WHERE conname = 'events_hash_present' "
                               "AND conrelid = 'events'::regclass"):
            await conn.execute("ALTER TABLE events VALIDATE CONSTRAINT events_hash_present")
            await conn.execute("ALTER TABLE events ALTER COLUMN hash SET NOT NULL")
            await conn.execute("ALTER TABLE events DROP CONSTRAINT events_hash_present")


async def _chain_one(conn: asyncpg.Connection, principal: str, conversation_id: object) -> int:
    """Hash one conversation's events in seq order and set its head; how many there were."""
    prev, after, count = chain.ZERO, 0, 0
    cid = str(conversation_id)
    while True:
        rows = await conn.fetch(
            """SELECT seq, id, type, data::text AS data, created_at FROM events
                WHERE principal = $1 AND conversation_id = $2 AND seq > $3 ORDER BY seq LIMIT $4""",
            principal, conversation_id, after, _PAGE)
        if not rows:
            break
        hashes = []
        for r in rows:
            prev = chain.event_hash(prev, {"conversation_id": cid, "seq": r["seq"], "id": r["id"], "type": r["type"],
                                           "data": orjson.loads(r["data"]), "created_at": rfc3339(r["created_at"])})
            hashes.append(prev)
        await conn.execute(
            """UPDATE events e SET hash = v.hash FROM unnest($3::int[], $4::text[]) AS v(seq, hash)
                WHERE e.principal = $1 AND e.conversation_id = $2 AND e.seq = v.seq""",
            principal, conversation_id, [r["seq"] for r in rows], hashes)
        after, count = rows[-1]["seq"], count + len(rows)
    await conn.execute("UPDATE conversations SET head_hash = $3 WHERE principal = $1 AND id = $2",
                       principal, conversation_id, prev if count else None)
    return count


# (name, coroutine taking the connection), run in this order after the SQL files
STEPS = [("011_hash_chain_backfill", backfill_hashes)]
