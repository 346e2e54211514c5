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
    # the answer as the next request carries it back: reasoning is not part of format=openai
    answered = [{k: v for k, v in last.answer.items() if k not in ("finish_reason", "reasoning_content", "reasoning")}
                ] if last.answer else []
    assert await messages(client, cid) == sent + answered


async def assert_projection_is_what_the_model_saw_then_partly_said(client, cid: str, fake: FakeUpstream,
                                                                   events: list[dict]) -> None:
    """For a turn that ended early: format=openai == the last request's messages + the text received."""
    last = [r for r in fake.requests if r.path.endswith("/chat/completions")][-1]
    sent = orjson.loads(last.body)["messages"]
    text = "".join(e["data"]["text"] for e in events if e["type"] == "text.delta" and e["seq"] > len(sent))
    assert text
    assert await messages(client, cid) == sent + [{"role": "assistant", "content": text}]


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


TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name}",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
         for name in ("weather", "time")]


async def calls_of(client, cid: str, turn_id: str) -> list[str]:
    """The turn's completed tool calls, in the order they started."""
    events = (await stored_events(client, cid)).values()
    started = [e["data"]["tool_call_id"] for e in events
               if e["type"] == "tool_call.started" and e["data"]["turn_id"] == turn_id]
    completed = {e["data"]["tool_call_id"] for e in events if e["type"] == "tool_call.completed"}
    return [c for c in started if c in completed]


async def result(client, cid: str, call_id: str, content, status: str = "ok", id: str | None = None) -> httpx.Response:
    event = {"type": "tool.result", "data": {"tool_call_id": call_id, "content": content, "status": status}}
    if id is not None:
        event["id"] = id
    return await client.post(f"/v1/conversations/{cid}/events", json={"events": [event]})


async def test_deltas_are_committed_in_batches_not_one_transaction_per_chunk(chat, fake, store):
    cid = await new_chat(chat)
    turn = await start(chat, cid, "[fake:long 300]")
    await until_status(chat, cid, turn["turn_id"], "finished")
    events = [e for e in (await stored_events(chat, cid)).values() if e["type"] == "text.delta"]
    assert len(events) == 300
    transactions = {e["position"] >> 16 for e in events}  # store/positions.py: the writing transaction's xid
    assert len(transactions) < 100, f"{len(transactions)} transactions for 300 deltas"


async def test_reasoning_is_recorded_as_reasoning_deltas(chat, fake):
    cid = await new_chat(chat)
    turn = await start(chat, cid, "think [fake:reasoning] [fake:say Done.]")
    await until_status(chat, cid, turn["turn_id"], "finished")
    events = list((await stored_events(chat, cid)).values())
    reasoning = "".join(e["data"]["text"] for e in events if e["type"] == "reasoning.delta")
    assert reasoning == "The user wants an answer. I will think briefly, then reply."
    assert "".join(e["data"]["text"] for e in events if e["type"] == "text.delta") == "Done."
    await assert_projection_is_what_the_model_saw(chat, cid, fake)  # reasoning is not part of format=openai
    await assert_requests_match(chat, cid, turn["turn_id"], fake)


async def test_parallel_tool_calls_wait_for_results_given_in_reverse_order(chat, fake):
    cid = await new_chat(chat)
    turn = await start(chat, cid, "weather and time in Paris [fake:tools]", tools=TOOLS)
    turn_id = turn["turn_id"]
    await until_status(chat, cid, turn_id, "waiting_for_tools")
    calls = await calls_of(chat, cid, turn_id)
    assert len(calls) == 2
    r = await result(chat, cid, calls[1], {"time": "12:00"})
    assert r.status_code == 201, r.text
    assert (await chat.get(f"/v1/conversations/{cid}/turns/{turn_id}")).json()["status"] == "waiting_for_tools"
    r = await result(chat, cid, calls[0], {"temp_c": 18})
    assert r.status_code == 201, r.text
    status = await until_status(chat, cid, turn_id, "finished")
    assert status["steps"] == 2
    second = [q for q in fake.requests if q.path.endswith("/chat/completions")][-1]
    tool_messages = [m for m in orjson.loads(second.body)["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == calls  # call order, not arrival order
    await assert_projection_is_what_the_model_saw(chat, cid, fake)
    requests = await assert_requests_match(chat, cid, turn_id, fake)
    assert [q["step"] for q in requests] == [1, 2]


async def test_max_steps_ends_the_turn_with_the_last_steps_finish_reason(chat, fake):
    cid = await new_chat(chat)
    turn = await start(chat, cid, "[fake:tools weather]", tools=TOOLS, max_steps=1)
    status = await until_status(chat, cid, turn["turn_id"], "finished")
    assert status["steps"] == 1
    events = list((await stored_events(chat, cid)).values())
    assert events[-1]["type"] == "turn.finished" and events[-1]["data"]["finish_reason"] == "tool_calls"


async def test_a_pending_result_lets_the_turn_finish_and_the_final_one_continues_once(chat, fake):
    cid = await new_chat(chat)
    turn = await start(chat, cid, "run the report [fake:tools weather]", tools=TOOLS)
    turn_id = turn["turn_id"]
    await until_status(chat, cid, turn_id, "waiting_for_tools")
    [call] = await calls_of(chat, cid, turn_id)
    assert (await result(chat, cid, call, "started, will take a while", "pending")).status_code == 201
    await until_status(chat, cid, turn_id, "finished")
    assert (await chat.get(f"/v1/conversations/{cid}")).json()["open_turn_id"] is None
    # the final result, delivered twice (a retry with the same id, and another delivery without)
    first = await result(chat, cid, call, {"report": "done"}, id="final-1")
    again = await result(chat, cid, call, {"report": "done"}, id="final-1")
    other = await result(chat, cid, call, {"report": "done"})
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 422)

    async def continuation():
        events = (await stored_events(chat, cid)).values()
        ends = [e for e in events if e["type"] == "turn.finished" and e["data"]["turn_id"] != turn_id]
        return ends
    [end] = await eventually(continuation, "the continuation turn to finish")
    events = list((await stored_events(chat, cid)).values())
    starts = [e for e in events if e["type"] == "turn.started"]
    assert len(starts) == 2 and starts[1]["data"]["turn_id"] == end["data"]["turn_id"]
    await asyncio.sleep(0.5)  # nothing more comes
    assert len([e for e in (await stored_events(chat, cid)).values() if e["type"] == "turn.started"]) == 2
    # the continuation's answer stands next to the turn's last assistant message (no user message
    # between), so the projection merges them (the contract's rule): joined with "\n"
    last = [q for q in fake.requests if q.path.endswith("/chat/completions")][-1]
    sent = orjson.loads(last.body)["messages"]
    assert sent[-1]["role"] == "assistant"
    merged = {"role": "assistant", "content": sent[-1]["content"] + "\n" + last.answer["content"]}
    assert await messages(chat, cid) == sent[:-1] + [merged]
    await assert_requests_match(chat, cid, end["data"]["turn_id"], fake)


async def test_429_then_success_is_retried_honouring_retry_after(chat, fake):
    cid = await new_chat(chat)
    turn = await start(chat, cid, "[fake:429 then ok retry-after-ms 50] [fake:say Worked.]")
    await until_status(chat, cid, turn["turn_id"], "finished")
    statuses = [q.status for q in fake.requests if q.path.endswith("/chat/completions")]
    assert statuses == [429, 200]
    events = list((await stored_events(chat, cid)).values())
    assert [e["type"] for e in events].count("model.requested") == 1  # one step, sent twice
    await assert_projection_is_what_the_model_saw(chat, cid, fake)
    await assert_requests_match(chat, cid, turn["turn_id"], fake)


async def test_a_4xx_fails_the_turn_with_the_upstreams_status_and_message(chat, fake):
    cid = await new_chat(chat)
    turn = await start(chat, cid, "[fake:error 400]")
    await until_status(chat, cid, turn["turn_id"], "failed")
    error = list((await stored_events(chat, cid)).values())[-1]["data"]["error"]
    assert error["code"] == "upstream_error" and error["status"] == 400 and "400" in error["message"]
    assert [q.status for q in fake.requests] == [400]  # not retried


async def test_a_stream_broken_mid_way_fails_the_turn_keeping_the_partial_text(chat, fake):
    cid = await new_chat(chat)
    turn = await start(chat, cid, "[fake:long 50] [fake:break after 20]")
    await until_status(chat, cid, turn["turn_id"], "failed")
    events = list((await stored_events(chat, cid)).values())
    text = "".join(e["data"]["text"] for e in events if e["type"] == "text.delta")
    assert text == "".join(f"word{i} " for i in range(19))  # 20 chunks: the role chunk and 19 words
    assert events[-1]["data"]["error"]["code"] == "upstream_error"
    assert len(fake.requests) == 1  # chunks had arrived: not retried
    await assert_projection_is_what_the_model_saw_then_partly_said(chat, cid, fake, events)


async def test_an_error_500_mid_stream_fails_the_turn_keeping_the_partial_text(chat, fake):
    cid = await new_chat(chat)
    turn = await start(chat, cid, "[fake:long 30] [fake:error 500 after 10]")
    await until_status(chat, cid, turn["turn_id"], "failed")
    events = list((await stored_events(chat, cid)).values())
    text = "".join(e["data"]["text"] for e in events if e["type"] == "text.delta")
    assert text == "".join(f"word{i} " for i in range(9))
    assert events[-1]["data"]["error"]["code"] == "upstream_error"
    await assert_projection_is_what_the_model_saw_then_partly_said(chat, cid, fake, events)


async def test_cancel_stops_the_upstream_and_keeps_the_partial_output(chat, fake):
    cid = await new_chat(chat)
    turn = await start(chat, cid, "[fake:long 400] [fake:slow 20ms]")
    turn_id = turn["turn_id"]

    async def some_text():  # one page: the log grows while the turn streams
        page = (await chat.get(f"/v1/conversations/{cid}/events", params={"compact": "false"})).json()
        return any(e["type"] == "text.delta" for e in page["events"])
    await eventually(some_text, "some text to be recorded")
    for _ in range(2):  # idempotent
        r = await chat.post(f"/v1/conversations/{cid}/turns/{turn_id}/cancel")
        assert r.status_code == 202, r.text
    await until_status(chat, cid, turn_id, "cancelled")
    await fake.wait_for(lambda q: q.outcome == "client_closed", timeout=5)
    events = list((await stored_events(chat, cid)).values())
    assert [e["type"] for e in events].count("turn.cancelled") == 1
    assert any(e["type"] == "text.delta" for e in events)
    await asyncio.sleep(0.3)
    events = list((await stored_events(chat, cid)).values())
    assert events[-1]["type"] == "turn.cancelled"
    await assert_projection_is_what_the_model_saw_then_partly_said(chat, cid, fake, events)


async def test_if_running_reject_interrupt_and_enqueue(chat, fake):
    cid = await new_chat(chat)
    first = await start(chat, cid, "[fake:long 400] [fake:slow 20ms]")
    r = await chat.post(f"/v1/conversations/{cid}/turns", json={"message": {"role": "user", "content": "again"}})
    assert r.status_code == 409 and r.json()["error"]["code"] == "turn_running"
    assert r.json()["error"]["details"]["turn_id"] == first["turn_id"]
    queued = await start(chat, cid, "queued one [fake:say Third.]", if_running="enqueue")
    assert queued["status"] == "queued"
    second = await start(chat, cid, "interrupting [fake:say Second.]", if_running="interrupt")
    assert (await until_status(chat, cid, first["turn_id"], "cancelled"))["status"] == "cancelled"
    await until_status(chat, cid, second["turn_id"], "finished")
    await until_status(chat, cid, queued["turn_id"], "finished")
    events = list((await stored_events(chat, cid)).values())
    users = [e["data"]["content"] for e in events if e["type"] == "message.user"]
    assert users == ["[fake:long 400] [fake:slow 20ms]", "interrupting [fake:say Second.]", "queued one [fake:say Third.]"]
    await assert_projection_is_what_the_model_saw(chat, cid, fake)


async def test_the_same_request_id_is_the_same_turn(chat, fake):
    cid = await new_chat(chat)
    body = {"message": {"role": "user", "content": "[fake:say Once.]"}, "request_id": "req-1"}
    r1 = await chat.post(f"/v1/conversations/{cid}/turns", json=body)
    r2 = await chat.post(f"/v1/conversations/{cid}/turns", json=body)
    assert (r1.status_code, r2.status_code) == (202, 200)
    assert r1.json()["turn_id"] == r2.json()["turn_id"]
    await until_status(chat, cid, r1.json()["turn_id"], "finished")
    r3 = await chat.post(f"/v1/conversations/{cid}/turns", json=body)
    assert r3.status_code == 200 and r3.json()["turn_id"] == r1.json()["turn_id"]
    assert len(fake.requests) == 1


async def test_accept_event_stream_answers_with_the_turns_stream(chat, fake):
    cid = await new_chat(chat)
    async with chat.stream("POST", f"/v1/conversations/{cid}/turns", headers={"Accept": "text/event-stream"},
                           json={"message": {"role": "user", "content": "[fake:say Streamed to you.]"}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = (await r.aread()).decode()
    assert "event: turn.started" in body and "event: turn.finished" in body
    assert "Streamed" in body


@pytest.fixture
async def narrow(store, fake):
    """A chatlog whose runner takes one turn at a time and waits at most 0.5 s for the upstream."""
    settings = Settings(database_url=None, api_keys=API_KEYS, heartbeat_seconds=HEARTBEAT_SECONDS,
                        upstream_base_url=fake.url, upstream_api_key="sk-fake", model="fake",
                        runner_concurrency=1, upstream_timeout_seconds=0.5)
    server = await InProcessServer(create_app(settings, store=store)).start()
    async with httpx.AsyncClient(base_url=server.url, headers=auth("alice"), timeout=20) as client:
        yield client
    await server.stop()


async def test_turns_beyond_the_concurrency_wait_as_queued(narrow, fake):
    one, two = await new_chat(narrow), await new_chat(narrow)
    first = await start(narrow, one, "[fake:long 60] [fake:slow 10ms]")
    second = await start(narrow, two, "[fake:say Waited my turn.]")
    assert (first["status"], second["status"]) == ("running", "queued")
    assert (await narrow.get(f"/v1/conversations/{two}/turns/{second['turn_id']}")).json()["status"] == "queued"
    await until_status(narrow, two, second["turn_id"], "finished")
    assert (await narrow.get(f"/v1/conversations/{one}/turns/{first['turn_id']}")).json()["status"] == "finished"


async def test_an_upstream_that_stops_sending_fails_the_turn_after_the_timeout(narrow, fake):
    cid = await new_chat(narrow)
    turn = await start(narrow, cid, "[fake:long 20] [fake:stall after 5]")
    await until_status(narrow, cid, turn["turn_id"], "failed")
    events = list((await stored_events(narrow, cid)).values())
    assert "".join(e["data"]["text"] for e in events if e["type"] == "text.delta") == "word0 word1 word2 word3 "
    assert events[-1]["data"]["error"]["code"] == "upstream_error"
    assert "timeout" in events[-1]["data"]["error"]["message"]


async def test_a_turn_waiting_for_tools_is_cancelled_and_calls_the_model_no_more(chat, fake):
    cid = await new_chat(chat)
    turn = await start(chat, cid, "[fake:tools weather]", tools=TOOLS)
    await until_status(chat, cid, turn["turn_id"], "waiting_for_tools")
    r = await chat.post(f"/v1/conversations/{cid}/turns/{turn['turn_id']}/cancel")
    assert r.status_code == 202
    await until_status(chat, cid, turn["turn_id"], "cancelled")
    [call] = await calls_of(chat, cid, turn["turn_id"])
    assert (await result(chat, cid, call, {"temp_c": 3})).status_code == 201  # a late result is still taken
    await asyncio.sleep(0.5)
    assert len(fake.requests) == 1
    events = list((await stored_events(chat, cid)).values())
    assert events[-1]["type"] == "tool.result"
    r = await chat.get(f"/v1/conversations/{cid}/turns/{turn['turn_id']}")
    assert r.json()["status"] == "cancelled"


async def test_an_unknown_turn_is_404_and_a_bad_request_is_422(chat):
    cid = await new_chat(chat)
    for path in ("", "/requests"):
        r = await chat.get(f"/v1/conversations/{cid}/turns/nope{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert (await chat.post(f"/v1/conversations/{cid}/turns/nope/cancel")).status_code == 404
    for body in ({"message": {"role": "assistant", "content": "x"}}, {"params": {"stream": False}},
                 {"tool_choice": "auto"}, {"max_steps": 0}, {"if_running": "sometimes"}):
        r = await chat.post(f"/v1/conversations/{cid}/turns", json=body)
        assert r.status_code == 422, (body, r.text)
    assert (await chat.get(f"/v1/conversations/{cid}")).json()["seq"] == 1  # nothing written


async def test_a_turn_waiting_for_tools_leaves_its_slot_to_others(narrow, fake):
    waiting, other = await new_chat(narrow), await new_chat(narrow)
    first = await start(narrow, waiting, "[fake:tools weather]", tools=TOOLS)
    await until_status(narrow, waiting, first["turn_id"], "waiting_for_tools")
    second = await start(narrow, other, "[fake:say Not blocked.]")
    assert second["status"] == "running"  # the only slot was free
    await until_status(narrow, other, second["turn_id"], "finished")
    [call] = await calls_of(narrow, waiting, first["turn_id"])
    assert (await result(narrow, waiting, call, {"temp_c": 9})).status_code == 201
    await until_status(narrow, waiting, first["turn_id"], "finished")


async def test_a_request_cancelled_after_a_dead_process_claimed_it_never_runs(store, fake):
    """A queued request was claimed by a process that died before it began the
    turn. Cancelling it answers 202; the sweep that finds the dead claimer must
    not put it back in the queue, and the next request starts instead."""
    import uuid

    from store.turns import Turns

    settings = Settings(database_url=None, api_keys=API_KEYS, heartbeat_seconds=HEARTBEAT_SECONDS,
                        upstream_base_url=fake.url, upstream_api_key="sk-fake", model="fake",
                        runner_lease_ttl_seconds=0.6)
    server = await InProcessServer(create_app(settings, store=store)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=auth("alice"), timeout=20) as client:
            cid = await new_chat(client)
            ghost = str(uuid.uuid4())
            request = {"message": {"role": "user", "content": "[fake:say Never.]"}, "max_steps": 8}
            # as a process leaves it when it dies between its claim and its begin
            await Turns(store.pool).add("alice", uuid.UUID(cid), ghost, None, request, "running", "dead-process")
            r = await client.post(f"/v1/conversations/{cid}/turns/{ghost}/cancel")
            assert r.status_code == 202

            async def leases_renewed(times: int):
                """`times` more heartbeats of the live runner: a whole sweep ran in between."""
                seen = []

                async def check():
                    seen.append(await store.pool.fetchval("SELECT max(lease_until) FROM runners"))
                    return len(set(seen)) > times
                await eventually(check, f"{times} lease renewals")

            await leases_renewed(3)
            after = await start(client, cid, "[fake:say Instead.]", if_running="enqueue")
            await until_status(client, cid, after["turn_id"], "finished")
            await leases_renewed(3)
            assert (await client.get(f"/v1/conversations/{cid}/turns/{ghost}")).json()["status"] == "cancelled"
            users = [e["data"]["content"] for e in (await stored_events(client, cid)).values()
                     if e["type"] == "message.user"]
            assert users == ["[fake:say Instead.]"]
            assert not [q for q in fake.requests if b"Never." in q.body]
    finally:
        await server.stop()
