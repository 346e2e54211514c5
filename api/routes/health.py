"""GET /healthz (process up) and GET /readyz (store reachable, migrations applied)."""

import asyncio

from fastapi import APIRouter

from api.deps import StoreDep
from api.errors import error_response
from api.openapi import operation
from api.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", openapi_extra=operation(ok={200: "Status"}))
async def healthz():
    return JSONResponse({"status": "ok"})


@router.get("/readyz", openapi_extra=operation(ok={200: "Status"}))
async def readyz(store: StoreDep):
    try:
        pending = await asyncio.wait_for(store.ready(), timeout=5)
    except Exception as exc:  # unreachable, timed out, refused: all mean "not ready"
        return error_response(503, "store_unavailable", f"the event store cannot be reached: {type(exc).__name__}")
    if pending:
        return error_response(503, "migrations_pending", "the database schema is not up to date; run `chatlog migrate`",
                              {"pending": pending})
    return JSONResponse({"status": "ready"})
