"""GET /messages and POST /fork: what a client reads back, at any point in time."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from store import NewEvent
from store.folds import SNAPSHOT_EVERY
from tests.helpers import TURN, append, assert_error, messages_at, new_conversation, tool_turns
from tests.strategies import check_anthropic, check_openai, valid_event_sequences


async def messages(client, cid, **params):
    r = await client.get(f"/v1/conversations/{cid}/messages", params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def test_openai_messages_of_a_turn_with_a_tool_call(client):
    cid = await new_conversation(client, system="Be brief.")
    await append(client, cid, TURN)
    body = await messages(client, cid)
    assert body == {"conversation_id": cid, "seq": 11, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c":18}'},
    ]}


async def test_anthropic_messages_return_system_separately(client):
    cid = await new_conversation(client, system="Be brief.")
    await append(client, cid, TURN)
    body = await messages(client, cid, format="anthropic")
    assert body["system"] == "Be brief." and body["seq"] == 11
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assistant = body["messages"][1]["content"]
    assert assistant[0] == {"type": "text", "text": "Let me check."}
    assert assistant[1]["type"] == "tool_use" and assistant[1]["input"] == {"city": "Paris"}
    result = body["messages"][2]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == assistant[1]["id"]
    check_anthropic({"system": body["system"], "messages": body["messages"]})


async def test_at_seq_gives_the_history_exactly_as_it_stood(client):
    cid = await new_conversation(client)
    stored = (await append(client, cid, TURN))["events"]
    events = (await client.get(f"/v1/conversations/{cid}/events")).json()["events"]
    for seq in range(1, stored[-1]["seq"] + 1):
        for format in ("openai", "anthropic"):
            body = await messages(client, cid, at_seq=seq, format=format)
            expected = messages_at(events, seq, format)
            assert {k: v for k, v in body.items() if k != "conversation_id"} == expected
            assert body["seq"] == seq
    # at seq 9 the call is completed but its turn is still open and unanswered: left out
    assert (await messages(client, cid, at_seq=9))["messages"][-1] == {"role": "assistant", "content": "Let me check."}


async def test_at_time_gives_the_last_seq_committed_by_then(client):
    cid = await new_conversation(client)
    first = (await append(client, cid, TURN[:1]))["events"][-1]
    await asyncio.sleep(0.01)
    await append(client, cid, TURN[1:])
    body = await messages(client, cid, at_time=first["created_at"])
    assert body["seq"] == first["seq"]
    assert body["messages"] == [{"role": "user", "content": "What is the weather in Paris?"}]
    created = (await client.get(f"/v1/conversations/{cid}")).json()["created_at"]
    assert (await messages(client, cid, at_time=created))["seq"] == 1


@pytest.mark.parametrize("params, code", [
    ({"at_seq": 0}, "out_of_range"),
    ({"at_seq": 99}, "out_of_range"),
    ({"at_time": "2000-01-01T00:00:00Z"}, "out_of_range"),
    ({"at_time": "yesterday"}, "invalid_request"),
    ({"at_time": "2026-11-21T10:00:00"}, "invalid_request"),
    ({"at_seq": 1, "at_time": "2026-11-21T10:00:00Z"}, "invalid_request"),
    ({"format": "gemini"}, "invalid_request"),
])
async def test_out_of_range_points_in_time_are_422_with_a_clear_message(client, params, code):
    cid = await new_conversation(client)
    error = assert_error(await client.get(f"/v1/conversations/{cid}/messages", params=params), 422, code)
    if params.get("at_seq") == 99:
        assert "between 1 and 1" in error["message"] and error["details"]["current_seq"] == 1


async def test_fork_equals_the_source_at_that_seq_and_records_provenance(client):
    cid = await new_conversation(client, system="Be brief.", metadata={"team": "a"})
    await append(client, cid, TURN)
    await append(client, cid, [{"type": "message.user", "data": {"content": "And tomorrow?"}}])
    r = await client.post(f"/v1/conversations/{cid}/fork", json={"at_seq": 11})
    assert r.status_code == 201, r.text
    fork = r.json()
    assert fork["id"] != cid and fork["seq"] == 11 and fork["metadata"] == {"team": "a"}
    for format in ("openai", "anthropic"):
        source = await messages(client, cid, at_seq=11, format=format)
        forked = await messages(client, fork["id"], format=format)
        assert {k: v for k, v in forked.items() if k != "conversation_id"} == \
               {k: v for k, v in source.items() if k != "conversation_id"}
    first = (await client.get(f"/v1/conversations/{fork['id']}/events", params={"limit": 1})).json()["events"][0]
    assert first["data"]["forked_from"] == {"conversation_id": cid, "seq": 11}
    # the fork goes its own way; the source does not move
    await append(client, fork["id"], [{"type": "message.user", "data": {"content": "Different question"}}])
    assert (await client.get(f"/v1/conversations/{cid}")).json()["seq"] == 12
    assert (await messages(client, cid))["messages"][-1]["content"] == "And tomorrow?"
    assert (await messages(client, fork["id"]))["messages"][-1]["content"] == "Different question"


async def test_fork_with_own_id_and_metadata_and_its_refusals(client, bob):
    cid = await new_conversation(client)
    await append(client, cid, TURN[:3])
    new_id = str(uuid.uuid4())
    r = await client.post(f"/v1/conversations/{cid}/fork", json={"at_seq": 4, "id": new_id, "metadata": {"x": 1}})
    assert r.status_code == 201 and r.json()["id"] == new_id and r.json()["metadata"] == {"x": 1}
    # a fork inside an open turn keeps it open, exactly as it stood
    assert r.json()["open_turn_id"] == "t1"
    assert_error(await client.post(f"/v1/conversations/{cid}/fork", json={"at_seq": 4, "id": new_id}),
                 409, "conversation_exists")
    assert_error(await client.post(f"/v1/conversations/{cid}/fork", json={"at_seq": 40}), 422, "out_of_range")
    assert_error(await client.post(f"/v1/conversations/{cid}/fork", json={}), 422, "invalid_request")
    assert_error(await bob.post(f"/v1/conversations/{cid}/fork", json={"at_seq": 2}), 404, "not_found")
    assert_error(await bob.get(f"/v1/conversations/{cid}/messages"), 404, "not_found")


async def test_deleting_snapshots_changes_no_answer(client, store, principal):
    """Snapshots are derived data: every answer is the same with or without them."""
    cid = await new_conversation(client)
    turns = tool_turns(12, deltas=60)
    await append(client, cid, turns)
    last = 1 + len(turns)
    points = [1, SNAPSHOT_EVERY - 1, SNAPSHOT_EVERY, SNAPSHOT_EVERY + 1, 2 * SNAPSHOT_EVERY + 7, last]
    with_snapshots = {}
    store.history.forget()
    for seq in points:
        with_snapshots[seq] = await messages(client, cid, at_seq=seq)
    await store.history.flush()
    count = await store.pool.fetchval("SELECT count(*) FROM history_snapshots WHERE conversation_id = $1",
                                      uuid.UUID(cid))
    assert count == last // SNAPSHOT_EVERY  # reading wrote them
    await store.pool.execute("DELETE FROM history_snapshots WHERE conversation_id = $1", uuid.UUID(cid))
    store.history.forget()
    for seq in reversed(points):
        assert await messages(client, cid, at_seq=seq) == with_snapshots[seq]
    # and a snapshot of another fold version is ignored, not trusted
    await store.pool.execute("UPDATE history_snapshots SET version = version + 1 WHERE conversation_id = $1",
                             uuid.UUID(cid))
    store.history.forget()
    assert await messages(client, cid) == with_snapshots[last]


async def test_messages_follow_appends_through_the_cache(client):
    cid = await new_conversation(client)
    for i, event in enumerate(TURN):
        await append(client, cid, [event])
        body = await messages(client, cid)
        assert body["seq"] == 2 + i
        check_openai(body["messages"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=valid_event_sequences(max_events=30), data=st.data())
async def test_served_messages_equal_the_pure_fold_at_any_seq(store, principal, events, data):
    """Through the store (snapshots, cache, SQL) the answer is the pure fold's."""
    assume(b"\\u0000" not in orjson.dumps(events))  # PostgreSQL text cannot hold NUL (the API refuses it)
    conversation = await store.create_conversation(principal, data=events[0]["data"])
    cid = uuid.UUID(conversation["id"])
    if len(events) > 1:
        await store.append(principal, cid, [NewEvent(e["type"], e["data"]) for e in events[1:]])
    # jsonb keeps the decimal value of each JSON number, not its spelling nor
    # a binary float (4.161975913030909e16 comes back as the integer
    # 41619759130309090): the log holds the same JSON values...
    stored = await store.events_after(principal, cid, 0, len(events))
    assert ([(e["type"], json_value(e["data"])) for e in stored]
            == [(e["type"], json_value(e["data"])) for e in events])
    # ...and what is served is exactly the pure fold of the log
    seq = data.draw(st.integers(1, len(events)))
    for format in ("openai", "anthropic"):
        served = await store.messages(principal, cid, format, at_seq=seq)
        assert {k: v for k, v in served.items() if k != "conversation_id"} == \
               messages_at(stored, seq, format)


def json_value(value):
    """`value` with every number as the decimal its JSON text denotes."""
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_value(v) for v in value]
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    return value


async def test_after_a_fold_version_change_reads_write_new_snapshots_beside_the_old(client, store):
    """Snapshots of an older fold version must not block the new version's at the
    same seqs (they are keyed by version too), or every cold read would fold from seq 1."""
    from projections import history

    cid = await new_conversation(client)
    await append(client, cid, tool_turns(12, deltas=60))
    store.history.forget()
    await messages(client, cid)
    await store.history.flush()

    async def snapshots(version: int) -> int:
        return await store.pool.fetchval(
            "SELECT count(*) FROM history_snapshots WHERE conversation_id = $1 AND version = $2",
            uuid.UUID(cid), version)

    written = await snapshots(history.VERSION)
    assert written > 0
    # as if these had been written by the previous version of the fold
    await store.pool.execute("UPDATE history_snapshots SET version = version - 1 WHERE conversation_id = $1",
                             uuid.UUID(cid))
    store.history.forget()
    before = await messages(client, cid)
    await store.history.flush()
    assert await snapshots(history.VERSION) == written, "the current version's snapshots are written again"
    store.history.forget()
    assert await messages(client, cid) == before
