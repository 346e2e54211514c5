"""POST/GET /v1/conversations, GET and DELETE /v1/conversations/{id}."""

from __future__ import annotations

import re
import uuid
from datetime import datetime

from fastapi import APIRouter, Query
from starlette.responses import Response

from api.deps import TIME_TEXT, UUID_TEXT, BodyDep, ConversationIdDep, PrincipalDep, StoreDep, parse_time, parse_uuid
from api.errors import ApiError
from api.bodies import CreateConversation, parse
from api.openapi import operation
from api.responses import JSONResponse

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])
_TIME_LIKE = re.compile(r"[0-9]{4}-")


@router.post("", status_code=201, openapi_extra=operation(CreateConversation, body_required=False,
                                                            ok={201: "Conversation"}, errors=(409,)))
async def create_conversation(principal: PrincipalDep, body: BodyDep, store: StoreDep):
    request = parse(CreateConversation, body)
    conversation_id = parse_uuid(request.id) if request.id is not None else None
    if request.id is not None and conversation_id is None:
        raise ApiError(422, "invalid_request", "id must be a UUID", field="id")
    data = {"metadata": request.metadata}
    if request.system is not None:
        data["system"] = request.system
    conversation = await store.create_conversation(principal, conversation_id, data)
    return JSONResponse(conversation, status_code=201)


@router.get("", openapi_extra=operation(ok={200: "ConversationList"}))
async def list_conversations(principal: PrincipalDep, store: StoreDep,
                             limit: int = Query(50, ge=1, le=200),
                             before: str | None = Query(None, description="a conversation id or an RFC 3339 time",
                                                        json_schema_extra={"anyOf": [UUID_TEXT, TIME_TEXT, {"const": ""}]})):
    cursor: uuid.UUID | datetime | None = None
    if before:
        cursor = parse_uuid(before)
        if cursor is None:
            if not _TIME_LIKE.match(before):
                raise ApiError(422, "invalid_request", "before must be a conversation id or an RFC 3339 time",
                               field="before")
            cursor = parse_time(before, "before")
    conversations = await store.list_conversations(principal, limit, cursor)
    next_before = conversations[-1]["id"] if len(conversations) == limit else None
    return JSONResponse({"conversations": conversations, "next_before": next_before})


@router.get("/{conversation_id}", openapi_extra=operation(ok={200: "Conversation"}))
async def get_conversation(principal: PrincipalDep, conversation_id: ConversationIdDep, store: StoreDep):
    return JSONResponse(await store.get_conversation(principal, conversation_id))


@router.delete("/{conversation_id}", status_code=204, openapi_extra=operation(errors=(410,)))
async def delete_conversation(principal: PrincipalDep, conversation_id: ConversationIdDep, store: StoreDep):
    """Erasure, for good (store/erasure.py). Again: 410 conversation_erased, its tombstone in details."""
    await store.erase(principal, conversation_id)
    return Response(status_code=204)
