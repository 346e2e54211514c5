"""Tenants sealed, provably.

- Every route on a conversation, as the app enumerates its own routes, is 404
  for another principal (and writes nothing); a route added later fails the
  test until it is covered here.
- Lists and the feed show a principal nothing of another's.
- API keys are compared in constant time, with every configured key.
- Keys and stream tokens never reach a log line, access log included.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid

import httpx
import pytest
import uvicorn.logging

from api import deps, stream_tokens
from api.app import create_app
from api.openapi import http_routes
from api.settings import Settings
from tests.helpers import TURN, append, asgi_client, bearer, eventually, new_conversation
from tests.servers import InProcessServer

DEADLINE = 10
C = "/v1/conversations/{conversation_id}"

# How the owner calls each route on a conversation (bob sends exactly the same).
# Every such route of the app must be here: see the first test.
CALLS: dict[tuple[str, str], dict] = {
    ("GET", C): {},
    ("POST", f"{C}/events"): {"json": {"events": [{"type": "message.user", "data": {"content": "hi"}}]}},
    ("GET", f"{C}/events"): {"params": {"compact": "true"}},
    ("GET", f"{C}/messages"): {"params": {"format": "anthropic"}},
    ("POST", f"{C}/fork"): {"json": {"at_seq": 3}},
    ("GET", f"{C}/stream"): {"params": {"follow": "false"}},
    ("GET", f"{C}/turns/{{turn_id}}/stream"): {"params": {"format": "ui"}},
    ("POST", f"{C}/stream-token"): {},
    # the runner (its upstream is a closed port: the owner's turn starts, then fails on its own)
    ("POST", f"{C}/turns"): {"json": {"message": {"role": "user", "content": "hi"}}},
    ("GET", f"{C}/turns/{{turn_id}}"): {},
    ("GET", f"{C}/turns/{{turn_id}}/requests"): {},
    ("POST", f"{C}/turns/{{turn_id}}/cancel"): {},
    # erasure: bob's DELETE erases nothing of alice's (tests/test_erasure.py: the owner's)
    ("DELETE", C): {},
    # the hash chain, recomputed (tests/test_audit.py: the owner's)
    ("GET", f"{C}/verify"): {},
}
# Routes without a conversation in their path, and where this file checks them.
OTHER_ROUTES = {
    ("POST", "/v1/conversations"): "creates the caller's own conversation",
    ("GET", "/v1/conversations"): "test_lists_and_the_feed_show_another_tenant_nothing",
    ("GET", "/v1/events"): "test_lists_and_the_feed_show_another_tenant_nothing",
    # a chat id names a conversation of the caller's own
    ("POST", "/v1/ai-sdk/chat"): "tests/test_ai_sdk_chat.py::test_a_chat_id_names_one_conversation_per_tenant",
    ("GET", "/v1/ai-sdk/chat/{chat_id}/stream"): "the same test",
    ("GET", "/healthz"): "no tenant data",
    ("GET", "/readyz"): "no tenant data",
}


def app_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves (the API's, not its documentation's)."""
    return {(method, path) for path, methods, _ in http_routes(app) for method in methods
            if path.startswith(("/v1/", "/healthz", "/readyz"))}


@pytest.fixture
def app(store, api_keys):
    return create_app(Settings(database_url=None, api_keys=api_keys, heartbeat_seconds=0.05,
                               upstream_base_url="http://127.0.0.1:9/v1"), store=store)


@pytest.fixture
async def alice(app, keys):
    async with asgi_client(app, bearer(keys["alice"])) as client:
        yield client


@pytest.fixture
async def bob(app, keys):
    async with asgi_client(app, bearer(keys["bob"])) as client:
        yield client


def test_every_route_of_the_app_is_covered_here(app):
    """A route added later (erasure, turns, ...) fails here until this file checks it."""
    conversation_routes = {r for r in app_routes(app) if "{conversation_id}" in r[1]}
    assert conversation_routes == set(CALLS), (
        f"routes on a conversation not covered: {sorted(conversation_routes - set(CALLS))}; "
        f"covered but gone: {sorted(set(CALLS) - conversation_routes)}")
    others = app_routes(app) - conversation_routes
    assert others == set(OTHER_ROUTES), f"routes not covered: {sorted(others - set(OTHER_ROUTES))}"


@pytest.mark.parametrize("method, path", sorted(CALLS))
async def test_every_conversation_route_is_404_for_another_tenant(alice, bob, ledger, method, path):
    cid = await new_conversation(alice)
    await append(alice, cid, TURN)
    url = path.format(conversation_id=cid, turn_id="t1")
    call = CALLS[(method, path)]
    await ledger.refused(bob.request(method, url, **call), 404, "not_found")
    # the same call is good for its owner: the 404 was about whose it is
    r = await asyncio.wait_for(alice.request(method, url, **call), DEADLINE)
    assert 200 <= r.status_code < 300, r.text[:300]


async def test_a_stream_token_opens_only_its_own_conversation(alice, bob, app, ledger):
    mine = await new_conversation(alice)
    await alice.post(f"/v1/conversations/{mine}/events", json={"events": TURN})
    theirs = await new_conversation(bob)
    token = (await bob.post(f"/v1/conversations/{theirs}/stream-token")).json()["token"]
    async with asgi_client(app) as anonymous:
        for url in (f"/v1/conversations/{mine}/stream", f"/v1/conversations/{mine}/turns/t1/stream"):
            await ledger.refused(anonymous.get(url, params={"token": token, "follow": "false"}), 401, "unauthorized")
        # and it opens nothing but streams
        for url in (f"/v1/conversations/{theirs}", f"/v1/conversations/{theirs}/events"):
            await ledger.refused(anonymous.get(url, params={"token": token}), 401, "unauthorized")
        r = await anonymous.get(f"/v1/conversations/{theirs}/stream", params={"token": token, "follow": "false"})
        assert r.status_code == 200 and "conversation.created" in r.text


async def test_lists_and_the_feed_show_another_tenant_nothing(alice, bob):
    mine = [await new_conversation(alice) for _ in range(3)]
    await alice.post(f"/v1/conversations/{mine[0]}/events", json={"events": TURN})
    theirs = await new_conversation(bob)
    listed = (await bob.get("/v1/conversations", params={"limit": 200})).json()["conversations"]
    assert [c["id"] for c in listed] == [theirs]
    # alice's id as bob's cursor pages nothing of hers
    assert (await bob.get("/v1/conversations", params={"before": mine[-1]})).json()["conversations"] == []
    # the feed: wait until alice's events are readable in hers, then look in bob's
    async def feed_of(client, holds):
        events = (await client.get("/v1/events")).json()["events"]
        return events if holds(events) else None

    hers = await eventually(lambda: feed_of(alice, lambda events: {e["conversation_id"] for e in events} >= set(mine)),
                            "alice's events reach her feed", timeout=DEADLINE, interval=0.05)
    his = await eventually(lambda: feed_of(bob, bool), "bob's event reaches his feed", timeout=DEADLINE,
                           interval=0.05)
    assert {e["conversation_id"] for e in his} == {theirs}
    assert not {e["id"] for e in his} & {e["id"] for e in hers}


async def test_api_keys_are_compared_in_constant_time_with_every_configured_key(make_client, monkeypatch):
    keys = {f"key-{i}-{uuid.uuid4().hex}": f"p{i}" for i in range(5)}
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def compare_digest(a, b):
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", compare_digest)
    api_keys = ",".join(f"{k}={p}" for k, p in keys.items())
    first, last = list(keys)[0], list(keys)[-1]
    for given, status in [(first, 200), (last, 200), (first[:-1], 401), (first + "x", 401), ("", 401),
                          (first[:-1] + chr(ord(first[-1]) ^ 1), 401)]:
        compared.clear()
        r = await make_client(api_keys=api_keys, headers={"Authorization": f"Bearer {given}"}).get("/v1/conversations")
        assert r.status_code == status, (given, r.text)
        if given:
            # every configured key, whichever matched (no early exit), as fixed-length digests
            assert len(compared) == len(keys), given
            assert all(len(a) == len(b) == 32 for a, b in compared)
            assert given.encode() not in [a for a, _ in compared]


async def test_keys_and_stream_tokens_never_reach_a_log_line(store, keys, api_keys, principal, caplog, monkeypatch):
    app = create_app(Settings(database_url=None, api_keys=api_keys, token_secret=f"s-{principal}",
                              heartbeat_seconds=0.05), store=store)
    server = InProcessServer(app)
    # uvicorn's own loggers at DEBUG, access log on, propagating to caplog's handler
    server.server = uvicorn.Server(uvicorn.Config(app, log_level="debug", log_config=None, access_log=True,
                                                  lifespan="on", timeout_graceful_shutdown=2))
    caplog.set_level(logging.DEBUG)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "propagate", True)  # an earlier uvicorn.Config may have turned it off
        monkeypatch.setattr(logger, "level", logger.level)  # uvicorn.Config sets DEBUG; restored afterwards
    await server.start()
    try:
        secret = f"s-{principal}".encode()
        async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as client:
            alice = {"Authorization": f"Bearer {keys['alice']}"}
            cid = (await client.post("/v1/conversations", json={}, headers=alice)).json()["id"]
            token = (await client.post(f"/v1/conversations/{cid}/stream-token", headers=alice)).json()["token"]
            expired, _ = stream_tokens.mint(secret, f"alice-{principal}", uuid.UUID(cid), -60)
            forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
            other, _ = stream_tokens.mint(secret, f"alice-{principal}", uuid.uuid4(), 300)
            wrong_key = f"wrong-{principal}"
            secrets = {"alice key": keys["alice"], "bob key": keys["bob"], "wrong key": wrong_key,
                       "token": token, "expired token": expired, "forged token": forged, "other token": other}
            stream = f"/v1/conversations/{cid}/stream"
            requests = [
                ("GET", "/v1/conversations", {"headers": alice}, 200),
                ("GET", "/v1/conversations", {"headers": {"Authorization": f"Bearer {keys['bob']}"}}, 200),
                ("GET", "/v1/events", {"headers": {"Authorization": f"Bearer {wrong_key}"}}, 401),
                ("GET", "/v1/events", {"headers": {"Authorization": f"Basic {keys['alice']}"}}, 401),
                ("GET", f"{stream}?token={token}&follow=false", {}, 200),
                ("GET", f"{stream}?follow=false&token={token}", {}, 200),
                ("GET", f"{stream}?%74oken={token}&follow=false", {}, 200),
                ("GET", f"{stream}?%74%6F%6B%65%6E={token}&follow=false", {}, 200),
                ("GET", f"/v1/conversations/{cid}/turns/t9/stream?token={token}", {}, 404),
                ("GET", f"{stream}?token={expired}&follow=false", {}, 401),
                ("GET", f"{stream}?token={forged}&follow=false", {}, 401),
                ("GET", f"{stream}?token={other}&follow=false", {}, 401),
                ("GET", f"{stream}?token={token}&after=garbled", {}, 422),
                ("GET", f"{stream}?token={token}%C3%A9&follow=false", {}, 401),
                ("GET", f"/v1/conversations/{cid}?token={token}", {"headers": alice}, 200),
                ("POST", "/v1/conversations", {"headers": {"Authorization": f"Bearer {wrong_key}"},
                                               "json": {"metadata": {"k": keys["alice"]}}}, 401),
            ]
            for method, url, kwargs, status in requests:
                r = await client.request(method, url, **kwargs)
                assert r.status_code == status, (method, url, r.status_code, r.text[:200])
    finally:
        await server.stop()

    # every record of the server's process; the test's own HTTP client (httpx) logs its URLs, tokens
    # included, but it is the caller, not the server
    records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    access = [r for r in records if r.name == "uvicorn.access"]
    assert len(access) >= len(requests) + 2, "the access log was not captured"
    plain, formatter = logging.Formatter("%(name)s %(levelname)s %(message)s"), uvicorn.logging.AccessFormatter()
    lines = [plain.format(r) for r in records] + [formatter.format(r) for r in access]
    assert any("[redacted]" in line for line in lines), "no token was even attempted in a line"
    for name, value in secrets.items():
        leaked = [line for line in lines if value in line]
        assert not leaked, f"the {name} is in the log: {leaked[:3]}"
