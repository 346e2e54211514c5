"""Erasure: DELETE /v1/conversations/{id} removes a conversation for good.

- The owner gets 410 conversation_erased on every route of it afterwards
  (its tombstone in details), DELETE again included; another tenant 404.
- Not a row of it is left in any table that names a conversation; the
  tombstone keeps no content.
- The append-only guard lets exactly the erase function's DELETEs through:
  any other session (a superuser's too) is refused, setting or no setting.
- Appends racing an erase: every one answered 2xx is counted in the tombstone,
  none is answered 2xx after it.
- Forks are conversations of their own and stay; lists and the feed forget it,
  and the feed still never skips an event of the conversations that remain.

Streams and the runner (real servers): tests/test_erasure_streams.py.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import pytest

from store import NewEvent
from tests.helpers import (TURN, append, asgi_client, assert_contract_error, assert_error, eventually,
                           new_conversation)
# the app (its runner's upstream a closed port, so the turn routes answer as in
# production) and its two tenants' clients, as the tenant-isolation tests have them
from tests.test_tenants_sealed import CALLS, alice, app, bob  # noqa: F401 (fixtures)

DEADLINE = 20
TOMBSTONE_KEYS = {"conversation_id", "erased_at", "event_count", "last_seq", "head_hash"}


@pytest.fixture
async def raw(database_url):
    """A superuser session of its own, around the application (as psql would be)."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def erase(client, cid: str) -> None:
    r = await client.delete(f"/v1/conversations/{cid}")
    assert r.status_code == 204, r.text
    assert r.content == b""


def assert_erased(response, cid: str) -> dict:
    error = assert_contract_error(response, 410, "conversation_erased")
    tombstone = error["details"]
    assert set(tombstone) == TOMBSTONE_KEYS and tombstone["conversation_id"] == cid, tombstone
    return tombstone


async def tables_naming_conversations(conn) -> list[tuple[str, str]]:
    """(table, its conversation column) for every table of the schema that names a conversation,
    as the catalog lists them now: a table added later is checked without a change here."""
    rows = await conn.fetch(
        """SELECT table_name, column_name FROM information_schema.columns
            WHERE table_schema = 'public' AND column_name IN ('conversation_id', 'id')
              AND table_name <> 'erased_conversations'
              AND (column_name = 'conversation_id' OR table_name = 'conversations')""")
    return sorted((r["table_name"], r["column_name"]) for r in rows)


async def rows_of(conn, principal: str, cid: str) -> dict[str, int]:
    counts = {}
    for table, column in await tables_naming_conversations(conn):
        counts[table] = await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE principal = $1 AND {column} = $2", principal, uuid.UUID(cid))
    return counts


# -- 410 everywhere for the owner, 404 for others ---------------------------------------------------


async def test_after_delete_every_route_answers_410_to_the_owner_and_404_to_others(app, alice, bob, ledger):
    cid = await new_conversation(alice, metadata={"topic": "secret"})
    await append(alice, cid, TURN)
    token = (await alice.post(f"/v1/conversations/{cid}/stream-token")).json()["token"]
    await erase(alice, cid)

    for (method, path), call in sorted(CALLS.items()):  # every route on a conversation (the DELETE too)
        url = path.format(conversation_id=cid, turn_id="t1")
        tombstone = (await ledger.refused(alice.request(method, url, **call), 410, "conversation_erased"))["details"]
        assert tombstone["conversation_id"] == cid and set(tombstone) == TOMBSTONE_KEYS, (method, path, tombstone)
        assert tombstone["event_count"] == tombstone["last_seq"] == 1 + len(TURN)
        await ledger.refused(bob.request(method, url, **call), 404, "not_found")
    # a stream token minted before the erasure opens nothing after it
    async with asgi_client(app) as anonymous:
        for url in (f"/v1/conversations/{cid}/stream", f"/v1/conversations/{cid}/turns/t1/stream"):
            assert_erased(await anonymous.get(url, params={"token": token, "follow": "false"}), cid)
    # an AI SDK chat on its id reaches it too
    r = await alice.post("/v1/ai-sdk/chat", json={"id": cid, "messages": [
        {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]})
    assert_erased(r, cid)


async def test_the_tombstone_says_what_was_erased_and_keeps_no_content(alice, raw, principal):
    cid = await new_conversation(alice, metadata={"name": "Ada Lovelace"}, system="secret system prompt")
    await append(alice, cid, TURN)
    await alice.post(f"/v1/conversations/{cid}/events", json={"events": [
        {"type": "conversation.titled", "data": {"title": "private title"}}]})
    events = (await alice.get(f"/v1/conversations/{cid}/events")).json()["events"]
    await erase(alice, cid)

    tombstone = assert_erased(await alice.delete(f"/v1/conversations/{cid}"), cid)  # DELETE again: 410
    assert tombstone["event_count"] == tombstone["last_seq"] == events[-1]["seq"] == 2 + len(TURN)
    # the chain's head: a digest taken before still accounts for the conversation
    assert tombstone["head_hash"] == events[-1]["hash"] and len(tombstone["head_hash"]) == 64
    assert tombstone["erased_at"].endswith("Z")
    row = await raw.fetchrow("SELECT * FROM erased_conversations WHERE conversation_id = $1", uuid.UUID(cid))
    assert set(dict(row)) == {"principal", "conversation_id", "erased_at", "event_count", "last_seq", "head_hash"}
    assert row["principal"] == f"alice-{principal}"
    for secret in ("Ada Lovelace", "secret system prompt", "private title", "Paris"):
        assert secret not in str(dict(row))


async def test_every_row_of_the_conversation_is_gone_from_every_table(alice, store, raw, principal):
    owner = f"alice-{principal}"
    cid = await new_conversation(alice)
    # long enough for snapshots of both folds (one every 256 seqs), and a turn waiting on a pending result
    await append(alice, cid, [{"type": "message.user", "data": {"content": f"m{i}"}} for i in range(300)])
    await append(alice, cid, TURN[:8] + [{"type": "tool.result", "data": {"tool_call_id": "call_1",
                                                                          "content": "working", "status": "pending"}}])
    assert (await alice.get(f"/v1/conversations/{cid}/messages")).status_code == 200
    assert (await alice.get(f"/v1/conversations/{cid}/stream",
                            params={"format": "ui", "follow": "false", "after": "300"})).status_code == 200
    await store.history.flush()
    await store.ui_states.flush()
    # the runner's rows: a queued request, and a continuation waiting for the pending call
    await raw.execute(
        """INSERT INTO turn_runs (principal, conversation_id, turn_id, request, status)
           VALUES ($1, $2, 'queued-turn', '{"message": {"role": "user", "content": "secret"}}', 'queued')""",
        owner, uuid.UUID(cid))
    await raw.execute(
        """INSERT INTO turn_continuations (principal, conversation_id, turn_id, step, waiting, request)
           VALUES ($1, $2, 't1', 1, ARRAY['call_1'], '{}')""", owner, uuid.UUID(cid))
    other = await new_conversation(alice)  # a neighbour, untouched
    await append(alice, other, TURN)

    before = await rows_of(raw, owner, cid)
    assert {t for t, n in before.items() if n} == {"conversations", "events", "history_snapshots", "ui_snapshots",
                                                   "turn_runs", "turn_continuations"}, before
    neighbour = await rows_of(raw, owner, other)
    await erase(alice, cid)

    assert set((await rows_of(raw, owner, cid)).values()) == {0}
    assert await rows_of(raw, owner, other) == neighbour
    assert await raw.fetchval("SELECT count(*) FROM erased_conversations WHERE conversation_id = $1",
                              uuid.UUID(cid)) == 1


# -- the guard -------------------------------------------------------------------------------------


async def test_the_guard_refuses_every_change_but_the_erase_functions_also_for_a_superuser(alice, raw, principal):
    owner = f"alice-{principal}"
    erased, kept = await new_conversation(alice), await new_conversation(alice)
    for cid in (erased, kept):
        await append(alice, cid, TURN)
    await erase(alice, erased)
    key = f"{kept}/{owner}"

    async def refused(*statements: str, setting: str | None = None) -> None:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            async with raw.transaction():
                if setting is not None:
                    await raw.execute("SELECT set_config('chatlog.erasing', $1, true)", setting)
                for statement in statements:
                    await raw.execute(statement.format(kept=kept, erased=erased))

    # no setting: nothing
    await refused("DELETE FROM events WHERE conversation_id = '{kept}'")
    await refused("UPDATE events SET data = '{{}}' WHERE conversation_id = '{kept}'")
    await refused("TRUNCATE events")
    # the setting alone, naming the conversation: no tombstone, no DELETE
    await refused("DELETE FROM events WHERE conversation_id = '{kept}' AND seq = 2", setting=key)
    # nor an UPDATE or a TRUNCATE, ever
    await refused("UPDATE events SET data = '{{}}' WHERE conversation_id = '{kept}'", setting=key)
    await refused("TRUNCATE events", setting=key)
    # the setting naming an erased conversation (its tombstone exists) opens no other conversation's events
    await refused("DELETE FROM events WHERE conversation_id = '{kept}'", setting=f"{erased}/{owner}")
    # and every refusal left the log whole
    assert len((await alice.get(f"/v1/conversations/{kept}/events")).json()["events"]) == 1 + len(TURN)
    # tombstones are permanent too
    for statement in ("DELETE FROM erased_conversations WHERE conversation_id = '{erased}'",
                      "UPDATE erased_conversations SET event_count = 0 WHERE conversation_id = '{erased}'",
                      "TRUNCATE erased_conversations"):
        await refused(statement, setting=f"{erased}/{owner}")
    assert await raw.fetchval("SELECT count(*) FROM erased_conversations WHERE conversation_id = $1",
                              uuid.UUID(erased)) == 1


async def test_the_setting_is_cleared_inside_the_erase_function(alice, raw, principal):
    """After the function returns, its own transaction can delete nothing more."""
    owner = f"alice-{principal}"
    cid, kept = await new_conversation(alice), await new_conversation(alice)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        async with raw.transaction():
            row = await raw.fetchrow("SELECT * FROM chatlog_erase_conversation($1, $2)", owner, uuid.UUID(cid))
            assert row["event_count"] == 1
            assert await raw.fetchval("SELECT current_setting('chatlog.erasing', true)") == ""
            await raw.execute("DELETE FROM events WHERE conversation_id = $1", uuid.UUID(kept))
    # the failed transaction rolled back the erasure with it
    assert (await alice.get(f"/v1/conversations/{cid}")).status_code == 200


# -- ids, forks, lists -------------------------------------------------------------------------------


async def test_an_erased_id_is_never_used_again_and_a_fork_survives_its_source(alice, bob):
    source = await new_conversation(alice, system="Be brief.")
    await append(alice, source, TURN)
    r = await alice.post(f"/v1/conversations/{source}/fork", json={"at_seq": 6})
    assert r.status_code == 201, r.text
    fork = r.json()["id"]
    fork_messages = (await alice.get(f"/v1/conversations/{fork}/messages")).json()["messages"]
    fork_events = (await alice.get(f"/v1/conversations/{fork}/events")).json()["events"]
    await erase(alice, source)

    # the fork is a conversation of its own: all of it stays, and it goes on
    assert (await alice.get(f"/v1/conversations/{fork}/messages")).json()["messages"] == fork_messages
    assert (await alice.get(f"/v1/conversations/{fork}/events")).json()["events"] == fork_events
    await append(alice, fork, [{"type": "turn.cancelled", "data": {"turn_id": "t1"}}])
    # the erased id: not to be created or forked into again by its owner...
    assert_error(await alice.post("/v1/conversations", json={"id": source}), 409, "conversation_erased")
    r = await alice.post(f"/v1/conversations/{fork}/fork", json={"at_seq": 2, "id": source})
    assert_error(r, 409, "conversation_erased")
    # ...while to another tenant it is just a free id (ids are per principal)
    assert (await bob.post("/v1/conversations", json={"id": source})).status_code == 201


async def test_lists_no_longer_show_it(alice):
    ids = [await new_conversation(alice) for _ in range(4)]
    await erase(alice, ids[1])
    listed = (await alice.get("/v1/conversations", params={"limit": 200})).json()["conversations"]
    assert [c["id"] for c in listed] == [ids[3], ids[2], ids[0]]
    # its id as a cursor pages nothing (it names no conversation any more)
    assert (await alice.get("/v1/conversations", params={"before": ids[1]})).json()["conversations"] == []


async def test_the_feed_forgets_it_and_still_never_skips_what_remains(alice, store, principal):
    """Writers append to six conversations while two of them are erased and a
    reader pages the feed from position 0, always passing the last position
    it got. The reader gets every event of the four that remain exactly
    once, in position order; a read from 0 afterwards holds nothing of the
    erased two (deleting events makes no position: the feed's proof stands)."""
    owner = f"alice-{principal}"
    cids = [await new_conversation(alice) for _ in range(6)]
    kept, doomed = cids[:4], cids[4:]
    rng = random.Random()
    writing = True

    async def write(cid: str) -> None:
        n = 0
        while writing:
            n += 1
            batch = [{"type": "message.user", "data": {"content": f"{cid}-{n}-{k}"}} for k in range(rng.randint(1, 4))]
            r = await alice.post(f"/v1/conversations/{cid}/events", json={"events": batch})
            if r.status_code == 410:
                return
            assert r.status_code == 201, r.text
            await asyncio.sleep(0)

    got: list[dict] = []
    reading = True

    async def read() -> None:
        after = 0
        while reading:
            page = await store.read_feed(owner, after, 500)
            got.extend(page)
            if page:
                after = page[-1]["position"]
            else:
                await asyncio.sleep(0.01)

    writers = [asyncio.create_task(write(cid)) for cid in cids]
    reader = asyncio.create_task(read())
    await eventually(lambda: len(got) > 200, "the reader to be under way", timeout=DEADLINE)
    await asyncio.gather(*(erase(alice, cid) for cid in doomed))
    seen = len(got)
    await eventually(lambda: len(got) > seen + 400, "more events after the erasures", timeout=DEADLINE)
    writing = False
    await asyncio.wait_for(asyncio.gather(*writers), DEADLINE)
    total = await store.pool.fetchval(
        "SELECT count(*) FROM events WHERE principal = $1 AND conversation_id = ANY($2::uuid[])",
        owner, [uuid.UUID(c) for c in kept])
    await eventually(lambda: sum(e["conversation_id"] in kept for e in got) >= total,
                     "the reader to reach the last event written", timeout=DEADLINE)
    reading = False
    await asyncio.wait_for(reader, DEADLINE)

    positions = [e["position"] for e in got]
    assert positions == sorted(positions) and len(set(positions)) == len(positions), "repeated or out of order"
    for cid in kept:
        seqs = [e["seq"] for e in got if e["conversation_id"] == cid]
        stored = (await alice.get(f"/v1/conversations/{cid}")).json()["seq"]
        assert seqs == list(range(1, stored + 1)), f"the feed skipped or repeated events of {cid}"
    later = await store.read_feed(owner, 0, 100_000)
    assert not {e["conversation_id"] for e in later} & set(doomed)
    assert [e for e in later if e["conversation_id"] in kept] == [e for e in got if e["conversation_id"] in kept]


# -- racing appends ----------------------------------------------------------------------------------


async def test_no_append_is_answered_2xx_after_the_erasure_and_none_before_is_lost(alice, store, principal):
    """Eight appenders hammer one conversation; it is erased mid-way. Each
    appender's answers are some 201s, then only 410s. Every 201 was committed
    before the erasure: the tombstone counts exactly the events they wrote."""
    cid = await new_conversation(alice)
    answers: dict[int, list[int]] = {}
    accepted_events = 0

    async def appender(n: int) -> None:
        nonlocal accepted_events
        mine = answers[n] = []
        k = 0
        while True:
            k += 1
            batch = [{"id": f"a{n}-{k}-{j}", "type": "message.user", "data": {"content": f"{n}/{k}/{j}"}}
                     for j in range(1 + k % 3)]
            r = await alice.post(f"/v1/conversations/{cid}/events", json={"events": batch})
            mine.append(r.status_code)
            if r.status_code == 201:
                accepted_events += len(batch)
            elif r.status_code == 410:
                if mine.count(410) >= 3:  # a few more tries after the first 410: still 410
                    return
            else:
                raise AssertionError(r.text)

    tasks = [asyncio.create_task(appender(n)) for n in range(8)]
    await eventually(lambda: accepted_events >= 100, "appends to be under way", timeout=DEADLINE)
    r = await alice.delete(f"/v1/conversations/{cid}")
    assert r.status_code == 204, r.text
    await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)

    for n, statuses in answers.items():
        first_gone = statuses.index(410)
        assert set(statuses[:first_gone]) == {201} and set(statuses[first_gone:]) == {410}, (n, statuses)
    tombstone = assert_erased(await alice.get(f"/v1/conversations/{cid}"), cid)
    assert tombstone["event_count"] == tombstone["last_seq"] == 1 + accepted_events
    assert await store.pool.fetchval("SELECT count(*) FROM events WHERE conversation_id = $1", uuid.UUID(cid)) == 0


async def lock_waiters(raw) -> int:
    return await raw.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                              "AND wait_event_type = 'Lock'")


async def test_an_erasure_waits_for_the_append_in_flight_and_takes_its_events(store, principal, raw, database_url):
    """An append holding the conversation's locks commits first and is
    erased with the rest; an append after the erasure finds the tombstone."""
    cid = uuid.uuid4()
    await store.create_conversation(principal, cid)
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():  # hold the conversation's row: the append waits, holding its lock
            await holder.execute("SELECT 1 FROM conversations WHERE principal = $1 AND id = $2 FOR UPDATE",
                                 principal, cid)
            waiting = await lock_waiters(raw)
            append_first = asyncio.create_task(
                store.append(principal, cid, [NewEvent("message.user", {"content": "a"})]))
            await eventually(lambda: _more(raw, waiting + 1), "the append to wait")
            erasing = asyncio.create_task(store.erase(principal, cid))
            await eventually(lambda: _more(raw, waiting + 2), "the erasure to wait behind it")
    finally:
        await holder.close()
    appended = await append_first
    tombstone = await erasing
    assert appended.last_seq == 2 and tombstone["event_count"] == 2
    with pytest.raises(Exception) as refused:
        await store.append(principal, cid, [NewEvent("message.user", {"content": "b"})])
    assert getattr(refused.value, "code", None) == "conversation_erased"


async def _more(raw, n: int) -> bool:
    return await lock_waiters(raw) >= n


async def test_two_deletes_at_once_erase_once(alice, raw, principal):
    cid = await new_conversation(alice)
    await append(alice, cid, TURN)
    answers = await asyncio.gather(*(alice.delete(f"/v1/conversations/{cid}") for _ in range(4)))
    assert sorted(r.status_code for r in answers) == [204, 410, 410, 410], [r.text for r in answers]
    assert await raw.fetchval("SELECT count(*) FROM erased_conversations WHERE conversation_id = $1",
                              uuid.UUID(cid)) == 1
