"""Logs: one format for chatlog's and uvicorn's lines (CHATLOG_LOG_FORMAT:
`text`, the default, or `json`: one JSON object a line), and one access line
per request with its request id, principal, route, status, latency and size.

The access line comes from `RequestLog`, the app's outermost middleware,
which also counts the request in the HTTP metrics (store/metrics.py) and echoes
the request id in the `X-Request-Id` response header: the client's own, when
it sent a sane one (1-128 characters of `A-Za-z0-9._:-`), else a new one.
Every line logged while a request is served carries its id in JSON.

Credentials never reach a line: the access line names the route template and
the path with `?token=` values replaced by `[redacted]`; both formatters also
redact, in whatever a line says, stream-token query values, `Bearer <...>`
and every configured API key (a key pasted into a request body that a
handler logs, say).
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import logging
import re
import time
import uuid
from typing import Any
from urllib.parse import unquote_plus

import orjson

from store import metrics

ACCESS = logging.getLogger("chatlog.access")
REQUEST_ID = contextvars.ContextVar("chatlog_request_id", default=None)

_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# a query parameter as it appears in a logged URL; its name is matched decoded, as the app reads it
_QUERY_PARAM = re.compile(r"([?&])([^=&#\s]*)=([^&#\s]*)")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")


def _redact_query(text: str) -> str:
    return _QUERY_PARAM.sub(lambda m: f"{m[1]}{m[2]}=[redacted]" if unquote_plus(m[2]) == "token" else m[0], text)


class Redactor:
    """Removes stream tokens, bearer credentials and the configured API keys from a text."""

    def __init__(self, keys: list[str] = ()) -> None:
        keys = sorted((k for k in keys if k), key=len, reverse=True)
        # a key as a whole word (a short key must not eat into other words)
        self._keys = re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, keys)) + r")(?![\w-])") if keys else None

    def __call__(self, text: str) -> str:
        if "token" in text:
            text = _redact_query(text)
        if "earer" in text or "EARER" in text:
            text = _BEARER.sub(r"\1[redacted]", text)
        if self._keys is not None:
            text = self._keys.sub("[redacted]", text)
        return text


def _configured_keys() -> list[str]:
    try:
        from api.settings import Settings

        return list(Settings().principals_by_key())
    except Exception:  # noqa: BLE001 -- invalid settings are reported by the CLI; redact what we can
        return []


class TextFormatter(logging.Formatter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.redact = Redactor(_configured_keys())

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", "request_id"?, ...the record's `fields`, "exception"?}"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.redact = Redactor(_configured_keys())

    def format(self, record: logging.LogRecord) -> str:
        # each text is redacted before it is encoded (a redaction must never cut into the JSON around it)
        redact = self.redact
        line: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds")
                                                                                 .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            line["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if fields:
            line.update((k, redact(v) if isinstance(v, str) else v) for k, v in fields.items())
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = redact(record.exc_text)
        return orjson.dumps(line, default=lambda v: redact(str(v))).decode()


def log_config(log_format: str, level: str) -> dict:
    """A logging.config.dictConfig for chatlog and uvicorn (uvicorn.run's
    `log_config`: every worker process applies it too)."""
    formatter = {"()": f"api.logs.{'Json' if log_format == 'json' else 'Text'}Formatter"}
    level = "DEBUG" if level == "trace" else level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"chatlog": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "chatlog",
                                "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": "INFO"},
        "loggers": {
            "chatlog": {"level": level},
            # uvicorn's lines go to the root's handler, in the same format
            "uvicorn": {"handlers": [], "propagate": True, "level": level},
            "uvicorn.error": {"handlers": [], "propagate": True},
            # chatlog's own access line (RequestLog) replaces uvicorn's
            "uvicorn.access": {"handlers": [], "propagate": False},
            "pgserver": {"level": "WARNING"},  # it logs whole initdb transcripts at INFO
        },
    }


def configure(log_format: str, level: str = "info") -> dict:
    import logging.config

    config = log_config(log_format, level)
    logging.config.dictConfig(config)
    logging.captureWarnings(True)  # Python's warnings as log lines too (py.warnings), in the same format
    return config


# -- the access line and the HTTP metrics ---------------------------------------------------

_ROUTE = "chatlog.route"  # scope key: the route template, for requests served outside FastAPI's router


def route_of(scope: dict) -> str:
    template = scope.get(_ROUTE)
    if template is not None:
        return template
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path or "unmatched"  # (never the raw path: one series per URL would have no bound)


class RequestLog:
    """Outermost ASGI middleware: request id, access line, HTTP metrics, open SSE streams."""

    def __init__(self, app, access_log: bool = True, principal_of=None) -> None:
        self.app = app
        self.access_log = access_log
        self.principal_of = principal_of or (lambda scope: None)
        self._children: dict[tuple[str, str, int], Any] = {}  # labelled counters, looked up once
        self._timers: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                text = value.decode("latin-1")
                if _SANE_ID.fullmatch(text):
                    request_id = text
                break
        if request_id is None:
            request_id = uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        header = (b"x-request-id", request_id.encode())
        state = {"status": 500, "bytes": 0, "sse": False}

        async def send_with_id(message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                state["status"] = message["status"]
                headers = list(message.get("headers", ()))
                headers.append(header)
                message = {**message, "headers": headers}
                for name, value in headers:
                    if name == b"content-type" and value.startswith(b"text/event-stream"):
                        state["sse"] = True
                        metrics.SSE_STREAMS.inc()
                        break
            elif kind == "http.response.body":
                state["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            if state["sse"]:
                metrics.SSE_STREAMS.dec()
            method, route, status = scope["method"], route_of(scope), state["status"]
            key = (method, route, status)
            counter = self._children.get(key)
            if counter is None:
                counter = self._children[key] = metrics.HTTP_REQUESTS.labels(method, route, str(status))
            counter.inc()
            if not state["sse"]:
                timer = self._timers.get(key[:2])
                if timer is None:
                    timer = self._timers[key[:2]] = metrics.HTTP_SECONDS.labels(method, route)
                timer.observe(elapsed)
            if self.access_log and ACCESS.isEnabledFor(logging.INFO):
                self._log(scope, request_id, route, status, elapsed, state["bytes"])
            REQUEST_ID.reset(token)

    def _log(self, scope, request_id: str, route: str, status: int, elapsed: float, size: int) -> None:
        path = scope.get("root_path", "") + scope["path"]
        query = scope.get("query_string", b"")
        if query:
            path = _redact_query(path + "?" + query.decode("latin-1"))
        client = scope.get("client")
        principal = self.principal_of(scope)
        ms = round(elapsed * 1000, 3)
        ACCESS.info('%s - "%s %s HTTP/%s" %d %s %.1fms %dB principal=%s request_id=%s',
                    f"{client[0]}:{client[1]}" if client else "-", scope["method"], path,
                    scope.get("http_version", "1.1"), status, route, ms, size, principal or "-", request_id,
                    extra={"fields": {"request_id": request_id, "principal": principal, "method": scope["method"],
                                      "route": route, "path": path, "status": status, "latency_ms": ms,
                                      "bytes": size, "client": client[0] if client else None}})


def principal_finder(state):
    """scope -> the principal a request authenticated as (for the access
    line; None when it did not). Looks the key up by its SHA-256 digest, as
    api/deps.py compares it, so the lookup tells nothing about a wrong key."""
    import hashlib

    from api import stream_tokens

    by_digest: dict[bytes, str] | None = None

    def principal_of(scope) -> str | None:
        nonlocal by_digest
        if not state.principals_by_key:
            return "open"
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, key = value.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer" or not key.strip():
                    return None
                if by_digest is None:
                    by_digest = {hashlib.sha256(k.encode("utf-8", "surrogatepass")).digest(): p
                                 for k, p in state.principals_by_key.items()}
                return by_digest.get(hashlib.sha256(key.strip().encode("utf-8", "surrogatepass")).digest())
        token_key = getattr(state, "token_key", None)
        conversation = (scope.get("path_params") or {}).get("conversation_id")
        if token_key is not None and conversation is not None and b"token=" in scope.get("query_string", b""):
            from urllib.parse import parse_qs

            token = parse_qs(scope["query_string"].decode("latin-1")).get("token")
            try:
                return stream_tokens.principal_for(token_key, token[0], uuid.UUID(str(conversation))) if token else None
            except ValueError:
                return None
        return None

    return principal_of


def configure_from_environment() -> None:
    """The CLI's logging, from CHATLOG_LOG_FORMAT and CHATLOG_LOG_LEVEL (text
    and info when the settings cannot be read: the CLI reports why later)."""
    try:
        from api.settings import Settings

        settings = Settings()
        configure(settings.log_format, settings.log_level)
    except Exception:  # noqa: BLE001
        configure("text", "info")
