"""Properties over every valid history: the projections are always sendable,
and every way of computing them (compacted, from a snapshot, point in time) agrees."""

from hypothesis import given, settings
from hypothesis import strategies as st

from projections import (compact, fold, fold_all, initial_state, render, render_anthropic,
                         render_openai, state_from_json, state_to_json)
from tests.helpers import messages_at
from tests.strategies import (DomainRules, check_anthropic, check_openai, event_sequences_with_one_invalid,
                              first_invalid_index, valid_event_sequences)

SOME = settings(max_examples=150, deadline=None)


@SOME
@given(valid_event_sequences())
def test_both_formats_are_accepted_by_the_providers_at_every_seq(events):
    state = initial_state()
    for event in events:
        fold(state, event)
        check_openai(render_openai(state))
        check_anthropic(render_anthropic(state))


@SOME
@given(valid_event_sequences(), st.data())
def test_compacted_events_give_the_same_messages(events, data):
    n = data.draw(st.integers(1, len(events)), label="prefix")
    for fmt in ("openai", "anthropic"):
        assert render(fold_all(compact(events[:n])), fmt) == render(fold_all(events[:n]), fmt)


@SOME
@given(valid_event_sequences())
def test_snapshot_plus_tail_equals_the_full_fold(events):
    full = fold_all(events)
    for split in range(len(events) + 1):
        snapshot = state_from_json(state_to_json(fold_all(events[:split])))
        assert fold_all(events[split:], snapshot) == full


@SOME
@given(valid_event_sequences(), st.data())
def test_at_seq_is_the_history_exactly_as_it_stood_then(events, data):
    at_seq = data.draw(st.integers(1, len(events) + 2), label="at_seq")
    for fmt in ("openai", "anthropic"):
        then = messages_at(events, at_seq, fmt)
        assert then == render(fold_all(e for e in events if e["seq"] <= at_seq), fmt)
        assert then["seq"] == min(at_seq, len(events))


@SOME
@given(valid_event_sequences())
def test_every_user_message_and_every_answerable_call_is_shown_once(events):
    users = [e["data"]["content"] for e in events if e["type"] == "message.user"]
    messages = render_openai(fold_all(events))
    assert [m["content"] for m in messages if m["role"] == "user"] == users
    completed = {e["data"]["tool_call_id"] for e in events if e["type"] == "tool_call.completed"}
    answered = {e["data"]["tool_call_id"] for e in events if e["type"] == "tool.result"}
    dead_turns = {e["data"]["turn_id"] for e in events if e["type"] in ("turn.cancelled", "turn.failed")}
    in_dead_turn = {e["data"]["tool_call_id"] for e in events
                    if e["type"] == "tool_call.started" and e["data"]["turn_id"] in dead_turns}
    shown = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    assert sorted(shown) == sorted(completed & (answered | in_dead_turn))


@settings(max_examples=100, deadline=None)
@given(valid_event_sequences())
def test_generated_histories_keep_every_domain_rule(events):
    assert first_invalid_index(events) is None


@settings(max_examples=200, deadline=None)
@given(event_sequences_with_one_invalid())
def test_an_event_the_domain_refuses_changes_no_message(case):
    events, index = case
    assert first_invalid_index(events) == index
    state = fold_all(events)
    check_openai(render_openai(state))
    check_anthropic(render_anthropic(state))
    bad = events[index]
    rules = DomainRules()
    for event in events[:index]:
        rules.apply(event["type"], event["data"])
    if index > 0 and rules.broken_rule(bad["type"], bad["data"]) != "arguments must be JSON":
        # The fold re-checks history rules, not argument JSON.
        without = fold_all(events[:index] + events[index + 1:])
        assert {**state, "seq": None} == {**without, "seq": None}
