"""format=ui streams from real `chatlog serve` processes, read as the AI SDK reads them.

What a frontend relies on: every frame passes the `ai` package's own chunk
schema, the messages it rebuilds are the conversation's history, and resuming
after any `<seq>:<k>` id (after drops, on another process) is exact.
"""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from projections import ui
from store.folds import SNAPSHOT_EVERY
from tests.helpers import (Frame, append, frame_key, new_conversation, parse_sse, read_a_long_turn_across_a_kill9,
                           read_a_long_turn_while_dropping, stored_events, tool_turns)
from tests.servers import open_sse
from tests.uisdk import assert_agrees_with_history, check_sse, sse_body, sse_text

pytest_plugins = ("tests.servers",)


def body_of(frames: list[Frame]) -> str:
    """The frames as one SSE body (what one uninterrupted connection would carry)."""
    return sse_text((None if frame.data == "[DONE]" else frame.id, frame.data) for frame in frames)


def sdk_messages(body: str) -> list[dict]:
    reads = check_sse([body])
    messages = None
    for version, (read,) in reads.items():
        assert read["problems"] == [], (f"ai {version}", read["problems"])
        messages = read["messages"] if messages is None else messages
        assert read["messages"] == messages, f"ai {version} rebuilt other messages"
    return messages


@pytest.mark.parametrize("compact", [False, True], ids=["compact=false", "compact=true"])
async def test_ui_resume_after_random_drops_repeats_and_misses_no_frame(chatlog_servers, compact):
    async with chatlog_servers[0].client() as client:
        reader, stored, last = await read_a_long_turn_while_dropping(
            client, {"format": "ui", "compact": str(compact).lower()}, lambda frame, _: frame.data == "[DONE]")
    stored = list(stored.values())

    assert len(stored) == last and reader.drops >= 50, (len(stored), reader.drops)
    frames = [f for f in reader.frames if f.data != "[DONE]"]
    keys = [frame_key(f) for f in frames]
    assert keys == sorted(set(keys)), "a frame id came twice or out of order"
    expected = ui.ui_frames(stored)
    if not compact:
        # exactly the frames of the log, whatever the drops
        assert [(f.id, f.json()) for f in frames] == [(i, c) for i, c in expected]
    else:
        # compacted runs stand for the raw frames with the same ids: every id is one of them
        assert set(f.id for f in frames) <= {i for i, _ in expected}
        assert frames[-1].id == expected[-1][0]
    messages = sdk_messages(body_of(reader.frames))
    assert messages == sdk_messages(sse_body(stored))
    assert_agrees_with_history(stored, messages)
    print(f"{last} events, {len(frames)} frames, {reader.connections} connections, {reader.drops} drops")


async def test_ui_stream_from_another_process_survives_kill9(chatlog_servers, start_server):
    b = await start_server("B-ui-killed")
    run = await read_a_long_turn_across_a_kill9(chatlog_servers[0], b, {"format": "ui", "compact": "false"},
                                                kill_after=60, done=lambda frame, _: frame.data == "[DONE]")

    assert not b.alive and len(run.on_b) >= 60 and run.reader.connections == 2
    frames = [f for f in run.reader.frames if f.data != "[DONE]"]
    assert [(f.id, f.json()) for f in frames] == [(i, c) for i, c in ui.ui_frames(list(run.stored.values()))]


async def test_ui_turn_stream_is_the_turn_for_the_sdk_resume(chatlog_servers):
    """/turns/{id}/stream?format=ui replays the turn from its start, ends with [DONE]
    right after the turn's end, and carries the AI SDK's header."""
    a = chatlog_servers[0]
    async with a.client() as client:
        cid = await new_conversation(client)
        events = [
            {"type": "message.user", "data": {"content": "hi"}},
            {"type": "turn.started", "data": {"turn_id": "t1"}},
            {"type": "reasoning.delta", "data": {"turn_id": "t1", "text": "thinking"}},
            {"type": "text.delta", "data": {"turn_id": "t1", "text": "Looking "}},
            {"type": "text.delta", "data": {"turn_id": "t1", "text": "it up."}},
            {"type": "tool_call.started", "data": {"turn_id": "t1", "tool_call_id": "c1", "name": "search"}},
            {"type": "tool_call.delta", "data": {"tool_call_id": "c1", "text": '{"q": "x"}'}},
            {"type": "tool_call.completed", "data": {"tool_call_id": "c1"}},
        ]
        await append(client, cid, events)
        async with open_sse(client, f"/v1/conversations/{cid}/turns/t1/stream",
                            params={"format": "ui", "compact": "false"}) as stream:
            assert stream.response.headers["x-vercel-ai-ui-message-stream"] == "v1"
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            reading = asyncio.create_task(stream.read_all())
            await asyncio.sleep(0.3)
            assert not reading.done(), "the turn is open: the stream must wait for it"
            await append(client, cid, [
                {"type": "turn.finished", "data": {"turn_id": "t1", "finish_reason": "tool_calls"}},
                {"type": "message.user", "data": {"content": "after the turn"}},
            ])
            items = await asyncio.wait_for(reading, 10)
        stored = list((await stored_events(client, cid)).values())
    frames = [i for i in items if isinstance(i, Frame)]
    assert frames[-1].data == "[DONE]" and frames[-2].json()["type"] == "finish"
    turn = [e for e in stored if 3 <= e["seq"] <= 11]
    assert [(f.id, f.json()) for f in frames[:-1]] == ui.ui_frames(turn)
    messages = sdk_messages(body_of(frames))
    assert [m["id"] for m in messages] == ["t1"]
    assert_agrees_with_history([e for e in stored if e["seq"] <= 11], messages)


async def test_ui_resume_inside_an_events_frames_is_exact(chatlog_servers):
    """An event may give several frames; resuming after `<seq>:<k>` sends the rest of them."""
    a = chatlog_servers[0]
    async with a.client() as client:
        cid = await new_conversation(client)
        await append(client, cid, [
            {"type": "message.user", "data": {"content": "hi"}},
            {"type": "turn.started", "data": {"turn_id": "t1"}},
            {"type": "reasoning.delta", "data": {"turn_id": "t1", "text": "r"}},
            {"type": "text.delta", "data": {"turn_id": "t1", "text": "a"}},  # reasoning-end, text-start, text-delta
            {"type": "turn.finished", "data": {"turn_id": "t1", "finish_reason": "stop"}},
        ])
        stored = list((await stored_events(client, cid)).values())
        expected = ui.ui_frames(stored)
        for index, (frame_id, _) in enumerate(expected):
            for how in ("header", "after"):
                kwargs = {"last_event_id": frame_id} if how == "header" else {}
                params = {"format": "ui", "follow": "false", "compact": "false",
                          **({"after": frame_id} if how == "after" else {})}
                async with open_sse(client, f"/v1/conversations/{cid}/stream", params=params, **kwargs) as stream:
                    frames = [f for f in await stream.read_all() if isinstance(f, Frame) and f.data != "[DONE]"]
                assert [(f.id, f.json()) for f in frames] == expected[index + 1:], (how, frame_id)


async def test_a_bad_resume_id_is_422(chatlog_servers):
    a = chatlog_servers[0]
    async with a.client() as client:
        cid = await new_conversation(client)
        r = await client.get(f"/v1/conversations/{cid}/stream", headers={"Last-Event-ID": "soon"},
                             params={"follow": "false"})
        assert r.status_code == 422 and orjson.loads(r.content)["error"]["code"] == "invalid_request"


async def test_ui_resume_deep_in_a_long_conversation_uses_snapshots_and_stays_exact(client, store):
    """The translator's state comes from a snapshot + tail (not a fold from seq 1);
    the frames after any resume point are the same with or without snapshot rows."""
    cid = await new_conversation(client)
    # odd turns' results come late, while their turn's message is still the latest
    await append(client, cid, tool_turns(8, deltas=70, answered=lambda t: t % 2))
    stored = (await client.get(f"/v1/conversations/{cid}/events")).json()["events"]
    assert len(stored) > 2 * SNAPSHOT_EVERY
    points = ["0", "5:0", f"{SNAPSHOT_EVERY}:0", f"{SNAPSHOT_EVERY + 1}", f"{2 * SNAPSHOT_EVERY + 3}:1",
              str(len(stored) - 1)]

    async def frames_after(point: str) -> list[tuple[str, dict]]:
        r = await client.get(f"/v1/conversations/{cid}/stream",
                             params={"format": "ui", "follow": "false", "compact": "false", "after": point})
        assert r.status_code == 200
        return [(f.id, f.json()) for f in parse_sse(r.text) if f.data != "[DONE]"]

    store.ui_states.forget()
    first = {p: await frames_after(p) for p in points}
    await store.ui_states.flush()
    saved = await store.pool.fetchval("SELECT count(*) FROM ui_snapshots WHERE conversation_id = $1",
                                      uuid.UUID(cid))
    assert saved >= 2, "reading deep into the conversation saved no UI snapshot"
    for point in points:
        assert first[point] == ui.ui_frames_after(stored, point), point
    await store.pool.execute("DELETE FROM ui_snapshots WHERE conversation_id = $1", uuid.UUID(cid))
    store.ui_states.forget()
    for point in reversed(points):
        assert await frames_after(point) == first[point], point
