"""Stored events can never be changed or removed: the database itself refuses it.

Every test goes around the application entirely (plain asyncpg on the run's
database, as a superuser would in psql) and then checks that the event reads
back exactly as it was stored.
"""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from store import NewEvent


async def _stored_event(store, principal) -> tuple[uuid.UUID, dict]:
    cid = uuid.uuid4()
    await store.create_conversation(principal, cid, {"metadata": {"k": "v"}})
    appended = await store.append(principal, cid, [NewEvent("message.user", {"content": "keep me"}, "evt-1")])
    return cid, appended.events[0]


async def _read_back(conn: asyncpg.Connection, cid: uuid.UUID) -> list[tuple]:
    rows = await conn.fetch(
        "SELECT seq, position, id, type, data::text, created_at, principal FROM events"
        " WHERE conversation_id = $1 ORDER BY seq", cid)
    return [tuple(r) for r in rows]


@pytest.fixture
async def raw(database_url):
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.mark.parametrize("statement", [
    "UPDATE events SET data = '{\"content\": \"changed\"}' WHERE conversation_id = $1 AND seq = 2",
    "UPDATE events SET seq = seq WHERE conversation_id = $1",  # even a no-op update
    "UPDATE events SET principal = 'someone-else' WHERE conversation_id = $1",
    "DELETE FROM events WHERE conversation_id = $1 AND seq = 2",
    "DELETE FROM events WHERE conversation_id = $1",
])
async def test_update_and_delete_of_an_event_are_refused_and_the_event_is_unchanged(
        store, principal, raw, statement):
    cid, stored = await _stored_event(store, principal)
    before = await _read_back(raw, cid)
    assert len(before) == 2

    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await raw.execute(statement, cid)

    assert await _read_back(raw, cid) == before
    events, last_seq = await store.read_events(principal, cid)
    assert last_seq == 2
    assert events[1] == stored


async def test_truncate_of_events_is_refused_and_nothing_is_lost(store, principal, raw):
    cid, stored = await _stored_event(store, principal)
    before = await _read_back(raw, cid)
    total = await raw.fetchval("SELECT count(*) FROM events")

    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await raw.execute("TRUNCATE events")
    # TRUNCATE ... CASCADE from the conversations side reaches events too, and is refused the same way
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await raw.execute("TRUNCATE conversations CASCADE")

    assert await raw.fetchval("SELECT count(*) FROM events") == total
    assert await _read_back(raw, cid) == before
    assert (await store.read_events(principal, cid))[0][1] == stored


async def test_deleting_the_conversation_row_cannot_take_its_events_with_it(store, principal, raw):
    cid, _ = await _stored_event(store, principal)
    before = await _read_back(raw, cid)

    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await raw.execute("DELETE FROM conversations WHERE id = $1", cid)

    assert await _read_back(raw, cid) == before
    assert (await store.get_conversation(principal, cid))["seq"] == 2


async def test_a_refused_change_inside_a_transaction_rolls_back_with_it(store, principal, raw):
    """A script that tries to 'fix' an event and then carries on keeps nothing of the attempt."""
    cid, _ = await _stored_event(store, principal)
    before = await _read_back(raw, cid)

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with raw.transaction():
            await raw.execute("UPDATE events SET type = 'message.system' WHERE conversation_id = $1", cid)

    assert await _read_back(raw, cid) == before


async def test_replication_role_replica_does_not_switch_the_append_only_guard_off(store, principal, raw):
    """`SET session_replication_role = replica` (used by bulk loaders and replication tools to skip
    triggers) silently disables ordinary triggers. The append-only triggers must fire in every
    session mode (`ALTER TABLE events ENABLE ALWAYS TRIGGER ...`)."""
    cid, _ = await _stored_event(store, principal)
    before = await _read_back(raw, cid)

    transaction = raw.transaction()
    await transaction.start()
    try:
        await raw.execute("SET LOCAL session_replication_role = replica")
        try:
            await raw.execute("UPDATE events SET data = '{\"content\": \"changed\"}' WHERE conversation_id = $1",
                              cid)
        except asyncpg.InsufficientPrivilegeError as refused:
            assert "append-only" in str(refused)
        else:
            changed = await _read_back(raw, cid)
            assert changed == before, "an event was changed under session_replication_role = replica"
            pytest.fail("UPDATE events was accepted under session_replication_role = replica")
    finally:
        await transaction.rollback()  # never keep what slipped through

    assert await _read_back(raw, cid) == before
