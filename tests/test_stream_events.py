"""SSE streams with format=events, against real `chatlog serve` processes.

What a reader relies on: resuming after any frame id it received delivers
exactly the frames after it (across drops, other processes and a SIGKILL),
nothing is sent before it is committed, heartbeats are comments, turn streams
end with their turn, and stream tokens open one conversation's streams only.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.helpers import (Comment, Frame, Retry, a_long_turn_to_write, append, eventually, frame_seq,
                           new_conversation, read_a_long_turn_across_a_kill9, read_a_long_turn_while_dropping,
                           seeded_rng, stored_events)
from tests.servers import ResumingReader, open_sse

pytest_plugins = ("tests.servers",)

DELTAS = {"text.delta": "turn_id", "reasoning.delta": "turn_id", "tool_call.delta": "tool_call_id"}


# -- helpers ----------------------------------------------------------------------


def assert_frames_are_the_log(frames: list[Frame], stored: dict[int, dict], after: int, last: int,
                              compacted: bool) -> dict[str, int]:
    """The frames, concatenated, are the stored events after..last: every seq
    exactly once, in order, data equal. A compacted frame covers first_seq..seq
    of one run, its text the run's texts joined. Returns counts by frame kind."""
    kinds = {"single": 0, "merged": 0, "live_delta": 0}
    expected = after + 1
    for frame in frames:
        event = frame.json()
        seq = frame_seq(frame)
        assert frame.id == str(seq) and event["seq"] == seq and frame.event == event["type"], frame
        first = event["data"].get("first_seq", seq) if event["type"] in DELTAS else seq
        assert first == expected, (f"frame {frame.id} covers {first}..{seq}, but the next seq due is {expected}: "
                                   + ("repeated" if first < expected else "missed"))
        if "first_seq" not in event["data"]:
            assert event == stored[seq], f"frame {frame.id} differs from the stored event"
            kinds["live_delta" if event["type"] in DELTAS else "single"] += 1
        else:
            assert compacted, f"frame {frame.id} is compacted but compact=false was asked"
            run = [stored[s] for s in range(first, seq + 1)]
            key = DELTAS[event["type"]]
            assert {(e["type"], e["data"][key]) for e in run} == {(event["type"], event["data"][key])}, \
                f"frame {frame.id} merges events of different runs"
            merged = {**stored[seq], "data": {**run[0]["data"], "text": "".join(e["data"]["text"] for e in run),
                                              "first_seq": first}}
            assert event == merged, f"frame {frame.id} is not the merge of seqs {first}..{seq}"
            kinds["merged" if first < seq else "single"] += 1
        expected = seq + 1
    assert expected == last + 1, f"the frames end at seq {expected - 1}, the log at {last}"
    return kinds


# -- resume exactness ---------------------------------------------------------------


@pytest.mark.parametrize("compact", [False, True], ids=["compact=false", "compact=true"])
async def test_resume_after_random_drops_delivers_every_event_once_in_order(chatlog_servers, compact):
    async with chatlog_servers[0].client() as client:
        reader, stored, last = await read_a_long_turn_while_dropping(
            client, {"compact": str(compact).lower()}, lambda frame, last: frame_seq(frame) >= last)

    assert len(stored) == last >= 400
    assert reader.drops >= 50, f"only {reader.drops} drops"
    kinds = assert_frames_are_the_log(reader.frames, stored, 0, last, compacted=compact)
    print(f"{last} events, {len(reader.frames)} frames, {reader.connections} connections, {reader.drops} drops, "
          f"frames by kind {kinds}")
    if compact:
        assert kinds["merged"] > 0, "no catch-up run was compacted"
        assert kinds["live_delta"] > 0, "no delta arrived live (one by one)"


async def test_live_events_cross_processes_and_a_reader_survives_kill9(chatlog_servers, start_server):
    """Append through A while reading from B (live, via B's own LISTEN); SIGKILL
    B mid-turn; the reader resumes on A with Last-Event-ID: nothing missed,
    nothing repeated."""
    b = await start_server("B-killed")
    run = await read_a_long_turn_across_a_kill9(chatlog_servers[0], b, {"compact": "false"}, kill_after=40,
                                                done=lambda frame, last: frame_seq(frame) >= last)

    assert not b.alive and run.killed_at is not None and len(run.on_b) >= 40
    assert run.killed_at < run.last - 20, "B must die mid-turn"
    assert run.reader.connections == 2, "one connection to B, then one to A"
    assert_frames_are_the_log(run.reader.frames, run.stored, 0, run.last, compacted=False)


async def test_a_lost_listen_connection_loses_no_event(chatlog_servers, store):
    """PostgreSQL drops every LISTEN connection mid-turn (a failover, an admin's
    pg_terminate_backend): the notifications sent meanwhile are lost, yet the
    reader gets every event exactly once; the server says it reconnected."""
    a = chatlog_servers[0]
    rng = seeded_rng()
    async with a.client() as client:
        writer = await a_long_turn_to_write(client, rng, at_least=120)
        cid, start, last = writer.cid, writer.start, writer.last
        reader = ResumingReader([client], f"/v1/conversations/{cid}/stream", params={"compact": "false"})
        terminated = []

        async def terminate_listeners():
            await eventually(lambda: writer.received >= start + 40, f"the reader to receive seq {start + 40}",
                             timeout=30, interval=0.005)
            terminated.append(await store.pool.fetchval(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                    WHERE datname = current_database() AND application_name = 'chatlog-listener'"""))

        await asyncio.wait_for(asyncio.gather(
            writer.run(), terminate_listeners(),
            reader.run(done=lambda f: frame_seq(f) >= last, on_frame=writer.saw)), 60)
        stored = await stored_events(client, cid)

    assert terminated[0] >= 2, "A's and B's listeners at least"
    assert reader.connections == 1
    assert_frames_are_the_log(reader.frames, stored, 0, last, compacted=False)
    assert "listener reconnected" in a.log_text()


# -- the rules of the stream --------------------------------------------------------


async def test_last_event_id_wins_over_after(chatlog_servers):
    async with chatlog_servers[0].client() as client:
        cid = await new_conversation(client)
        await append(client, cid, [{"type": "message.user", "data": {"content": str(i)}} for i in range(8)])
        path = f"/v1/conversations/{cid}/stream"
        async with open_sse(client, path, params={"after": "2", "follow": "false"}, last_event_id="6") as s:
            from_header = [f.id async for f in s.frames()]
        async with open_sse(client, path, params={"after": "2", "follow": "false"}) as s:
            from_after = [f.id async for f in s.frames()]
    assert from_header == ["7", "8", "9"]
    assert from_after == [str(i) for i in range(3, 10)]


async def test_retry_comes_first_and_heartbeats_are_comments(chatlog_servers):
    async with chatlog_servers[1].client() as client:
        cid = await new_conversation(client)
        items = []
        async with open_sse(client, f"/v1/conversations/{cid}/stream") as s:
            assert s.response.headers["content-type"].startswith("text/event-stream")
            async for item in s.items():
                items.append(item)
                if sum(isinstance(i, Comment) for i in items) == 3:
                    break
    assert isinstance(items[0], Retry) and items[0].ms > 0
    assert [type(i) for i in items[1:]] == [Frame, Comment, Comment, Comment]
    assert items[1].id == "1" and items[1].event == "conversation.created"
    assert {i.text for i in items if isinstance(i, Comment)} == {"ping"}


async def test_follow_false_ends_after_the_catch_up(chatlog_servers):
    async with chatlog_servers[0].client() as client:
        cid = await new_conversation(client)
        await append(client, cid, [{"type": "message.user", "data": {"content": "hi"}},
                                   {"type": "turn.started", "data": {"turn_id": "t1"}},
                                   {"type": "text.delta", "data": {"turn_id": "t1", "text": "a"}},
                                   {"type": "text.delta", "data": {"turn_id": "t1", "text": "b"}}])
        # the turn is open: follow=false still ends right after what is stored
        async with open_sse(client, f"/v1/conversations/{cid}/stream", params={"follow": "false"}) as s:
            items = await s.read_all()
    frames = [i for i in items if isinstance(i, Frame)]
    assert isinstance(items[0], Retry)
    assert [(f.id, f.event) for f in frames] == [("1", "conversation.created"), ("2", "message.user"),
                                                 ("3", "turn.started"), ("5", "text.delta")]
    assert frames[-1].json()["data"] == {"turn_id": "t1", "text": "ab", "first_seq": 4}


TURN_1 = [{"type": "message.user", "data": {"content": "one"}},
          {"type": "turn.started", "data": {"turn_id": "t1"}},
          {"type": "text.delta", "data": {"turn_id": "t1", "text": "x"}},
          {"type": "text.delta", "data": {"turn_id": "t1", "text": "y"}},
          {"type": "turn.finished", "data": {"turn_id": "t1", "finish_reason": "stop"}},
          {"type": "message.user", "data": {"content": "two"}},
          {"type": "turn.started", "data": {"turn_id": "t2"}},
          {"type": "text.delta", "data": {"turn_id": "t2", "text": "z"}}]  # seqs 2..9: t1 is 3..6, t2 8.. (open)


async def test_turn_stream_replays_a_finished_turn_and_ends(chatlog_servers):
    async with chatlog_servers[0].client() as client:
        cid = await new_conversation(client)
        await append(client, cid, TURN_1)
        async with open_sse(client, f"/v1/conversations/{cid}/turns/t1/stream", params={"compact": "false"}) as s:
            ids = [(f.id, f.event) async for f in s.frames()]
        assert ids == [("3", "turn.started"), ("4", "text.delta"), ("5", "text.delta"), ("6", "turn.finished")]
        # resuming inside the turn gives the rest of it
        async with open_sse(client, f"/v1/conversations/{cid}/turns/t1/stream", last_event_id="4") as s:
            assert [f.id async for f in s.frames()] == ["5", "6"]


async def test_turn_stream_follows_an_open_turn_until_it_closes(chatlog_servers):
    async with chatlog_servers[0].client() as client:
        cid = await new_conversation(client)
        await append(client, cid, TURN_1)
        got: list[tuple[str, str]] = []
        async with open_sse(client, f"/v1/conversations/{cid}/turns/t2/stream", params={"compact": "false"}) as s:
            async for frame in s.frames():
                got.append((frame.id, frame.event))
                if frame.id == "9":  # caught up: the rest is live
                    await append(client, cid, [
                        {"type": "text.delta", "data": {"turn_id": "t2", "text": "w"}},
                        {"type": "turn.cancelled", "data": {"turn_id": "t2", "reason": "user"}},
                        {"type": "message.user", "data": {"content": "after the turn"}}])
            # the loop ended: the response ended by itself after the closing event
    assert got == [("8", "turn.started"), ("9", "text.delta"), ("10", "text.delta"), ("11", "turn.cancelled")]


async def test_turn_stream_resumed_after_its_last_frame_sends_nothing_more(chatlog_servers):
    """A browser that reconnects after the turn's closing frame must not get
    the events of later turns as if they were this turn's."""
    async with chatlog_servers[0].client() as client:
        cid = await new_conversation(client)
        await append(client, cid, TURN_1)
        async with open_sse(client, f"/v1/conversations/{cid}/turns/t1/stream", last_event_id="6",
                            params={"compact": "false"}) as s:
            items = await asyncio.wait_for(s.read_all(), 10)
        assert [f.id for f in items if isinstance(f, Frame)] == []
        # the same in format=ui, after the last frame of the closing event
        async with open_sse(client, f"/v1/conversations/{cid}/turns/t1/stream", last_event_id="6",
                            params={"format": "ui"}) as s:
            items = await asyncio.wait_for(s.read_all(), 10)
        assert [f.id for f in items if isinstance(f, Frame) and f.data != "[DONE]"] == []


async def test_unknown_turn_and_other_principals_get_404(chatlog_servers):
    a, b = chatlog_servers
    async with a.client("alice") as alice, b.client("bob") as bob:
        cid = await new_conversation(alice)
        await append(alice, cid, TURN_1)
        r = await alice.get(f"/v1/conversations/{cid}/turns/nope/stream")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        for path in (f"/v1/conversations/{cid}/stream", f"/v1/conversations/{cid}/turns/t1/stream"):
            r = await bob.get(path, params={"follow": "false"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        r = await bob.post(f"/v1/conversations/{cid}/stream-token")
        assert r.status_code == 404


# -- stream tokens ------------------------------------------------------------------


async def test_stream_token_opens_that_conversations_streams_only(chatlog_servers):
    a, b = chatlog_servers
    async with a.client() as alice, a.client(principal=None) as anonymous_a, \
            b.client(principal=None) as anonymous_b:
        cid = await new_conversation(alice)
        other = await new_conversation(alice)
        await append(alice, cid, TURN_1)
        r = await alice.post(f"/v1/conversations/{cid}/stream-token")
        assert r.status_code == 201, r.text
        token = r.json()["token"]
        assert r.json()["expires_at"].endswith("Z")

        # the stream endpoints of THAT conversation, on any process
        for client in (anonymous_a, anonymous_b):
            async with open_sse(client, f"/v1/conversations/{cid}/stream",
                                params={"token": token, "follow": "false"}) as s:
                assert s.response.status_code == 200
                assert [f.id async for f in s.frames()][-1] == "9"
        async with open_sse(anonymous_a, f"/v1/conversations/{cid}/turns/t1/stream", params={"token": token}) as s:
            assert s.response.status_code == 200
            assert [f.id async for f in s.frames()][-1] == "6"
        # a parameter name the app decodes is a token too, and is kept out of the log all the same
        r = await anonymous_a.get(f"/v1/conversations/{cid}/stream?%74oken={token}&follow=false")
        assert r.status_code == 200

        # nowhere else
        refused = [("GET", f"/v1/conversations/{other}/stream"),
                   ("GET", f"/v1/conversations/{other}/turns/t1/stream"),
                   ("GET", f"/v1/conversations/{cid}/events"),
                   ("GET", f"/v1/conversations/{cid}"),
                   ("GET", f"/v1/conversations/{cid}/messages"),
                   ("GET", "/v1/conversations"),
                   ("GET", "/v1/events"),
                   ("POST", f"/v1/conversations/{cid}/stream-token"),
                   ("POST", f"/v1/conversations/{cid}/events")]
        for method, path in refused:
            r = await anonymous_a.request(method, path, params={"token": token, "follow": "false"},
                                          json={"events": [{"type": "message.user", "data": {"content": "x"}}]}
                                          if method == "POST" else None)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
        # a forged or mangled token is refused too
        r = await anonymous_a.get(f"/v1/conversations/{cid}/stream", params={"token": token[:-2] + "xx"})
        assert r.status_code == 401

    for server in (a, b):
        log = server.log_text()
        assert "token=[redacted]" in log, "the access log should show the (redacted) requests"
        assert token not in log and token.split(".")[1] not in log, f"the token is in {server.name}'s log"


async def test_expired_stream_token_is_refused(start_server):
    server = await start_server("short-tokens", CHATLOG_STREAM_TOKEN_TTL_SECONDS="1")
    async with server.client() as alice, server.client(principal=None) as anonymous:
        cid = await new_conversation(alice)
        r = await alice.post(f"/v1/conversations/{cid}/stream-token")
        assert r.status_code == 201
        token = r.json()["token"]
        await asyncio.sleep(2.2)  # past expires_at (whole seconds), not a timing assertion
        r = await anonymous.get(f"/v1/conversations/{cid}/stream", params={"token": token, "follow": "false"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert token not in server.log_text()


# -- nothing before commit ----------------------------------------------------------


async def test_nothing_is_streamed_before_it_is_committed(chatlog_servers, store, monkeypatch):
    """An append's transaction is held open after its rows are inserted (its
    NOTIFY queued): no process streams them until COMMIT, and a transaction
    that rolls back is never streamed at all."""
    from store import NewEvent
    from store import appends as store_appends

    a, b = chatlog_servers
    async with a.client() as client_a, b.client() as client_b:
        cid = await new_conversation(client_a)
        await append(client_a, cid, [{"type": "message.user", "data": {"content": "hi"}},
                                     {"type": "turn.started", "data": {"turn_id": "t1"}}])  # seq 3
        stream = f"/v1/conversations/{cid}/stream"

        inserted, release = asyncio.Event(), asyncio.Event()
        held = {"rows": None, "roll_back": False}
        real_write = store_appends._write  # a group's appends, all inserted by one statement

        async def held_write(tx, heads):
            stored = await real_write(tx, heads)
            if any(str(head.conversation_id) == cid for head in heads):
                conversation_id = uuid.UUID(cid)
                held["rows"] = await tx.conn.fetchval(
                    "SELECT count(*) FROM events WHERE conversation_id = $1 AND seq > 3", conversation_id)
                inserted.set()
                await release.wait()
                if held["roll_back"]:
                    raise RuntimeError("this transaction rolls back")
            return stored

        monkeypatch.setattr(store_appends, "_write", held_write)

        async def frames_during_two_heartbeats(client) -> list[Frame]:
            """Follow after seq 3 for two heartbeats (each makes the tail re-read the store)."""
            frames, pings = [], 0
            async with open_sse(client, stream, last_event_id="3") as s:
                async for item in s.items():
                    frames += [item] if isinstance(item, Frame) else []
                    pings += isinstance(item, Comment)
                    if pings == 2:
                        return frames

        # one reader follows from before the first transaction to after the second
        async with open_sse(client_b, stream, last_event_id="3") as follower:
            for roll_back, texts in ((True, ["rolled", "back"]), (False, ["seen", "after commit"])):
                inserted.clear(), release.clear()
                held["roll_back"] = roll_back
                appending = asyncio.create_task(
                    store.append("alice", uuid.UUID(cid), [NewEvent("text.delta", {"turn_id": "t1", "text": t})
                                                           for t in texts]))
                await asyncio.wait_for(inserted.wait(), 10)
                assert held["rows"] == 2, "the rows are in the table, inside the open transaction"
                # while it is open: new followers on both processes, a catch-up, the read API: nothing
                for frames in await asyncio.wait_for(asyncio.gather(
                        frames_during_two_heartbeats(client_a), frames_during_two_heartbeats(client_b)), 20):
                    assert frames == [], f"streamed before commit: {frames}"
                async with open_sse(client_a, stream, params={"follow": "false"}) as s:
                    assert [f.id async for f in s.frames()][-1] == "3"
                assert (await client_a.get(f"/v1/conversations/{cid}")).json()["seq"] == 3
                release.set()
                if roll_back:
                    with pytest.raises(RuntimeError):
                        await appending
                else:
                    await appending
            got = []
            async for frame in follower.frames():
                got.append((frame.id, frame.json()["data"]["text"]))
                if len(got) == 2:
                    break
        assert got == [("4", "seen"), ("5", "after commit")]
        stored = await stored_events(client_a, cid)
        assert len(stored) == 5 and [stored[s]["data"]["text"] for s in (4, 5)] == ["seen", "after commit"]
