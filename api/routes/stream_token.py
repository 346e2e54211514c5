"""POST /v1/conversations/{id}/stream-token: a read-only token for EventSource."""

from datetime import datetime, timezone

from fastapi import APIRouter, Depends

from api import stream_tokens
from api.deps import ConversationIdDep, PrincipalDep, SettingsDep, StoreDep, token_key
from api.openapi import operation
from api.responses import JSONResponse
from store import rfc3339

router = APIRouter(prefix="/v1/conversations", tags=["stream"])


@router.post("/{conversation_id}/stream-token", status_code=201, openapi_extra=operation(ok={201: "StreamToken"}))
async def stream_token(principal: PrincipalDep, conversation_id: ConversationIdDep, store: StoreDep,
                       settings: SettingsDep, key: bytes = Depends(token_key)):
    await store.get_conversation(principal, conversation_id)  # 404 unless it is yours
    token, expires = stream_tokens.mint(key, principal, conversation_id, settings.stream_token_ttl_seconds)
    return JSONResponse({"token": token, "expires_at": rfc3339(datetime.fromtimestamp(expires, timezone.utc))},
                        status_code=201)
