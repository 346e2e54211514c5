"""Readers that never read while live events pile up (issue 7), seen from inside the process.

`chatlog bench` (bench/fanout.py) measures what such readers cost a real server (RSS, CPU);
this asserts the behaviour behind the figures, with no memory or timing
threshold: the readers of a conversation share one tail whose buffer stays
within its bound, the writer is not held up by them, and once they hang up
nothing of them is left (no tail, no task, no pooled connection) while every
event can still be read.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx

from tests.helpers import append, assert_nothing_left_behind, eventually, new_conversation, our_tails, parse_sse
from tests.servers import RawSSE, auth

pytest_plugins = ("tests.servers",)

CONVERSATIONS = 4
READERS = 200  # 50 per conversation
BATCHES = 20  # of 100 events: 500 per conversation, ~230 kB of SSE per reader, far more than a socket holds


async def test_readers_that_never_read_share_bounded_tails_and_leave_nothing_when_they_hang_up(inprocess_server,
                                                                                            store):
    await asyncio.sleep(0.1)  # let an earlier test's connections settle before the baseline
    tasks_before = set(asyncio.all_tasks())
    headers = auth("alice")
    readers: list[RawSSE] = []
    async with httpx.AsyncClient(base_url=inprocess_server.url, headers=headers, timeout=30) as client:
        cids = []
        for _ in range(CONVERSATIONS):
            cid = await new_conversation(client)
            await append(client, cid, [{"type": "message.user", "data": {"content": "go"}},
                                       {"type": "turn.started", "data": {"turn_id": "t"}}])
            cids.append(cid)
        ours = {uuid.UUID(c) for c in cids}
        try:
            # each reads the response head, then never reads again (a 4 kB receive buffer)
            for i in range(READERS):
                path = f"/v1/conversations/{cids[i % CONVERSATIONS]}/stream?format=events&compact=false&follow=true"
                reader = await RawSSE.connect(inprocess_server.url, path, headers, rcvbuf=4096)
                readers.append(reader)
                assert await reader.start() == 200
            await eventually(lambda: sum(t.readers for t in our_tails(store, ours).values()) == READERS,
                             "every reader follows its conversation")

            # the writer goes on while they stall
            last = {}
            for b in range(BATCHES):
                cid = cids[b % CONVERSATIONS]
                last[cid] = (await append(client, cid, [
                    {"type": "text.delta", "data": {"turn_id": "t", "text": f"{b}-{i} " + "x" * 200}}
                    for i in range(100)]))["last_seq"]

            # one tail per conversation, shared by its readers, its buffer within bounds
            tails = our_tails(store, ours)
            assert set(tails) == ours
            assert [t.readers for t in tails.values()] == [READERS // CONVERSATIONS] * CONVERSATIONS
            assert all(t.buffered <= t.buffer_size or len(t._batches) == 1 for t in tails.values())
        finally:
            for i, reader in enumerate(readers):
                reader.hang_up(reset=i % 2 == 0)

        await assert_nothing_left_behind(store, ours, tasks_before)

        # and a reader that does read gets every event of every conversation
        for cid in cids:
            r = await client.get(f"/v1/conversations/{cid}/stream", params={"compact": "false", "follow": "false"},
                                 headers={"Accept": "text/event-stream"})
            assert r.status_code == 200
            ids = [int(f.id) for f in parse_sse(r.text)]
            assert ids == list(range(1, last[cid] + 1))
