"""POST/GET /v1/conversations/{id}/events: the append path and the read-back."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Query
from pydantic import ValidationError

import domain
from api.deps import BodyDep, ConversationIdDep, PrincipalDep, SettingsDep, StoreDep
from api.errors import ApiError
from api.bodies import MAX_SEQ, AppendEvents, EventIn, nul_path, parse
from api.openapi import operation
from api.responses import JSONResponse
from api.settings import Settings
from domain.schemas import problems
from projections.compact import compact as compact_events
from store import InvalidEvent, NewEvent

router = APIRouter(prefix="/v1/conversations", tags=["events"])


def to_new_events(raw_events: list, settings: Settings) -> list[NewEvent]:
    """Check each event's shape and size; the first bad one refuses the batch."""
    if not raw_events:
        raise ApiError(422, "invalid_request", "events must hold at least one event")
    if len(raw_events) > settings.max_batch_events:
        raise ApiError(413, "too_many_events",
                       f"a batch holds at most {settings.max_batch_events} events, this one has {len(raw_events)}",
                       limit=settings.max_batch_events)
    seen: set[str] = set()
    new_events = []
    for index, raw in enumerate(raw_events):
        try:
            event = EventIn.model_validate(raw)
        except ValidationError as exc:
            first = problems(exc)[0]
            type_ = raw.get("type") if isinstance(raw, dict) and isinstance(raw.get("type"), str) else None
            raise InvalidEvent.at(index, type_, "event_shape", f"{first['field'] or 'event'}: {first['problem']}") \
                from None
        if event.id is not None and "\x00" in event.id:
            raise InvalidEvent.at(index, event.type, "no_nul",
                                  "id contains a NUL character (\\u0000), which cannot be stored")
        encoded = orjson.dumps(event.data)
        if b"\\u0000" in encoded and nul_path(event.data) is not None:
            # PostgreSQL text cannot hold NUL; refuse it here rather than fail the store
            raise InvalidEvent.at(index, event.type, "no_nul",
                                  "data contains a NUL character (\\u0000), which cannot be stored")
        size = len(encoded)
        if size > settings.max_event_bytes:
            raise ApiError(413, "event_too_large",
                           f"event {index}: data is {size} bytes, the limit is {settings.max_event_bytes}",
                           index=index, limit=settings.max_event_bytes)
        try:
            data = domain.check_data(event.type, event.data)
        except domain.InvalidData as exc:
            rule = "known_type" if event.type not in domain.EVENT_TYPES else "data_shape"
            raise InvalidEvent.at(index, event.type, rule, str(exc), errors=exc.errors) from None
        if event.id is not None:
            if event.id in seen:
                raise InvalidEvent.at(index, event.type, "event_id_unique", f"id {event.id!r} appears twice in this batch")
            seen.add(event.id)
        # check_data (strict, no coercion) returns the same JSON as was sent, so
        # the bytes measured above are what the store writes
        new_events.append(NewEvent(event.type, data, event.id, encoded))
    return new_events


@router.post("/{conversation_id}/events", status_code=201,
             openapi_extra=operation(AppendEvents, ok={200: "Appended", 201: "Appended"}, errors=(409,)))
async def append_events(principal: PrincipalDep, conversation_id: ConversationIdDep, body: BodyDep,
                        store: StoreDep, settings: SettingsDep):
    request = parse(AppendEvents, body)
    events = to_new_events(request.events, settings)
    appended = await store.append(principal, conversation_id, events, request.expected_seq)
    return JSONResponse({"events": appended.events, "last_seq": appended.last_seq},
                        status_code=200 if appended.retried else 201)


@router.get("/{conversation_id}/events", openapi_extra=operation(ok={200: "EventPage"}))
async def read_events(principal: PrincipalDep, conversation_id: ConversationIdDep, store: StoreDep,
                      after: int = Query(0, ge=0, le=MAX_SEQ), limit: int = Query(1000, ge=1, le=1000),
                      compact: bool = False):
    events, current_seq = await store.read_events(principal, conversation_id, after, limit)
    last_seq = events[-1]["seq"] if events else after
    return JSONResponse({
        "events": compact_events(events) if compact else events,
        "last_seq": last_seq,
        "has_more": last_seq < current_seq,
    })
