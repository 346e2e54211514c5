"""The fake upstream, driven by the real `openai` SDK over real HTTP: what the runner relies on."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest

from runner.fake_upstream import FakeUpstream, start

USER = {"role": "user", "content": "hello"}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "kelvin"]}}}}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {
    "type": "object", "properties": {"timezone": {"type": "string"}}}}}


@pytest.fixture
def client(fake):
    return openai.AsyncOpenAI(base_url=fake.url, api_key="test-key", max_retries=0)


def say(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


async def stream(client, messages, **params) -> list:
    params.setdefault("model", "gpt-test")
    response = await client.chat.completions.create(
        messages=messages, stream=True, stream_options={"include_usage": True}, **params)
    return [chunk async for chunk in response]


def assemble(chunks) -> dict:
    """What a runner accumulates: text, reasoning, tool calls by index, finish reason, usage."""
    out = {"content": "", "reasoning_content": "", "reasoning": "", "calls": {}, "finish_reason": None,
           "usage": None, "roles": []}
    for chunk in chunks:
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if delta.role:
                out["roles"].append(delta.role)
            out["content"] += delta.content or ""
            for name in ("reasoning_content", "reasoning"):
                out[name] += (delta.model_extra or {}).get(name) or ""
            for fragment in delta.tool_calls or []:
                call = out["calls"].setdefault(fragment.index, {"id": None, "name": None, "arguments": ""})
                if fragment.id:
                    call["id"] = fragment.id
                if fragment.function and fragment.function.name:
                    call["name"] = fragment.function.name
                if fragment.function and fragment.function.arguments:
                    call["arguments"] += fragment.function.arguments
            if choice.finish_reason:
                out["finish_reason"] = choice.finish_reason
    return out


async def test_default_reply_is_friendly_text_streamed_word_by_word(fake, client):
    chunks = await stream(client, say("hi there"))
    got = assemble(chunks)
    assert got["roles"] == ["assistant"] and chunks[0].choices[0].delta.role == "assistant"
    assert "fake upstream" in got["content"] and 'You said: "hi there"' in got["content"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 10
    assert got["finish_reason"] == "stop"
    # usage comes last, alone, with no choices
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    raw = bytes(fake.requests[-1].response)
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"data: ") == len(chunks) + 1
    assert fake.requests[-1].answer == {"role": "assistant", "content": got["content"], "finish_reason": "stop"}


async def test_say_streams_exactly_the_scripted_text(client):
    got = assemble(await stream(client, say("[fake:say Paris is the capital of France.]")))
    assert got["content"] == "Paris is the capital of France."


async def test_without_include_usage_no_usage_chunk(fake, client):
    response = await client.chat.completions.create(model="m", messages=say("[fake:say a b]"), stream=True)
    chunks = [c async for c in response]
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert b'"usage"' not in bytes(fake.requests[-1].response)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_streams_before_the_text_in_the_chosen_field(client, field):
    directive = "[fake:reasoning]" if field == "reasoning_content" else "[fake:reasoning field=reasoning]"
    chunks = await stream(client, say(f"{directive} [fake:say It is 4.]"))
    got = assemble(chunks)
    other = "reasoning" if field == "reasoning_content" else "reasoning_content"
    assert got[field].startswith("The user wants") and got[other] == ""
    assert got["content"] == "It is 4."
    kinds = ["content" if c.choices[0].delta.content else field
             for c in chunks if c.choices and (c.choices[0].delta.content or (c.choices[0].delta.model_extra or {}).get(field))]
    assert kinds == sorted(kinds, key=lambda kind: kind == "content")  # all the reasoning first
    assert kinds.count(field) > 3 and kinds.count("content") == 3
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0


async def test_parallel_tool_calls_interleave_fragments_by_index(fake, client):
    chunks = await stream(client, say("[fake:tools weather,time]"), tools=[WEATHER, TIME])
    fragments = [f for c in chunks if c.choices for f in c.choices[0].delta.tool_calls or []]
    indexes = [f.index for f in fragments]
    assert set(indexes) == {0, 1} and indexes[:4] == [0, 1, 0, 1]  # interleaved
    for index in (0, 1):
        mine = [f for f in fragments if f.index == index]
        assert mine[0].id.startswith("call_") and mine[0].function.name and mine[0].type == "function"
        assert all(f.id is None and f.function.name is None for f in mine[1:])  # id, name: first fragment only
        assert len(mine) > 3  # arguments come in pieces
    got = assemble(chunks)
    assert got["finish_reason"] == "tool_calls" and got["content"] == ""
    calls = got["calls"]
    assert [calls[0]["name"], calls[1]["name"]] == ["weather", "time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "example", "unit": "celsius"}  # from the schema
    assert json.loads(calls[1]["arguments"]) == {"timezone": "example"}
    answer = fake.requests[-1].answer
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in answer["tool_calls"]] == [
        (calls[i]["id"], calls[i]["name"], calls[i]["arguments"]) for i in (0, 1)]


async def test_tool_results_in_any_order_lead_to_a_text_that_quotes_them(fake, client):
    messages = say("What about Paris? [fake:tools weather,time]")
    first = assemble(await stream(client, messages, tools=[WEATHER, TIME]))
    calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
             for c in first["calls"].values()]
    messages += [{"role": "assistant", "content": None, "tool_calls": calls},
                 {"role": "tool", "tool_call_id": calls[1]["id"], "content": "14:05"},
                 {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"temp": 21}'}]
    second = assemble(await stream(client, messages, tools=[WEATHER, TIME]))
    assert second["finish_reason"] == "stop" and not second["calls"]
    assert "time returned 14:05" in second["content"] and 'weather returned {"temp": 21}' in second["content"]
    assert fake.requests[-1].json["messages"] == messages


async def test_reasoning_can_precede_tool_calls(client):
    got = assemble(await stream(client, say("[fake:reasoning] [fake:tools weather]"), tools=[WEATHER]))
    assert got["reasoning_content"] and got["content"] == "" and got["calls"][0]["name"] == "weather"


async def test_tools_without_names_call_every_tool_of_the_request_and_steps_repeat_them(client):
    messages = say("[fake:tools sequential steps 2]")
    first = assemble(await stream(client, messages, tools=[TIME]))
    assert [c["name"] for c in first["calls"].values()] == ["time"]
    call = first["calls"][0]
    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": "time", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "noon"}]
    second = assemble(await stream(client, messages, tools=[TIME]))
    assert second["finish_reason"] == "tool_calls" and second["calls"][0]["id"] != call["id"]


async def test_model_name_chooses_the_scenario(client):
    got = assemble(await stream(client, say("weather please"), model="fake-tools", tools=[WEATHER]))
    assert got["finish_reason"] == "tool_calls" and got["calls"][0]["name"] == "weather"


@pytest.mark.parametrize("status,error", [(500, openai.InternalServerError), (503, openai.InternalServerError),
                                          (400, openai.BadRequestError), (429, openai.RateLimitError)])
async def test_http_errors_before_any_chunk_surface_as_sdk_exceptions(fake, client, status, error):
    with pytest.raises(error) as raised:
        await stream(client, say(f"[fake:error {status}]"))
    assert raised.value.status_code == status
    assert set(raised.value.body) == {"message", "type", "param", "code"}  # OpenAI's error shape
    if status == 429:
        assert raised.value.response.headers["retry-after"] == "1"
    assert fake.requests[-1].status == status and fake.requests[-1].chunks_sent == 0


async def test_429_then_ok_succeeds_on_the_sdk_retry_after_retry_after(fake):
    retrying = openai.AsyncOpenAI(base_url=fake.url, api_key="k", max_retries=2)
    got = assemble(await stream(retrying, say("[fake:429 then ok retry-after 0.05] [fake:say fine]")))
    assert got["content"] == "fine"
    assert [r.status for r in fake.requests] == [429, 200]
    assert fake.requests[0].body == fake.requests[1].body  # the same request, retried


async def test_fail_n_times_then_ok_counts_per_conversation_and_starts_over(fake, client):
    messages = say("[fake:fail 2 503 then ok] [fake:say ok]")
    other = say("[fake:fail 2 503 then ok] [fake:say other]")
    for expected in (503, 503, 200):
        if expected == 200:
            assert assemble(await stream(client, messages))["content"] == "ok"
        else:
            with pytest.raises(openai.InternalServerError):
                await stream(client, messages)
        if expected == 503:  # another conversation keeps its own count
            with pytest.raises(openai.InternalServerError):
                await stream(client, other)
    assert assemble(await stream(client, other))["content"] == "other"
    with pytest.raises(openai.InternalServerError):  # after a success, the next request fails again
        await stream(client, messages)


async def test_error_mid_stream_raises_after_the_chunks_already_sent(fake, client):
    response = await client.chat.completions.create(
        model="m", messages=say("[fake:error 500 after 4] [fake:say one two three four five six]"), stream=True)
    received = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in response:
            received.append(chunk)
    assert len(received) == 4 and assemble(received)["content"] == "one two three"
    assert raised.value.body["type"] == "server_error"
    assert fake.requests[-1].outcome == "error"


async def test_broken_stream_raises_a_connection_error_after_n_chunks(fake, client):
    response = await client.chat.completions.create(
        model="m", messages=say("[fake:break after 3] [fake:say one two three four]"), stream=True)
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in response:
            received.append(chunk)
    assert assemble(received)["content"] == "one two" and assemble(received)["finish_reason"] is None
    assert fake.requests[-1].outcome == "broken"


async def test_truncated_stream_ends_without_finish_reason_or_done(fake, client):
    got = assemble(await stream(client, say("[fake:truncate after 3] [fake:say one two three four]")))
    assert got["content"] == "one two" and got["finish_reason"] is None and got["usage"] is None
    assert b"[DONE]" not in bytes(fake.requests[-1].response)


async def test_closing_a_slow_stream_is_seen_by_the_upstream(fake, client):
    response = await client.chat.completions.create(
        model="m", messages=say("[fake:slow 20ms] [fake:long 1000]"), stream=True)
    received = 0
    async for _ in response:
        received += 1
        if received == 5:
            break
    await response.close()
    record = await fake.wait_for(lambda r: r.outcome != "open", timeout=5)
    assert record.outcome == "client_closed" and record.chunks_sent < 100


async def test_a_stalled_stream_waits_until_the_client_gives_up(fake):
    patient = openai.AsyncOpenAI(base_url=fake.url, api_key="k", max_retries=0, timeout=0.5)
    response = await patient.chat.completions.create(
        model="m", messages=say("[fake:stall after 2] [fake:say one two three]"), stream=True)
    received = []
    with pytest.raises(openai.APITimeoutError):
        async for chunk in response:
            received.append(chunk)
    assert assemble(received)["content"] == "one"
    record = await fake.wait_for(lambda r: r.outcome != "open", timeout=5)
    assert record.outcome == "client_closed" and record.chunks_sent == 2


async def test_a_delay_before_the_headers_ends_when_the_client_gives_up(fake):
    patient = openai.AsyncOpenAI(base_url=fake.url, api_key="k", max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        await stream(patient, say("[fake:delay 30s]"))
    record = await fake.wait_for(lambda r: r.outcome != "open", timeout=5)
    assert record.outcome == "client_closed" and record.status == 0


async def test_long_stream_has_n_text_chunks(client):
    chunks = await stream(client, say("[fake:long 2000 chunks]"))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) == 2000 and texts[0] == "word0 " and texts[-1] == "word1999"


async def test_finish_reason_length(client):
    assert assemble(await stream(client, say("[fake:length]")))["finish_reason"] == "length"


async def test_non_streaming_answer_and_models(client):
    completion = await client.chat.completions.create(model="m", messages=say("[fake:say Just this.]"))
    assert completion.choices[0].message.content == "Just this." and completion.choices[0].finish_reason == "stop"
    completion = await client.chat.completions.create(model="m", messages=say("[fake:tools weather]"))
    assert completion.choices[0].message.tool_calls[0].function.name == "weather"
    assert "fake" in [m.id async for m in client.models.list()]


@pytest.mark.parametrize("messages,param,says", [
    ([USER, {"role": "tool", "tool_call_id": "call_x", "content": "1"}], "messages.[1].role",
     "must be a response to a preceeding message with 'tool_calls'"),
    ([USER, {"role": "assistant", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "call_b", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "call_b", "content": "1"}, USER], "messages.[1].role",
     "did not have response messages: call_a"),
    ([USER, {"role": "assistant", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}], "messages.[1].role",
     "did not have response messages: call_a"),
    ([USER, {"role": "assistant", "content": None, "tool_calls": []}, USER], "messages[1].tool_calls", "empty array"),
    ([USER, {"role": "assistant", "content": None}, USER], "messages.[1].content", "got null"),
    ([], "messages", "empty array"),
])
async def test_requests_openai_refuses_are_refused_with_its_400(fake, client, messages, param, says):
    with pytest.raises(openai.BadRequestError) as raised:
        await stream(client, messages)
    assert raised.value.body["param"] == param and says in raised.value.body["message"]
    assert raised.value.body["type"] == "invalid_request_error"
    assert fake.requests[-1].status == 400 and fake.requests[-1].json["messages"] == messages


async def test_stream_options_without_stream_is_refused(fake):
    async with httpx.AsyncClient(base_url=fake.url, headers={"authorization": "Bearer k"}) as http:
        answer = await http.post("/chat/completions", json={"model": "m", "messages": [USER],
                                                            "stream_options": {"include_usage": True}})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "stream_options"
        answer = await http.post("/chat/completions", json={"model": "m", "messages": [USER]},
                                 headers={"authorization": ""})
        assert answer.status_code == 401


async def test_every_request_is_kept_byte_for_byte_and_listed_over_http(fake, client):
    body = b'{"model":"m",  "messages":[{"role":"user","content":"caf\\u00e9 [fake:say x]"}],"stream":true}'
    async with httpx.AsyncClient(base_url=fake.url, headers={"authorization": "Bearer k"}) as http:
        answer = await http.post("/chat/completions", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
        await stream(client, say("[fake:say y]"), temperature=0.5, max_tokens=7)
        listed = (await http.get("/_fake/requests")).json()["requests"]
        assert [r["n"] for r in listed] == [r.n for r in fake.requests] == [1, 2]
        assert fake.requests[0].body == body and base64.b64decode(listed[0]["body_base64"]) == body
        sent = json.loads(listed[1]["body"])
        assert sent["temperature"] == 0.5 and sent["max_tokens"] == 7
        assert sent["stream_options"] == {"include_usage": True} and listed[1]["headers"]["authorization"] == "Bearer test-key"
        assert listed[1]["answer"] == {"role": "assistant", "content": "y", "finish_reason": "stop"}
        await http.delete("/_fake/requests")
        assert (await http.get("/_fake/requests")).json() == {"requests": []}


async def test_kept_requests_are_bounded():
    upstream = FakeUpstream(max_requests=3)
    url = await upstream.start()
    try:
        client = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0)
        for i in range(5):
            await stream(client, say(f"[fake:say {i}]"))
        assert [r.n for r in upstream.requests] == [3, 4, 5]
    finally:
        await upstream.stop()


async def test_started_in_process_or_in_a_thread():
    url, stop = await start()
    try:
        client = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0)
        assert assemble(await stream(client, say("[fake:say a]")))["content"] == "a"
    finally:
        await stop()
    threaded = FakeUpstream()
    url = threaded.start_in_thread()
    try:
        with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as sync:
            text = "".join(c.choices[0].delta.content or "" for c in sync.chat.completions.create(
                model="m", messages=say("[fake:say b c]"), stream=True) if c.choices)
        assert text == "b c" and len(threaded.requests) == 1
    finally:
        threaded.stop_in_thread()


async def test_a_directive_it_cannot_read_is_a_400_that_says_so(client):
    with pytest.raises(openai.BadRequestError, match=r"cannot read the directive \[fake:slow soon\]"):
        await stream(client, say("[fake:slow soon]"))


@pytest.mark.parametrize("model", ["fake", "fake-tools", "fake-reasoning", "fake-long", "fake-slow"])
async def test_every_listed_model_streams(client, model):
    got = assemble(await stream(client, say("hi"), model=model, tools=[TIME]))
    assert got["finish_reason"] in ("stop", "tool_calls") and (got["content"] or got["calls"])
