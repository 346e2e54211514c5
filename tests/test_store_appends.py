"""Store-level append behaviour users rely on: gap-free seqs, atomic batches (also inside a
shared group-commit transaction), idempotent retries, tenancy, monotonic times, and appends
whose cost does not grow with the conversation."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime

import asyncpg
import pytest

from store import (IdempotencyConflict, InvalidEvent, NewEvent, NotFound, SeqConflict, Store, StoreError,
                   create_pool)
from store.writer import MAX_EVENTS_PER_TRANSACTION
from tests.helpers import all_events, finished_tool_turn as tool_turn, new_store_conversation, user_messages


def user(text: str, id: str | None = None) -> NewEvent:
    return NewEvent("message.user", {"content": text}, id)


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def xid(event: dict) -> int:
    """The transaction that wrote an event (position = xid << 16 + index)."""
    return event["position"] >> 16


# -- seq ------------------------------------------------------------------------------------------


async def test_concurrent_appenders_to_one_conversation_get_gap_free_seqs_and_exact_conflicts(store, principal):
    cid = await new_store_conversation(store, principal)
    rng = random.Random()
    written: list[list[dict]] = []
    conflicts: list[tuple[int, int]] = []  # (expected_seq, current_seq)
    stale_refused = 0

    async def appender(t: int) -> None:
        nonlocal stale_refused
        last_seen = 1
        for i in range(20):
            events = user_messages(rng.randint(1, 4), f"t{t}-{i}", with_ids=i % 2 == 0)
            if i % 4 == 3 and last_seen >= 2:
                expected = last_seen - 1  # certainly stale: seq never goes down
            elif i % 4 == 1:
                expected = last_seen  # stale or not, depending on the others
            else:
                expected = None
            try:
                appended = await store.append(principal, cid, events, expected_seq=expected)
            except SeqConflict as conflict:
                current = conflict.details["current_seq"]
                assert expected is not None and current != expected
                assert current >= last_seen  # the seq it reports is real and not older than one we saw
                conflicts.append((expected, current))
                stale_refused += expected < last_seen
                last_seen = current
                continue
            assert not (expected is not None and expected < last_seen), "a stale expected_seq was accepted"
            seqs = [e["seq"] for e in appended.events]
            assert seqs == list(range(seqs[0], seqs[0] + len(events))), f"batch not contiguous: {seqs}"
            assert appended.last_seq == seqs[-1]
            assert seqs[0] > last_seen
            if expected is not None:
                assert seqs[0] == expected + 1
            if events[0].id:
                assert [e["id"] for e in appended.events] == [e.id for e in events]
            last_seen = seqs[-1]
            written.append(appended.events)

    await asyncio.gather(*(appender(t) for t in range(20)))

    seqs = sorted(e["seq"] for b in written for e in b)
    assert seqs == list(range(2, len(seqs) + 2)), "seqs have a gap or a double"
    conversation = await store.get_conversation(principal, cid)
    assert conversation["seq"] == len(seqs) + 1
    stored = await all_events(store, principal, cid)
    assert [e["seq"] for e in stored] == list(range(1, conversation["seq"] + 1))
    by_seq = {e["seq"]: e for b in written for e in b}
    assert all(stored[s - 1] == by_seq[s] for s in range(2, conversation["seq"] + 1)), (
        "the store answered an appender with an event that is not what it stored")
    assert stale_refused > 0 and all(current <= conversation["seq"] for _, current in conflicts)


# -- atomic batches -------------------------------------------------------------------------------


async def test_a_refused_batch_writes_nothing_even_when_it_shares_a_group_commit_with_good_ones(store, principal):
    cids = [await new_store_conversation(store, principal) for _ in range(6)]
    for cid in cids:
        await store.append(principal, cid, [user("taken", "taken-id")])
    before = {cid: await all_events(store, principal, cid) for cid in cids}

    good, bad = [], []
    for k, cid in enumerate(cids):
        for j in range(3):
            good.append((cid, user_messages(3, f"good-{k}-{j}", with_ids=j == 0), None))
        bad += [
            # a rule broken by the LAST event: the first ones must not be kept either
            (cid, [user("bad-1"), NewEvent("text.delta", {"turn_id": "t", "text": "x"})], InvalidEvent),
            # opens a turn, then breaks a rule: the turn must not stay open
            (cid, [NewEvent("turn.started", {"turn_id": f"t-{k}"}), user("bad-2")], InvalidEvent),
            (cid, [user("bad-3")], SeqConflict),  # submitted with expected_seq=1, long gone
            (cid, [user("bad-4", "fresh-id"), user("other content", "taken-id")], IdempotencyConflict),
        ]
    submissions = good + bad
    random.shuffle(submissions)

    # All submitted in the same tick: the writer takes them as one group, in one transaction.
    results = await asyncio.gather(
        *(store.append(principal, cid, events, expected_seq=1 if refusal is SeqConflict else None)
          for cid, events, refusal in submissions),
        return_exceptions=True)

    stored_good: list[dict] = []
    for (cid, events, refusal), result in zip(submissions, results):
        if refusal is None:
            assert not isinstance(result, BaseException), repr(result)
            stored_good += result.events
        else:
            assert isinstance(result, refusal), repr(result)
    assert len({xid(e) for e in stored_good}) < len(good), "precondition: good batches shared transactions"

    for k, cid in enumerate(cids):
        events = await all_events(store, principal, cid)
        mine = sorted((e for e in stored_good if e["conversation_id"] == str(cid)), key=lambda e: e["seq"])
        assert events == before[cid] + mine, "a refused batch left something behind"
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        conversation = await store.get_conversation(principal, cid)
        assert conversation["seq"] == len(events) and conversation["open_turn_id"] is None
        assert not {"bad-1", "bad-2", "bad-3", "bad-4"} & {e["data"].get("content") for e in events}
        # the refused turn.started left no trace in the rule state either: its turn id is still free
        await store.append(principal, cid, [NewEvent("turn.started", {"turn_id": f"t-{k}"}),
                                            NewEvent("turn.cancelled", {"turn_id": f"t-{k}"})])
        await store.append(principal, cid, [user("fresh", "fresh-id")])


async def test_a_batch_that_breaks_the_shared_transaction_costs_the_others_nothing(store, principal):
    """A batch PostgreSQL itself rejects (jsonb cannot hold \\u0000) aborts the group's transaction;
    the writer must retry the others on their own and keep nothing of the bad one."""
    cids = [await new_store_conversation(store, principal) for _ in range(4)]
    submissions = [(cid, user_messages(2, f"ok-{k}-{j}"), True) for k, cid in enumerate(cids) for j in range(3)]
    submissions.insert(5, (cids[1], [user("fine"), user("nul \x00 inside")], False))
    results = await asyncio.gather(*(store.append(principal, cid, events) for cid, events, _ in submissions),
                                   return_exceptions=True)
    for (cid, events, ok), result in zip(submissions, results):
        assert isinstance(result, BaseException) != ok, repr(result)
    for cid in cids:
        events = await all_events(store, principal, cid)
        assert [e["seq"] for e in events] == list(range(1, 8))
        assert "fine" not in {e["data"].get("content") for e in events}
        assert (await store.get_conversation(principal, cid))["seq"] == 7


async def test_a_batch_too_large_for_one_transactions_positions_is_refused_or_kept_in_range(store, principal):
    """position = (xid << 16) + index: a batch of more than 65,536 events would spill into the next
    transaction's positions (duplicates, which a feed reader resuming `after_position` can skip)."""
    cid = await new_store_conversation(store, principal)
    events = [user("x")] * (MAX_EVENTS_PER_TRANSACTION + 1)
    try:
        appended = await store.append(principal, cid, events)
    except (StoreError, ValueError):
        assert (await store.get_conversation(principal, cid))["seq"] == 1
        assert len(await all_events(store, principal, cid)) == 1
    else:
        assert len({xid(e) for e in appended.events}) == 1, (
            "the batch's positions run into the next transaction's position range")


# -- idempotency ------------------------------------------------------------------------------------


async def test_an_idempotent_retry_returns_the_same_stored_events_and_writes_nothing(store, principal):
    cid = await new_store_conversation(store, principal)
    first = await store.append(principal, cid, [
        user("hello", "e-1"),
        NewEvent("conversation.titled", {"title": "T"}, "e-2"),
        NewEvent("message.user", {"content": [{"type": "text", "text": "parts"}], "name": "n"}, "e-3"),
    ])
    assert not first.retried
    after_first = await store.get_conversation(principal, cid)

    retries = [
        await store.append(principal, cid, [
            user("hello", "e-1"), NewEvent("conversation.titled", {"title": "T"}, "e-2"),
            NewEvent("message.user", {"name": "n", "content": [{"text": "parts", "type": "text"}]}, "e-3"),
        ]),
        # a client that retries after a lost response still sends its old expected_seq
        await store.append(principal, cid, [
            user("hello", "e-1"), NewEvent("conversation.titled", {"title": "T"}, "e-2"),
            NewEvent("message.user", {"content": [{"type": "text", "text": "parts"}], "name": "n"}, "e-3"),
        ], expected_seq=1),
    ]
    for retry in retries:
        assert retry.retried
        assert retry.events == first.events  # same seq, position, created_at, id, type, data
        assert retry.last_seq == first.last_seq == 4
    assert await store.get_conversation(principal, cid) == after_first
    stored = await all_events(store, principal, cid)
    assert len(stored) == 4 and stored[1:] == first.events


async def test_the_same_batch_submitted_concurrently_is_written_once(store, principal):
    cid = await new_store_conversation(store, principal)
    same = [user("once", "once-1"), user("once again", "once-2")]
    results = await asyncio.gather(*(store.append(principal, cid, same) for _ in range(5)))
    assert sorted(r.retried for r in results) == [False, True, True, True, True]
    assert all(r.events == results[0].events for r in results)
    assert [e["seq"] for e in results[0].events] == [2, 3]
    assert len(await all_events(store, principal, cid)) == 3


@pytest.mark.parametrize("reused", [
    NewEvent("message.user", {"content": "other words"}, "e-1"),
    NewEvent("message.system", {"content": "hello"}, "e-1"),
    NewEvent("message.user", {"content": "hello", "name": "someone"}, "e-1"),
])
async def test_an_event_id_reused_with_other_content_is_an_idempotency_conflict(store, principal, reused):
    cid = await new_store_conversation(store, principal)
    await store.append(principal, cid, [user("hello", "e-1")])
    before = await all_events(store, principal, cid)
    with pytest.raises(IdempotencyConflict) as refused:
        await store.append(principal, cid, [reused])
    assert refused.value.details["ids"] == ["e-1"]
    assert await all_events(store, principal, cid) == before


@pytest.mark.parametrize("retry", [
    [user("one", "e-1"), user("new", "e-new")],  # a stored id plus a new one
    [user("new", "e-new"), user("two", "e-2")],
    [user("one", "e-1"), user("no id at all")],  # a stored id plus an event without id
    [user("one", "e-1"), user("two", "e-2"), user("three", "e-3")],  # the stored batch plus one more
], ids=["stored+new", "new+stored", "stored+anonymous", "batch+one-more"])
async def test_a_batch_reusing_only_some_stored_ids_is_an_idempotency_conflict(store, principal, retry):
    cid = await new_store_conversation(store, principal)
    await store.append(principal, cid, [user("one", "e-1"), user("two", "e-2")])
    before = await all_events(store, principal, cid)
    with pytest.raises(IdempotencyConflict) as refused:
        await store.append(principal, cid, retry)
    assert set(refused.value.details["ids"]) <= {"e-1", "e-2"}
    assert await all_events(store, principal, cid) == before
    assert (await store.get_conversation(principal, cid))["seq"] == 3


async def test_retrying_part_of_a_stored_batch_unchanged_returns_those_events(store, principal):
    """The contract: a retry whose ids ALL exist with the same type and data is a replay."""
    cid = await new_store_conversation(store, principal)
    first = await store.append(principal, cid, [user("one", "e-1"), user("two", "e-2")])
    replay = await store.append(principal, cid, [user("two", "e-2")])
    assert replay.retried and replay.events == first.events[1:] and replay.last_seq == 3
    assert len(await all_events(store, principal, cid)) == 3


# -- tenancy ----------------------------------------------------------------------------------------


async def test_another_principal_cannot_append_read_or_replay_a_conversation(store, principal):
    owner, intruder = principal, f"{principal}-other"
    cid = await new_store_conversation(store, owner)
    await store.append(owner, cid, [user("secret", "s-1")])
    before = await all_events(store, owner, cid)

    with pytest.raises(NotFound):
        await store.append(intruder, cid, [user("hi")])
    with pytest.raises(NotFound):  # a "retry" of the owner's batch must not hand back the owner's events
        await store.append(intruder, cid, [user("secret", "s-1")])
    with pytest.raises(NotFound):
        await store.append(intruder, cid, [user("hi")], expected_seq=2)
    with pytest.raises(NotFound):
        await store.get_conversation(intruder, cid)
    with pytest.raises(NotFound):
        await store.read_events(intruder, cid)
    with pytest.raises(NotFound):
        await store.append(owner, uuid.uuid4(), [user("nobody's")])
    assert [e for e in await store.read_feed(intruder) if e["conversation_id"] == str(cid)] == []
    assert await all_events(store, owner, cid) == before


# -- time -------------------------------------------------------------------------------------------


async def test_times_never_go_backwards_within_a_conversation(store, principal):
    cid = await new_store_conversation(store, principal)
    created = await store.get_conversation(principal, cid)
    observed: list[dict] = []
    returned: list[dict] = []
    writing = True

    async def watch() -> None:
        while writing:
            observed.append(await store.get_conversation(principal, cid))
            await asyncio.sleep(0)

    async def appender(t: int) -> None:
        for i in range(10):
            appended = await store.append(principal, cid, user_messages(random.randint(1, 3), f"{t}-{i}"))
            assert len({e["created_at"] for e in appended.events}) == 1  # one batch, one moment
            returned.extend(appended.events)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(appender(t) for t in range(10)))
    finally:
        writing = False
        await watcher
    final = await store.get_conversation(principal, cid)
    observed.append(final)

    events = await all_events(store, principal, cid)
    times = [moment(e["created_at"]) for e in events]
    assert times == sorted(times), "an event's created_at is earlier than the one before it"
    assert moment(created["created_at"]) <= times[0]
    assert final["created_at"] == created["created_at"]
    assert moment(final["updated_at"]) == times[-1]
    for earlier, later in zip(observed, observed[1:]):
        assert later["seq"] >= earlier["seq"]
        assert moment(later["updated_at"]) >= moment(earlier["updated_at"])
        assert moment(later["updated_at"]) >= moment(later["created_at"])
    by_seq = {e["seq"]: e for e in events}
    assert all(by_seq[e["seq"]]["created_at"] == e["created_at"] for e in returned), (
        "an appender was told another created_at than the one stored")


async def test_the_conversations_own_times_name_moments_its_history_can_be_read_at(store, principal):
    """GET /conversations/{id} says when it was created and last updated; reading the history
    `at_time` either of those moments must give seq 1 and the current seq, not 'before it existed'."""
    cid = await new_store_conversation(store, principal)
    created = await store.get_conversation(principal, cid)
    at_creation = await store.messages(principal, cid, "openai", at_time=moment(created["created_at"]))
    assert at_creation["seq"] == 1

    await store.append(principal, cid, [user("hi")])
    updated = await store.get_conversation(principal, cid)
    latest = await store.messages(principal, cid, "openai", at_time=moment(updated["updated_at"]))
    assert latest["seq"] == 2


# -- cost does not grow with the conversation --------------------------------------------------------


class EventsTableReads:
    """Rows of `events` read by everything on one store's single connection, from the statistics
    PostgreSQL keeps per table. Flushed on demand (PG >= 15), so the numbers are exact, not sampled."""

    def __init__(self, store: Store, admin: asyncpg.Connection) -> None:
        self.store, self.admin = store, admin

    async def now(self) -> dict:
        await self.store.pool.execute("SELECT pg_stat_force_next_flush()")  # flushed before it returns
        await self.admin.execute("SELECT pg_stat_clear_snapshot()")
        row = await self.admin.fetchrow("""
            SELECT t.seq_scan, t.seq_tup_read, t.idx_tup_fetch,
                   (SELECT coalesce(sum(i.idx_tup_read), 0) FROM pg_stat_user_indexes i WHERE i.relid = t.relid)
                       AS idx_tup_read,
                   coalesce(io.heap_blks_hit, 0) + coalesce(io.heap_blks_read, 0) AS heap_blocks,
                   coalesce(io.idx_blks_hit, 0) + coalesce(io.idx_blks_read, 0) AS index_blocks
              FROM pg_stat_user_tables t JOIN pg_statio_user_tables io USING (relid)
             WHERE t.relname = 'events'""")
        return dict(row)

    @staticmethod
    def rows_read(before: dict, after: dict) -> int:
        return sum(after[k] - before[k] for k in ("seq_tup_read", "idx_tup_fetch", "idx_tup_read"))


async def test_appending_to_a_conversation_with_100000_events_reads_none_of_its_events(pg_server, principal):
    url = await pg_server.create_database()  # nobody else touches this database's statistics
    admin = await asyncpg.connect(url)
    await admin.execute("ALTER TABLE events SET (autovacuum_enabled = false)")
    store = Store(await create_pool(url, min_size=1, max_size=1), writers=1)
    try:
        big, small = await new_store_conversation(store, principal), await new_store_conversation(store, principal)
        for k in range(100):
            await store.append(principal, big, user_messages(1000, f"bulk{k}"))
        assert (await store.get_conversation(principal, big))["seq"] == 100_001
        reads = EventsTableReads(store, admin)

        async def twenty_appends(cid, with_ids: bool) -> dict:
            start = await reads.now()
            for i in range(20):
                await store.append(principal, cid, user_messages(1 + i % 3, f"probe-{uuid.uuid4().hex[:6]}", with_ids))
            end = await reads.now()
            return {"rows": EventsTableReads.rows_read(start, end), "seq_scans": end["seq_scan"] - start["seq_scan"],
                    "blocks": sum(end[k] - start[k] for k in ("heap_blocks", "index_blocks"))}

        on_big = await twenty_appends(big, with_ids=False)
        on_small = await twenty_appends(small, with_ids=False)
        on_big_with_ids = await twenty_appends(big, with_ids=True)

        # The probe sees reads when there are some: reading 500 events shows up as >= 500 rows.
        start = await reads.now()
        await store.read_events(principal, big, after=0, limit=500)
        assert EventsTableReads.rows_read(start, await reads.now()) >= 500

        for measured in (on_big, on_small, on_big_with_ids):
            assert measured["rows"] == 0 and measured["seq_scans"] == 0, (on_big, on_small, on_big_with_ids)
        # the buffers an append touches (index descent, the heap page it lands on) do not depend
        # on the conversation's length either
        assert on_big["blocks"] <= 2 * on_small["blocks"] + 20, (on_big, on_small)
    finally:
        await store.close()
        await admin.close()


async def test_the_saved_state_of_2000_finished_tool_turns_is_as_small_as_a_new_conversations(store, principal):
    """The state rewritten with every append holds only what is live, so an append
    to a long agent loop writes about as much as one to a new conversation; the
    rules that need the whole history still hold (unique indexes, probed per id)."""
    long = await new_store_conversation(store, principal)
    for start in range(0, 2000, 200):
        await store.append(principal, long, [e for n in range(start, start + 200) for e in tool_turn(n)])
    new = await new_store_conversation(store, principal)
    await store.append(principal, new, tool_turn(0))

    async def state_bytes(cid: uuid.UUID) -> int:
        return await store.pool.fetchval(
            "SELECT pg_column_size(state) FROM conversations WHERE principal = $1 AND id = $2", principal, cid)

    assert (await store.get_conversation(principal, long))["seq"] == 10_001
    assert await state_bytes(long) == await state_bytes(new)

    # history rules on the long conversation, refused as before
    refusals = [
        ([NewEvent("turn.started", {"turn_id": "t7"})], "turn_id_unique"),
        ([NewEvent("turn.started", {"turn_id": "new"}),
          NewEvent("tool_call.started", {"turn_id": "new", "tool_call_id": "call-3", "name": "f"})],
         "tool_call_id_unique"),
        ([NewEvent("tool.result", {"tool_call_id": "call-5", "content": "again", "status": "ok"})], "one_final_result"),
        ([NewEvent("tool.result", {"tool_call_id": "call-5", "content": "late", "status": "pending"})],
         "one_final_result"),
        ([NewEvent("tool_call.delta", {"tool_call_id": "call-9", "text": "x"})], "needs_started_call"),
        ([NewEvent("tool.result", {"tool_call_id": "never", "content": "x", "status": "ok"})],
         "result_needs_completed_call"),
    ]
    for batch, rule in refusals:
        with pytest.raises(InvalidEvent) as refused:
            await store.append(principal, long, batch)
        assert refused.value.details["rule"] == rule, (batch, refused.value.details)
    assert (await store.get_conversation(principal, long))["seq"] == 10_001, "nothing of a refused batch is written"
    # and a turn that is still live keeps its calls across appends
    await store.append(principal, long, [NewEvent("turn.started", {"turn_id": "live"}),
                                         NewEvent("tool_call.started", {"turn_id": "live", "tool_call_id": "x",
                                                                        "name": "f"})])
    await store.append(principal, long, [NewEvent("tool_call.completed", {"tool_call_id": "x", "arguments": "{}"}),
                                         NewEvent("turn.finished", {"turn_id": "live", "finish_reason": "tool_calls"})])
    await store.append(principal, long, [NewEvent("tool.result", {"tool_call_id": "x", "content": 1, "status": "pending"})])
    await store.append(principal, long, [NewEvent("tool.result", {"tool_call_id": "x", "content": 2, "status": "ok"})])
    assert await state_bytes(long) == await state_bytes(new)
