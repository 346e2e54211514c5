"""Erasure reaches what is live: open streams end, on every process, and the
runner stops the turns of an erased conversation and drops its queued
requests. Real `chatlog serve` processes and the fake upstream over HTTP.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from api.app import create_app
from api.settings import Settings
from runner.fake_upstream import FakeUpstream
from store import Store
from tests.helpers import Frame, append, eventually, new_conversation
from tests.servers import API_KEYS, HEARTBEAT_SECONDS, InProcessServer, auth, open_sse
from tests.test_runner_turns import TOOLS, new_chat, start, until_status

pytest_plugins = ("tests.servers",)

DEADLINE = 20
OPEN_TURN = [{"type": "message.user", "data": {"content": "hello"}},
             {"type": "turn.started", "data": {"turn_id": "t1"}},
             {"type": "text.delta", "data": {"turn_id": "t1", "text": "Hi"}}]


async def first_frame(stream) -> Frame:
    async for frame in stream.frames():
        return frame
    raise AssertionError("the stream ended before its first frame")


async def read_to_the_end(stream) -> list:
    """Everything the stream still sends; returns when the server ends it (bounded: a hang fails)."""
    return await asyncio.wait_for(stream.read_all(), DEADLINE)


def assert_gone(response: httpx.Response, cid: str) -> None:
    assert response.status_code == 410, response.text
    error = response.json()["error"]
    assert error["code"] == "conversation_erased" and error["details"]["conversation_id"] == cid


async def test_an_erasure_ends_its_open_streams_on_every_process(chatlog_servers):
    a, b = chatlog_servers
    async with a.client() as on_a, b.client() as on_b:
        cid = await new_conversation(on_a)
        await append(on_a, cid, OPEN_TURN)
        other = await new_conversation(on_a)
        streams = [(on_a, f"/v1/conversations/{cid}/stream", {}),
                   (on_b, f"/v1/conversations/{cid}/stream", {"format": "ui"}),
                   (on_b, f"/v1/conversations/{cid}/turns/t1/stream", {}),
                   (on_a, f"/v1/conversations/{other}/stream", {})]
        async with open_sse(*streams[0][:2], params=streams[0][2]) as s1, \
                open_sse(*streams[1][:2], params=streams[1][2]) as s2, \
                open_sse(*streams[2][:2], params=streams[2][2]) as s3, \
                open_sse(*streams[3][:2], params=streams[3][2]) as neighbour:
            for stream in (s1, s2, s3, neighbour):
                await asyncio.wait_for(first_frame(stream), DEADLINE)
            r = await on_a.delete(f"/v1/conversations/{cid}")
            assert r.status_code == 204, r.text

            # every stream of it ends, on A (where it was erased) and on B (told by PostgreSQL);
            # what they still send is the catch-up read before the erasure
            for stream in (s1, s2, s3):
                rest = await read_to_the_end(stream)
                assert all(int(f.id.split(":")[0]) <= 4 for f in rest if isinstance(f, Frame)), rest
            # another conversation's stream goes on
            await append(on_a, other, [{"type": "message.user", "data": {"content": "still here"}}])
            frame = await asyncio.wait_for(first_frame(neighbour), DEADLINE)
            assert frame.json()["data"] == {"content": "still here"}

        # a reconnect, as EventSource makes it, is told why it cannot resume
        for client, path, params in streams[:3]:
            assert_gone(await client.get(path, params=params, headers={"Last-Event-ID": "2"}), cid)


async def test_a_stream_ends_even_when_the_erasure_notification_is_lost(database_url, store):
    """The listener misses chatlog_erased (dropped here, as it is while its
    connection is down): the sweep finds the conversation's row gone and the
    stream ends all the same."""
    deaf = Store(store.pool.raw, dsn=database_url)  # a second process, as far as the listener goes
    deaf.listener._on_erase_notify = lambda *args: None  # every erasure notification is lost
    await deaf.listener.start()
    settings = Settings(database_url=None, api_keys=API_KEYS, heartbeat_seconds=HEARTBEAT_SECONDS)
    server = await InProcessServer(create_app(settings, store=deaf)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=auth("alice"), timeout=DEADLINE) as client:
            cid = await new_conversation(client)
            async with open_sse(client, f"/v1/conversations/{cid}/stream") as stream:
                await asyncio.wait_for(first_frame(stream), DEADLINE)
                tail = await eventually(lambda: [t for k, t in deaf.listener.tails.items() if str(k[1]) == cid],
                                        "the stream's tail")
                assert (await client.delete(f"/v1/conversations/{cid}")).status_code == 204
                await read_to_the_end(stream)
                assert tail[0].erased
    finally:
        await server.stop()
        await deaf.listener.close()
        await deaf.writer.close()


@pytest.fixture
async def runner_chat(store, fake):
    """A client on a chatlog in this loop whose runner calls `fake`, and its app."""
    settings = Settings(database_url=None, api_keys=API_KEYS, heartbeat_seconds=HEARTBEAT_SECONDS,
                        upstream_base_url=fake.url, upstream_api_key="sk-fake", model="fake", runner_lease_ttl_seconds=3)
    app = create_app(settings, store=store)
    server = await InProcessServer(app).start()
    async with httpx.AsyncClient(base_url=server.url, headers=auth("alice"), timeout=DEADLINE) as client:
        yield client, app
    await server.stop()


async def turn_rows(store, cid: str) -> int:
    return await store.pool.fetchval("SELECT count(*) FROM turn_runs WHERE conversation_id = $1::text::uuid", cid)


async def test_an_erasure_stops_a_running_turn_and_drops_its_queued_requests(runner_chat, fake: FakeUpstream, store,
                                                                            caplog):
    client, app = runner_chat
    runner = app.state.runner
    cid = await new_chat(client)
    turn = await start(client, cid, "[fake:long 2000] [fake:slow 20ms]")
    queued = await start(client, cid, "queued-marker [fake:say Never.]", if_running="enqueue")
    assert queued["status"] == "queued"

    async def some_text():
        page = (await client.get(f"/v1/conversations/{cid}/events", params={"compact": "false"})).json()
        return any(e["type"] == "text.delta" for e in page["events"])
    await eventually(some_text, "some text to be recorded")
    assert (await client.delete(f"/v1/conversations/{cid}")).status_code == 204

    # the upstream request is closed, the turn's task ends, nothing of it is left
    await fake.wait_for(lambda q: q.outcome == "client_closed", timeout=DEADLINE)
    await eventually(lambda: not [k for k in runner.running if str(k[1]) == cid], "the turn's task to end")
    assert await turn_rows(store, cid) == 0
    assert await store.pool.fetchval("SELECT count(*) FROM events WHERE conversation_id = $1::text::uuid", cid) == 0
    assert_gone(await client.get(f"/v1/conversations/{cid}/turns/{turn['turn_id']}"), cid)
    assert_gone(await client.get(f"/v1/conversations/{cid}/turns/{queued['turn_id']}"), cid)

    # the queued request never runs: another turn runs to its end meanwhile, and no upstream request carried it
    other = await new_chat(client)
    done = await start(client, other, "[fake:say Done.]")
    await until_status(client, other, done["turn_id"], "finished")
    assert not [q for q in fake.requests if b"queued-marker" in q.body]
    assert not [r for r in caplog.records if r.name == "chatlog.runner" and r.levelno >= logging.ERROR], \
        "an erasure is not a failure of the runner"


async def test_an_erasure_ends_a_turn_waiting_for_tools(runner_chat, fake: FakeUpstream, store, caplog):
    client, app = runner_chat
    runner = app.state.runner
    cid = await new_chat(client)
    turn = await start(client, cid, "[fake:tools weather]", tools=TOOLS)
    await until_status(client, cid, turn["turn_id"], "waiting_for_tools")
    assert (await client.delete(f"/v1/conversations/{cid}")).status_code == 204
    await eventually(lambda: not [k for k in runner.running if str(k[1]) == cid], "the waiting turn to end")
    assert await turn_rows(store, cid) == 0
    assert len([q for q in fake.requests if q.path.endswith("/chat/completions")]) == 1  # the model is not called again
    assert not [r for r in caplog.records if r.name == "chatlog.runner" and r.levelno >= logging.ERROR]
