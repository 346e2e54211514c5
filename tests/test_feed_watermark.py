"""Only transactions that write chatlog's log may hold the feed back."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from store import NewEvent, Store
from tests.helpers import new_store_conversation
from tests.pg import with_database


async def feed_ids(store: Store, principal: str) -> list[str]:
    return [e["id"] for e in await store.read_feed(principal, 0, 1000)]


@pytest.mark.parametrize("where", ["another database", "this database"])
async def test_a_long_unrelated_transaction_does_not_hold_the_feed_back(store, principal, database_url, where):
    url = with_database(database_url, "postgres") if where == "another database" else database_url
    other = await asyncpg.connect(url)
    try:
        # an open transaction that has an xid, as any writing transaction has
        await other.execute("BEGIN")
        await other.fetchval("SELECT pg_current_xact_id()")
        cid = await new_store_conversation(store, principal)
        appended = await store.append(principal, cid, [NewEvent("message.user", {"content": "hi"}, "e1")])
        assert appended.events[0]["id"] in await feed_ids(store, principal)
    finally:
        await other.close()


async def test_an_open_chatlog_write_holds_back_the_events_committed_after_it(store, principal, database_url):
    """The other side of the watermark: a log-writing transaction still open
    (it may yet commit a lower position) keeps later events out of the feed
    until it ends, and then both appear, in position order."""
    cid = await new_store_conversation(store, principal)
    slow = await new_store_conversation(store, principal)
    held = asyncio.Event()
    release = asyncio.Event()

    other = await Store.open(database_url, pool_size=2, writers=1)
    try:
        async def stalled_op(tx):
            # the writer's own transaction: locks taken, an xid assigned, a row written
            await tx.conn.execute("SELECT pg_current_xact_id()")
            held.set()
            await release.wait()

        stall = asyncio.create_task(other.writer.submit(str(slow), 1, stalled_op))
        await asyncio.wait_for(held.wait(), 10)
        appended = await store.append(principal, cid, [NewEvent("message.user", {"content": "later"}, "later")])
        assert "later" not in await feed_ids(store, principal), "a position below it may still commit"
        release.set()
        await asyncio.wait_for(stall, 10)
        assert appended.events[0]["id"] in await feed_ids(store, principal)
    finally:
        release.set()
        await other.close()
