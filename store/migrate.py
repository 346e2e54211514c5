"""Apply the numbered SQL files in `migrations/` in order, each once.

Each file runs in its own transaction together with its row in
`schema_migrations`, under an advisory lock, so several processes starting at
once (``chatlog serve --workers 4``) apply each file exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from importlib import resources

import asyncpg

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
    return [name for version, name, _ in available() if version not in have]
