"""GET /v1/conversations/{id}/stream and /turns/{turn_id}/stream (SSE).

The catch-up part (events stored when the request arrives) is read from the
store; then the process's listener hands over live events. The listener
subscribes before it reads, and every step resumes from the last seq sent, so
the hand-over has no gap and no duplicate.
"""

from __future__ import annotations

import uuid
from contextlib import aclosing
from typing import AsyncIterator, Literal

from fastapi import APIRouter, Header, Query
from starlette.responses import StreamingResponse

from api import sse
from api.deps import ConversationIdDep, SettingsDep, StoreDep, StreamPrincipalDep
from projections.compact import compact as compact_events
from store import Store

router = APIRouter(prefix="/v1/conversations", tags=["stream"])

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
TURN_ENDS = frozenset({"turn.finished", "turn.cancelled", "turn.failed"})


async def stored_then_live(store: Store, conversation_id: uuid.UUID, after: int, upto: int, follow: bool,
                           heartbeat: float) -> AsyncIterator[tuple[bool, list[dict]]]:
    """(live, events) batches after `after`: the stored ones up to `upto`, then
    (with follow) live ones forever; an empty live batch is a heartbeat."""
    cursor = after
    while cursor < upto:
        events = await store.events_after(conversation_id, cursor, min(1000, upto - cursor))
        if not events:
            break
        cursor = events[-1]["seq"]
        yield False, events
    if follow:
        async with aclosing(store.listener.follow(conversation_id, cursor, heartbeat)) as live:
            async for events in live:
                yield True, events


async def event_frames(batches: AsyncIterator[tuple[bool, list[dict]]], compact: bool,
                       until_turn: str | None = None) -> AsyncIterator[bytes]:
    yield sse.retry()
    async with aclosing(batches):
        async for live, events in batches:
            if not events:
                yield sse.PING
                continue
            if until_turn is not None:
                end = next((i for i, e in enumerate(events)
                            if e["type"] in TURN_ENDS and e["data"]["turn_id"] == until_turn), None)
                if end is not None:
                    events = events[:end + 1]
            for event in (events if live or not compact else compact_events(events)):
                yield sse.frame(str(event["seq"]), event, event["type"])
            if until_turn is not None and end is not None:
                return


def _response(body: AsyncIterator[bytes], extra: dict | None = None) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={**_HEADERS, **(extra or {})})


@router.get("/{conversation_id}/stream")
async def stream(conversation_id: ConversationIdDep, principal: StreamPrincipalDep, store: StoreDep,
                 settings: SettingsDep, after: str | None = None,
                 format: Literal["events", "ui"] = "events", compact: bool = True, follow: bool = True,
                 last_event_id: str | None = Header(None)):
    seq, _ = sse.resume_point(last_event_id, after)
    current = (await store.get_conversation(principal, conversation_id))["seq"]
    batches = stored_then_live(store, conversation_id, seq, current, follow, settings.heartbeat_seconds)
    return _response(event_frames(batches, compact))


@router.get("/{conversation_id}/turns/{turn_id}/stream")
async def turn_stream(conversation_id: ConversationIdDep, turn_id: str, principal: StreamPrincipalDep,
                      store: StoreDep, settings: SettingsDep, after: str | None = None,
                      format: Literal["events", "ui"] = "events", compact: bool = True,
                      last_event_id: str | None = Header(None)):
    seq, _ = sse.resume_point(last_event_id, after)
    start = await store.turn_start(principal, conversation_id, turn_id)
    conversation = await store.get_conversation(principal, conversation_id)
    # a turn that already ended is replayed and the response ends
    still_open = conversation["open_turn_id"] == turn_id
    batches = stored_then_live(store, conversation_id, max(seq, start - 1), conversation["seq"], still_open,
                               settings.heartbeat_seconds)
    return _response(event_frames(batches, compact, until_turn=turn_id))
