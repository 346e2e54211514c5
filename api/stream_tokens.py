"""Stream tokens: short-lived, read-only, for one conversation's streams.

Browsers' EventSource cannot send headers, so a stream URL may carry
`?token=`. A token is `<payload>.<signature>`, both base64url: the payload
names the principal, the conversation and the expiry; the signature is
HMAC-SHA256 with a key every process shares (see migrations/004_secrets.sql).
Stateless: nothing to store, valid on any process, useless after it expires.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid

import orjson


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint(key: bytes, principal: str, conversation_id: uuid.UUID, ttl_seconds: int) -> tuple[str, int]:
    expires = int(time.time()) + ttl_seconds
    payload = _b64(orjson.dumps({"p": principal, "c": str(conversation_id), "e": expires}))
    signature = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}", expires


def principal_for(key: bytes, token: str, conversation_id: uuid.UUID) -> str | None:
    """The principal a valid, unexpired token for this conversation names, else None."""
    payload, _, signature = token.partition(".")
    # compared as bytes: compare_digest refuses non-ASCII str (a TypeError,
    # not a "no"); whatever a client sends is just a wrong signature
    raw_payload = payload.encode("utf-8", "surrogatepass")
    expected = _b64(hmac.new(key, raw_payload, hashlib.sha256).digest()).encode()
    if not signature or not hmac.compare_digest(signature.encode("utf-8", "surrogatepass"), expected):
        return None
    try:
        claims = orjson.loads(_unb64(payload))
    except (ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(claims, dict) or claims.get("c") != str(conversation_id) or claims.get("e", 0) < time.time():
        return None
    return claims.get("p")
