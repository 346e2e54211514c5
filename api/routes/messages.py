"""GET /v1/conversations/{id}/messages and POST /v1/conversations/{id}/fork."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from pydantic import Field, JsonValue

from api.deps import TIME_TEXT, BodyDep, ConversationIdDep, PrincipalDep, StoreDep, parse_time, parse_uuid
from api.errors import ApiError
from api.bodies import UuidText, Body, parse
from api.openapi import operation
from api.responses import JSONResponse

router = APIRouter(prefix="/v1/conversations", tags=["messages"])


class ForkRequest(Body):
    # below 1 or past the source's seq: 422 out_of_range
    at_seq: int = Field(json_schema_extra={"minimum": 1})
    id: UuidText | None = None
    metadata: dict[str, JsonValue] | None = None


@router.get("/{conversation_id}/messages", openapi_extra=operation(ok={200: "Messages"}))
async def messages(principal: PrincipalDep, conversation_id: ConversationIdDep, store: StoreDep,
                   format: Literal["openai", "anthropic"] = "openai",
                   at_seq: int | None = Query(None, description="the history as it stood right after this seq",
                                              json_schema_extra={"minimum": 1}),
                   at_time: str | None = Query(None, description="the history as it stood at this RFC 3339 time",
                                               json_schema_extra=TIME_TEXT)):
    if at_seq is not None and at_time is not None:
        raise ApiError(422, "invalid_request", "give at_seq or at_time, not both")
    moment = parse_time(at_time, "at_time") if at_time is not None else None
    return JSONResponse(await store.messages(principal, conversation_id, format, at_seq, moment))


@router.post("/{conversation_id}/fork", status_code=201,
             openapi_extra=operation(ForkRequest, ok={201: "Conversation"}, errors=(409,)))
async def fork(principal: PrincipalDep, conversation_id: ConversationIdDep, body: BodyDep, store: StoreDep):
    request = parse(ForkRequest, body)
    new_id = parse_uuid(request.id) if request.id is not None else None
    if request.id is not None and new_id is None:
        raise ApiError(422, "invalid_request", "id must be a UUID", field="id")
    conversation = await store.fork(principal, conversation_id, request.at_seq, new_id, request.metadata)
    return JSONResponse(conversation, status_code=201)
