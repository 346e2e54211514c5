"""GET /v1/conversations/{id}/messages and POST /v1/conversations/{id}/fork."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Query
from pydantic import JsonValue

from api.deps import BodyDep, ConversationIdDep, PrincipalDep, StoreDep, utc
from api.errors import ApiError
from api.models import _Body, parse
from api.responses import JSONResponse

router = APIRouter(prefix="/v1/conversations", tags=["messages"])


class ForkRequest(_Body):
    at_seq: int
    id: str | None = None
    metadata: dict[str, JsonValue] | None = None


@router.get("/{conversation_id}/messages")
async def messages(principal: PrincipalDep, conversation_id: ConversationIdDep, store: StoreDep,
                   format: Literal["openai", "anthropic"] = "openai",
                   at_seq: int | None = Query(None, description="the history as it stood right after this seq"),
                   at_time: datetime | None = Query(None, description="the history as it stood at this RFC 3339 time")):
    if at_seq is not None and at_time is not None:
        raise ApiError(422, "invalid_request", "give at_seq or at_time, not both")
    if at_time is not None:
        at_time = utc(at_time, "at_time")
    return JSONResponse(await store.messages(principal, conversation_id, format, at_seq, at_time))


@router.post("/{conversation_id}/fork", status_code=201)
async def fork(principal: PrincipalDep, conversation_id: ConversationIdDep, body: BodyDep, store: StoreDep):
    request = parse(ForkRequest, body)
    try:
        new_id = uuid.UUID(request.id) if request.id is not None else None
    except ValueError:
        raise ApiError(422, "invalid_request", "id must be a UUID", field="id") from None
    conversation = await store.fork(principal, conversation_id, request.at_seq, new_id, request.metadata)
    return JSONResponse(conversation, status_code=201)
