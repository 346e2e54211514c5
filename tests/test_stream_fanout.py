"""One LISTEN connection per process, one store read per wake-up per conversation."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from store import NewEvent
from store.listener import Listener
from tests.helpers import eventually, new_store_conversation


async def test_one_store_read_per_wakeup_serves_every_reader(database_url, store, principal):
    reads: list[tuple[tuple[str, uuid.UUID], int]] = []

    failed: list[tuple[int, str]] = []

    async def counting_read(key, after, limit):
        # a read that failed (the store slow to answer on a loaded machine: its pool wait or
        # statement timed out) is retried by the next sweep; that is the listener doing its job,
        # not a read per reader, so it is noted apart
        try:
            events = await store.tail_events(key, after, limit)
        except Exception as exc:
            failed.append((after, type(exc).__name__))
            raise
        reads.append((key, after, len(events)))
        return events

    listener = Listener(database_url, counting_read, store.heads)
    await listener.start()
    try:
        cid = await new_store_conversation(store, principal)
        await store.append(principal, cid, [NewEvent("turn.started", {"turn_id": "t1"})])
        received: list[list[int]] = [[] for _ in range(50)]

        async def reader(mine: list[int]) -> None:
            async for events in listener.follow((principal, cid), 2, heartbeat=60):
                mine.extend(e["seq"] for e in events)
                if mine and mine[-1] >= 12:
                    return

        tasks = [asyncio.create_task(reader(mine)) for mine in received]
        # each new reader checks the store once for what it may have missed (nothing here). Reads
        # are counted when they return: a first look still under way when seq 3 commits (a slow
        # pool in a full run) returns seq 3 before the tail has it, and that reader then looks
        # at the store once more by itself (once per reader at its start, never per wake-up)
        await eventually(lambda: len(reads) >= 50, "every reader's first look at the store", timeout=10,
                         interval=0.01)
        assert len(reads) == 50
        reads.clear()
        failed.clear()
        for i in range(10):
            await store.append(principal, cid, [NewEvent("text.delta", {"turn_id": "t1", "text": f"w{i}"})])
            await eventually(lambda: all(len(mine) == i + 1 for mine in received),
                             f"every reader to receive event {i + 1}", timeout=10, interval=0.005)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        await listener.close()
    assert all(mine == list(range(3, 13)) for mine in received)
    # one read per wake-up, whatever the number of readers (per reader it would be 500); the
    # once-a-second sweep racing a notification on a busy machine may add one now and then
    assert 10 <= len(reads) < 20, (f"{len(reads)} store reads for 10 wake-ups of 50 readers: "
                                   f"{[(after, n) for _, after, n in reads]}; failed: {failed}")
    assert listener.tails == {}, "the tail outlived its readers"


async def test_readers_of_other_conversations_are_not_woken(database_url, store, principal):
    listener = Listener(database_url, store.tail_events, store.heads)
    await listener.start()
    try:
        quiet = await new_store_conversation(store, principal)
        busy = await new_store_conversation(store, principal)
        batches = []

        async def reader() -> None:
            async for events in listener.follow((principal, quiet), 1, heartbeat=0.5):
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


async def test_a_reader_gets_commits_whose_notifications_were_lost_within_seconds(database_url, store, principal):
    """NOTIFY is the fast path only: with every notification lost (as while the
    LISTEN connection is down), the once-a-second sweep still delivers."""
    listener = Listener(database_url, store.tail_events, store.heads)
    listener._on_notify = lambda *args: None  # every notification lost
    await listener.start()
    try:
        cid = await new_store_conversation(store, principal)
        got: list[int] = []

        async def reader() -> None:
            async for events in listener.follow((principal, cid), 1, heartbeat=60):
                got.extend(e["seq"] for e in events)
                if got and got[-1] >= 4:
                    return

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.2)  # the reader is waiting, past its first look at the store
        for i in range(3):
            await store.append(principal, cid, [NewEvent("message.user", {"content": f"m{i}"})])
        await asyncio.wait_for(task, 5)
    finally:
        await listener.close()
    assert got == [2, 3, 4]


async def test_a_reader_whose_store_keeps_failing_is_ended_not_left_waiting(database_url, store, principal):
    from store import Unavailable
    from store.listener import STALL_SECONDS

    failing = False

    async def heads(ids):
        if failing:
            raise Unavailable("the event store cannot be reached right now")
        return await store.heads(ids)

    listener = Listener(database_url, store.tail_events, heads)
    await listener.start()
    try:
        cid = await new_store_conversation(store, principal)

        async def reader() -> None:
            async for _ in listener.follow((principal, cid), 1, heartbeat=60):
                pass

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.2)
        failing = True
        with pytest.raises(Unavailable):
            await asyncio.wait_for(task, STALL_SECONDS + 3)
    finally:
        await listener.close()
