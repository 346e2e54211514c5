"""The global feed (`Store.read_feed`, `GET /v1/events`) never skips and never repeats an event,
and gives each conversation's events in seq order, however writers interleave.

The dangerous interleaving for a position-ordered feed: a transaction gets its
position range early (its xid) but commits late, after transactions with higher
positions committed. A reader that had already moved past those higher positions
would never see the late one's events. The tests below make that interleaving
happen on purpose (and check that it did), through the store's own write path.
"""

from __future__ import annotations

import asyncio
import copy
import random
import uuid
from collections import defaultdict

import asyncpg
import pytest

from store import NewEvent, Store, create_pool
from store.writer import GroupWriter
from tests.helpers import eventually

# A hang guard for waiting on the feed; never a timing assertion. The feed lags
# behind the oldest transaction running anywhere in the cluster, so it is generous.
PATIENCE = 120.0


async def lock_waiters(pool) -> int:
    """Backends of this database waiting for a lock (row, transaction or advisory)."""
    return await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")


class HookedWriter:
    """A GroupWriter whose ops get code run around them, inside the real group transaction.

    `store_with(store, writer)` gives a Store whose appends go through the very same op
    (rule checks, INSERT, conversation update) but in a transaction the test can stretch.
    """

    def __init__(self, inner: GroupWriter, before=None, after=None) -> None:
        self.inner, self.before, self.after = inner, before, after

    async def submit(self, key, size, op):
        async def hooked(tx):
            if self.before:
                await self.before(tx)
            result = await op(tx)
            if self.after:
                await self.after(tx, result)
            return result

        return await self.inner.submit(key, size, hooked)

    async def close(self) -> None:
        await self.inner.close()


def store_with(store: Store, writer) -> Store:
    view = copy.copy(store)
    view.writer = writer
    return view


def messages(n: int, tag: str, with_ids: bool = False) -> list[NewEvent]:
    kinds = ("message.user", "message.system", "conversation.titled")
    out = []
    for i in range(n):
        kind = kinds[i % 3] if n > 1 else "message.user"
        data = {"title": f"{tag}-{i}"} if kind == "conversation.titled" else {"content": f"{tag}-{i}"}
        out.append(NewEvent(kind, data, f"{tag}-{i}-{uuid.uuid4().hex[:8]}" if with_ids else None))
    return out


class FeedReader:
    """Reads the feed the way the contract tells a client to: always after the last position received.

    Checks every page as it arrives: positions strictly increase, no event twice, and each
    conversation's seqs come 1, 2, 3 ... in order.
    """

    def __init__(self, name: str, principal: str, read_page) -> None:
        self.name, self.principal, self.read_page = name, principal, read_page
        self.last = 0
        self.seen: dict[tuple[str, str], int] = {}  # (conversation, event id) -> position
        self.last_seq: dict[str, int] = defaultdict(int)
        self.pages = 0

    def take(self, events: list[dict]) -> None:
        for event in events:
            key = (event["conversation_id"], event["id"])
            assert event["position"] > self.last, (
                f"{self.name}: position went from {self.last} to {event['position']}")
            assert key not in self.seen, f"{self.name}: event {key} was delivered twice"
            expected_seq = self.last_seq[event["conversation_id"]] + 1
            assert event["seq"] == expected_seq, (
                f"{self.name}: conversation {event['conversation_id']} gave seq {event['seq']} "
                f"when {expected_seq} was next")
            self.last = event["position"]
            self.seen[key] = event["position"]
            self.last_seq[event["conversation_id"]] = event["seq"]

    async def step(self) -> int:
        events = await self.read_page(self.last)
        self.pages += 1
        self.take(events)
        return len(events)


def store_pages(store: Store, principal: str, limits=(1000,)):
    async def read(after: int) -> list[dict]:
        return await store.read_feed(principal, after_position=after, limit=random.choice(limits))
    return read


def http_pages(client, limits=(1000,)):
    async def read(after: int) -> list[dict]:
        limit = random.choice(limits)
        response = await client.get("/v1/events", params={"after_position": after, "limit": limit})
        assert response.status_code == 200, response.text
        body = response.json()
        expected_last = body["events"][-1]["position"] if body["events"] else after
        assert body["last_position"] == expected_last
        return body["events"]
    return read


def mixed_pages(store: Store, principal: str, client, limits):
    by_store, by_http = store_pages(store, principal, limits), http_pages(client, limits)

    async def read(after: int) -> list[dict]:
        return await (by_http if random.random() < 0.5 else by_store)(after)
    return read


async def drain(reader: FeedReader, until) -> None:
    await eventually(lambda: _step_until(reader, until), f"{reader.name} to reach the expected events",
                     timeout=PATIENCE, interval=0.01)


async def _step_until(reader: FeedReader, until) -> bool:
    await reader.step()
    return until()


# -- the small deterministic cases ---------------------------------------------------------------


async def test_feed_waits_for_a_transaction_that_took_its_position_early_and_then_delivers_everything(
        store, client, principal):
    alice = f"alice-{principal}"
    held_cid, later_cid = uuid.uuid4(), uuid.uuid4()
    for cid in (held_cid, later_cid):
        await store.create_conversation(alice, cid)

    reader = FeedReader("store", alice, store_pages(store, alice, limits=(2,)))
    await drain(reader, lambda: len(reader.seen) == 2)
    start = reader.last

    # An append that runs in the store's own group-commit path, but whose transaction stays open.
    reached, release = asyncio.Event(), asyncio.Event()
    held_events: list[dict] = []

    async def hold(tx, appended):
        held_events.extend(appended.events)
        reached.set()
        await release.wait()

    holding = HookedWriter(GroupWriter(store.pool, writers=1), after=hold)
    held_task = asyncio.create_task(
        store_with(store, holding).append(alice, held_cid, messages(3, "held")))
    try:
        await asyncio.wait_for(reached.wait(), PATIENCE)

        # Meanwhile other appends commit, with positions ABOVE the open transaction's.
        later = [await store.append(alice, later_cid, messages(n, f"later{n}")) for n in (1, 4)]
        later_events = [e for a in later for e in a.events]
        assert min(e["position"] for e in later_events) > max(e["position"] for e in held_events), (
            "the test did not create the dangerous interleaving")
        committed = await store.pool.fetchval("SELECT count(*) FROM events WHERE conversation_id = $1", later_cid)
        assert committed == 6  # they are committed and visible to any plain query ...

        # ... but the feed does not hand them out past the open transaction, to anyone.
        for _ in range(3):
            assert await store.read_feed(alice, after_position=start, limit=1000) == []
            response = await client.get("/v1/events", params={"after_position": start})
            assert response.status_code == 200
            body = response.json()
            assert body["events"] == [] and body["last_position"] == start
    finally:
        release.set()
        await held_task
        await holding.close()

    # Once it commits, everything arrives: the held events first (lower positions), nothing skipped.
    http_reader = FeedReader("http", alice, http_pages(client, limits=(3,)))
    http_reader.last = start
    http_reader.last_seq.update(reader.last_seq)
    await drain(reader, lambda: len(reader.seen) == 2 + 3 + 5)
    await drain(http_reader, lambda: len(http_reader.seen) == 3 + 5)
    expected = [(e["conversation_id"], e["id"]) for e in held_events + later_events]
    assert list(reader.seen)[2:] == expected
    assert list(http_reader.seen) == expected
    assert [reader.seen[k] for k in expected] == [e["position"] for e in held_events + later_events]


async def test_feed_gives_a_conversations_events_in_seq_order_when_a_group_commit_waits_on_a_lock(
        store, principal, database_url):
    """A group transaction gets its xid (its positions) at its first write, then waits for a row lock
    on a later conversation. Another transaction appends to THAT conversation meanwhile and commits.
    The waiting group's event then gets the next seq but a lower position: unless the store prevents
    it, a feed reader sees seq n+1 before seq n (and the feed is not in commit order)."""
    # Two writer tasks (the second append needs one while the group waits),
    # but a group may take everything waiting: normally each writer takes only
    # a fair share of the queue, which would split the three appends up.
    store = Store(await create_pool(database_url, min_size=1, max_size=4), writers=2)
    store.writer._writers = 1
    try:
        await _group_waits_on_a_lock(store, principal, database_url)
    finally:
        await store.close()


async def _group_waits_on_a_lock(store, principal, database_url):
    ids = sorted((uuid.uuid4() for _ in range(3)), key=str)  # the writer runs a group's ops in this order
    first, blocked, shared = ids
    for cid in ids:
        await store.create_conversation(principal, cid)

    blocker = await asyncpg.connect(database_url)
    blocker_tx = blocker.transaction()
    await blocker_tx.start()
    second = None
    try:
        await blocker.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", blocked)
        # Submitted in one go, these three form ONE group: `first` is written, then it waits on `blocked`.
        group = asyncio.gather(
            store.append(principal, first, messages(2, "g1-first")),
            store.append(principal, blocked, messages(1, "g1-blocked")),
            store.append(principal, shared, messages(1, "g1-shared")),
        )
        await eventually(lambda: lock_waiters(store.pool), "the group to wait on the blocked conversation",
                         timeout=PATIENCE, interval=0.01)
        second = asyncio.create_task(store.append(principal, shared, messages(1, "g2-shared")))
        # Either the store lets it through now, or it makes it wait for the group: both are observable.
        await eventually(lambda: _done_or_waiting(second, store.pool, 2), "the second append to finish or wait",
                         timeout=PATIENCE, interval=0.01)
    finally:
        await blocker_tx.rollback()
        await blocker.close()
    g1_first, _, g1_shared = await group
    await second

    assert g1_first.events[0]["position"] >> 16 == g1_shared.events[0]["position"] >> 16, (
        "precondition: the three appends shared one transaction")

    events, _ = await store.read_events(principal, shared)
    assert [e["seq"] for e in events] == [1, 2, 3]
    positions = [e["position"] for e in events]
    assert positions == sorted(positions), (
        f"positions of conversation {shared} do not follow its seqs: {[(e['seq'], e['position']) for e in events]}")

    reader = FeedReader("store", principal, store_pages(store, principal))
    await drain(reader, lambda: len(reader.seen) == 3 + 2 + 1 + 1 + 1)  # FeedReader asserts the seq order


async def _done_or_waiting(task: asyncio.Task, pool, waiters: int) -> bool:
    return task.done() or await lock_waiters(pool) >= waiters


# -- the big one --------------------------------------------------------------------------------


async def test_feed_never_skips_or_repeats_under_many_concurrent_writers(store, client, principal, database_url):
    """9 writers, 20,000+ events in batches of 1..200 over 12 conversations, through three
    independent stores (as three server processes would be), one of them stretching its
    transactions: each takes its xid, waits until another append with higher positions has
    committed, writes, and sleeps before COMMIT. Two readers follow the feed meanwhile (one
    through the store, one mixing the store and GET /v1/events) with page sizes from 1 to 1000."""
    rng = random.Random()
    alice = f"alice-{principal}"
    conversations = [uuid.uuid4() for _ in range(12)]
    markers = [uuid.uuid4() for _ in range(3)]  # only written from inside the slow transactions
    for cid in conversations + markers:
        await store.create_conversation(alice, cid)

    # "another server process"; more appenders than writer tasks, so its groups
    # really hold several appends (a writer takes a fair share of what waits)
    other = await Store.open(database_url, pool_size=4, writers=1)
    marker_store = await Store.open(database_url, pool_size=2, writers=1)
    slow_pool = await create_pool(database_url, min_size=3, max_size=3)

    written: list[dict] = []  # every stored event the writers were told about
    stretched = {"transactions": 0, "overtaken": 0}

    async def take_xid_and_let_others_commit(tx):
        await tx.conn.fetchval("SELECT pg_current_xact_id()")
        overtaking = await marker_store.append(alice, rng.choice(markers), messages(rng.randint(1, 3), "marker"))
        written.extend(overtaking.events)
        tx.overtaking = overtaking.events  # remembered on the group's Transaction for the after-hook

    async def check_and_sleep(tx, appended):
        stretched["transactions"] += 1
        if min(e["position"] for e in tx.overtaking) > max(e["position"] for e in appended.events):
            stretched["overtaken"] += 1
        await tx.conn.execute("SELECT pg_sleep($1)", rng.uniform(0, 0.03))

    slow = HookedWriter(GroupWriter(slow_pool, writers=3), before=take_xid_and_let_others_commit,
                        after=check_and_sleep)
    slow_store = store_with(store, slow)

    async def writer(name: str, via: Store, quota: int, max_batch: int) -> None:
        done = 0
        while done < quota:
            n = min(rng.randint(1, max_batch), quota - done)
            appended = await via.append(alice, rng.choice(conversations),
                                        messages(n, f"{name}-{done}", with_ids=rng.random() < 0.3))
            assert [e["seq"] for e in appended.events] == list(range(appended.events[0]["seq"],
                                                                     appended.last_seq + 1))
            written.extend(appended.events)
            done += n

    writers_done = asyncio.Event()

    async def all_writers() -> None:
        try:
            await asyncio.gather(
                writer("a", store, 3400, 200), writer("b", store, 3400, 200), writer("c", store, 3400, 30),
                writer("d", other, 2267, 200), writer("e", other, 2267, 200), writer("f", other, 2267, 30),
                writer("s1", slow_store, 1100, 200), writer("s2", slow_store, 1100, 200),
                writer("s3", slow_store, 1100, 50),
            )
        finally:
            writers_done.set()

    readers = [
        FeedReader("store", alice, store_pages(store, alice, limits=(1, 7, 100, 333, 1000))),
        FeedReader("store+http", alice, mixed_pages(store, alice, client, limits=(5, 64, 500, 1000))),
    ]

    def complete(reader: FeedReader) -> bool:
        if not writers_done.is_set():
            return False
        expected = len(written) + len(conversations) + len(markers)
        if len(reader.seen) >= expected:
            return True
        skipped = [e for e in written
                   if e["position"] <= reader.last and (e["conversation_id"], e["id"]) not in reader.seen]
        assert not skipped, f"{reader.name} skipped {len(skipped)} events, e.g. {skipped[:3]}"
        return False

    async def follow(reader: FeedReader) -> None:
        loop = asyncio.get_running_loop()
        give_up = None
        while not complete(reader):
            if writers_done.is_set() and give_up is None:
                give_up = loop.time() + PATIENCE
            if give_up is not None and loop.time() > give_up:
                pytest.fail(f"{reader.name}: the feed stopped short of the written events")
            if await reader.step() == 0:
                await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(all_writers()), *(asyncio.create_task(follow(r)) for r in readers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # on failure, leave nothing running in the session's loop
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await slow.close()
        await slow_pool.close()
        await other.close()
        await marker_store.close()

    # The run really was what it claims to be.
    assert len(written) >= 20_000
    assert stretched["transactions"] >= 20
    assert stretched["overtaken"] == stretched["transactions"], (
        "every stretched transaction committed after a transaction with higher positions")
    conversations_per_transaction = defaultdict(set)
    for e in written:
        conversations_per_transaction[e["position"] >> 16].add(e["conversation_id"])
    assert max(len(c) for c in conversations_per_transaction.values()) > 1, "group commit never grouped"

    every = {(e["conversation_id"], e["id"]): e["position"] for e in written}
    assert len(every) == len(written), "an event id was handed out twice"
    for reader in readers:
        got = {k: v for k, v in reader.seen.items() if k[0] in {str(c) for c in conversations + markers}}
        assert len(got) == len(every) + len(conversations) + len(markers)
        assert all(got[k] == p for k, p in every.items()), f"{reader.name} saw an event at another position"
        # seqs per conversation: 1..n, exactly the conversation's own count
        for cid in conversations + markers:
            stored = (await store.get_conversation(alice, cid))["seq"]
            assert reader.last_seq[str(cid)] == stored
