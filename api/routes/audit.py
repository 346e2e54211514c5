"""GET /v1/conversations/{id}/verify: the conversation's hash chain, recomputed."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import ConversationIdDep, PrincipalDep, StoreDep
from api.openapi import operation
from api.responses import JSONResponse

router = APIRouter(prefix="/v1/conversations", tags=["audit"])


@router.get("/{conversation_id}/verify", openapi_extra=operation(ok={200: "Verification"}))
async def verify_conversation(principal: PrincipalDep, conversation_id: ConversationIdDep, store: StoreDep):
    """Every event's hash recomputed from seq 1 to the head: `ok` and the head
    hash, or the first bad seq and how the chain broke there."""
    return JSONResponse(await store.verify(principal, conversation_id))
