"""A COMMIT whose reply is lost: the writer finds out what happened and never writes twice.

The store reaches PostgreSQL through tests/faultproxy.py, which forwards a
COMMIT and then cuts the connection before the reply comes back (the
transaction committed, the client cannot know), or cuts it before the COMMIT
arrives (the transaction aborted, the client cannot know either).
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

import pytest

from store import OutcomeUnknown, Store
from tests.faultproxy import FaultProxy
from tests.helpers import all_events, new_store_conversation, user_messages


@pytest.fixture
async def proxy(database_url):
    parts = urlsplit(database_url)
    proxy = await FaultProxy(parts.port or 5432, parts.hostname or "127.0.0.1").start()
    yield proxy
    await proxy.close()


def through(proxy: FaultProxy, database_url: str) -> str:
    parts = urlsplit(database_url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{proxy.port}" if user else f"127.0.0.1:{proxy.port}"))


@pytest.mark.parametrize("fault", ["reply_lost", "commit_lost"])
@pytest.mark.parametrize("with_ids", [True, False])
async def test_an_append_whose_commit_reply_is_lost_is_answered_truly_and_stored_once(
        proxy, database_url, principal, fault, with_ids):
    store = await Store.open(through(proxy, database_url), pool_size=3, writers=1)
    try:
        cid = await new_store_conversation(store, principal)
        proxy.arm(fault)
        appended = await store.append(principal, cid, user_messages(3, "m", with_ids))
        assert [e["seq"] for e in appended.events] == [2, 3, 4]
        events = await all_events(store, principal, cid)
        assert [e["data"]["content"] for e in events[1:]] == ["m-0", "m-1", "m-2"], "stored exactly once"
        assert [e["id"] for e in events[1:]] == [e["id"] for e in appended.events]
        assert proxy.counts[fault] == 1
        assert store.writer.unclear_commits == 1
    finally:
        await store.close()


async def test_every_append_of_a_group_whose_commit_reply_is_lost_is_answered_and_stored_once(
        proxy, database_url, principal):
    # one writer task, many appenders: they share a transaction
    store = await Store.open(through(proxy, database_url), pool_size=3, writers=1)
    try:
        cids = [await new_store_conversation(store, principal) for _ in range(4)]
        # the first append holds the writer while the others queue up: the
        # second transaction is a group of eleven; both lose their COMMIT reply
        proxy.pause()
        proxy.arm("reply_lost", count=2)
        before = (store.writer.transactions, store.writer.ops)
        appends = []
        for n, cid in enumerate(cids):
            for k in range(3):
                events = user_messages(2, f"{n}-{k}", n % 2 == 0)
                appends.append(asyncio.create_task(store.append(principal, cid, events)))
                await asyncio.sleep(0.1 if not k and not n else 0)
        await asyncio.sleep(0.1)
        proxy.resume()
        answers = await asyncio.gather(*appends)
        done = (store.writer.transactions - before[0], store.writer.ops - before[1])
        assert done == (2, 12), "one append, then a group of eleven"
        assert proxy.counts["reply_lost"] == 2 and store.writer.unclear_commits == 2
        for n, cid in enumerate(cids):
            events = (await all_events(store, principal, cid))[1:]
            contents = [e["data"]["content"] for e in events]
            assert sorted(contents) == sorted(f"{n}-{k}-{i}" for k in range(3) for i in range(2))
            answered = [e["seq"] for a in answers for e in a.events if e["conversation_id"] == str(cid)]
            assert sorted(answered) == [e["seq"] for e in events]
    finally:
        await store.close()


async def test_an_outcome_that_cannot_be_learned_is_503_unknown_and_a_retry_settles_it(
        proxy, database_url, principal):
    # a pool of one: when its connection is cut, asking for the outcome needs a new one
    store = await Store.open(through(proxy, database_url), pool_size=1, writers=1, outcome_timeout=1.0)
    try:
        cid = await new_store_conversation(store, principal)
        batch = user_messages(2, "u", with_ids=True)
        proxy.refuse(True)  # the store stays unreachable once the COMMIT's connection is cut
        proxy.arm("reply_lost")
        with pytest.raises(OutcomeUnknown) as unknown:
            await store.append(principal, cid, batch)
        assert unknown.value.details == {"outcome": "unknown"}
        proxy.refuse(False)
        retry = await store.append(principal, cid, batch)
        assert retry.retried, "the first attempt had committed: the retry writes nothing"
        events = await all_events(store, principal, cid)
        assert [e["data"]["content"] for e in events[1:]] == ["u-0", "u-1"]
        assert [e["seq"] for e in retry.events] == [2, 3]
    finally:
        await store.close()
