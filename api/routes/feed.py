"""GET /v1/events: the principal's global feed in commit order."""

from fastapi import APIRouter, Query

from api.deps import PrincipalDep, StoreDep
from api.bodies import MAX_POSITION
from api.openapi import operation
from api.responses import JSONResponse

router = APIRouter(tags=["feed"])


@router.get("/v1/events", openapi_extra=operation(ok={200: "Feed"}))
async def read_feed(principal: PrincipalDep, store: StoreDep,
                    after_position: int = Query(0, ge=0, le=MAX_POSITION), limit: int = Query(1000, ge=1, le=1000)):
    events = await store.read_feed(principal, after_position, limit)
    return JSONResponse({
        "events": events,
        "last_position": events[-1]["position"] if events else after_position,
        "has_more": len(events) == limit,
    })
