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


# -- tools the browser answers ----------------------------------------------------------------------


@pytest.mark.parametrize("version", SDKS)
async def test_a_tool_the_browser_answers_continues_the_same_assistant_message(sdk, alice, fake, version):
    chat = chat_id()
    done = await sdk("chat", sdk=version, chatId=chat, text="Weather in Paris? [fake:tools weather]",
                     body={"tools": WEATHER[:1]}, toolOutputs={"weather": {"temp_c": 18, "sky": "clear"}})
    assert (done["status"], done["error"]) == ("ready", None)
    first, again = done["requests"]  # the message, then the tool output useChat sent by itself
    cid, turn_id = first["conversationId"], first["turnId"]
    assert again["body"]["messageId"] == turn_id and again["body"]["messages"][-1]["role"] == "assistant"
    assert (again["conversationId"], again["turnId"]) == (cid, turn_id)
    question, answer = done["messages"]  # one assistant message in the end
    assert answer["id"] == turn_id
    tool, = [p for p in answer["parts"] if p["type"] == "tool-weather"]
    assert (tool["state"], tool["output"]) == ("output-available", {"temp_c": 18, "sky": "clear"})
    assert texts(answer).startswith("Here is what the tools said: weather returned")
    assert [p["type"] for p in answer["parts"]] == ["step-start", "tool-weather", "step-start", "text"]
    assert done["finishes"] == ["tool-calls", "stop"]
    events = await log_of(alice, cid)
    assert started_turns(events) == [turn_id] and events[-1]["type"] == "turn.finished"
    (result,) = of_type(events, "tool.result")
    assert result["data"] == {"tool_call_id": tool["toolCallId"], "content": {"temp_c": 18, "sky": "clear"},
                              "status": "ok"}
    await assert_history_is_what_the_model_saw(alice, cid, fake)
    await assert_sdk_messages_agree_with_the_log(alice, cid, done["messages"])


def answered(message: dict, outputs: dict, errors: dict) -> dict:
    """`message` as useChat holds it after addToolOutput for each of its calls."""
    parts = []
    for part in message["parts"]:
        name = part["type"].removeprefix("tool-")
        if name in outputs:
            part = {**part, "state": "output-available", "output": outputs[name]}
        elif name in errors:
            part = {**part, "state": "output-error", "errorText": errors[name]}
        parts.append(part)
    return {**message, "parts": parts}


async def test_tool_outputs_sent_twice_are_recorded_once(sdk, alice, fake, ledger):
    chat, question = chat_id(), user("Weather and time? [fake:tools weather,time]")
    sent = await sdk("send", chatId=chat, messages=[question], body={"tools": WEATHER})
    cid, waiting = sent["requests"][0]["conversationId"], sent["message"]
    # the response ended where the browser has to answer: both calls' input, then finish
    assert [p["state"] for p in waiting["parts"] if p["type"].startswith("tool-")] == ["input-available"] * 2
    assert sent["chunks"][-2:] == ["finish-step", "finish"]
    # a reconnect now (useChat's resume on a reload) gives the same message, up to the same point
    assert (await sdk("reconnect", chatId=chat))["message"] == waiting
    # a new message while the turn waits for tools: the contract's if_running default
    await ledger.refused(alice.post("/v1/ai-sdk/chat", json={"id": chat, "messages": [question, waiting, user("hi")]}),
                         409, "turn_running")
    reply = answered(waiting, {"weather": {"temp_c": 18}}, {"time": "the clock is broken"})
    # an output for a call the turn never made is refused whole
    made_up = {**reply, "parts": [{**p, "toolCallId": "call_made_up"} if p["type"] == "tool-time" else p
                                  for p in reply["parts"]]}
    await ledger.refused(alice.post("/v1/ai-sdk/chat", json={
        "id": chat, "messages": [question, made_up], "messageId": waiting["id"]}), 422, "invalid_request")
    again = {"chatId": chat, "messages": [question, reply], "messageId": waiting["id"], "body": {"tools": WEATHER}}
    one, two = await asyncio.gather(sdk("send", **again), sdk("send", **again))
    assert one["message"] == two["message"]
    assert [p["type"] for p in one["message"]["parts"]] == ["step-start", "tool-weather", "tool-time", "step-start",
                                                            "text"]
    assert texts(one["message"]).startswith("Here is what the tools said:")
    events = await log_of(alice, cid)
    assert len(started_turns(events)) == 1 and events[-1]["type"] == "turn.finished"
    results = {e["data"]["tool_call_id"]: e["data"] for e in of_type(events, "tool.result")}
    calls = {p["type"]: p["toolCallId"] for p in waiting["parts"] if p["type"].startswith("tool-")}
    assert results == {
        calls["tool-weather"]: {"tool_call_id": calls["tool-weather"], "content": {"temp_c": 18}, "status": "ok"},
        calls["tool-time"]: {"tool_call_id": calls["tool-time"], "content": "the clock is broken", "status": "error"}}
    # once more after the turn finished: the same message again, nothing written
    late = await sdk("send", **again)
    assert late["message"] == one["message"] and len(await log_of(alice, cid)) == len(events)
    await assert_history_is_what_the_model_saw(alice, cid, fake)
    await assert_sdk_messages_agree_with_the_log(alice, cid, [question, one["message"]])


async def test_tools_answered_one_at_a_time_each_end_their_response(sdk, alice, fake):
    """Without sendAutomaticallyWhen a page may send what it has: each response ends
    as soon as only the browser can go on, so useChat can send the next answer."""
    chat, question = chat_id(), user("Weather and time? [fake:tools weather,time]")
    sent = await sdk("send", chatId=chat, messages=[question], body={"tools": WEATHER})
    cid, waiting = sent["requests"][0]["conversationId"], sent["message"]
    again = {"chatId": chat, "messageId": waiting["id"]}
    unchanged = await sdk("send", messages=[question, waiting], **again)  # nothing answered yet
    assert unchanged["chunks"] == ["start", "finish-step", "finish"] and unchanged["message"] == waiting
    half = answered(waiting, {"weather": "sunny"}, {})
    first = await sdk("send", messages=[question, half], **again)
    assert first["chunks"] == ["start", "tool-output-available", "finish-step", "finish"]
    assert first["message"] == half
    assert len(of_type(await log_of(alice, cid), "tool.result")) == 1
    whole = answered(waiting, {"weather": "sunny", "time": "noon"}, {})
    done = await sdk("send", messages=[question, whole], **again)
    assert texts(done["message"]) == "Here is what the tools said: weather returned sunny; time returned noon."
    events = await log_of(alice, cid)
    assert len(of_type(events, "tool.result")) == 2 and events[-1]["type"] == "turn.finished"
    await assert_history_is_what_the_model_saw(alice, cid, fake)
    await assert_sdk_messages_agree_with_the_log(alice, cid, [question, done["message"]])


# -- reconnecting -----------------------------------------------------------------------------------


async def test_reconnect_mid_turn_gives_the_whole_message(sdk, alice, fake, store, principal):
    """useChat's resume after a reload: the running turn from its start, then live until it ends.
    The turn waits for a tool answered by someone else (`server_tools`), so it is surely
    running when the SDK reconnects; the answer after the tool streams slowly."""
    chat, question = chat_id(), user("Weather? [fake:tools weather] [fake:slow 30ms]")
    body = {"id": chat, "messages": [question], "tools": WEATHER[:1], "server_tools": ["weather"]}
    async with alice.stream("POST", "/v1/ai-sdk/chat", json=body) as response:
        assert response.status_code == 200
        cid = uuid.UUID(response.headers["x-chatlog-conversation-id"])
        turn_id = response.headers["x-chatlog-turn-id"]
        async for line in response.aiter_lines():
            if '"tool-input-available"' in line:
                break  # the tab is closed: a disconnect is not a cancel
    key = (f"alice-{principal}", cid)

    def readers() -> int:
        tail = store.listener.tails.get(key)
        return tail.readers if tail else 0

    async def runner_alone() -> bool:
        status = (await alice.get(f"/v1/conversations/{cid}/turns/{turn_id}")).json()["status"]
        return status == "waiting_for_tools" and readers() == 1

    await eventually(runner_alone, "only the runner, waiting for the result, to follow the conversation")
    resumed = asyncio.create_task(sdk("reconnect", chatId=chat))
    await eventually(lambda: readers() == 2 or resumed.done(), "the SDK's reconnect to follow the turn")
    call = next(e["data"]["tool_call_id"] for e in await log_of(alice, str(cid)) if e["type"] == "tool_call.completed")
    r = await alice.post(f"/v1/conversations/{cid}/events", json={"events": [
        {"type": "tool.result", "data": {"tool_call_id": call, "content": "sunny", "status": "ok"}}]})
    assert r.status_code == 201, r.text
    message = (await resumed)["message"]
    assert [p["type"] for p in message["parts"]] == ["step-start", "tool-weather", "step-start", "text"]
    assert texts(message) == "Here is what the tools said: weather returned sunny."
    events = await log_of(alice, str(cid))
    assert message["id"] == started_turns(events)[0] and events[-1]["type"] == "turn.finished"
    await assert_history_is_what_the_model_saw(alice, str(cid), fake)
    await assert_sdk_messages_agree_with_the_log(alice, str(cid), [question, message])
    # the turn has ended: nothing to reconnect to
    assert (await sdk("reconnect", chatId=chat))["stream"] is None


async def test_reconnect_with_nothing_running_is_null(sdk, alice):
    assert (await sdk("reconnect", chatId=chat_id()))["stream"] is None  # a chat that never sent anything
    r = await alice.get(f"/v1/ai-sdk/chat/{uuid.uuid4()}/stream")
    assert (r.status_code, r.content) == (204, b"")


# -- chat ids, repeats, regenerate --------------------------------------------------------------------


async def test_a_chat_id_names_one_conversation_per_tenant(sdk, alice, server, keys, fake, principal):
    chat, first = chat_id(), user("one [fake:say One.]")
    one = await sdk("send", chatId=chat, messages=[first])
    cid = one["requests"][0]["conversationId"]
    # the same message again (a retried request): the same turn, no second generation
    calls = len(fake.requests)
    repeat = await sdk("send", chatId=chat, messages=[first])
    assert repeat["requests"][0]["turnId"] == one["requests"][0]["turnId"] and repeat["message"] == one["message"]
    assert len(fake.requests) == calls
    two = await sdk("send", chatId=chat, messages=[first, one["message"], user("two [fake:say Two.]")])
    assert two["requests"][0]["conversationId"] == cid and texts(two["message"]) == "Two."
    events = await log_of(alice, cid)
    assert [e["data"]["content"] for e in of_type(events, "message.user")] == ["one [fake:say One.]",
                                                                              "two [fake:say Two.]"]
    assert len(started_turns(events)) == 2
    assert (await alice.get(f"/v1/conversations/{cid}")).json()["id"] == cid  # in the rest of the API
    await assert_history_is_what_the_model_saw(alice, cid, fake)
    await assert_sdk_messages_agree_with_the_log(alice, cid, [one["message"], two["message"]])
    # another tenant's same chat id is a conversation of their own
    async with httpx.AsyncClient(base_url=server.url, headers=bearer(keys["bob"]), timeout=20) as bob:
        r = await bob.post("/v1/ai-sdk/chat", json={"id": chat, "messages": [user("mine [fake:say Bob.]")]})
        assert r.status_code == 200 and r.headers["x-chatlog-conversation-id"] == \
            str(conversation_for(f"bob-{principal}", chat)) != cid
        assert (await bob.get(f"/v1/conversations/{cid}")).status_code == 404
        # alice's conversation id as bob's chat id: his own (nothing running), never hers
        r = await bob.get(f"/v1/ai-sdk/chat/{cid}/stream")
        assert r.status_code == 204 and r.headers["x-chatlog-conversation-id"] == cid
        # and no key, no chat
        for method, url in (("POST", "/v1/ai-sdk/chat"), ("GET", f"/v1/ai-sdk/chat/{chat}/stream")):
            r = await bob.request(method, url, headers={"Authorization": ""}, json={"id": chat, "messages": [first]})
            assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized")
    # a UUID chat id is the conversation id itself
    mine = str(uuid.uuid4())
    three = await sdk("send", chatId=mine, messages=[user("uuid [fake:say Three.]")])
    assert three["requests"][0]["conversationId"] == mine and texts(three["message"]) == "Three."


async def test_regenerate_starts_a_turn_only_when_the_last_one_left_no_answer(sdk, alice, fake, ledger):
    chat, question = chat_id(), user("again? [fake:fail 1 400 then ok] [fake:say Now it works.]")
    failed = await sdk("send", chatId=chat, messages=[question])
    cid = failed["requests"][0]["conversationId"]
    assert failed["chunks"][-3:] == ["error", "finish-step", "finish"] and failed["errors"]
    assert (await log_of(alice, cid))[-1]["type"] == "turn.failed"
    # useChat's regenerate() drops the failed message and sends the rest
    again = await sdk("send", chatId=chat, messages=[question], trigger="regenerate-message",
                      messageId=failed["message"]["id"])
    assert texts(again["message"]) == "Now it works." and again["message"]["id"] != failed["message"]["id"]
    events = await log_of(alice, cid)
    assert len(started_turns(events)) == 2 and len(of_type(events, "message.user")) == 1
    await assert_history_is_what_the_model_saw(alice, cid, fake)
    # now the answer is in the history: regenerating it would not replace it
    await ledger.refused(alice.post("/v1/ai-sdk/chat", json={
        "id": chat, "messages": [question], "trigger": "regenerate-message", "messageId": again["message"]["id"]}),
        409, "cannot_regenerate")


# -- what is refused ----------------------------------------------------------------------------------

PNG = "data:image/png;base64,iVBORw0KGgo="


def file(media_type: str, url: str, **extra) -> dict:
    return {"type": "file", "mediaType": media_type, "url": url, **extra}


def with_parts(*parts: dict) -> dict:
    return {"id": chat_id(), "role": "user", "parts": list(parts)}


@pytest.mark.parametrize("body, status, code", [
    ([1, 2], 400, "malformed_request"),
    ({}, 422, "invalid_request"),
    ({"messages": [user("hi")]}, 422, "invalid_request"),
    ({"id": "", "messages": [user("hi")]}, 422, "invalid_request"),
    ({"id": "c", "messages": []}, 422, "invalid_request"),
    ({"id": "c", "messages": "hi"}, 422, "invalid_request"),
    ({"id": "c", "messages": [user("hi")], "trigger": "resume-stream"}, 422, "invalid_request"),
    ({"id": "c", "messages": [{"role": "user", "parts": [{"type": "text", "text": "no id"}]}]}, 422, "invalid_request"),
    ({"id": "c", "messages": [{"id": "m", "role": "robot", "parts": []}]}, 422, "invalid_request"),
    ({"id": "c", "messages": [{"id": "m", "role": "system", "parts": [{"type": "text", "text": "x"}]}]},
     422, "invalid_request"),
    ({"id": "c", "messages": [with_parts()]}, 422, "invalid_request"),
    ({"id": "c", "messages": [with_parts({"type": "text"})]}, 422, "invalid_request"),
    ({"id": "c", "messages": [with_parts({"type": "text", "text": "a\u0000b"})]}, 422, "invalid_request"),
    ({"id": "c", "messages": [with_parts(file("text/csv", "data:text/csv;base64,YSxi"))]}, 422, "unsupported_file"),
    ({"id": "c", "messages": [with_parts(file("application/pdf", "https://example.com/a.pdf"))]},
     422, "unsupported_file"),
    ({"id": "c", "messages": [with_parts(file("image/png", ""))]}, 422, "invalid_request"),
    ({"id": "c", "messages": [user("hi")], "params": {"model": "x"}}, 422, "invalid_request"),
    ({"id": "c", "messages": [user("hi")], "tool_choice": "auto"}, 422, "invalid_request"),
    ({"id": "c", "messages": [user("hi")], "max_steps": "8"}, 422, "invalid_request"),
    # tool outputs for a turn the chat does not have
    ({"id": "c", "messages": [user("hi"), {"id": "t-unknown", "role": "assistant", "parts": []}]}, 404, "not_found"),
    # regenerating in a chat that has nothing yet
    ({"id": "c", "messages": [user("hi")], "trigger": "regenerate-message"}, 404, "not_found"),
])
async def test_bad_bodies_are_refused_in_the_contract_shape_and_write_nothing(alice, ledger, body, status, code):
    if isinstance(body, dict) and body.get("id") == "c":
        body = {**body, "id": chat_id()}  # a chat of this test's own
    await ledger.refused(alice.post("/v1/ai-sdk/chat", json=body), status, code)


async def test_files_reach_the_model_as_content_parts(sdk, alice, fake):
    image = file("image/png", PNG, filename="dot.png")
    pdf = file("application/pdf", "data:application/pdf;base64,JVBERi0=", filename="a.pdf")
    question = with_parts(image, pdf, {"type": "text", "text": "What are these? [fake:say A dot and a page.]"})
    sent = await sdk("send", chatId=chat_id(), messages=[question])
    assert texts(sent["message"]) == "A dot and a page."
    cid = sent["requests"][0]["conversationId"]
    (message,) = of_type(await log_of(alice, cid), "message.user")
    assert message["data"]["content"] == [
        {"type": "image_url", "image_url": {"url": PNG}},
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}},
        {"type": "text", "text": "What are these? [fake:say A dot and a page.]"}]
    await assert_history_is_what_the_model_saw(alice, cid, fake)
