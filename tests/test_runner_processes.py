"""The runner across real `chatlog serve` processes on one database: the log
is the message between them. Cancel and repeats reach the turn wherever it
runs; a process killed with SIGKILL leaves no turn open for longer than its
lease allows; a result delivered to two processes continues the turn once;
a client that hangs up loses nothing and resumes by Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from tests.helpers import eventually, stored_events
from tests.servers import open_sse
from tests.test_runner_turns import (TOOLS, assert_projection_is_what_the_model_saw_then_partly_said, calls_of, messages,
                                     new_chat, result, start, until_status)

pytest_plugins = ("tests.servers",)

LEASE_TTL = 2.0


@pytest.fixture
async def pair(start_server, fake):
    """Two chatlog processes whose runners call `fake`, with a short lease."""
    env = {"CHATLOG_UPSTREAM_BASE_URL": fake.url, "CHATLOG_UPSTREAM_API_KEY": "sk-fake", "CHATLOG_MODEL": "fake",
           "CHATLOG_RUNNER_LEASE_TTL_SECONDS": str(LEASE_TTL)}
    a, b = await asyncio.gather(start_server("A", **env), start_server("B", **env))
    clients = [a.client(), b.client()]
    yield (a, b), clients
    for client in clients:
        await client.aclose()


async def first_page(client, cid: str) -> list[dict]:
    return (await client.get(f"/v1/conversations/{cid}/events", params={"compact": "false"})).json()["events"]


async def test_cancel_from_the_other_process_stops_the_upstream(pair, fake):
    _, (a, b) = pair
    cid = await new_chat(a)
    turn = await start(a, cid, "[fake:long 500] [fake:slow 20ms]")
    await eventually(lambda: _has_text(a, cid), "some text to be recorded")
    r = await b.post(f"/v1/conversations/{cid}/turns/{turn['turn_id']}/cancel")
    assert r.status_code == 202, r.text
    await until_status(b, cid, turn["turn_id"], "cancelled")
    record = await fake.wait_for(lambda q: q.outcome == "client_closed", timeout=5)
    assert record.chunks_sent < 400  # stopped promptly, not streamed to the end
    await asyncio.sleep(0.5)
    events = list((await stored_events(a, cid)).values())
    assert events[-1]["type"] == "turn.cancelled" and [e["type"] for e in events].count("turn.cancelled") == 1
    await assert_projection_is_what_the_model_saw_then_partly_said(b, cid, fake, events)


async def test_cancel_reaches_a_stalled_upstream_call_on_the_other_process(pair, fake):
    """No chunk arrives, so no append would find the turn closed: the signal stops it."""
    _, (a, b) = pair
    cid = await new_chat(a)
    turn = await start(a, cid, "[fake:long 50] [fake:stall after 5]")
    await eventually(lambda: _has_text(b, cid), "the first words to be recorded")
    r = await b.post(f"/v1/conversations/{cid}/turns/{turn['turn_id']}/cancel")
    assert r.status_code == 202, r.text
    await fake.wait_for(lambda q: q.outcome == "client_closed", timeout=5)  # the upstream timeout is 120 s
    await until_status(a, cid, turn["turn_id"], "cancelled")


async def _has_text(client, cid: str) -> bool:
    return any(e["type"] == "text.delta" for e in await first_page(client, cid))


async def test_a_repeated_request_id_on_the_other_process_is_the_same_turn(pair, fake):
    _, (a, b) = pair
    cid = await new_chat(a)
    body = {"message": {"role": "user", "content": "[fake:long 100] [fake:slow 10ms]"}, "request_id": "same"}
    r1, r2 = await asyncio.gather(a.post(f"/v1/conversations/{cid}/turns", json=body),
                                  b.post(f"/v1/conversations/{cid}/turns", json=body))
    assert sorted((r1.status_code, r2.status_code)) == [200, 202], (r1.text, r2.text)
    assert r1.json()["turn_id"] == r2.json()["turn_id"]
    await until_status(a, cid, r1.json()["turn_id"], "finished")
    r3 = await b.post(f"/v1/conversations/{cid}/turns", json=body)
    assert r3.status_code == 200 and r3.json()["turn_id"] == r1.json()["turn_id"]
    assert len([q for q in fake.requests if q.path.endswith("/chat/completions")]) == 1
    events = list((await stored_events(a, cid)).values())
    assert [e["type"] for e in events].count("turn.started") == 1


async def test_kill9_of_the_runners_process_closes_its_turn_as_interrupted(pair, fake):
    (server_a, _), (a, b) = pair
    cid = await new_chat(a)
    turn = await start(a, cid, "[fake:long 2000] [fake:slow 20ms]")
    await eventually(lambda: _has_text(b, cid), "some text to be recorded")
    server_a.kill9()
    killed = time.monotonic()
    status = await until_status(b, cid, turn["turn_id"], "failed", timeout=LEASE_TTL * 4 + 10)
    waited = time.monotonic() - killed
    events = list((await stored_events(b, cid)).values())
    assert events[-1]["type"] == "turn.failed" and events[-1]["data"]["error"]["code"] == "interrupted"
    assert any(e["type"] == "text.delta" for e in events)  # what was committed stays
    assert status["ended_at"]
    await assert_projection_is_what_the_model_saw_then_partly_said(b, cid, fake, events)
    print(f"closed as interrupted {waited:.1f}s after the kill (lease ttl {LEASE_TTL}s)")
    # the conversation takes turns again
    again = await start(b, cid, "[fake:say Back.]")
    await until_status(b, cid, again["turn_id"], "finished")


async def test_a_final_result_delivered_to_two_processes_continues_once(pair, fake):
    _, (a, b) = pair
    cid = await new_chat(a)
    turn = await start(a, cid, "[fake:tools weather]", tools=TOOLS)
    turn_id = turn["turn_id"]
    await until_status(a, cid, turn_id, "waiting_for_tools")
    [call] = await calls_of(a, cid, turn_id)
    assert (await result(b, cid, call, "working on it", "pending")).status_code == 201
    await until_status(a, cid, turn_id, "finished")
    r1, r2 = await asyncio.gather(result(a, cid, call, {"temp_c": 21}), result(b, cid, call, {"temp_c": 21}))
    assert sorted((r1.status_code, r2.status_code)) == [201, 422]

    async def continued():
        events = (await stored_events(a, cid)).values()
        return [e for e in events if e["type"] == "turn.finished" and e["data"]["turn_id"] != turn_id]
    await eventually(continued, "the continuation turn to finish")
    await asyncio.sleep(1.0)
    events = list((await stored_events(a, cid)).values())
    assert [e["type"] for e in events].count("turn.started") == 2
    assert len([q for q in fake.requests if q.path.endswith("/chat/completions")]) == 3


async def test_a_client_that_hangs_up_loses_nothing_and_resumes_by_last_event_id(pair, fake):
    _, (a, b) = pair
    cid = await new_chat(a)
    turn = await start(a, cid, "[fake:long 150] [fake:slow 10ms]")
    url = f"/v1/conversations/{cid}/turns/{turn['turn_id']}/stream?compact=false"
    seen: list[int] = []
    async with open_sse(a, url) as stream:
        async for frame in stream.frames():
            seen.append(int(frame.id))
            if len(seen) >= 20:
                break
    last = str(seen[-1])  # hung up: the turn goes on without us
    async with open_sse(b, url, last_event_id=last) as stream:
        async for frame in stream.frames():
            seen.append(int(frame.id))
    events = list((await stored_events(b, cid)).values())
    turn_seqs = [e["seq"] for e in events if e["seq"] >= seen[0]]
    assert seen == turn_seqs  # every frame once, in order, across the hang-up
    assert events[-1]["type"] == "turn.finished"
    sent = orjson.loads([q for q in fake.requests if q.path.endswith("/chat/completions")][-1].body)["messages"]
    assert (await messages(b, cid))[:-1] == sent


async def test_sigterm_closes_running_turns_as_interrupted_keeping_what_was_received(pair, fake):
    (server_a, _), (a, b) = pair
    cid = await new_chat(a)
    turn = await start(a, cid, "[fake:long 2000] [fake:slow 20ms]")
    await eventually(lambda: _has_text(b, cid), "some text to be recorded")
    await server_a.stop()
    assert server_a.proc.returncode == 0, server_a.log_tail()
    status = await until_status(b, cid, turn["turn_id"], "failed", timeout=5)
    events = list((await stored_events(b, cid)).values())
    assert events[-1]["data"]["error"]["code"] == "interrupted"
    record = [q for q in fake.requests if q.path.endswith("/chat/completions")][-1]
    text = "".join(e["data"]["text"] for e in events if e["type"] == "text.delta")
    # every chunk the runner read before it hung up was recorded (the first is the role chunk): the text
    # is what the upstream sent, but for one chunk that may still have been on the wire when the signal came
    sent = [f"word{i} " for i in range(record.chunks_sent - 1)]
    assert text in ("".join(sent), "".join(sent[:-1]))
    assert status["status"] == "failed"
    await assert_projection_is_what_the_model_saw_then_partly_said(b, cid, fake, events)


async def test_a_queued_request_of_a_killed_process_runs_on_another(pair, fake):
    (server_a, _), (a, b) = pair
    cid = await new_chat(a)
    first = await start(a, cid, "[fake:long 2000] [fake:slow 20ms]")
    queued = await start(a, cid, "after that [fake:say Queued and done.]", if_running="enqueue")
    assert queued["status"] == "queued"
    await eventually(lambda: _has_text(b, cid), "some text to be recorded")
    server_a.kill9()
    await until_status(b, cid, first["turn_id"], "failed", timeout=LEASE_TTL * 4 + 10)
    await until_status(b, cid, queued["turn_id"], "finished", timeout=20)
    events = list((await stored_events(b, cid)).values())
    assert [e["data"]["content"] for e in events if e["type"] == "message.user"][-1] == "after that [fake:say Queued and done.]"
