"""The aggregate accepts exactly the valid event sequences (property-based)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import domain
from tests.helpers import replay
from tests.strategies import DomainRules, event_sequences_with_one_invalid, valid_event_sequences

CID = uuid.UUID("c0ffee00-0000-4000-8000-000000000000")


def start(events):
    assert events[0]["type"] == "conversation.created"
    return domain.create(CID, events[0]["data"])


@settings(max_examples=300, deadline=None)
@given(valid_event_sequences(max_events=60))
def test_every_valid_sequence_is_accepted_and_seq_is_the_version(events):
    conversation = start(events)
    for event in events[1:]:
        domain.apply(conversation, event["type"], event["data"])
        assert conversation.version == event["seq"]


@settings(max_examples=300, deadline=None)
@given(event_sequences_with_one_invalid(max_events=60))
def test_the_first_invalid_event_is_refused_and_changes_nothing(case):
    events, bad = case
    if bad == 0:  # a history that does not begin with conversation.created
        assert events[0]["type"] != "conversation.created"
        return
    conversation = start(events)
    for event in events[1:bad]:
        domain.apply(conversation, event["type"], event["data"])
    before = (conversation.version, domain.to_state(conversation))
    with pytest.raises(domain.RuleBroken) as refused:
        domain.apply(conversation, events[bad]["type"], events[bad]["data"])
    assert refused.value.rule and refused.value.message
    assert (conversation.version, domain.to_state(conversation)) == before


@settings(max_examples=200, deadline=None)
@given(valid_event_sequences(max_events=60), st.data())
def test_stored_state_resumes_exactly_like_a_replay(events, data):
    """The store keeps to_state() instead of re-reading events: it must not differ."""
    split = data.draw(st.integers(1, len(events)))
    head = start(events)
    for event in events[1:split]:
        domain.apply(head, event["type"], event["data"])
    resumed = domain.from_state(CID, head.version, domain.to_state(head))
    replayed = replay(CID, [(e["type"], e["data"]) for e in events])
    for event in events[split:]:
        domain.apply(resumed, event["type"], event["data"])
    assert resumed.version == replayed.version
    assert domain.to_state(resumed) == domain.to_state(replayed)


# Random events over a tiny universe of ids, so that every rule gets hit often;
# the aggregate must agree with the reference model in tests/strategies.py at
# every step.
_turns = st.sampled_from(["t1", "t2", "t3"])
_calls = st.sampled_from(["c1", "c2", "c3"])
_fragments = st.sampled_from(["{", "}", "{}", '"x"', "", "[1", "]", "nul", "l", "NaN", "Infinity"])
chaos_event = st.one_of(
    st.builds(lambda c: ("message.user", {"content": c}), st.sampled_from(["hi", ""])),
    st.just(("message.system", {"content": "be brief"})),
    st.just(("conversation.created", {"metadata": {}})),
    st.builds(lambda t: ("turn.started", {"turn_id": t}), _turns),
    st.builds(lambda t: ("text.delta", {"turn_id": t, "text": "x"}), _turns),
    st.builds(lambda t: ("reasoning.delta", {"turn_id": t, "text": "x"}), _turns),
    st.builds(lambda t, c: ("tool_call.started", {"turn_id": t, "tool_call_id": c, "name": "f"}), _turns, _calls),
    st.builds(lambda c, f: ("tool_call.delta", {"tool_call_id": c, "text": f}), _calls, _fragments),
    st.builds(lambda c: ("tool_call.completed", {"tool_call_id": c}), _calls),
    st.builds(lambda c, f: ("tool_call.completed", {"tool_call_id": c, "arguments": f}), _calls, _fragments),
    st.builds(lambda c, s: ("tool.result", {"tool_call_id": c, "content": "r", "status": s}), _calls,
              st.sampled_from(["ok", "error", "pending"])),
    st.builds(lambda t: ("turn.finished", {"turn_id": t, "finish_reason": "stop"}), _turns),
    st.builds(lambda t: ("turn.cancelled", {"turn_id": t}), _turns),
    st.builds(lambda t: ("turn.failed", {"turn_id": t, "error": {"code": "x", "message": "y"}}), _turns),
    st.just(("conversation.titled", {"title": "T"})),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(chaos_event, max_size=80))
def test_aggregate_agrees_with_the_reference_rules_on_arbitrary_input(pairs):
    model = DomainRules()
    model.apply("conversation.created", {"metadata": {}})
    conversation = domain.create(CID, {"metadata": {}})
    for type_, data in pairs:
        expected_broken = model.broken_rule(type_, data)
        try:
            domain.apply(conversation, type_, data)
        except domain.RuleBroken as refused:
            assert expected_broken is not None, f"refused a valid {type_}: {refused.rule}"
            continue
        assert expected_broken is None, f"accepted {type_} {data} which breaks: {expected_broken}"
        model.apply(type_, data)


@settings(max_examples=200, deadline=None)
@given(valid_event_sequences(max_events=40))
def test_generated_data_passes_the_schema_unchanged(events):
    for event in events:
        assert domain.check_data(event["type"], event["data"]) == event["data"]


@pytest.mark.parametrize("type_, data", [
    ("text.delta", {"turn_id": "t", "text": 1}),
    ("text.delta", {"turn_id": "t"}),
    ("tool.result", {"tool_call_id": "c", "content": "x", "status": "maybe"}),
    ("turn.finished", {"turn_id": "t", "finish_reason": "done"}),
    ("turn.finished", {"turn_id": "t", "finish_reason": "stop", "usage": {"prompt_tokens": "1"}}),
    ("turn.failed", {"turn_id": "t", "error": "boom"}),
    ("message.user", {"content": 5}),
    ("message.user", {"content": "x", "nme": "typo"}),
    ("turn.started", {"turn_id": ""}),
    ("nope", {}),
])
def test_wrong_shapes_are_refused_by_the_schema(type_, data):
    with pytest.raises(domain.InvalidData):
        domain.check_data(type_, data)


@settings(max_examples=300, deadline=None)
@given(event_sequences_with_one_invalid(max_events=60), st.data())
def test_saved_state_plus_the_known_facts_refuses_exactly_what_a_replay_refuses(case, data):
    """The store saves only what is live and reads, for each batch, the history
    facts of the ids it names (domain.Known): that must refuse the same event,
    for the same rule, as folding the whole history."""
    events, bad = case
    if bad == 0:
        return
    split = data.draw(st.integers(1, bad))
    head = start(events)
    for event in events[1:split]:
        domain.apply(head, event["type"], event["data"])
    saved = domain.to_state(head)
    batch = events[split:bad + 1]
    turns, calls = domain.ids_named([(e["type"], e["data"]) for e in batch])
    # what the store's index probes answer, here taken from the full fold
    known = domain.Known(turn_ids=frozenset(set(turns) & head.turn_ids),
                         calls={c: head.calls[c][1] for c in calls if c in head.calls and c not in saved["calls"]})
    resumed = domain.from_state(CID, head.version, saved, known)
    for event in batch[:-1]:
        domain.apply(resumed, event["type"], event["data"])
    with pytest.raises(domain.RuleBroken) as refused:
        domain.apply(resumed, batch[-1]["type"], batch[-1]["data"])
    replayed = start(events)
    for event in events[1:bad]:
        domain.apply(replayed, event["type"], event["data"])
    with pytest.raises(domain.RuleBroken) as expected:
        domain.apply(replayed, events[bad]["type"], events[bad]["data"])
    assert refused.value.rule == expected.value.rule


def test_the_saved_state_holds_only_what_is_live():
    conversation = domain.create(CID, {"metadata": {}})
    for n in range(50):
        for type_, data in [("turn.started", {"turn_id": f"t{n}"}),
                            ("tool_call.started", {"turn_id": f"t{n}", "tool_call_id": f"c{n}", "name": "f"}),
                            ("tool_call.completed", {"tool_call_id": f"c{n}", "arguments": "{}"}),
                            ("turn.finished", {"turn_id": f"t{n}", "finish_reason": "tool_calls"}),
                            ("tool.result", {"tool_call_id": f"c{n}", "content": "ok", "status": "ok"})]:
            domain.apply(conversation, type_, data)
    domain.apply(conversation, "turn.started", {"turn_id": "live"})
    domain.apply(conversation, "tool_call.started", {"turn_id": "live", "tool_call_id": "open", "name": "f"})
    assert domain.to_state(conversation) == {"open_turn_id": "live", "calls": {"open": ["live", "started"]},
                                             "call_args": {"open": []}}
