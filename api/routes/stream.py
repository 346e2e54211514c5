"""GET /v1/conversations/{id}/stream and /turns/{turn_id}/stream (SSE).

Validate, call, frame: the store hands over from stored to live events
(Store.stream), projections.ui renders the UI stream, api.sse writes the bytes.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import AsyncIterator, Literal

from fastapi import APIRouter, Header, Query
from starlette.responses import StreamingResponse

from api import sse
from api.deps import ConversationIdDep, SettingsDep, StoreDep, StreamPrincipalDep, storable
from api.errors import ApiError
from api.openapi import operation
from projections import ui
from store import Store

router = APIRouter(prefix="/v1/conversations", tags=["stream"])

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
UI_HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
RESUME = {"pattern": sse.RESUME_PATTERN, "description": "a seq (12) or a UI frame id (12:3) to resume after"}
# The first catch-up read: the first frame goes out after a few rows, not a
# thousand (a client resuming deep inside a long turn waits for one short
# read). A compacted catch-up merges runs within each read, as
# /events?compact=true does within each page, so its first merged run ends
# here and the next read's runs follow: every delta is still in exactly one
# frame, and a resume after any of these ids is exact.
FIRST_READ = 32


async def _start(store: Store, principal: str, conversation_id: uuid.UUID, after: int,
                 end: int | None = None, ui_state_at: int | None = None) -> tuple[int, list[dict], dict | None]:
    """(where the catch-up ends: `end` or the conversation's current seq, its
    first batch, the UI translator's state at `ui_state_at`), the queries
    side by side: a resumed stream's first frame waits for one round trip."""
    limit = FIRST_READ
    if end is not None:
        limit = max(0, min(limit, end - after))
    head = store.stream_start(principal, conversation_id, after, limit)
    state = store.ui_states.copy_at(principal, conversation_id, ui_state_at) if ui_state_at is not None else None
    results = await asyncio.gather(head, *([state] if state else []), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    (current, first), state = results[0], results[1] if state else None
    return (current if end is None else end), first, state


def _response(body: AsyncIterator[bytes], extra: dict | None = None) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={**_HEADERS, **(extra or {})})


@router.get("/{conversation_id}/stream", openapi_extra=operation(sse=True))
async def stream(principal: StreamPrincipalDep, conversation_id: ConversationIdDep, store: StoreDep,
                 settings: SettingsDep, after: str | None = Query(None, json_schema_extra=RESUME),
                 format: Literal["events", "ui"] = "events", compact: bool = True, follow: bool = True,
                 last_event_id: str | None = Header(None, json_schema_extra=RESUME)):
    resume = sse.resume_point(last_event_id, after)
    if format == "events":
        current, first, _ = await _start(store, principal, conversation_id, resume[0])
        batches = store.stream(principal, conversation_id, resume[0], current, follow, settings.heartbeat_seconds,
                               first)
        return _response(sse.body(batches, sse.event_frames(compact)))
    start = ui.read_after(resume)
    # the translator's state after events 1..start: a late tool result needs its
    # call from an older turn, so it is the whole history's (snapshot + tail)
    current, first, state = await _start(store, principal, conversation_id, start, ui_state_at=start)
    batches = store.stream(principal, conversation_id, start, current, follow, settings.heartbeat_seconds, first)
    return _response(sse.body(batches, ui.UiStream(resume, compact, state)), UI_HEADERS)


@router.get("/{conversation_id}/turns/{turn_id}/stream", openapi_extra=operation(sse=True))
async def turn_stream(principal: StreamPrincipalDep, conversation_id: ConversationIdDep, turn_id: str,
                      store: StoreDep, settings: SettingsDep, after: str | None = Query(None, json_schema_extra=RESUME),
                      format: Literal["events", "ui"] = "events", compact: bool = True,
                      last_event_id: str | None = Header(None, json_schema_extra=RESUME)):
    resume = sse.resume_point(last_event_id, after)
    if not storable(turn_id):  # PostgreSQL text cannot hold it, so no turn has that id
        raise ApiError(404, "not_found", f"turn {turn_id!r} was not found in conversation {conversation_id}")
    start, end = await store.turn_span(principal, conversation_id, turn_id)
    # an ended turn is replayed up to its end and the response ends; an open
    # one is followed until it closes
    follow = end is None
    if format == "events":
        after = max(resume[0], start - 1)
        upto, first, _ = await _start(store, principal, conversation_id, after, end)
        batches = store.stream(principal, conversation_id, after, upto, follow, settings.heartbeat_seconds, first)
        return _response(sse.body(batches, sse.event_frames(compact), until_turn=turn_id))
    # ui: a turn's frames are the conversation's frames of its events
    # (projections/ui.py), so they come from a fresh translator fed from
    # turn.started, or, resuming inside the turn, from the conversation's
    # translator state at the resume point (snapshot + tail: a resume deep in
    # a long turn does not translate the turn from its start)
    resume = resume if resume[0] >= start else (start - 1, None)
    after = ui.read_after(resume)
    upto, first, state = await _start(store, principal, conversation_id, after, end,
                                      ui_state_at=after if after >= start else None)
    batches = store.stream(principal, conversation_id, after, upto, follow, settings.heartbeat_seconds, first)
    return _response(sse.body(batches, ui.UiStream(resume, compact, state), until_turn=turn_id), UI_HEADERS)
