"""A turn's recorder against the real store: when the store falls behind the
upstream, the turn stops reading instead of piling chunks up in memory."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from runner.recorder import Recorder
from store.appends import NewEvent


async def test_a_store_that_falls_behind_holds_the_producer_back_and_loses_nothing(store, database_url, principal):
    conversation_id = (await store.create_conversation(principal))["id"]
    cid = uuid.UUID(str(conversation_id))
    await store.append(principal, cid, [NewEvent("turn.started", {"turn_id": "t"})])
    appended_sizes = []

    async def append(events):
        appended_sizes.append(len(events))
        return await store.append(principal, cid, [NewEvent(t, d) for t, d in events])

    recorder = Recorder(append, flush_seconds=0.005, flush_events=8, max_pending=32)
    total, added = 2000, 0

    async def produce():
        nonlocal added
        for k in range(total):
            recorder.add([("text.delta", {"turn_id": "t", "text": f"{k} "})])
            added += 1
            await recorder.room()

    # another transaction holds the conversation's row: appends wait for it (for
    # less than the store's statement timeout), as when PostgreSQL is slow
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM conversations WHERE principal = $1 AND id = $2 FOR UPDATE",
                                  principal, cid)
            producer = asyncio.create_task(produce())
            await asyncio.sleep(0.5)
            held_at = added
            assert held_at <= 2 * 32 + 1, "the producer went on while nothing could be committed"
            assert not producer.done()
    finally:
        await blocker.close()
    await asyncio.wait_for(producer, 30)
    last = await recorder.close()
    assert last == 2 + total
    assert max(appended_sizes) <= 32 + 1
    events, _ = await store.read_events(principal, cid, 0, 10_000)
    texts = [e["data"]["text"] for e in events if e["type"] == "text.delta"]
    assert texts == [f"{k} " for k in range(total)]
