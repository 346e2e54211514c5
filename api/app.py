"""The FastAPI application: routes, error shape, store lifetime."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.responses import JSONResponse
from api.routes import conversations, events, feed, health, messages
from api.settings import Settings
from store import Store

log = logging.getLogger("chatlog")


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """Build the app. Pass `store` to share one (tests); else it opens its own."""
    settings = settings or Settings()
    principals = settings.principals_by_key()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = store is None
        if owned:
            if not settings.database_url:
                raise RuntimeError("DATABASE_URL is not set; start the server with `chatlog serve`, "
                                   "which runs an embedded PostgreSQL when it is unset")
            app.state.store = await Store.open(settings.database_url, settings.pool_size, settings.writers)
        else:
            app.state.store = store
        if not principals:
            log.warning("=" * 72)
            log.warning("OPEN MODE: CHATLOG_API_KEYS is not set. Anyone who can reach this server can")
            log.warning("read and write every conversation. Set CHATLOG_API_KEYS=key=principal,...")
            log.warning("=" * 72)
        try:
            yield
        finally:
            if owned:
                await app.state.store.close()

    app = FastAPI(title="chatlog", version="1", lifespan=lifespan, default_response_class=JSONResponse)
    app.state.settings = settings
    app.state.store = store  # None until the lifespan opens one
    app.state.principals_by_key = principals
    errors.install(app)
    for module in (conversations, events, feed, health, messages):
        app.include_router(module.router)
    return app
