"""Conversations stored before the hash chain get theirs from the migration's
backfill: rows written as the old schema wrote them (no hash), then
`chatlog migrate`, then every check passes and appends chain on."""

from __future__ import annotations

import uuid

import asyncpg
import orjson
import pytest

import domain
from store import NewEvent, Store
from store.migrate import available, migrate
from tests.pg import with_database
from tests.test_audit import chatlog


async def _database_at_version_10(pg_server) -> str:
    """A new database with migrations 001-010 only: the schema before the chain."""
    name = f"chatlog_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server.admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    pg_server.databases.append(name)
    url = with_database(pg_server.admin_url, name)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                           "applied_at timestamptz NOT NULL DEFAULT now())")
        for version, file, sql in available():
            if version <= 10:
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, file)
    finally:
        await conn.close()
    return url


async def _old_conversation(conn: asyncpg.Connection, principal: str, messages: list) -> uuid.UUID:
    """A conversation as the old store wrote it: its row and its events, no hashes anywhere."""
    cid = uuid.uuid4()
    created = {"metadata": {"from": "before the chain"}}
    conversation = domain.create(cid, created)
    events = [("conversation.created", created)]
    for content in messages:
        domain.apply(conversation, "message.user", {"content": content})
        events.append(("message.user", {"content": content}))
    await conn.execute(
        """INSERT INTO conversations (id, principal, seq, created_at, updated_at, metadata, title, open_turn_id, state)
           VALUES ($1, $2, $3, now(), now(), $4::jsonb, NULL, NULL, $5::jsonb)""",
        cid, principal, len(events), orjson.dumps(created["metadata"]).decode(),
        orjson.dumps(domain.to_state(conversation)).decode())
    for seq, (type_, data) in enumerate(events, start=1):
        await conn.execute(
            """INSERT INTO events (principal, conversation_id, seq, position, id, type, data, created_at)
               VALUES ($1, $2, $3::int, (pg_current_xact_id()::text::bigint << 16) + $3::int, $4, $5, $6::jsonb,
                       now() + $3::int * interval '1 millisecond')""",
            principal, cid, seq, str(uuid.uuid4()), type_, orjson.dumps(data).decode())
    return cid


async def test_events_stored_before_the_chain_get_it_from_the_backfill(pg_server, principal):
    url = await _database_at_version_10(pg_server)
    conn = await asyncpg.connect(url)
    try:
        # one holds an integer beyond 2^53, which the API accepted before safe_numbers existed
        legacy = [await _old_conversation(conn, principal, [f"hello {i}", [{"type": "text", "text": "x",
                                                                             "n": 2**60 + i}]])
                  for i in range(3)]
        applied = await migrate(conn)
        assert "011_hash_chain.sql" in applied and "011_hash_chain_backfill" in applied
        assert await conn.fetchval("SELECT count(*) FROM events WHERE hash IS NULL") == 0
        assert await conn.fetchval("SELECT count(*) FROM conversations WHERE head_hash IS NULL") == 0
        assert await migrate(conn) == []  # done once, recorded
        # from now on the column itself refuses an event without its hash
        with pytest.raises(asyncpg.NotNullViolationError):
            await conn.execute(
                """INSERT INTO events (principal, conversation_id, seq, position, id, type, data, created_at)
                   VALUES ($1, $2, 99, 1, 'x', 'message.user', '{}', now())""", principal, legacy[0])
    finally:
        await conn.close()

    store = await Store.open(url, pool_size=2, writers=1)
    try:
        for cid in legacy:
            assert await store.verify(principal, cid) == {
                "ok": True, "verified_through_seq": 3,
                "head_hash": await store.pool.fetchval(
                    "SELECT head_hash FROM conversations WHERE principal = $1 AND id = $2", principal, cid)}
        # an append chains on from the backfilled head
        await store.append(principal, legacy[0], [NewEvent("message.user", {"content": "after"})])
        assert (await store.verify(principal, legacy[0]))["verified_through_seq"] == 4
    finally:
        await store.close()
    result = chatlog(url, "verify", "--quiet")
    assert result.returncode == 0, result.stdout
    assert result.stdout.decode().strip().endswith("OK")
