"""The contract's error shape, for every error the API can give."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from api.responses import JSONResponse
from domain.schemas import problems
from store import errors as store_errors
from store.pool import CONNECTION_ERRORS

log = logging.getLogger("chatlog.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **details) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def _encodable(value):
    """Messages and details may quote the request; a lone surrogate in it
    (which JSON cannot carry) is shown escaped, as `\\udc80`."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encodable(v) for v in value]
    return value


def error_response(status: int, code: str, message: str, details: dict | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body: dict = {"code": code, "message": _encodable(message)}
    if details:
        body["details"] = _encodable(details)
    return JSONResponse({"error": body}, status_code=status, headers=headers)


_STORE_STATUS = {
    store_errors.NotFound: 404,
    store_errors.ConversationErased: 410,
    store_errors.ConversationExists: 409,
    store_errors.ErasedIdReused: 409,
    store_errors.SeqConflict: 409,
    store_errors.IdempotencyConflict: 409,
    store_errors.InvalidEvent: 422,
    store_errors.OutOfRange: 422,
}

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route serves at `path`, sorted."""
    from api.openapi import http_routes

    routes = getattr(app.state, "route_patterns", None)
    if routes is None:
        routes = app.state.route_patterns = [(compile_path(p)[0], methods) for p, methods, _ in http_routes(app)]
    return sorted({m for pattern, methods in routes if pattern.match(path) for m in methods})


def handler_for(app: FastAPI, exc: Exception):
    """The handler `install` gave `app` for `exc` (its class or the nearest
    base), as Starlette's ExceptionMiddleware picks it; None for what only the
    500 catch-all takes, which FastAPI's ServerErrorMiddleware runs (it logs,
    answers and re-raises). For api/hot_path.py, which runs before that lookup."""
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        handler = app.exception_handlers.get(cls)
        if handler is not None:
            return handler
    return None


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(store_errors.StoreError)
    async def _store(_: Request, exc: store_errors.StoreError):
        return error_response(_STORE_STATUS.get(type(exc), 503), exc.code, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = problems(exc, skip=1)
        first = errors[0]
        return error_response(422, "invalid_request", f"{first['field']}: {first['problem']}", {"errors": errors})

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # `Allow` (RFC 9110) names every method of the path, not only those
            # of the first route that matched it
            allowed = allowed_methods(request.app, request.scope["path"])
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed here; use {' or '.join(allowed)}"
        return error_response(exc.status_code, code, message, headers=headers or None)

    async def _unavailable(_: Request, exc: Exception):
        log.warning("store unavailable: %r", exc)
        return error_response(503, "store_unavailable", "the event store cannot be reached right now; retry shortly")

    # the store turns these into Unavailable itself; this is the safety net
    # for a path that lets one through (never a 500 for a store that went away)
    for unavailable in CONNECTION_ERRORS:
        app.add_exception_handler(unavailable, _unavailable)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(500, "internal_error", "something went wrong on the server; it has been logged")
