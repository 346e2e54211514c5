"""What streams cost the server, seen from inside the process.

uvicorn serves the app on the session's store in this event loop, so the
tests can look at what a real `chatlog serve` process keeps hidden: the
listener's tails, the loop's tasks, the pool, the LISTEN connection. Clients
are bare sockets, so they can hang up rudely (FIN or RST) at any moment or
stop reading altogether.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import httpx

from tests.helpers import append, assert_nothing_left_behind, eventually, new_conversation, our_tails
from tests.servers import RawSSE, auth

pytest_plugins = ("tests.servers",)

CONVERSATIONS = 10
STREAMS = 1000
WAVE = 100


async def listen_connections(store) -> int:
    """LISTEN connections on this run's database (every process's listener)."""
    return await store.pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'chatlog-listener'")


async def open_shed_or_not(connect, attempts: int = 50) -> RawSSE:
    """A stream answered 200, opened as a client that honours 503 does.

    The store waits `acquire_timeout` (1 s) for a pooled connection, then
    answers 503 store_unavailable, "retry shortly". A hundred streams opening
    at once on a machine whose cores are busy elsewhere (CI's are shared) can
    meet that: the server sheds them rather than queueing without bound. A
    client retries; so do these, a bounded number of times. What this module
    tests is what those streams leave behind, shed or not."""
    for _ in range(attempts):
        stream = await connect()
        status = await stream.start()
        if status == 200:
            return stream
        assert status == 503, f"a stream answered {status}"
        stream.hang_up()
        await asyncio.sleep(0.1 + random.random() * 0.2)
    raise AssertionError(f"still 503 after {attempts} attempts")


async def test_a_thousand_dropped_streams_leave_nothing_behind(inprocess_server, store):
    """1,000 streams on 10 conversations, opened in waves and dropped every way
    a client can drop: before the response starts, stuck mid catch-up, while
    idle, while live events flow; with FIN or RST. Afterwards: no tail, no
    task, no pooled connection in use, the same one LISTEN connection."""
    rng = random.Random(1000)
    await asyncio.sleep(0.1)  # let the previous test's connections settle before the baseline
    tasks_before = set(asyncio.all_tasks())
    listens_before = await listen_connections(store)
    listener_conn = store.listener._conn
    headers = auth("alice")

    async with httpx.AsyncClient(base_url=inprocess_server.url, headers=headers) as client:
        async def conversation(deltas: int, size: int) -> str:
            cid = await new_conversation(client)
            await append(client, cid, [{"type": "message.user", "data": {"content": "hi"}},
                                       {"type": "turn.started", "data": {"turn_id": "t"}},
                                       *({"type": "text.delta", "data": {"turn_id": "t", "text": "x" * size}}
                                         for _ in range(deltas))])
            return cid

        cids = [await conversation(60, 200) for _ in range(CONVERSATIONS)]
        # its catch-up (400 kB) is far more than a small-buffered client and the socket hold
        big = await conversation(100, 4000)
        ours = {uuid.UUID(c) for c in [*cids, big]}
        seq = {cid: 62 for cid in cids}

        async def write_while(flag: asyncio.Event):
            async def one(cid):
                r = await client.post(f"/v1/conversations/{cid}/events", json={
                    "events": [{"type": "text.delta", "data": {"turn_id": "t", "text": "y"}}]})
                if r.status_code == 503:  # shed under load (see open_shed_or_not): the next one tells
                    return
                assert r.status_code == 201, r.text
                seq[cid] = max(seq[cid], r.json()["last_seq"])

            while not flag.is_set():
                await asyncio.gather(*(one(cid) for cid in cids))

        async def one_stream(i: int, phase: str, peak: asyncio.Event, ready: list):
            cid = big if phase == "mid_catch_up" else cids[i % CONVERSATIONS]
            params = "compact=false" if i % 2 or phase == "mid_catch_up" else "compact=true"
            reset = i % 3 == 0

            async def connect() -> RawSSE:
                return await RawSSE.connect(inprocess_server.url, f"/v1/conversations/{cid}/stream?{params}",
                                            headers, rcvbuf=4096 if phase == "mid_catch_up" else None)

            if phase == "at_once":
                stream = await connect()
                await asyncio.sleep(rng.random() * 0.01)
                stream.hang_up(reset)  # maybe before the request was even read
                return
            stream = await open_shed_or_not(connect)
            if phase == "live":
                target = seq[cid] + rng.randint(1, 3)  # a frame or more that is written after we came
                await stream.frames_until(lambda f: int(f.id) >= target)
                stream.hang_up(reset)
                return
            if phase == "mid_catch_up":
                await stream.frames_until(lambda f: True)  # one frame, then it reads no more
            else:  # idle: caught up, then parked in the listener
                await stream.frames_until(lambda f: int(f.id) >= seq[cid])
            ready.append(cid)
            await peak.wait()
            stream.hang_up(reset)

        phases = ["idle", "at_once", "mid_catch_up", "live"]
        opened = 0
        for wave in range(STREAMS // WAVE):
            phase = phases[wave % len(phases)]
            peak, ready, writing_done = asyncio.Event(), [], asyncio.Event()
            writer = asyncio.create_task(write_while(writing_done)) if phase == "live" else None
            wave_tasks = [asyncio.create_task(one_stream(opened + j, phase, peak, ready)) for j in range(WAVE)]
            opened += WAVE
            if phase in ("idle", "mid_catch_up"):
                await eventually(lambda: len(ready) == WAVE, f"every {phase} stream got its first frames")
            if phase == "idle":
                # one tail per conversation, shared by its readers
                await eventually(lambda: sum(t.readers for t in our_tails(store, ours).values()) == WAVE,
                                 "every idle stream is following")
                assert set(our_tails(store, ours)) == ours - {uuid.UUID(big)}
            if phase == "mid_catch_up":
                # they hold the server mid catch-up: none of them has reached the listener
                assert uuid.UUID(big) not in {key[1] for key in store.listener.tails}
            peak.set()
            await asyncio.wait_for(asyncio.gather(*wave_tasks), 60)
            if writer:
                writing_done.set()
                await writer
        assert opened == STREAMS

    await assert_nothing_left_behind(store, ours, tasks_before)
    assert await listen_connections(store) == listens_before
    assert store.listener._conn is listener_conn and not listener_conn.is_closed(), "the listener reconnected"


async def test_a_reader_that_stops_reading_slows_no_one_and_still_gets_everything(inprocess_server, store,
                                                                                 monkeypatch):
    """A reader that stops reading its socket: the writer and a fast reader
    get through a 1,500-event, 1.5 MB turn regardless. The tail's buffer is
    bounded (1,024 events), so the stalled reader falls behind it; when it
    reads again it gets every event, re-read from the store."""
    headers = auth("alice")
    texts = 1500
    big = "z" * 1000
    async with httpx.AsyncClient(base_url=inprocess_server.url, headers=headers, timeout=30) as client:
        cid = await new_conversation(client)
        await append(client, cid, [{"type": "message.user", "data": {"content": "hi"}},
                                   {"type": "turn.started", "data": {"turn_id": "t"}}])
        last = 3 + texts
        path = f"/v1/conversations/{cid}/stream?compact=false"

        slow = await RawSSE.connect(inprocess_server.url, path, headers, rcvbuf=4096)
        assert [f.id for f in await slow.frames_until(lambda f: f.id == "3")][-1] == "3"  # then it stops reading
        fast = await RawSSE.connect(inprocess_server.url, path, headers)
        await fast.frames_until(lambda f: f.id == "3")
        tail = await eventually(lambda: (t := store.listener.tails.get(("alice", uuid.UUID(cid)))) and t.readers == 2 and t,
                                "both readers follow the conversation")

        # from here, count the reads readers make themselves (the tail keeps its own reference)
        reader_reads: list[tuple[int, int]] = []
        real_read = store.listener._read

        async def counted_read(key, after, limit):
            events = await real_read(key, after, limit)
            if key[1] == uuid.UUID(cid):
                reader_reads.append((after, len(events)))
            return events

        monkeypatch.setattr(store.listener, "_read", counted_read)

        async def write():
            for start in range(0, texts, 50):
                await append(client, cid, [
                    {"type": "text.delta", "data": {"turn_id": "t", "text": f"{start + i} {big}"}} for i in range(50)])

        fast_frames, _ = await asyncio.wait_for(asyncio.gather(
            fast.frames_until(lambda f: int(f.id) == last), write()), 60)
        # the writer and the fast reader are done; the slow reader has not read a byte since seq 3
        assert [int(f.id) for f in fast_frames] == list(range(4, last + 1))
        assert 0 < tail.buffered <= tail.buffer_size < texts, "the tail's buffer is bounded"
        reads_before_resume = len(reader_reads)

        slow_frames = await asyncio.wait_for(slow.frames_until(lambda f: int(f.id) == last), 60)
        fast.hang_up()
        slow.hang_up()

    assert [int(f.id) for f in slow_frames] == list(range(4, last + 1)), "the slow reader missed or repeated events"
    assert [f.json()["data"]["text"].split()[0] for f in slow_frames] == [str(i) for i in range(texts)]
    resumed_reads = reader_reads[reads_before_resume:]
    assert any(count for _, count in resumed_reads), \
        "the slow reader fell behind the bounded buffer, so it must have read the store itself"
    await eventually(lambda: uuid.UUID(cid) not in {key[1] for key in store.listener.tails}, "the tail is gone")
