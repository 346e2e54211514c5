"""POST/GET /v1/conversations/{id}/events: the append path and the read-back."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import ValidationError

import domain
from api.deps import ConversationIdDep, PrincipalDep, StoreDep, get_principal, read_json
from api.deps import conversation_id as parse_conversation_id
from api.errors import ApiError
from api.bodies import MAX_SEQ, VALID_BATCH, AppendEvents, EventIn, nul_path, parse
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
    try:
        VALID_BATCH.validate_python(raw_events)
        shaped = True
    except ValidationError:
        shaped = False  # EventIn and check_data below say which event and why
    seen: set[str] = set()
    new_events = []
    for index, raw in enumerate(raw_events):
        if shaped:
            id_, type_, data = raw.get("id"), raw["type"], raw["data"]
        else:
            try:
                event = EventIn.model_validate(raw)
            except ValidationError as exc:
                first = problems(exc)[0]
                type_ = raw.get("type") if isinstance(raw, dict) and isinstance(raw.get("type"), str) else None
                raise InvalidEvent.at(index, type_, "event_shape", f"{first['field'] or 'event'}: {first['problem']}") \
                    from None
            id_, type_, data = event.id, event.type, event.data
        if id_ is not None and "\x00" in id_:
            raise InvalidEvent.at(index, type_, "no_nul",
                                  "id contains a NUL character (\\u0000), which cannot be stored")
        encoded = orjson.dumps(data)
        if b"\\u0000" in encoded and nul_path(data) is not None:
            # PostgreSQL text cannot hold NUL; refuse it here rather than fail the store
            raise InvalidEvent.at(index, type_, "no_nul",
                                  "data contains a NUL character (\\u0000), which cannot be stored")
        size = len(encoded)
        if size > settings.max_event_bytes:
            raise ApiError(413, "event_too_large",
                           f"event {index}: data is {size} bytes, the limit is {settings.max_event_bytes}",
                           index=index, limit=settings.max_event_bytes)
        if not shaped:
            try:
                domain.check_data(type_, data)
            except domain.InvalidData as exc:
                rule = "known_type" if type_ not in domain.EVENT_TYPES else "data_shape"
                raise InvalidEvent.at(index, type_, rule, str(exc), errors=exc.errors) from None
        if id_ is not None:
            if id_ in seen:
                raise InvalidEvent.at(index, type_, "event_id_unique", f"id {id_!r} appears twice in this batch")
            seen.add(id_)
        # stored as sent: the checks are strict (no coercion), so the bytes
        # measured above are what the store writes
        new_events.append(NewEvent(type_, data, id_, encoded))
    return new_events


@router.post("/{conversation_id}/events", status_code=201,
             openapi_extra=operation(AppendEvents, ok={200: "Appended", 201: "Appended"}, errors=(409,),
                                     example={"events": [{"type": "message.user", "data": {"content": "Hello!"}}]}))
async def append_events(request: Request, conversation_id: str) -> JSONResponse:
    # Served first by api/hot_path.py, which calls it without FastAPI's
    # routing and dependency solving: it resolves what the other routes take
    # as dependencies itself, in the same order (principal, id, body).
    principal = await get_principal(request)
    cid = await parse_conversation_id(conversation_id)
    body = parse(AppendEvents, await read_json(request))
    state = request.app.state
    events = to_new_events(body.events, state.settings)
    appended = await state.store.append(principal, cid, events, body.expected_seq)
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
