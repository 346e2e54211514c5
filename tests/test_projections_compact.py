"""compact=true: runs of deltas arrive as one event a client can resume after."""

import copy

from hypothesis import given, settings

from projections import compact
from tests.strategies import args, call, completed, history, reasoning, started, text, valid_event_sequences


def test_a_run_of_text_deltas_becomes_one_event_at_the_runs_last_seq():
    events = history(started("t1"), text("t1", "Hel"), text("t1", "lo"), text("t1", "!"))
    assert compact(events) == events[:2] + [
        {**events[4], "data": {"turn_id": "t1", "text": "Hello!", "first_seq": 3}}]


def test_runs_end_where_another_event_or_stream_comes_between():
    events = history(started("t1"), text("t1", "a"), reasoning("t1", "r1"), reasoning("t1", "r2"),
                     text("t1", "b"), call("t1", "x"), args("x", "{"), args("x", "}"), completed("x"))
    assert [(e["type"], e["seq"], e["data"].get("text"), e["data"].get("first_seq")) for e in compact(events)] == [
        ("conversation.created", 1, None, None),
        ("turn.started", 2, None, None),
        ("text.delta", 3, "a", 3),
        ("reasoning.delta", 5, "r1r2", 4),
        ("text.delta", 6, "b", 6),
        ("tool_call.started", 7, None, None),
        ("tool_call.delta", 9, "{}", 8),
        ("tool_call.completed", 10, None, None),
    ]


def test_deltas_of_different_calls_are_separate_runs():
    events = history(started("t1"), call("t1", "x"), call("t1", "y"), args("x", "{"), args("y", "["),
                     args("y", "]"), args("x", "}"))
    assert [(e["seq"], e["data"].get("text")) for e in compact(events)[4:]] == [(5, "{"), (7, "[]"), (8, "}")]


@settings(max_examples=60, deadline=None)
@given(valid_event_sequences())
def test_compacting_twice_changes_nothing_and_leaves_the_input_alone(events):
    before = copy.deepcopy(events)
    once = compact(events)
    assert compact(once) == once
    assert events == before
    assert [e["seq"] for e in once] == sorted({e["seq"] for e in once})
    assert "".join(e["data"]["text"] for e in once if e["type"] == "text.delta") == \
        "".join(e["data"]["text"] for e in events if e["type"] == "text.delta")
