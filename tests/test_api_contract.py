"""The contract walk-through: every endpoint of the foundation, as a client sees it."""

from __future__ import annotations

import uuid

import pytest

from tests.helpers import TURN, asgi_client, assert_error, eventually, new_conversation


def with_ids(events, prefix):
    return [{**e, "id": f"{prefix}-{i}"} for i, e in enumerate(events)]


# -- conversations ------------------------------------------------------------

async def test_create_returns_the_conversation_with_seq_1(client):
    r = await client.post("/v1/conversations", json={"metadata": {"user": "u1"}, "system": "Be brief."})
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"id", "seq", "created_at", "updated_at", "metadata", "title", "open_turn_id"}
    assert uuid.UUID(body["id"]) and body["seq"] == 1 and body["metadata"] == {"user": "u1"}
    assert body["created_at"].endswith("Z") and body["title"] is None and body["open_turn_id"] is None
    events = (await client.get(f"/v1/conversations/{body['id']}/events")).json()["events"]
    assert [(e["seq"], e["type"]) for e in events] == [(1, "conversation.created")]
    assert events[0]["data"] == {"metadata": {"user": "u1"}, "system": "Be brief."}


async def test_create_with_the_same_id_twice_is_a_conflict(client):
    cid = str(uuid.uuid4())
    assert (await client.post("/v1/conversations", json={"id": cid})).json()["id"] == cid
    assert_error(await client.post("/v1/conversations", json={"id": cid}), 409, "conversation_exists")


@pytest.mark.parametrize("body, status, code", [
    ({"id": "not-a-uuid"}, 422, "invalid_request"),
    ({"metadata": "nope"}, 422, "invalid_request"),
    ({"colour": "blue"}, 422, "invalid_request"),
    ([1, 2], 400, "malformed_request"),
])
async def test_create_refuses_bad_bodies_in_the_error_shape(client, body, status, code):
    assert_error(await client.post("/v1/conversations", json=body), status, code)


async def test_malformed_json_is_400(client):
    r = await client.post("/v1/conversations", content=b'{"system": ', headers={"content-type": "application/json"})
    assert_error(r, 400, "malformed_json")


async def test_get_conversation_reflects_seq_title_and_open_turn(client):
    cid = await new_conversation(client)
    await client.post(f"/v1/conversations/{cid}/events", json={"events": TURN[:3] + [
        {"type": "conversation.titled", "data": {"title": "Paris weather"}}]})
    body = (await client.get(f"/v1/conversations/{cid}")).json()
    assert body["seq"] == 5 and body["title"] == "Paris weather" and body["open_turn_id"] == "t1"
    assert body["updated_at"] >= body["created_at"]


async def test_unknown_and_malformed_conversation_ids_are_404(client):
    assert_error(await client.get(f"/v1/conversations/{uuid.uuid4()}"), 404, "not_found")
    assert_error(await client.get("/v1/conversations/nope"), 404, "not_found")
    assert_error(await client.get("/v1/conversations/nope/events"), 404, "not_found")


async def test_list_is_newest_first_and_pages_with_before(client):
    ids = [await new_conversation(client) for _ in range(5)]
    first = (await client.get("/v1/conversations", params={"limit": 3})).json()
    assert [c["id"] for c in first["conversations"]] == ids[::-1][:3]
    assert first["next_before"] == ids[2]
    rest = (await client.get("/v1/conversations", params={"limit": 3, "before": first["next_before"]})).json()
    assert [c["id"] for c in rest["conversations"]] == ids[::-1][3:]
    assert rest["next_before"] is None


# -- appends ------------------------------------------------------------------

async def test_append_a_whole_turn_returns_stored_events(client):
    cid = await new_conversation(client)
    r = await client.post(f"/v1/conversations/{cid}/events", json={"expected_seq": 1, "events": TURN})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["last_seq"] == 1 + len(TURN)
    stored = body["events"]
    assert [e["seq"] for e in stored] == list(range(2, 2 + len(TURN)))
    assert [e["type"] for e in stored] == [e["type"] for e in TURN]
    assert [e["data"] for e in stored] == [e["data"] for e in TURN]
    for event in stored:
        assert set(event) == {"conversation_id", "seq", "position", "id", "type", "data", "created_at", "hash"}
        assert event["conversation_id"] == cid and uuid.UUID(event["id"])
    positions = [e["position"] for e in stored]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    read = (await client.get(f"/v1/conversations/{cid}/events")).json()
    assert read["events"][1:] == stored and read["last_seq"] == 1 + len(TURN) and read["has_more"] is False


async def test_retry_of_the_same_batch_returns_200_and_writes_nothing(client):
    cid = await new_conversation(client)
    batch = {"expected_seq": 1, "events": with_ids(TURN, "r")}
    first = await client.post(f"/v1/conversations/{cid}/events", json=batch)
    again = await client.post(f"/v1/conversations/{cid}/events", json=batch)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json() == first.json()
    assert [e["id"] for e in first.json()["events"]] == [f"r-{i}" for i in range(len(TURN))]
    read = (await client.get(f"/v1/conversations/{cid}/events")).json()
    assert len(read["events"]) == 1 + len(TURN)


async def test_id_reused_with_other_content_is_an_idempotency_conflict(client):
    cid = await new_conversation(client)
    await client.post(f"/v1/conversations/{cid}/events",
                      json={"events": [{"id": "m1", "type": "message.user", "data": {"content": "hi"}}]})
    r = await client.post(f"/v1/conversations/{cid}/events",
                          json={"events": [{"id": "m1", "type": "message.user", "data": {"content": "bye"}}]})
    assert assert_error(r, 409, "idempotency_conflict")["details"]["ids"] == ["m1"]
    # a new batch that reuses one old id among new ones is not a retry either
    r = await client.post(f"/v1/conversations/{cid}/events", json={"events": [
        {"id": "m1", "type": "message.user", "data": {"content": "hi"}},
        {"id": "m2", "type": "message.user", "data": {"content": "more"}}]})
    assert_error(r, 409, "idempotency_conflict")
    assert (await client.get(f"/v1/conversations/{cid}")).json()["seq"] == 2


async def test_expected_seq_behind_is_a_seq_conflict_with_current_seq(client):
    cid = await new_conversation(client)
    await client.post(f"/v1/conversations/{cid}/events", json={"events": TURN[:1]})
    r = await client.post(f"/v1/conversations/{cid}/events", json={"expected_seq": 1, "events": TURN[1:2]})
    error = assert_error(r, 409, "seq_conflict")
    assert error["details"] == {"current_seq": 2}


async def test_a_batch_breaking_a_rule_names_index_and_rule_and_writes_nothing(client):
    cid = await new_conversation(client)
    bad = TURN[:3] + [{"type": "message.user", "data": {"content": "interrupting"}}] + TURN[3:]
    error = assert_error(await client.post(f"/v1/conversations/{cid}/events", json={"events": bad}),
                         422, "invalid_event")
    assert error["details"]["index"] == 3 and error["details"]["rule"] == "no_message_during_turn"
    assert "3" in error["message"]
    assert (await client.get(f"/v1/conversations/{cid}")).json()["seq"] == 1


@pytest.mark.parametrize("event, rule", [
    ({"type": "no.such.type", "data": {}}, "known_type"),
    ({"type": "text.delta", "data": {"turn_id": "t1", "text": 5}}, "data_shape"),
    ({"type": "tool.result", "data": {"tool_call_id": "c", "content": "x", "status": "done"}}, "data_shape"),
    ({"type": "message.user", "data": {"content": "x", "extra": 1}}, "data_shape"),
    ({"type": "message.user"}, "data_shape"),
    ({"data": {}}, "event_shape"),
    ("not an object", "event_shape"),
    ({"type": "conversation.created", "data": {}}, "created_is_seq_1"),
    ({"type": "text.delta", "data": {"turn_id": "t9", "text": "x"}}, "needs_open_turn"),
    ({"type": "message.user", "data": {"content": "nul \u0000 inside"}}, "no_nul"),
])
async def test_malformed_or_unknown_events_are_422_with_their_index(client, event, rule):
    cid = await new_conversation(client)
    ok = {"type": "message.user", "data": {"content": "fine"}}
    r = await client.post(f"/v1/conversations/{cid}/events", json={"events": [ok, event]})
    error = assert_error(r, 422, "invalid_event")
    assert error["details"]["index"] == 1 and error["details"]["rule"] == rule
    assert (await client.get(f"/v1/conversations/{cid}")).json()["seq"] == 1


async def test_duplicate_ids_inside_one_batch_are_refused(client):
    cid = await new_conversation(client)
    r = await client.post(f"/v1/conversations/{cid}/events", json={"events": [
        {"id": "x", "type": "message.user", "data": {"content": "a"}},
        {"id": "x", "type": "message.user", "data": {"content": "b"}}]})
    assert assert_error(r, 422, "invalid_event")["details"]["index"] == 1


@pytest.mark.parametrize("body, status, code", [
    ({"events": []}, 422, "invalid_request"),
    ({"events": "x"}, 422, "invalid_request"),
    ({}, 422, "invalid_request"),
    ({"events": [], "expected_seq": "1"}, 422, "invalid_request"),
    ("[]", 400, "malformed_request"),
])
async def test_bad_append_envelopes_are_refused(client, body, status, code):
    cid = await new_conversation(client)
    assert_error(await client.post(f"/v1/conversations/{cid}/events", json=body), status, code)


async def test_limits_are_413_with_clear_errors(make_client):
    client = make_client(max_batch_events=3, max_event_bytes=100, max_body_bytes=2000)
    cid = await new_conversation(client)
    msg = {"type": "message.user", "data": {"content": "x"}}
    error = assert_error(await client.post(f"/v1/conversations/{cid}/events", json={"events": [msg] * 4}),
                         413, "too_many_events")
    assert error["details"]["limit"] == 3
    big = {"type": "message.user", "data": {"content": "x" * 200}}
    error = assert_error(await client.post(f"/v1/conversations/{cid}/events", json={"events": [msg, big]}),
                         413, "event_too_large")
    assert error["details"]["index"] == 1
    huge = {"events": [{"type": "message.user", "data": {"content": "x" * 5000}}]}
    assert_error(await client.post(f"/v1/conversations/{cid}/events", json=huge), 413, "body_too_large")
    assert (await client.get(f"/v1/conversations/{cid}")).json()["seq"] == 1


# -- reading back ---------------------------------------------------------------

async def test_compact_read_merges_delta_runs_and_keeps_first_seq(client):
    cid = await new_conversation(client)
    await client.post(f"/v1/conversations/{cid}/events", json={"events": TURN})
    plain = (await client.get(f"/v1/conversations/{cid}/events")).json()["events"]
    compacted = (await client.get(f"/v1/conversations/{cid}/events", params={"compact": "true"})).json()
    types = [e["type"] for e in compacted["events"]]
    assert types == ["conversation.created", "message.user", "turn.started", "text.delta", "tool_call.started",
                     "tool_call.delta", "tool_call.completed", "turn.finished", "tool.result"]
    text = compacted["events"][3]
    assert text["data"]["text"] == "Let me check." and text["data"]["first_seq"] == 4 and text["seq"] == 5
    args = compacted["events"][5]
    assert args["data"] == {"tool_call_id": "call_1", "text": '{"city":"Paris"}', "first_seq": 7}
    assert args["seq"] == 8 and args["position"] == plain[7]["position"]
    assert compacted["last_seq"] == plain[-1]["seq"]


async def test_reading_pages_with_after_and_limit(client):
    cid = await new_conversation(client)
    await client.post(f"/v1/conversations/{cid}/events", json={"events": TURN})
    seen, after = [], 0
    while True:
        page = (await client.get(f"/v1/conversations/{cid}/events", params={"after": after, "limit": 4})).json()
        seen += [e["seq"] for e in page["events"]]
        after = page["last_seq"]
        if not page["has_more"]:
            break
    assert seen == list(range(1, 2 + len(TURN)))


async def test_feed_lists_the_principals_events_in_position_order(client):
    a = await new_conversation(client)
    b = await new_conversation(client)
    await client.post(f"/v1/conversations/{a}/events", json={"events": TURN[:2]})
    await client.post(f"/v1/conversations/{b}/events", json={"events": TURN[:1]})
    # The feed waits for every older transaction on the server (other test
    # runs share it) to end: poll until ours are below the watermark.
    async def our_events_in_the_feed():
        feed = (await client.get("/v1/events", params={"after_position": 0})).json()
        return feed if len(feed["events"]) >= 5 else None

    feed = await eventually(our_events_in_the_feed, "the five events to reach the feed", timeout=30, interval=0.05)
    got = [(e["conversation_id"], e["seq"]) for e in feed["events"]]
    assert got == [(a, 1), (b, 1), (a, 2), (a, 3), (b, 2)]
    assert feed["last_position"] == feed["events"][-1]["position"]
    later = (await client.get("/v1/events", params={"after_position": feed["last_position"]})).json()
    assert later["events"] == [] and later["last_position"] == feed["last_position"]


# -- tenants and auth -------------------------------------------------------------

async def test_another_principal_gets_404_everywhere(client, bob):
    cid = await new_conversation(client)
    await client.post(f"/v1/conversations/{cid}/events", json={"events": TURN[:2]})
    assert_error(await bob.get(f"/v1/conversations/{cid}"), 404, "not_found")
    assert_error(await bob.get(f"/v1/conversations/{cid}/events"), 404, "not_found")
    assert_error(await bob.post(f"/v1/conversations/{cid}/events", json={"events": TURN[2:3]}), 404, "not_found")
    assert (await bob.get("/v1/conversations")).json()["conversations"] == []
    assert (await bob.get("/v1/events")).json()["events"] == []
    # and bob cannot learn it exists by trying to reuse an event id
    assert (await client.get(f"/v1/conversations/{cid}")).json()["seq"] == 3


async def test_missing_or_unknown_key_is_401(make_client, keys, principal):
    api_keys = f"{keys['alice']}=alice-{principal}"
    assert_error(await make_client(api_keys=api_keys).get("/v1/conversations"), 401, "unauthorized")
    stranger = make_client(api_keys=api_keys, headers={"Authorization": "Bearer wrong"})
    assert_error(await stranger.get("/v1/events"), 401, "unauthorized")
    basic = make_client(api_keys=api_keys, headers={"Authorization": f"Basic {keys['alice']}"})
    assert_error(await basic.get("/v1/events"), 401, "unauthorized")


async def test_open_mode_needs_no_key(make_client):
    client = make_client(api_keys="")
    cid = await new_conversation(client)
    assert (await client.get(f"/v1/conversations/{cid}")).status_code == 200


# -- health and unknown routes ------------------------------------------------------

async def test_health_and_readiness(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}


async def test_unknown_routes_and_methods_use_the_error_shape(client):
    assert_error(await client.get("/v1/nothing"), 404, "not_found")
    assert_error(await client.delete("/v1/conversations"), 405, "method_not_allowed")


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": "many"}, {"after": -1}, {"compact": "maybe"}])
async def test_bad_query_parameters_are_422(client, params):
    cid = await new_conversation(client)
    assert_error(await client.get(f"/v1/conversations/{cid}/events", params=params), 422, "invalid_request")


async def test_an_unreachable_store_is_503_not_500(database_url):
    from api.app import create_app
    from api.settings import Settings
    from store import Store

    store = await Store.open(database_url, pool_size=2, writers=1)
    app = create_app(Settings(database_url=None, api_keys=""), store=store)
    client = asgi_client(app)
    cid = await new_conversation(client)
    await store.pool.close()  # as if PostgreSQL went away
    try:
        assert_error(await client.get(f"/v1/conversations/{cid}"), 503, "store_unavailable")
        assert_error(await client.post(f"/v1/conversations/{cid}/events", json={"events": TURN[:1]}),
                     503, "store_unavailable")
        assert_error(await client.get("/readyz"), 503, "store_unavailable")
        assert (await client.get("/healthz")).status_code == 200
    finally:
        await store.listener.close()
        await store.writer.close()
        await client.aclose()


async def test_cors_allows_only_the_configured_origins(make_client):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization,last-event-id"}
    closed = make_client(api_keys="")
    r = await closed.options("/v1/conversations", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = await closed.get("/healthz", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers

    opened = make_client(api_keys="", cors_origins="https://app.example, https://other.example")
    r = await opened.options("/v1/conversations", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "last-event-id" in r.headers["access-control-allow-headers"].lower()
    r = await opened.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


async def test_a_browser_on_an_allowed_origin_reads_its_appends_and_their_errors(make_client):
    client = make_client(api_keys="", cors_origins="https://app.example")
    cid = await new_conversation(client)
    allowed, other = {"Origin": "https://app.example"}, {"Origin": "https://evil.example"}
    r = await client.post(f"/v1/conversations/{cid}/events", json={"events": TURN[:1]}, headers=allowed)
    assert r.status_code == 201 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = await client.post(f"/v1/conversations/{cid}/events", json={"events": TURN[2:3]}, headers=allowed)
    assert_error(r, 422, "invalid_event")
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = await client.post(f"/v1/conversations/{cid}/events", json={"events": TURN[1:2]}, headers=other)
    assert r.status_code == 201 and "access-control-allow-origin" not in r.headers
