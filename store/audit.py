"""Audit reads: a conversation's chain checked (GET /verify, `chatlog verify`),
every head at one moment (`chatlog digest`), a conversation's events with
their hashes (`chatlog export`). The checking itself is domain/chain.py's.

Each check reads one conversation in one REPEATABLE READ snapshot, so its
head and its events agree however many appends commit meanwhile; the events
come a page at a time (memory stays flat for any length).
"""

from __future__ import annotations

import uuid
from typing import AsyncIterator

import asyncpg

from domain import chain
from store.pool import _init_connection
from store.rows import rfc3339

PAGE = 1000

# the stored event as the API shows it (created_at as store/rows.py rfc3339 writes it)
_EVENTS = """
SELECT conversation_id::text AS conversation_id, seq, position, id, type, data,
       to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_at, hash
  FROM events
 WHERE principal = $1 AND conversation_id = $2 AND seq > $3
 ORDER BY seq LIMIT $4
"""

_HEAD = "SELECT seq, head_hash FROM conversations WHERE principal = $1 AND id = $2"


async def connect(url: str) -> asyncpg.Connection:
    """A connection that decodes jsonb as the store does (the CLI's)."""
    conn = await asyncpg.connect(url, timeout=10, server_settings={"application_name": "chatlog audit"})
    await _init_connection(conn)
    return conn


async def events(conn: asyncpg.Connection, principal: str, conversation_id: uuid.UUID,
                 page: int = PAGE) -> AsyncIterator[dict]:
    """The conversation's stored events, in seq order, read `page` at a time."""
    after = 0
    while True:
        rows = await conn.fetch(_EVENTS, principal, conversation_id, after, page)
        for row in rows:
            yield dict(row)
        if len(rows) < page:
            return
        after = rows[-1]["seq"]


async def check(conn: asyncpg.Connection, principal: str, conversation_id: uuid.UUID,
                checkpoint: int | None = None) -> tuple[chain.Verdict, int] | None:
    """(verdict, head seq) for the principal's conversation, None when it has no row."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        head = await conn.fetchrow(_HEAD, principal, conversation_id)
        if head is None:
            return None
        checking = chain.ChainCheck(str(conversation_id), head["seq"], head["head_hash"], checkpoint)
        async for row in events(conn, principal, conversation_id):
            if not checking.add(row):
                break
        return checking.verdict(), head["seq"]


async def conversations(conn: asyncpg.Connection, page: int = 10_000) -> AsyncIterator[asyncpg.Record]:
    """(principal, id, seq, head_hash) of every conversation, in (principal, id) order."""
    after: tuple[str, uuid.UUID] | None = None
    while True:
        rows = await conn.fetch(
            """SELECT principal, id, seq, head_hash FROM conversations
                WHERE $1::text IS NULL OR (principal, id) > ($1::text, $2::uuid)
                ORDER BY principal, id LIMIT $3""",
            *(after or (None, None)), page)
        for row in rows:
            yield row
        if len(rows) < page:
            return
        after = (rows[-1]["principal"], rows[-1]["id"])


async def tombstone(conn: asyncpg.Connection, principal: str, conversation_id: uuid.UUID) -> dict | None:
    row = await conn.fetchrow(
        """SELECT erased_at, event_count, last_seq, head_hash FROM erased_conversations
            WHERE principal = $1 AND conversation_id = $2""", principal, conversation_id)
    if row is None:
        return None
    return {"erased_at": rfc3339(row["erased_at"]), "event_count": row["event_count"], "last_seq": row["last_seq"],
            "head_hash": row["head_hash"]}


async def tombstones(conn: asyncpg.Connection, page: int = 10_000) -> AsyncIterator[dict]:
    """Every tombstone (principal, conversation_id, erased_at, event_count, last_seq, head_hash), in key order."""
    after: tuple[str, uuid.UUID] | None = None
    while True:
        rows = await conn.fetch(
            """SELECT principal, conversation_id, erased_at, event_count, last_seq, head_hash
                 FROM erased_conversations
                WHERE $1::text IS NULL OR (principal, conversation_id) > ($1::text, $2::uuid)
                ORDER BY principal, conversation_id LIMIT $3""",
            *(after or (None, None)), page)
        for row in rows:
            yield {**dict(row), "erased_at": rfc3339(row["erased_at"])}
        if len(rows) < page:
            return
        after = (rows[-1]["principal"], rows[-1]["conversation_id"])


async def principals_of(conn: asyncpg.Connection, conversation_id: uuid.UUID) -> list[str]:
    """The principals having a conversation (live or erased) with this id."""
    rows = await conn.fetch(
        """SELECT principal FROM conversations WHERE id = $1
           UNION SELECT principal FROM erased_conversations WHERE conversation_id = $1 ORDER BY 1""",
        conversation_id)
    return [r["principal"] for r in rows]


async def digest(conn: asyncpg.Connection) -> dict:
    """Every conversation's (principal, id, seq, head_hash) at one moment, and the root over them."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        taken_at = rfc3339(await conn.fetchval("SELECT statement_timestamp()"))
        entries = [{"principal": r["principal"], "id": str(r["id"]), "seq": r["seq"], "head_hash": r["head_hash"]}
                   async for r in conversations(conn)]
    return {"version": 1, "taken_at": taken_at, "root": chain.digest_root(entries, taken_at), "conversations": entries}
