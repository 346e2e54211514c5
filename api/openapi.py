"""The served OpenAPI document, made to tell the truth about the API.

The routes read their bodies raw (`api.deps.read_json`, then
`api.bodies.parse`), so FastAPI alone documents no request body, no error and
no credentials. Here:

- `operation(...)` is what a route passes as `openapi_extra`: the request body
  (from the pydantic model the route actually parses), its success answers
  and the statuses only it gives (409, ...);
- `install(app)` replaces `app.openapi` with one that adds what every route
  shares: the contract's error body for every status an operation can answer,
  the bearer scheme on /v1 (and `?token=` on the stream endpoints), stable
  operation ids (the endpoint's name) and links from a created conversation to
  every operation on it (for stateful fuzzing).

Nothing here changes what the API does.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.bodies import EventIn
from domain.chain import MAX_SAFE, REASONS
from domain.schemas import SCHEMAS

_REF = "#/components/schemas/{model}"
_JSON = "application/json"
SSE = "text/event-stream"

# Models whose schemas go under components/schemas (filled by `operation`).
_MODELS: dict[str, type[BaseModel]] = {}


def _ref(name: str) -> dict:
    return {"$ref": _REF.format(model=name)}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_TIME = {"type": "string", "format": "date-time"}
_HASH = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_OBJECT = {"type": "object"}

# What the API answers, as JSON Schema (the store builds these dicts; they
# have no pydantic model of their own).
_SCHEMAS: dict[str, dict] = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["code", "message"], "additionalProperties": False,
            "properties": {"code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
                           "message": {"type": "string", "minLength": 1},
                           "details": _OBJECT}}},
    },
    "StoredEvent": {
        "type": "object", "additionalProperties": False,
        "required": ["conversation_id", "seq", "position", "id", "type", "data", "created_at", "hash"],
        "properties": {"conversation_id": {"type": "string", "format": "uuid"},
                       "seq": {"type": "integer", "minimum": 1}, "position": {"type": "integer", "minimum": 0},
                       "id": {"type": "string"}, "type": {"type": "string"}, "data": _OBJECT,
                       "created_at": _TIME, "hash": _HASH},
    },
    "Verification": {"oneOf": [
        {"type": "object", "additionalProperties": False, "required": ["ok", "verified_through_seq", "head_hash"],
         "properties": {"ok": {"const": True}, "verified_through_seq": {"type": "integer", "minimum": 1},
                        "head_hash": _HASH}},
        {"type": "object", "additionalProperties": False, "required": ["ok", "first_bad_seq", "reason"],
         "properties": {"ok": {"const": False}, "first_bad_seq": {"type": "integer", "minimum": 1},
                        "reason": {"enum": list(REASONS)}}},
    ]},
    "Conversation": {
        "type": "object", "additionalProperties": False,
        "required": ["id", "seq", "created_at", "updated_at", "metadata", "title", "open_turn_id"],
        "properties": {"id": {"type": "string", "format": "uuid"}, "seq": {"type": "integer", "minimum": 1},
                       "created_at": _TIME, "updated_at": _TIME, "metadata": _OBJECT,
                       "title": _nullable({"type": "string"}), "open_turn_id": _nullable({"type": "string"})},
    },
    "ConversationList": {
        "type": "object", "additionalProperties": False, "required": ["conversations", "next_before"],
        "properties": {"conversations": {"type": "array", "items": _ref("Conversation")},
                       "next_before": _nullable({"type": "string", "format": "uuid"})},
    },
    "Appended": {
        "type": "object", "additionalProperties": False, "required": ["events", "last_seq"],
        "properties": {"events": {"type": "array", "items": _ref("StoredEvent"), "minItems": 1},
                       "last_seq": {"type": "integer", "minimum": 1}},
    },
    "EventPage": {
        "type": "object", "additionalProperties": False, "required": ["events", "last_seq", "has_more"],
        "properties": {"events": {"type": "array", "items": _ref("StoredEvent")},
                       "last_seq": {"type": "integer", "minimum": 0}, "has_more": {"type": "boolean"}},
    },
    "Feed": {
        "type": "object", "additionalProperties": False, "required": ["events", "last_position", "has_more"],
        "properties": {"events": {"type": "array", "items": _ref("StoredEvent")},
                       "last_position": {"type": "integer", "minimum": 0}, "has_more": {"type": "boolean"}},
    },
    "Messages": {
        "type": "object", "additionalProperties": False, "required": ["conversation_id", "seq", "messages"],
        "properties": {"conversation_id": {"type": "string", "format": "uuid"},
                       "seq": {"type": "integer", "minimum": 1},
                       "messages": {"type": "array", "items": _OBJECT},
                       "system": _nullable({"type": "string"})},  # format=anthropic only
    },
    "StreamToken": {
        "type": "object", "additionalProperties": False, "required": ["token", "expires_at"],
        "properties": {"token": {"type": "string"}, "expires_at": _TIME},
    },
    "Status": {
        "type": "object", "additionalProperties": False, "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
    # One Server-Sent Event as a reader parses it ("event" is "message" when
    # the frame names none): format=events frames, format=ui frames, [DONE].
    "StreamFrame": {"anyOf": [
        {"type": "object", "required": ["event", "id", "data"],
         "properties": {"event": {"type": "string", "pattern": "^[a-z_]+\\.[a-z_.]+$"},
                        "id": {"type": "string", "pattern": "^[1-9][0-9]*$"},
                        "data": {"type": "string", "contentMediaType": _JSON,
                                 "contentSchema": {"$ref": "#/components/schemas/StoredEvent"}}}},
        {"type": "object", "required": ["event", "id", "data"],
         "properties": {"event": {"const": "message"}, "id": {"type": "string", "pattern": "^[1-9][0-9]*(:[0-9]+)?$"},
                        "data": {"type": "string", "contentMediaType": _JSON,
                                 "contentSchema": {"type": "object", "required": ["type"],
                                                   "properties": {"type": {"type": "string"}}}}}},
        {"type": "object", "required": ["data"], "properties": {"data": {"const": "[DONE]"}}},
    ]},
}

_REASONS = {
    400: "malformed: the body is not JSON, not a JSON object, or a header is garbled",
    401: "no or unknown credentials",
    404: "unknown, or not yours",
    409: "conflict",
    410: "erased",
    413: "too large",
    422: "well-formed, but breaks a rule",
    503: "the store is unavailable",
}


def _answer(description: str, schema: dict, media_type: str = _JSON) -> dict:
    return {"description": description, "content": {media_type: {"schema": schema}}}


def _error(status: int) -> dict:
    return _answer(_REASONS.get(status, "error"), _ref("Error"))


def operation(body: type[BaseModel] | None = None, *, body_required: bool = True,
              ok: dict[int, str] | None = None, errors: tuple[int, ...] = (), sse: bool = False,
              example: dict | None = None) -> dict:
    """A route's `openapi_extra`: its request body (the model it parses), its
    success answers ({status: component schema name}), the error statuses
    only it gives; `sse`: its 200 is a `text/event-stream`; `example`: the
    body Swagger UI's "Try it out" starts from (one the API accepts)."""
    extra: dict[str, Any] = {"responses": {}}
    if body is not None:
        _MODELS[body.__name__] = body
        extra["requestBody"] = {"required": body_required,
                                "content": {_JSON: {"schema": _ref(body.__name__)}}}
        if example is not None:
            extra["requestBody"]["content"][_JSON]["example"] = example
    for status, name in (ok or {}).items():
        extra["responses"][str(status)] = _answer("success", _ref(name))
    if sse:
        extra["responses"]["200"] = _answer("Server-Sent Events, one frame each", _ref("StreamFrame"), SSE)
    for status in errors:
        extra["responses"][str(status)] = _error(status)
    return extra


def _event_schemas() -> dict[str, dict]:
    """`EventIn` as the API checks it: `{"id"?, "type", "data"}`, data shaped
    by type (`conversation.created` is never appended: it is always seq 1)."""
    appendable = {t: m for t, m in SCHEMAS.items() if t != "conversation.created"}
    names = {t: "Event_" + "".join(p.capitalize() for p in t.replace("_", ".").split(".")) for t in appendable}
    _, defs = models_json_schema([(m, "validation") for m in appendable.values()], ref_template=_REF)
    schemas = dict(defs.get("$defs", {}))
    event_id = {k: v for k, v in EventIn.model_json_schema()["properties"]["id"].items() if k not in ("title", "default")}
    for type_, model in appendable.items():
        schemas[names[type_]] = {
            "type": "object", "additionalProperties": False, "required": ["type", "data"],
            "properties": {"id": event_id, "type": {"const": type_}, "data": _ref(model.__name__)},
        }
    schemas["EventIn"] = {"oneOf": [_ref(names[t]) for t in appendable]}
    return schemas


# PostgreSQL text cannot hold U+0000: no string a request stores may have it.
_NO_NUL = "^[^\\u0000]*$"
# Any JSON without NUL in a string or a key (pydantic's JsonValue, as the API stores it).
_JSON_VALUE = {"anyOf": [
    {"type": ["number", "boolean", "null"], "minimum": -MAX_SAFE, "maximum": MAX_SAFE},
    {"type": "string", "pattern": _NO_NUL},
    {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
    {"type": "object", "propertyNames": {"pattern": _NO_NUL},
     "additionalProperties": {"$ref": "#/components/schemas/JsonValue"}},
]}


def _request_rules(schema: Any) -> None:
    """Say, in a request schema, what the API refuses whatever the field: NUL
    in strings and keys (PostgreSQL), numbers the hash chain cannot keep exactly
    (beyond ±(2^53 − 1): the rule safe_numbers)."""
    if isinstance(schema, list):
        for item in schema:
            _request_rules(item)
        return
    if not isinstance(schema, dict):
        return
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types or []
    if "string" in types and not {"pattern", "format", "enum", "const"} & schema.keys():
        schema["pattern"] = _NO_NUL
    if "object" in types and schema.get("additionalProperties") not in (None, False):
        schema.setdefault("propertyNames", {"pattern": _NO_NUL})
    if "integer" in types or "number" in types:
        schema.setdefault("minimum", -MAX_SAFE)
        schema.setdefault("maximum", MAX_SAFE)
    for key, value in schema.items():
        if key not in ("const", "enum", "default", "examples"):
            _request_rules(value)


def _param_schema(schema: dict) -> dict:
    """A query or header value is text or absent, never null: `X | None` is X."""
    options = schema.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options and len(options) == 2:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return {**next(o for o in options if o != {"type": "null"}), **rest}
    return schema


def _body_schemas() -> dict[str, dict]:
    if not _MODELS:
        return {}
    _, defs = models_json_schema([(m, "validation") for m in _MODELS.values()], ref_template=_REF)
    schemas = dict(defs.get("$defs", {}))
    events = schemas.get("AppendEvents", {}).get("properties", {}).get("events")
    if events is not None:  # `list[Any]` in the model: each item is checked on its own, as EventIn
        events["items"] = _ref("EventIn")
        events["minItems"] = 1
    return schemas


def http_routes(app: FastAPI) -> list[tuple[str, frozenset[str], str]]:
    """(path, methods, endpoint name) of every HTTP route, included routers
    flattened (FastAPI >= 0.16x wraps them; older ones list APIRoutes)."""
    try:
        from fastapi.routing import iter_route_contexts
        contexts = list(iter_route_contexts(app.routes))
    except ImportError:  # pragma: no cover - older FastAPI
        contexts = app.routes
    return [(r.path, frozenset(r.methods), r.name) for r in contexts
            if getattr(r, "path", None) and getattr(r, "methods", None)]


def _walk_operations(spec: dict):
    for path, item in spec.get("paths", {}).items():
        for method, op in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield path, method, op


def build(app: FastAPI, spec: dict) -> dict:
    """Complete FastAPI's document (in place) and return it."""
    names = {(path, m.lower()): name for path, methods, name in http_routes(app) for m in methods}
    open_mode = not app.state.principals_by_key
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(_SCHEMAS)
    schemas.update(_event_schemas())
    schemas.update(_body_schemas())
    for name, schema in schemas.items():
        if name not in _SCHEMAS:  # request schemas (answers are what the API wrote)
            _request_rules(schema)
    schemas["JsonValue"] = _JSON_VALUE
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "an API key (CHATLOG_API_KEYS)"},
        "streamToken": {"type": "apiKey", "in": "query", "name": "token",
                        "description": "a token from POST /v1/conversations/{id}/stream-token; stream endpoints only"},
    }
    conversation_ops = []
    for path, method, op in _walk_operations(spec):
        op["operationId"] = names.get((path, method), op.get("operationId"))
        responses = op.setdefault("responses", {})
        params = op.get("parameters", [])
        for param in params:
            param["schema"] = _param_schema(param.get("schema", {}))
        statuses: set[int] = set()
        if path.startswith("/v1/"):
            statuses.add(503)
            # ?token= opens a conversation's streams (the AI SDK routes take bearer keys only)
            streams = "{conversation_id}" in path and any(r.get("content", {}).get(SSE) for r in responses.values())
            if not open_mode:
                statuses.add(401)
                op["security"] = [{"bearer": []}] + ([{"streamToken": []}] if streams else [])
        if "{conversation_id}" in path:
            statuses |= {404, 410}  # 410: an erased conversation, to its owner
            conversation_ops.append((path, method, op))
        if any(p.get("in") in ("query", "header") for p in params):
            statuses.add(422)
        else:
            responses.pop("422", None)  # FastAPI's default; ours only where something can be refused
        if "requestBody" in op:
            statuses |= {400, 413, 422}
        if path == "/readyz":
            statuses.add(503)
        for status in statuses:
            responses.setdefault(str(status), _error(status))
        for status, answer in responses.items():
            content = answer.get("content", {})
            if SSE in content:
                content.pop(_JSON, None)
            if status[0] in "45":  # every error, declared here or by FastAPI, in the contract's shape
                answer.update(_error(int(status)))
    # links, for clients and stateful fuzzing: a created (or forked)
    # conversation's id is every conversation operation's path parameter; an
    # appended batch that starts a turn names that turn's stream
    for _, _, op in _walk_operations(spec):
        if op["operationId"] in ("create_conversation", "fork"):
            op["responses"]["201"]["links"] = {
                target["operationId"]: {"operationId": target["operationId"],
                                        "parameters": {"conversation_id": "$response.body#/id"}}
                for target_path, _, target in conversation_ops if "{turn_id}" not in target_path
            }
        if op["operationId"] == "append_events" and any(t["operationId"] == "turn_stream" for *_, t in conversation_ops):
            op["responses"]["201"]["links"] = {"turn_stream": {
                "operationId": "turn_stream",
                "description": "the stream of the turn the batch's first event belongs to",
                "parameters": {"conversation_id": "$response.body#/events/0/conversation_id",
                               "turn_id": "$request.body#/events/0/data/turn_id"}}}
    return spec


def install(app: FastAPI) -> None:
    """Serve the completed document at /openapi.json (built once, on first use)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, generate())
        return app.openapi_schema

    app.openapi = openapi
