"""Live frames are encoded once per process, however many readers follow (issue 9).

Readers of one conversation that stand at the same point share the encoded
frames of each live batch (api/sse.py, store/listener.py LiveBatch); each
reader still gets exactly the frames of its own stream, whatever its format,
its resume point and whether it caught up first.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import httpx

from api import sse
from projections import ui
from tests.helpers import append, eventually, new_conversation, our_tails, stored_events, tool_turns
from tests.servers import RawSSE, auth

pytest_plugins = ("tests.servers",)

LIVE_READERS = 8  # per format, following from the conversation's head


def live_turn() -> list[dict]:
    """One event per append: text, a tool call streaming its input, the result, more text, the end."""
    t = {"turn_id": "live"}
    return [{"type": "message.user", "data": {"content": "go"}},
            {"type": "turn.started", "data": t},
            *({"type": "text.delta", "data": {**t, "text": f"w{i} "}} for i in range(3)),
            {"type": "tool_call.started", "data": {**t, "tool_call_id": "c", "name": "f"}},
            {"type": "tool_call.delta", "data": {"tool_call_id": "c", "text": "{\"a\":"}},
            {"type": "tool_call.delta", "data": {"tool_call_id": "c", "text": " 1}"}},
            {"type": "tool_call.completed", "data": {"tool_call_id": "c"}},
            {"type": "tool.result", "data": {"tool_call_id": "c", "content": "ok", "status": "ok"}},
            {"type": "reasoning.delta", "data": {**t, "text": "hm"}},
            {"type": "text.delta", "data": {**t, "text": "done"}},
            {"type": "turn.finished", "data": {**t, "finish_reason": "stop"}}]


async def test_readers_at_one_point_share_each_live_frame_and_each_gets_its_own_stream(inprocess_server, store,
                                                                                     monkeypatch):
    encoded: Counter = Counter()
    real_frame = sse.frame

    def counting_frame(id_: str, data: dict, event: str | None = None) -> bytes:
        encoded["events" if event else "ui", id_] += 1
        return real_frame(id_, data, event)

    monkeypatch.setattr(sse, "frame", counting_frame)
    headers = auth("alice")
    async with httpx.AsyncClient(base_url=inprocess_server.url, headers=headers, timeout=30) as client:
        cid = await new_conversation(client)
        await append(client, cid, tool_turns(2, deltas=5, answered=lambda t: t == 0))
        head = (await client.get(f"/v1/conversations/{cid}")).json()["seq"]
        base = f"/v1/conversations/{cid}/stream"
        paths = ([f"{base}?format=events&after={head}"] * LIVE_READERS + [f"{base}?format=ui&after={head}"] * LIVE_READERS
                 # readers that catch up first (compacted or not), one resuming inside an event's frames
                 + [f"{base}?format=events", f"{base}?format=events&compact=false", f"{base}?format=ui",
                    f"{base}?format=ui&compact=false&after=3:0"])
        readers = [await RawSSE.connect(inprocess_server.url, path, headers) for path in paths]
        try:
            assert all([await r.start() == 200 for r in readers])
            await eventually(lambda: sum(t.readers for t in our_tails(store, {uuid.UUID(cid)}).values()) == len(paths),
                             "every reader follows the conversation")
            caught_up = sum(encoded.values())
            for event in live_turn():  # one event per append: one live batch each
                await append(client, cid, [event])
            last = head + len(live_turn())
            frames = await asyncio.wait_for(asyncio.gather(*(
                r.frames_until(lambda f: f.id == str(last) or f.data == "[DONE]" and f.id.startswith(f"{last}:"))
                for r in readers)), 30)
        finally:
            for r in readers:
                r.hang_up()
        stored = list((await stored_events(client, cid)).values())
    assert len(stored) == last
    for path, got in zip(paths, frames):
        after = path.partition("after=")[2] or "0"
        if "format=events" in path:
            live = [(f.id, f.json()) for f in got if int(f.id) > head]
            assert live == [(str(e["seq"]), e) for e in stored if e["seq"] > head], path
        else:
            items = [(f.id, f.json()) for f in got if f.data != "[DONE]"]
            if "compact=false" in path or after != "0":
                assert items == ui.ui_frames_after(stored, after), path
            live = [item for item in items if ui.parse_frame_id(item[0])[0] > head]
            assert live == [f for f in ui.ui_frames(stored) if ui.parse_frame_id(f[0])[0] > head], path
    # each live frame was encoded once for all its readers, per format
    live_encodings = {key: n for key, n in encoded.items() if ui.parse_frame_id(key[1])[0] > head}
    assert sum(encoded.values()) - caught_up == sum(live_encodings.values())
    assert set(n for n in live_encodings.values()) == {1}, live_encodings
    assert {key for key in live_encodings if key[0] == "events"} == {("events", str(s)) for s in range(head + 1, last + 1)}

