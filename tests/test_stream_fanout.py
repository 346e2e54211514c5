"""One LISTEN connection per process, one store read per wake-up per conversation."""

from __future__ import annotations

import asyncio
import uuid

from store import NewEvent
from store.listener import Listener


async def test_one_store_read_per_wakeup_serves_every_reader(database_url, store, principal):
    reads: list[tuple[uuid.UUID, int]] = []

    async def counting_read(conversation_id, after, limit):
        reads.append((conversation_id, after))
        return await store.events_after(conversation_id, after, limit)

    listener = Listener(database_url, counting_read, store.heads)
    await listener.start()
    try:
        cid = uuid.UUID((await store.create_conversation(principal))["id"])
        await store.append(principal, cid, [NewEvent("turn.started", {"turn_id": "t1"})])
        received: list[list[int]] = [[] for _ in range(50)]

        async def reader(mine: list[int]) -> None:
            async for events in listener.follow(cid, 2, heartbeat=60):
                mine.extend(e["seq"] for e in events)
                if mine and mine[-1] >= 12:
                    return

        tasks = [asyncio.create_task(reader(mine)) for mine in received]
        # each new reader checks the store once for what it may have missed (nothing here)
        for _ in range(200):
            if len(reads) >= 50:
                break
            await asyncio.sleep(0.01)
        assert len(reads) == 50
        reads.clear()
        for i in range(10):
            await store.append(principal, cid, [NewEvent("text.delta", {"turn_id": "t1", "text": f"w{i}"})])
            await asyncio.wait_for(_until(lambda: all(len(mine) == i + 1 for mine in received)), 10)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        await listener.close()
    assert all(mine == list(range(3, 13)) for mine in received)
    assert len(reads) == 10, f"{len(reads)} store reads for 10 wake-ups of 50 readers"
    assert listener.tails == {}, "the tail outlived its readers"


async def test_readers_of_other_conversations_are_not_woken(database_url, store, principal):
    listener = Listener(database_url, store.events_after, store.heads)
    await listener.start()
    try:
        quiet = uuid.UUID((await store.create_conversation(principal))["id"])
        busy = uuid.UUID((await store.create_conversation(principal))["id"])
        batches = []

        async def reader() -> None:
            async for events in listener.follow(quiet, 1, heartbeat=0.5):
                batches.append(events)

        task = asyncio.create_task(reader())
        await store.append(principal, busy, [NewEvent("message.user", {"content": "x"})] * 3)
        await asyncio.sleep(1.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await listener.close()
    # only heartbeats (empty batches) reached the quiet conversation's reader
    assert batches and all(b == [] for b in batches)


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.005)
