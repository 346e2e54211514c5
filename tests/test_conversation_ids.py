"""Conversation ids are scoped to their principal: another tenant's id is just a free id."""

from __future__ import annotations

import uuid


async def test_creating_or_forking_into_another_tenants_id_looks_like_a_free_id(client, bob):
    cid = str(uuid.uuid4())
    r = await client.post("/v1/conversations", json={"id": cid, "system": "alice's"})
    assert r.status_code == 201
    await client.post(f"/v1/conversations/{cid}/events",
                      json={"events": [{"type": "message.user", "data": {"content": "alice only"}}]})

    # bob, knowing alice's id, creates it: exactly what a free id gives him
    r = await bob.post("/v1/conversations", json={"id": cid, "system": "bob's"})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == cid and r.json()["seq"] == 1
    # and the same id again is his own conflict, as for anyone's own id
    r = await bob.post("/v1/conversations", json={"id": cid})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conversation_exists"

    # a fork into alice's id, by bob, from a conversation of his: a free id too
    other = str(uuid.uuid4())
    assert (await client.post("/v1/conversations", json={"id": other})).status_code == 201
    source = (await bob.post("/v1/conversations", json={})).json()["id"]
    r = await bob.post(f"/v1/conversations/{source}/fork", json={"at_seq": 1, "id": other})
    assert r.status_code == 201, r.text

    # each sees only their own conversation under that id
    alices = (await client.get(f"/v1/conversations/{cid}/events")).json()["events"]
    bobs = (await bob.get(f"/v1/conversations/{cid}/events")).json()["events"]
    assert [e["data"].get("system") for e in alices[:1]] == ["alice's"]
    assert [e["type"] for e in alices] == ["conversation.created", "message.user"]
    assert [e["data"].get("system") for e in bobs] == ["bob's"]
    assert [(m["role"], m["content"]) for m in
            (await bob.get(f"/v1/conversations/{cid}/messages")).json()["messages"]] == [("system", "bob's")]
    feed = (await bob.get("/v1/events")).json()["events"]
    assert "alice only" not in str(feed)
    assert {e["conversation_id"] for e in feed} == {cid, source, other}


async def test_live_readers_of_two_tenants_with_one_id_each_get_only_their_own(store, principal):
    import asyncio

    from store import NewEvent

    cid = uuid.uuid4()
    alice, bob = f"{principal}-a", f"{principal}-b"
    await store.create_conversation(alice, cid)
    await store.create_conversation(bob, cid)
    got: list[dict] = []

    async def follow_bob() -> None:
        async for events in store.follow(bob, cid, 1, heartbeat=60):
            got.extend(events)
            if any(e["data"].get("content") == "bob's" for e in events):
                return

    reader = asyncio.create_task(follow_bob())
    await asyncio.sleep(0.1)
    await store.append(alice, cid, [NewEvent("message.user", {"content": "alice's"})] * 3)
    await store.append(bob, cid, [NewEvent("message.user", {"content": "bob's"})])
    await asyncio.wait_for(reader, 10)
    assert [(e["seq"], e["data"]["content"]) for e in got] == [(2, "bob's")]
