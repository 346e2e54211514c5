"""The append route served without FastAPI's per-request machinery.

`POST /v1/conversations/{id}/events` is the request every producer sends for
every delta. FastAPI spends more on it than the endpoint does: measured on
this machine, FastAPI 0.165 routing one request through the included routers,
solving its dependencies and running its request handler cost about 230 µs of
CPU for an endpoint that returns at once; a plain ASGI layer that calls the
endpoint costs about 10 µs. So this middleware hands those requests straight to
the same endpoint (api/routes/events.py `append_events`), which reads its
principal, id and body itself; everything else goes on to FastAPI.

The route stays declared in FastAPI too: it is what the OpenAPI document and
the 405 answers describe, and it would serve the same answers without this
layer. Errors get the handlers `api.errors.install` gave the app; anything
else propagates to FastAPI's ServerErrorMiddleware, which answers 500 and logs
it as for every route. CORS, when configured, wraps this layer.
"""

from __future__ import annotations

import re
from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import handler_for

# The route's path pattern, as Starlette compiles `/v1/conversations/{conversation_id}/events`
_APPEND = re.compile(r"/v1/conversations/([^/]+)/events")
ROUTE = "/v1/conversations/{conversation_id}/events"


class AppendFirst:
    def __init__(self, app: ASGIApp, endpoint: Callable[[Request, str], Awaitable[Response]]) -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _APPEND.fullmatch(_route_path(scope))
            if match is not None:
                scope["chatlog.route"] = ROUTE  # for the access line and the HTTP metrics (api/logs.py)
                request = Request(scope, receive)
                try:
                    response = await self.endpoint(request, match[1])
                except Exception as exc:
                    handler = handler_for(request.app, exc)
                    if handler is None:
                        raise
                    response = await handler(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the routes match (the path below `root_path`), as Starlette's router reads it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] == "/":
        return path[len(root):]
    return path
