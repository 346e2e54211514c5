"""POST/GET /v1/conversations, GET /v1/conversations/{id}."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, Query

from api.deps import BodyDep, ConversationIdDep, PrincipalDep, StoreDep, utc
from api.errors import ApiError
from api.models import CreateConversation, parse
from api.responses import JSONResponse

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])


@router.post("", status_code=201)
async def create_conversation(principal: PrincipalDep, body: BodyDep, store: StoreDep):
    request = parse(CreateConversation, body)
    try:
        conversation_id = uuid.UUID(request.id) if request.id is not None else None
    except ValueError:
        raise ApiError(422, "invalid_request", "id must be a UUID", field="id") from None
    data = {"metadata": request.metadata}
    if request.system is not None:
        data["system"] = request.system
    conversation = await store.create_conversation(principal, conversation_id, data)
    return JSONResponse(conversation, status_code=201)


@router.get("")
async def list_conversations(principal: PrincipalDep, store: StoreDep,
                             limit: int = Query(50, ge=1, le=200),
                             before: str | None = Query(None, description="a conversation id or an RFC 3339 time")):
    cursor: uuid.UUID | datetime | None = None
    if before:
        try:
            cursor = uuid.UUID(before)
        except ValueError:
            try:
                cursor = datetime.fromisoformat(before.replace("Z", "+00:00"))
            except ValueError:
                raise ApiError(422, "invalid_request", "before must be a conversation id or an RFC 3339 time") from None
            cursor = utc(cursor, "before")
    conversations = await store.list_conversations(principal, limit, cursor)
    next_before = conversations[-1]["id"] if len(conversations) == limit else None
    return JSONResponse({"conversations": conversations, "next_before": next_before})


@router.get("/{conversation_id}")
async def get_conversation(principal: PrincipalDep, conversation_id: ConversationIdDep, store: StoreDep):
    return JSONResponse(await store.get_conversation(principal, conversation_id))
