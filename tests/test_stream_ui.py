"""format=ui streams from real `chatlog serve` processes, read as the AI SDK reads them.

What a frontend relies on: every frame passes the `ai` package's own chunk
schema, the messages it rebuilds are the conversation's history, and resuming
after any `<seq>:<k>` id (after drops, on another process) is exact.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from projections import ui
from tests.servers import Frame, ResumingReader, open_sse
from tests.test_stream_events import (Writer, append, long_turn, new_conversation, read_a_long_turn_while_dropping,
                                      seeded_rng, stored_events)
from tests.test_ui_stream import assert_agrees_with_history, sse_body
from tests.uisdk import check_sse

pytest_plugins = ("tests.servers",)


def frame_key(frame: Frame) -> tuple[int, int]:
    seq, k = frame.id.split(":")
    return int(seq), int(k)


def body_of(frames: list[Frame]) -> str:
    """The frames as one SSE body (what one uninterrupted connection would carry)."""
    out = []
    for frame in frames:
        out.append("data: [DONE]\n\n" if frame.data == "[DONE]" else f"id: {frame.id}\ndata: {frame.data}\n\n")
    return "".join(out)


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
    a = chatlog_servers[0]
    b = await start_server("B-ui-killed")
    rng = seeded_rng()
    async with a.client() as client_a, b.client() as client_b:
        cid = await new_conversation(client_a)
        start = (await append(client_a, cid, [{"type": "message.user", "data": {"content": "go"}}]))["last_seq"]
        turn = long_turn(rng, "t1", at_least=150)
        writer = Writer(client_a, cid, turn, rng)
        writer.received = start
        reader = ResumingReader([client_b, client_a], f"/v1/conversations/{cid}/stream",
                                params={"format": "ui", "compact": "false"})
        seen_on_b = []

        def on_frame(frame: Frame) -> None:
            if frame.data == "[DONE]":
                return
            writer.received = max(writer.received, frame_key(frame)[0])
            if reader.use_client == 0:
                seen_on_b.append(frame.id)
                if len(seen_on_b) == 60:
                    b.kill9()

        await asyncio.wait_for(asyncio.gather(
            writer.run(), reader.run(done=lambda f: f.data == "[DONE]", on_frame=on_frame)), 60)
        stored = list((await stored_events(client_a, cid)).values())

    assert not b.alive and len(seen_on_b) >= 60 and reader.connections == 2
    frames = [f for f in reader.frames if f.data != "[DONE]"]
    assert [(f.id, f.json()) for f in frames] == [(i, c) for i, c in ui.ui_frames(stored)]


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


def _parse_body(text: str) -> list[tuple[str, dict]]:
    frames = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "id" in lines and lines.get("data") != "[DONE]":
            frames.append((lines["id"], orjson.loads(lines["data"])))
    return frames


async def test_ui_resume_deep_in_a_long_conversation_uses_snapshots_and_stays_exact(client, store):
    """The translator's state comes from a snapshot + tail (not a fold from seq 1);
    the frames after any resume point are the same with or without snapshot rows."""
    import uuid as uuid_module

    from store.folds import SNAPSHOT_EVERY

    cid = (await client.post("/v1/conversations", json={})).json()["id"]
    events = []
    for t in range(8):
        events += [{"type": "message.user", "data": {"content": f"q{t}"}},
                   {"type": "turn.started", "data": {"turn_id": f"t{t}"}}]
        events += [{"type": "text.delta", "data": {"turn_id": f"t{t}", "text": f"w{i} "}} for i in range(70)]
        events += [{"type": "tool_call.started", "data": {"turn_id": f"t{t}", "tool_call_id": f"c{t}", "name": "f"}},
                   {"type": "tool_call.completed", "data": {"tool_call_id": f"c{t}", "arguments": "{}"}},
                   {"type": "turn.finished", "data": {"turn_id": f"t{t}", "finish_reason": "tool_calls"}}]
        if t % 2:  # a late result while its turn's message is still the latest
            events.append({"type": "tool.result", "data": {"tool_call_id": f"c{t}", "content": t, "status": "ok"}})
    assert (await client.post(f"/v1/conversations/{cid}/events", json={"events": events})).status_code == 201
    stored = (await client.get(f"/v1/conversations/{cid}/events")).json()["events"]
    assert len(stored) > 2 * SNAPSHOT_EVERY
    points = ["0", "5:0", f"{SNAPSHOT_EVERY}:0", f"{SNAPSHOT_EVERY + 1}", f"{2 * SNAPSHOT_EVERY + 3}:1",
              str(len(stored) - 1)]

    async def frames_after(point: str) -> list[tuple[str, dict]]:
        r = await client.get(f"/v1/conversations/{cid}/stream",
                             params={"format": "ui", "follow": "false", "compact": "false", "after": point})
        assert r.status_code == 200
        return _parse_body(r.text)

    store.ui_states.forget()
    first = {p: await frames_after(p) for p in points}
    await store.ui_states.flush()
    saved = await store.pool.fetchval("SELECT count(*) FROM ui_snapshots WHERE conversation_id = $1",
                                      uuid_module.UUID(cid))
    assert saved >= 2, "reading deep into the conversation saved no UI snapshot"
    for point in points:
        assert first[point] == ui.ui_frames_after(stored, point), point
    await store.pool.execute("DELETE FROM ui_snapshots WHERE conversation_id = $1", uuid_module.UUID(cid))
    store.ui_states.forget()
    for point in reversed(points):
        assert await frames_after(point) == first[point], point
