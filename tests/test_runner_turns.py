"""The built-in runner, in one process: chatlog calls the fake upstream over
real HTTP and records every chunk in the real PostgreSQL log.

After each scenario the conversation's `format=openai` projection equals what
the upstream received in its last request plus what it answered, and every
`/requests` body hashes to what `model.requested` recorded.
"""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from api.app import create_app
from api.settings import Settings
from runner.chunks import sha256_hex
from runner.fake_upstream import FakeUpstream
from tests.helpers import eventually, stored_events
from tests.servers import API_KEYS, HEARTBEAT_SECONDS, InProcessServer, auth

pytest_plugins = ("tests.servers",)


@pytest.fixture
async def fake():
    upstream = FakeUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def chat(store, fake):
    """A client on a chatlog (in this loop, on the session's store) whose runner calls `fake`."""
    settings = Settings(database_url=None, api_keys=API_KEYS, heartbeat_seconds=HEARTBEAT_SECONDS,
                        upstream_base_url=fake.url, upstream_api_key="sk-fake", model="fake", runner_lease_ttl_seconds=3)
    server = await InProcessServer(create_app(settings, store=store)).start()
    async with httpx.AsyncClient(base_url=server.url, headers=auth("alice"), timeout=20) as client:
        yield client
    await server.stop()


async def new_chat(client: httpx.AsyncClient, **body) -> str:
    r = await client.post("/v1/conversations", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def start(client, cid: str, content: str | None = None, **body) -> dict:
    if content is not None:
        body["message"] = {"role": "user", "content": content}
    r = await client.post(f"/v1/conversations/{cid}/turns", json=body)
    assert r.status_code in (200, 202), r.text
    return r.json()


async def until_status(client, cid: str, turn_id: str, *statuses: str, timeout: float = 20) -> dict:
    async def check():
        r = await client.get(f"/v1/conversations/{cid}/turns/{turn_id}")
        assert r.status_code == 200, r.text
        return r.json() if r.json()["status"] in statuses else None
    return await eventually(check, f"turn {turn_id} to be {' or '.join(statuses)}", timeout=timeout)


async def messages(client, cid: str) -> list[dict]:
    r = await client.get(f"/v1/conversations/{cid}/messages", params={"format": "openai"})
    assert r.status_code == 200, r.text
    return r.json()["messages"]


async def assert_projection_is_what_the_model_saw(client, cid: str, fake: FakeUpstream) -> None:
    """format=openai == the last request's messages + the answer it streamed."""
    last = [r for r in fake.requests if r.path.endswith("/chat/completions")][-1]
    sent = orjson.loads(last.body)["messages"]
    answered = [{k: v for k, v in last.answer.items() if k != "finish_reason"}] if last.answer else []
    assert await messages(client, cid) == sent + answered


async def assert_requests_match(client, cid: str, turn_id: str, fake: FakeUpstream) -> list[dict]:
    r = await client.get(f"/v1/conversations/{cid}/turns/{turn_id}/requests")
    assert r.status_code == 200, r.text
    requests = r.json()["requests"]
    assert requests and all(q["matches"] for q in requests), requests
    sent = {sha256_hex(q.body) for q in fake.requests}
    assert {q["request_sha256"] for q in requests} <= sent  # the exact bytes the upstream got
    return requests


async def test_a_text_turn_streams_into_the_log_and_finishes(chat, fake):
    cid = await new_chat(chat, system="Be brief.")
    answer = await start(chat, cid, "hello [fake:say Hello there, friend.]")
    assert answer["stream_url"] == f"/v1/conversations/{cid}/turns/{answer['turn_id']}/stream"
    status = await until_status(chat, cid, answer["turn_id"], "finished")
    assert status["steps"] == 1 and status["usage"]["total_tokens"] > 0
    assert status["started_at"] and status["ended_at"]
    events = list((await stored_events(chat, cid)).values())
    types = [e["type"] for e in events]
    assert types[:4] == ["conversation.created", "message.user", "turn.started", "model.requested"]
    assert types[-1] == "turn.finished" and "text.delta" in types
    text = "".join(e["data"]["text"] for e in events if e["type"] == "text.delta")
    assert text == "Hello there, friend."
    await assert_projection_is_what_the_model_saw(chat, cid, fake)
    await assert_requests_match(chat, cid, answer["turn_id"], fake)


async def test_no_upstream_is_503_naming_the_settings(store):
    settings = Settings(database_url=None, api_keys=API_KEYS, heartbeat_seconds=HEARTBEAT_SECONDS)
    server = await InProcessServer(create_app(settings, store=store)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=auth("alice")) as client:
            cid = await new_chat(client)
            r = await client.post(f"/v1/conversations/{cid}/turns", json={"message": {"role": "user", "content": "hi"}})
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_upstream"
            assert "CHATLOG_UPSTREAM_BASE_URL" in r.json()["error"]["message"]
    finally:
        await server.stop()
