"""Dependencies shared by the routes: the store, the principal, the JSON body.

All are `async def` although none awaits much: FastAPI runs a plain `def`
dependency on a worker thread, a round trip per dependency per request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request

from api import stream_tokens
from api.errors import ApiError
from api.settings import Settings
from store import Store

OPEN_PRINCIPAL = "open"


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _key_digests(state) -> list[tuple[bytes, str]]:
    digests = getattr(state, "key_digests", None)
    if digests is None:
        digests = state.key_digests = [(_digest(k), p) for k, p in state.principals_by_key.items()]
    return digests


async def get_principal(request: Request) -> str:
    """The principal of the bearer key. The key is compared in constant time
    with every configured one (SHA-256 digests, all of them, no early exit),
    so the answer's timing tells nothing about how close a guess was."""
    state = request.app.state
    if not state.principals_by_key:
        return OPEN_PRINCIPAL
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "unauthorized", "send your API key as 'Authorization: Bearer <key>'")
    given = _digest(key.strip())
    principal = None
    for digest, owner in _key_digests(state):
        if hmac.compare_digest(given, digest):
            principal = owner
    if principal is None:
        raise ApiError(401, "unauthorized", "that API key is not known")
    return principal


async def token_key(request: Request) -> bytes:
    """The stream-token key: CHATLOG_TOKEN_SECRET, else the database's shared one."""
    state = request.app.state
    if getattr(state, "token_key", None) is None:
        secret = state.settings.token_secret or await state.store.secret("stream_token")
        state.token_key = secret.encode()
    return state.token_key


async def get_stream_principal(request: Request, conversation_id: str) -> str:
    """Stream endpoints also accept `?token=` (EventSource cannot send headers)."""
    token = request.query_params.get("token")
    if token is None:
        return await get_principal(request)
    try:
        cid = uuid.UUID(conversation_id)
    except ValueError:
        raise ApiError(404, "not_found", f"conversation {conversation_id} was not found") from None
    principal = stream_tokens.principal_for(await token_key(request), token, cid)
    if principal is None:
        raise ApiError(401, "unauthorized", "the stream token is invalid, expired, or for another conversation")
    return principal


# JSON nested deeper than this is refused (orjson reads 1024 levels but writes
# only 254; stored data is re-encoded inside larger documents: snapshots,
# responses), whatever part of the body it is in.
MAX_JSON_DEPTH = 128


def _too_deep() -> ApiError:
    return ApiError(422, "too_deep", f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep, the limit",
                    limit=MAX_JSON_DEPTH)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the request body is larger than {limit} bytes", limit=limit)


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep `value` nests (a scalar is 0, `[]` is 1); stops counting past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if items is None:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((item, depth + 1) for item in items if isinstance(item, (dict, list)))
    return deepest


async def read_json(request: Request) -> Any:
    """The body as JSON, whatever Content-Type says; oversized bodies are
    refused before they are read whole, over-deep ones before anything else
    sees them."""
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        declared = declared.strip()
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError(400, "malformed_request", "the Content-Length header is not a number")
        if len(declared) > 18 or int(declared) > limit:
            raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise _too_deep() from None
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON ({exc})") from None
    # no value nests deeper than the body has `[` and `{`: most bodies are
    # cleared by that count without walking what they hold
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and json_depth(value) > MAX_JSON_DEPTH:
        raise _too_deep()
    return value


def storable(text: str) -> bool:
    """Whether PostgreSQL text can hold `text`: no NUL, no lone surrogate."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# RFC 3339 `date-time` (what JSON Schema's "date-time" format is): a leap
# second (:60) parses but cannot be represented, and is refused like a bad time
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


# The same, for the API document
UUID_TEXT = {"type": "string", "format": "uuid"}
TIME_TEXT = {"type": "string", "format": "date-time"}


def parse_uuid(text: str) -> uuid.UUID | None:
    """A UUID in its canonical text form (8-4-4-4-12 hex digits), else None."""
    return uuid.UUID(text) if _UUID.fullmatch(text) else None


def parse_time(text: str, name: str) -> datetime:
    """An RFC 3339 time with its offset, in UTC; anything else is 422."""
    if not _RFC3339.fullmatch(text):
        raise ApiError(422, "invalid_request",
                       f"{name} must be an RFC 3339 time with an offset, e.g. 2026-11-21T10:00:00Z", field=name)
    try:
        return utc(datetime.fromisoformat(text.upper().replace("Z", "+00:00")), name)
    except ValueError:
        raise ApiError(422, "invalid_request", f"{name} is not a valid time (e.g. month 13 or second 60)",
                       field=name) from None


def utc(moment: datetime, name: str) -> datetime:
    """An aware time in UTC; one that leaves the representable range after its
    offset (0001-01-01T00:00:00+01:00) is 422, not an overflow in the store."""
    if moment.tzinfo is None:
        raise ApiError(422, "invalid_request", f"{name} must carry a time zone, e.g. 2026-11-21T10:00:00Z")
    try:
        return moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise ApiError(422, "invalid_request",
                       f"{name} is out of range: it must lie between 0001-01-01 and 9999-12-31 in UTC") from None


async def conversation_id(conversation_id: str) -> uuid.UUID:
    """Path ids that are not UUIDs name no conversation: 404, like any unknown id."""
    try:
        return uuid.UUID(conversation_id)
    except ValueError:
        raise ApiError(404, "not_found", f"conversation {conversation_id} was not found") from None


StoreDep = Annotated[Store, Depends(get_store)]
PrincipalDep = Annotated[str, Depends(get_principal)]
StreamPrincipalDep = Annotated[str, Depends(get_stream_principal)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
BodyDep = Annotated[Any, Depends(read_json)]
ConversationIdDep = Annotated[uuid.UUID, Depends(conversation_id)]
