"""Dependencies shared by the routes: the store, the principal, the JSON body."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request

from api import tokens
from api.errors import ApiError
from api.settings import Settings
from store import Store

OPEN_PRINCIPAL = "open"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_principal(request: Request) -> str:
    keys: dict[str, str] = request.app.state.principals_by_key
    if not keys:
        return OPEN_PRINCIPAL
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "unauthorized", "send your API key as 'Authorization: Bearer <key>'")
    principal = keys.get(key.strip())
    if principal is None:
        raise ApiError(401, "unauthorized", "that API key is not known")
    return principal


async def token_key(request: Request) -> bytes:
    """The stream-token key: CHATLOG_TOKEN_SECRET, else the database's shared one."""
    state = request.app.state
    if getattr(state, "token_key", None) is None:
        secret = state.settings.token_secret or await state.store.secret("stream_token")
        state.token_key = secret.encode()
    return state.token_key


async def get_stream_principal(request: Request, conversation_id: str) -> str:
    """Stream endpoints also accept `?token=` (EventSource cannot send headers)."""
    token = request.query_params.get("token")
    if token is None:
        return get_principal(request)
    try:
        cid = uuid.UUID(conversation_id)
    except ValueError:
        raise ApiError(404, "not_found", f"conversation {conversation_id} was not found") from None
    principal = tokens.principal_for(await token_key(request), token, cid)
    if principal is None:
        raise ApiError(401, "unauthorized", "the stream token is invalid, expired, or for another conversation")
    return principal


async def read_json(request: Request) -> Any:
    """The body as JSON, refusing oversized bodies before reading them whole."""
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"the request body is larger than {limit} bytes", limit=limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the request body is larger than {limit} bytes", limit=limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        return {}
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON ({exc})") from None


def conversation_id(conversation_id: str) -> uuid.UUID:
    """Path ids that are not UUIDs name no conversation: 404, like any unknown id."""
    try:
        return uuid.UUID(conversation_id)
    except ValueError:
        raise ApiError(404, "not_found", f"conversation {conversation_id} was not found") from None


StoreDep = Annotated[Store, Depends(get_store)]
PrincipalDep = Annotated[str, Depends(get_principal)]
StreamPrincipalDep = Annotated[str, Depends(get_stream_principal)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
BodyDep = Annotated[Any, Depends(read_json)]
ConversationIdDep = Annotated[uuid.UUID, Depends(conversation_id)]
