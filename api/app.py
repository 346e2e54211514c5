"""The FastAPI application: routes, error shape, store lifetime."""

from __future__ import annotations

import gc
import logging
import re
from contextlib import asynccontextmanager
from urllib.parse import unquote_plus

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api import docs_assets, errors, logs, metrics, openapi
from api.hot_path import AppendFirst
from api.responses import JSONResponse
from api.shutdown import chain_exit_signals
from api.routes import ai_sdk, audit, conversations, events, feed, health, messages, stream, stream_token, turns
from api.routes import inspect as inspector
from api.settings import Settings
from runner.runner import Runner
from store import Store
from store import metrics as store_metrics

log = logging.getLogger("chatlog")


# A query parameter as it appears in a logged URL. Its name is matched decoded,
# as the app reads it: `?%74oken=` is a token too.
_QUERY_PARAM = re.compile(r"([?&])([^=&#\s]*)=([^&#\s]*)")


def _redact(text: str) -> str:
    return _QUERY_PARAM.sub(lambda m: f"{m[1]}{m[2]}=[redacted]" if unquote_plus(m[2]) == "token" else m[0], text)


def redact_tokens(record: logging.LogRecord) -> bool:
    """Stream tokens are credentials: they never reach a log line."""
    if isinstance(record.args, tuple):
        record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
    elif isinstance(record.msg, str):
        record.msg = _redact(record.msg)
    return True


def _begin_shutdown(app: FastAPI) -> None:
    runner = getattr(app.state, "runner", None)
    if runner is not None:
        runner.begin_shutdown()  # takes no more turns; closes its running ones as interrupted
    store = app.state.store
    if store is not None:
        store.end_streams()


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
            app.state.store = await Store.open(
                settings.database_url, settings.pool_size, settings.writers,
                acquire_timeout=settings.acquire_timeout_seconds, statement_timeout=settings.statement_timeout_seconds,
                outcome_timeout=settings.commit_outcome_timeout_seconds)
            restore_signals = chain_exit_signals(lambda: _begin_shutdown(app))
            # What is alive now lives as long as the serving process (modules,
            # schemas, the pool): out of the collector's way, a full collection
            # scans what requests allocate, not ~70,000 start-up objects.
            # Measured under one-event appends: GC 11.6 % -> 8.4 % of the
            # server's CPU, a full collection's pause ~60 ms -> ~15 ms.
            gc.collect()
            gc.freeze()
        else:
            app.state.store = store
            restore_signals = lambda: None  # noqa: E731
        access = logging.getLogger("uvicorn.access")
        if redact_tokens not in access.filters:  # once per process, however many apps start
            access.addFilter(redact_tokens)
        # the turn runner: its lease, sweeps and signals (runner/runner.py)
        app.state.runner = Runner(app.state.store, settings)
        await app.state.runner.open()
        if settings.upstream_base_url is None:
            log.info("no upstream model configured (CHATLOG_UPSTREAM_BASE_URL): POST /turns answers 503 no_upstream")
        if not principals:
            log.warning("=" * 72)
            log.warning("OPEN MODE: CHATLOG_API_KEYS is not set. Anyone who can reach this server can")
            log.warning("read and write every conversation. Set CHATLOG_API_KEYS=key=principal,...")
            log.warning("=" * 72)
        try:
            yield
        finally:
            restore_signals()
            await app.state.runner.close(settings.shutdown_grace_seconds)
            if owned:
                _begin_shutdown(app)
                await app.state.store.close()
                store_metrics.process_exited()

    # docs_url/redoc_url None: FastAPI's pages load their assets from CDNs; api/docs_assets.py serves them itself
    app = FastAPI(title="chatlog", version="1", lifespan=lifespan, default_response_class=JSONResponse,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.store = store  # None until the lifespan opens one
    app.state.runner = None  # made by the lifespan
    app.state.principals_by_key = principals
    errors.install(app)
    app.add_middleware(AppendFirst, endpoint=events.append_events)  # added first: CORS wraps it
    origins = settings.cors_origin_list()
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                           expose_headers=["x-vercel-ai-ui-message-stream", ai_sdk.CONVERSATION_HEADER,
                                           ai_sdk.TURN_HEADER, "x-request-id"], max_age=600)
    for module in (conversations, events, feed, health, messages, stream, stream_token, turns, ai_sdk, audit):
        app.include_router(module.router)
    metrics.install(app)  # GET /metrics
    # outermost: request id, access line, HTTP metrics (the append's hot path included)
    app.add_middleware(logs.RequestLog, access_log=settings.access_log, principal_of=logs.principal_finder(app.state))
    inspector.install(app)  # /inspect: the time-travel inspector (static files)
    openapi.install(app)
    docs_assets.install(app)  # /docs and /redoc, offline
    return app
