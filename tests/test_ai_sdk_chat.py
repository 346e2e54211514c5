"""useChat without a backend of your own: /v1/ai-sdk/chat driven by the real AI SDK.

A chatlog on a real socket (in this loop, on the session's store) runs turns
against the fake upstream; tests/js/ai-sdk-chat.mjs drives it with the `ai`
package's own DefaultChatTransport, readUIMessageStream and Chat (what useChat
wraps), in a node process per call. After each scenario the conversation's
`format=openai` history is valid (every tool call answered right after it) and
the SDK's messages agree with the log.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid

import httpx
import orjson
import pytest

from api.app import create_app
from api.routes.ai_sdk import conversation_for
from api.settings import Settings
from tests.helpers import bearer, eventually, stored_events
from tests.servers import HEARTBEAT_SECONDS, InProcessServer
from tests.uisdk import JS, assert_agrees_with_history, check_sse, ensure_installed

pytest_plugins = ("tests.servers",)

SCRIPT = JS / "ai-sdk-chat.mjs"
NODE_SECONDS = 90
SDKS = ("ai", "ai5")
WEATHER = [{"type": "function", "function": {
    "name": name, "description": f"the {name} somewhere",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    for name in ("weather", "time")]


@pytest.fixture
async def server(store, fake, api_keys):
    settings = Settings(database_url=None, api_keys=api_keys, heartbeat_seconds=HEARTBEAT_SECONDS,
                        upstream_base_url=fake.url, upstream_api_key="sk-fake", model="fake",
                        runner_lease_ttl_seconds=3)
    server = await InProcessServer(create_app(settings, store=store)).start()
    yield server
    await server.stop()


@pytest.fixture
async def alice(server, keys):
    async with httpx.AsyncClient(base_url=server.url, headers=bearer(keys["alice"]), timeout=20) as client:
        yield client


@pytest.fixture
def sdk(server, keys):
    """sdk(op, **command) -> what tests/js/ai-sdk-chat.mjs answered, as alice."""
    ensure_installed()
    node = shutil.which("node")
    assert node, "these tests need Node.js 20+ (`node`) on PATH"

    async def run(op: str, **command) -> dict:
        command = {"op": op, "api": f"{server.url}/v1/ai-sdk/chat",
                   "headers": {"Authorization": f"Bearer {keys['alice']}"}, **command}
        proc = await asyncio.create_subprocess_exec(node, str(SCRIPT), stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    cwd=JS)
        try:
            out, err = await asyncio.wait_for(proc.communicate(json.dumps(command).encode()), NODE_SECONDS)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"{SCRIPT.name} {op} gave no answer in {NODE_SECONDS} s") from None
        assert proc.returncode == 0, err.decode()
        return json.loads(out)

    return run


def chat_id() -> str:
    """An id as useChat's generateId makes them: 16 characters, not a UUID."""
    return uuid.uuid4().hex[:16]


def user(text: str, message_id: str | None = None, **extra) -> dict:
    return {"id": message_id or chat_id(), "role": "user", "parts": [{"type": "text", "text": text}], **extra}


def texts(message: dict) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


async def history(client, cid: str) -> list[dict]:
    r = await client.get(f"/v1/conversations/{cid}/messages", params={"format": "openai"})
    assert r.status_code == 200, r.text
    return r.json()["messages"]


async def assert_history_is_valid(client, cid: str) -> list[dict]:
    """format=openai as Chat Completions takes it: every tool call answered right
    after its assistant message, every tool message answering such a call."""
    messages = await history(client, cid)
    open_calls: list[str] = []
    for m in messages:
        if m["role"] == "tool":
            assert open_calls and m["tool_call_id"] == open_calls.pop(0), messages
            continue
        assert not open_calls, f"tool calls without a result: {open_calls} in {messages}"
        open_calls = [c["id"] for c in m.get("tool_calls") or []]
    assert not open_calls, f"tool calls without a result: {open_calls} in {messages}"
    return messages


async def assert_history_is_what_the_model_saw(client, cid: str, fake) -> None:
    """format=openai == the upstream's last request + what it answered."""
    last = [r for r in fake.requests if r.path.endswith("/chat/completions")][-1]
    answered = {k: v for k, v in last.answer.items() if k not in ("finish_reason", "reasoning_content", "reasoning")}
    assert await assert_history_is_valid(client, cid) == orjson.loads(last.body)["messages"] + [answered]


async def log_of(client, cid: str) -> list[dict]:
    return list((await stored_events(client, cid)).values())


async def assert_sdk_messages_agree_with_the_log(client, cid: str, messages: list[dict]) -> None:
    """The SDK's assistant messages are the log's turns (projections' own check), and
    exactly what the SDK rebuilds from the conversation's whole ui stream."""
    events = await log_of(client, cid)
    assistant = [m for m in messages if m["role"] == "assistant"]
    assert_agrees_with_history(events, assistant)
    r = await client.get(f"/v1/conversations/{cid}/stream", params={"format": "ui", "follow": "false"})
    rebuilt = check_sse([r.text])
    for version, (result,) in rebuilt.items():
        assert result["problems"] == [], (version, result["problems"])
        assert [_shown(m) for m in result["messages"]] == [_shown(m) for m in assistant], version


def _shown(message: dict) -> dict:
    """What a UI renders of a message (the SDK leaves `metadata` out or undefined)."""
    return {"id": message["id"], "role": message["role"], "parts": message["parts"]}


def started_turns(events: list[dict]) -> list[str]:
    return [e["data"]["turn_id"] for e in events if e["type"] == "turn.started"]


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


# -- a text turn ----------------------------------------------------------------------------------


async def test_a_text_turn_streams_the_answer_the_log_holds(sdk, alice, fake, principal):
    chat, first = chat_id(), user("hello [fake:say Hello there, friend.]")
    sent = await sdk("send", chatId=chat, messages=[first])
    (request,) = sent["requests"]
    cid = request["conversationId"]
    assert cid == str(conversation_for(f"alice-{principal}", chat))  # a non-UUID chat id names a conversation
    message = sent["message"]
    assert (message["id"], message["role"], texts(message)) == (request["turnId"], "assistant", "Hello there, friend.")
    assert sent["chunks"][0] == "start" and sent["chunks"][-1] == "finish" and sent["errors"] == []
    events = await log_of(alice, cid)
    assert of_type(events, "message.user")[0]["data"] == {"content": first["parts"][0]["text"]}
    (started,) = of_type(events, "turn.started")
    assert started["data"]["request_id"] == first["id"] and events[-1]["type"] == "turn.finished"
    await assert_history_is_what_the_model_saw(alice, cid, fake)
    await assert_sdk_messages_agree_with_the_log(alice, cid, [first, message])
