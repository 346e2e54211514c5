"""GET /v1/conversations/{id}/stream and /turns/{turn_id}/stream (SSE).

The catch-up part (events stored when the request arrives) is read from the
store; then the process's listener hands over live events. The listener
subscribes before it reads, and every step resumes from the last seq sent, so
the hand-over has no gap and no duplicate.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import aclosing
from typing import AsyncIterator, Callable, Iterable, Literal

from fastapi import APIRouter, Header, Query
from starlette.responses import StreamingResponse

from api import sse
from api.deps import ConversationIdDep, SettingsDep, StoreDep, StreamPrincipalDep, storable
from api.errors import ApiError
from api.openapi import operation
from projections import ui
from projections.compact import compact as compact_events
from store import Store, Unavailable

log = logging.getLogger("chatlog.stream")

router = APIRouter(prefix="/v1/conversations", tags=["stream"])

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
UI_HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
RESUME = {"pattern": sse.RESUME_PATTERN, "description": "a seq (12) or a UI frame id (12:3) to resume after"}


async def stored_then_live(store: Store, principal: str, conversation_id: uuid.UUID, after: int, upto: int,
                           follow: bool, heartbeat: float) -> AsyncIterator[tuple[bool, list[dict]]]:
    """(live, events) batches after `after`: the stored ones up to `upto`, then
    (with follow) live ones forever; an empty live batch is a heartbeat."""
    cursor = after
    while cursor < upto:
        events = await store.events_after(principal, conversation_id, cursor, min(1000, upto - cursor))
        if not events:
            break
        cursor = events[-1]["seq"]
        yield False, events
    if follow:
        async with aclosing(store.follow(principal, conversation_id, cursor, heartbeat)) as live:
            async for events in live:
                yield True, events


async def sse_body(batches: AsyncIterator[tuple[bool, list[dict]]], render: Callable[[bool, list[dict]], Iterable[bytes]],
                   until_turn: str | None = None) -> AsyncIterator[bytes]:
    """`retry:` first, then each batch rendered, `: ping` for heartbeats; a
    turn's stream ends right after the turn's closing event."""
    yield sse.retry()
    async with aclosing(batches):
        try:
            async for live, events in batches:
                if not events:
                    yield sse.PING
                    continue
                if until_turn is not None:
                    events = _through_turn_end(events, until_turn)
                for chunk in render(live, events):
                    yield chunk
                if until_turn is not None and _ends_turn(events[-1], until_turn):
                    return
        except Unavailable as exc:
            # the stream cannot be served now: end it, so the client resumes
            # with Last-Event-ID (here later, or on another process)
            log.warning("ending a stream: %s", exc.message)


def event_renderer(compact: bool) -> Callable[[bool, list[dict]], Iterable[bytes]]:
    """format=events: a frame per stored event (catch-up compacted when asked)."""
    def render(live: bool, events: list[dict]) -> Iterable[bytes]:
        for event in events if live or not compact else compact_events(events):
            yield sse.frame(str(event["seq"]), event, event["type"])
    return render


class UiRenderer:
    """format=ui: the Vercel AI SDK UI message stream, frames `<seq>:<k>`.

    `state` is the translator's state right before the first batch (None: a
    fresh one, right for a turn's own stream); the first batch holds the
    resume point's event when frames of it are left to send.
    """

    def __init__(self, resume: tuple[int, int | None], compact: bool, state: dict | None) -> None:
        self.resume, self.compact = resume, compact
        self.state = ui.initial_ui_state() if state is None else state
        self.first = True

    def __call__(self, live: bool, events: list[dict]) -> Iterable[bytes]:
        compacted = self.compact and not live
        if self.first:
            frames = ui.ui_frames_after(events, self.resume, self.state, compacted=compacted)
            self.first = False
        else:
            frames = ui.ui_frames(compact_events(events) if compacted else events, self.state)
        # [DONE] goes right after the last frame of each turn-ending event
        ends = [e["seq"] for e in events if ui.is_turn_end(e)]
        for frame_id, chunk in frames:
            while ends and ui.parse_frame_id(frame_id)[0] > ends[0]:
                ends.pop(0)
                yield sse.DONE
            yield sse.frame(frame_id, chunk)
        for _ in ends:
            yield sse.DONE


def _ends_turn(event: dict, turn_id: str) -> bool:
    return ui.is_turn_end(event) and event["data"]["turn_id"] == turn_id


def _through_turn_end(events: list[dict], turn_id: str) -> list[dict]:
    """`events` up to and including the end of turn `turn_id`."""
    for i, event in enumerate(events):
        if _ends_turn(event, turn_id):
            return events[:i + 1]
    return events


def _response(body: AsyncIterator[bytes], extra: dict | None = None) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={**_HEADERS, **(extra or {})})


@router.get("/{conversation_id}/stream", openapi_extra=operation(sse=True))
async def stream(principal: StreamPrincipalDep, conversation_id: ConversationIdDep, store: StoreDep,
                 settings: SettingsDep, after: str | None = Query(None, json_schema_extra=RESUME),
                 format: Literal["events", "ui"] = "events", compact: bool = True, follow: bool = True,
                 last_event_id: str | None = Header(None, json_schema_extra=RESUME)):
    resume = sse.resume_point(last_event_id, after)
    current = (await store.get_conversation(principal, conversation_id))["seq"]
    if format == "events":
        batches = stored_then_live(store, principal, conversation_id, resume[0], current, follow,
                                   settings.heartbeat_seconds)
        return _response(sse_body(batches, event_renderer(compact)))
    # ui: resume inside an event's frames, so read from that event itself
    start = max(resume[0] - 1 if resume[1] is not None else resume[0], 0)
    # the translator's state after events 1..start: a late tool result needs its
    # call from an older turn, so it is the whole history's (snapshot + tail)
    state = await store.ui_states.copy_at(principal, conversation_id, start)
    batches = stored_then_live(store, principal, conversation_id, start, current, follow, settings.heartbeat_seconds)
    return _response(sse_body(batches, UiRenderer(resume, compact, state)), UI_HEADERS)


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
    upto = end if end is not None else (await store.get_conversation(principal, conversation_id))["seq"]
    follow = end is None
    if format == "events":
        batches = stored_then_live(store, principal, conversation_id, max(resume[0], start - 1), upto, follow,
                                   settings.heartbeat_seconds)
        return _response(sse_body(batches, event_renderer(compact), until_turn=turn_id))
    # ui: the turn's frames come from a fresh translator fed from turn.started
    batches = stored_then_live(store, principal, conversation_id, start - 1, upto, follow, settings.heartbeat_seconds)
    resume = resume if resume[0] >= start else (start - 1, None)
    return _response(sse_body(batches, UiRenderer(resume, compact, None), until_turn=turn_id), UI_HEADERS)
