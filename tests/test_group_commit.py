"""Appends that share a group-commit transaction answer exactly as if they had been made one at a
time, in arrival order: several appends to one conversation see each other (seq, rule state,
event ids), a refused one changes nothing for the ones after it, and a retry of a batch earlier in
the same group is answered with that batch's events."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store import IdempotencyConflict, InvalidEvent, NewEvent, SeqConflict, Store, StoreError, create_pool
from tests.helpers import all_events, new_store_conversation


@pytest.fixture(scope="module")
async def one_writer(database_url):
    """A store with one writer task: appends submitted in the same tick form ONE group."""
    store = Store(await create_pool(database_url, min_size=1, max_size=3), writers=1)
    yield store
    await store.close()


async def in_one_group(store: Store, calls: list) -> list:
    """Submit every (principal, cid, events, expected_seq) in the same tick; answers or refusals."""
    return await asyncio.gather(*(store.append(p, c, events, expected_seq=x) for p, c, events, x in calls),
                                return_exceptions=True)


def xid(event: dict) -> int:
    return event["position"] >> 16


def user(text: str, id: str | None = None) -> NewEvent:
    return NewEvent("message.user", {"content": text}, id)


def started(turn: str) -> NewEvent:
    return NewEvent("turn.started", {"turn_id": turn})


def delta(turn: str, text: str) -> NewEvent:
    return NewEvent("text.delta", {"turn_id": turn, "text": text})


def finished(turn: str) -> NewEvent:
    return NewEvent("turn.finished", {"turn_id": turn, "finish_reason": "stop"})


async def test_appends_to_one_conversation_in_one_group_run_in_arrival_order_each_on_the_last_ones_state(
        one_writer, principal):
    cid = await new_store_conversation(one_writer, principal)
    answers = await in_one_group(one_writer, [
        (principal, cid, [user("hi"), started("t1")], 1),
        (principal, cid, [delta("t1", "a"), delta("t1", "b")], 3),  # the seq the first one left
        (principal, cid, [finished("t1")], None),
        (principal, cid, [started("t1")], None),  # its id was used by the first append: refused
        (principal, cid, [user("after"), started("t2")], 6),
    ])
    refused = answers[3]
    assert isinstance(refused, InvalidEvent) and refused.details["rule"] == "turn_id_unique"
    good = [a for a in answers if not isinstance(a, BaseException)]
    assert len(good) == 4, answers
    assert [[e["seq"] for e in a.events] for a in good] == [[2, 3], [4, 5], [6], [7, 8]]
    assert len({xid(e) for a in good for e in a.events}) == 1, "precondition: one transaction"
    assert len({e["created_at"] for a in good for e in a.events}) == 1  # one moment per group and conversation
    stored = await all_events(one_writer, principal, cid)
    assert stored[1:] == [e for a in good for e in a.events]
    conversation = await one_writer.get_conversation(principal, cid)
    assert conversation["seq"] == 8 and conversation["open_turn_id"] == "t2"


async def test_a_refused_append_in_a_group_leaves_the_state_the_next_one_sees_untouched(one_writer, principal):
    cid = await new_store_conversation(one_writer, principal)
    answers = await in_one_group(one_writer, [
        (principal, cid, [started("t1"), delta("t1", "x")], None),
        # opens nothing (breaks a rule on its last event), so t2 stays free and t1 stays open
        (principal, cid, [finished("t1"), started("t2"), user("during a turn")], None),
        (principal, cid, [user("stale")], 1),  # seq 1 is long gone
        (principal, cid, [delta("t1", "y"), finished("t1")], 3),  # the seq the first one left
        (principal, cid, [started("t2"), finished("t2")], None),
    ])
    assert isinstance(answers[1], InvalidEvent) and answers[1].details["rule"] == "no_message_during_turn"
    assert isinstance(answers[2], SeqConflict) and answers[2].details["current_seq"] == 3
    assert [[e["seq"] for e in answers[i].events] for i in (0, 3, 4)] == [[2, 3], [4, 5], [6, 7]]
    stored = await all_events(one_writer, principal, cid)
    assert [e["type"] for e in stored] == ["conversation.created", "turn.started", "text.delta", "text.delta",
                                           "turn.finished", "turn.started", "turn.finished"]
    assert (await one_writer.get_conversation(principal, cid))["open_turn_id"] is None


async def test_a_retry_in_the_same_group_as_its_original_gets_the_originals_events(one_writer, principal):
    cid = await new_store_conversation(one_writer, principal)
    batch = [user("one", "e-1"), user("two", "e-2")]
    answers = await in_one_group(one_writer, [
        (principal, cid, batch, 1),
        (principal, cid, batch, 1),  # a retry after a lost response: its expected_seq is the old one
        (principal, cid, [user("two", "e-2")], None),  # part of the batch, unchanged
        (principal, cid, [user("other", "e-1")], None),  # the id with other content
        (principal, cid, [user("two", "e-2"), user("three", "e-3")], None),  # a stored id among new ones
        (principal, cid, [user("three", "e-3")], 3),
    ])
    original, retry, part, other, mixed, last = answers
    assert not original.retried and [e["seq"] for e in original.events] == [2, 3]
    assert retry.retried and retry.events == original.events and retry.last_seq == 3
    assert part.retried and part.events == original.events[1:]
    assert isinstance(other, IdempotencyConflict) and other.details["ids"] == ["e-1"]
    assert isinstance(mixed, IdempotencyConflict) and mixed.details["ids"] == ["e-2"]
    assert not last.retried and last.events[0]["seq"] == 4 and last.events[0]["id"] == "e-3"
    assert xid(last.events[0]) == xid(original.events[0]), "precondition: one transaction"
    stored = await all_events(one_writer, principal, cid)
    assert [e["id"] for e in stored[1:]] == ["e-1", "e-2", "e-3"]


# -- grouped equals one at a time -------------------------------------------------------------------

TURNS, CALLS, IDS = ("t1", "t2"), ("c1", "c2"), ("e1", "e2", "e3")

_event = st.one_of(
    st.just(("message.user", {"content": "u"})),
    st.sampled_from(TURNS).map(lambda t: ("turn.started", {"turn_id": t})),
    st.sampled_from(TURNS).map(lambda t: ("text.delta", {"turn_id": t, "text": "x"})),
    st.sampled_from(TURNS).map(lambda t: ("turn.finished", {"turn_id": t, "finish_reason": "stop"})),
    st.tuples(st.sampled_from(TURNS), st.sampled_from(CALLS)).map(
        lambda tc: ("tool_call.started", {"turn_id": tc[0], "tool_call_id": tc[1], "name": "f"})),
    st.tuples(st.sampled_from(CALLS), st.sampled_from(["{}", "{", "}"])).map(
        lambda ct: ("tool_call.delta", {"tool_call_id": ct[0], "text": ct[1]})),
    st.sampled_from(CALLS).map(lambda c: ("tool_call.completed", {"tool_call_id": c})),
    st.tuples(st.sampled_from(CALLS), st.sampled_from(["ok", "pending"])).map(
        lambda cs: ("tool.result", {"tool_call_id": cs[0], "content": "r", "status": cs[1]})),
)
_batch = st.lists(st.tuples(_event, st.one_of(st.none(), st.sampled_from(IDS))), min_size=1, max_size=4)
# (conversation 0..2, batch, expected_seq or None); a batch made of a previous op's repeats it (a retry)
_op = st.tuples(st.integers(0, 2), _batch, st.one_of(st.none(), st.integers(1, 8)))


def _events(batch) -> list[NewEvent]:
    ids = [i for _, i in batch if i is not None]
    if len(ids) != len(set(ids)):  # the API refuses a batch repeating an id; keep only the first
        seen: set[str] = set()
        batch = [(e, None if i in seen or seen.add(i) else i) for e, i in batch]
    return [NewEvent(t, d, i) for (t, d), i in batch]


def _seen(answer) -> tuple:
    """What a caller learns, without what differs between two conversations (their ids,
    positions, times, server-made event ids)."""
    if isinstance(answer, StoreError):
        return type(answer).__name__, answer.details
    return ("appended", answer.retried, answer.last_seq,
            [(e["seq"], e["type"], e["data"], e["id"] if not _made(e["id"]) else None) for e in answer.events])


def _made(event_id: str) -> bool:
    return event_id not in IDS


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=12), repeats=st.lists(st.integers(0, 11), max_size=3))
async def test_appends_in_one_group_answer_and_store_exactly_what_appending_one_at_a_time_does(
        one_writer, principal, ops, repeats):
    ops = ops + [ops[r % len(ops)] for r in repeats]  # exact repeats of earlier ops: retries in the group
    grouped = [await new_store_conversation(one_writer, principal) for _ in range(3)]
    alone = [await new_store_conversation(one_writer, principal) for _ in range(3)]

    together = await in_one_group(one_writer, [(principal, grouped[c], _events(b), x) for c, b, x in ops])
    one_by_one = []
    for c, b, x in ops:
        try:
            one_by_one.append(await one_writer.append(principal, alone[c], _events(b), expected_seq=x))
        except StoreError as refused:
            one_by_one.append(refused)

    assert not [a for a in together if isinstance(a, BaseException) and not isinstance(a, StoreError)], together
    assert [_seen(a) for a in together] == [_seen(a) for a in one_by_one]
    written = [e for a in together if not isinstance(a, BaseException) and not a.retried for e in a.events]
    assert len({xid(e) for e in written}) <= 1, "precondition: the group was one transaction"
    for g, a in zip(grouped, alone):
        stored_g, stored_a = await all_events(one_writer, principal, g), await all_events(one_writer, principal, a)
        assert [_seen_event(e) for e in stored_g] == [_seen_event(e) for e in stored_a]
        row_g, row_a = await one_writer.get_conversation(principal, g), await one_writer.get_conversation(principal, a)
        assert (row_g["seq"], row_g["open_turn_id"]) == (row_a["seq"], row_a["open_turn_id"])
        assert await _state(one_writer, principal, g) == await _state(one_writer, principal, a)


def _seen_event(e: dict) -> tuple:
    return e["seq"], e["type"], e["data"], e["id"] if not _made(e["id"]) else None


async def _state(store: Store, principal: str, cid: uuid.UUID) -> dict:
    """The rule state saved with the conversation (what the next append is checked against)."""
    return await store.pool.fetchval("SELECT state FROM conversations WHERE principal = $1 AND id = $2",
                                     principal, cid)
