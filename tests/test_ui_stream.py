"""format=ui: what the real AI SDK (tests/js, `ai` 6.x and 5.x) makes of our frames,
and exact resume after any frame id. What "agrees with the history" means:
tests/uisdk.py (`assert_agrees_with_history`).
"""

from __future__ import annotations

import copy
import random

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from projections import compact
from projections.ui import (initial_ui_state, is_turn_end, parse_frame_id, ui_frames, ui_frames_after,
                            ui_state_from_json)
from tests.strategies import (args, call, cancelled, completed, failed, finished, history, reasoning, result,
                              started, text, titled, user, valid_event_sequences)
from tests.uisdk import NEVER_COMPLETED, assert_agrees_with_history, check_sse, parts_of, sse_body

PURE = settings(max_examples=150, deadline=None)
# Each example is a round trip to the node process tests.uisdk keeps (a few ms).
SDK_EXAMPLES = settings(max_examples=300, deadline=None)


def sdk_read(*sequences: list[dict]) -> list[list[dict]]:
    """Per sequence, per SDK version: the reader's result; asserts it had no problems."""
    results = check_sse([sse_body(events) for events in sequences])
    per_sequence = [[by_version[i] for by_version in results.values()] for i in range(len(sequences))]
    for i, reads in enumerate(per_sequence):
        for version, read in zip(results, reads):
            assert read["problems"] == [], (f"ai {version}", read["problems"], sse_body(sequences[i]))
    return per_sequence


def types(frames) -> list[str]:
    return [chunk["type"] for _, chunk in frames]


# -- scenarios: the stream as a user's frontend sees it ---------------------------------

def test_text_and_a_tool_call_in_one_step_make_one_message():
    events = history(user("weather?"), started("t1"), text("t1", "Let me "), text("t1", "check."),
                     call("t1", "a", "get_weather"), args("a", '{"city":'), args("a", '"Oslo"}'), completed("a"),
                     result("a", "sunny"), text("t1", "Sunny."), finished("t1"))
    assert types(ui_frames(events)) == [
        "start", "start-step", "text-start", "text-delta", "text-delta",
        "text-end", "tool-input-start", "tool-input-delta", "tool-input-delta", "tool-input-available",
        "tool-output-available",
        "finish-step", "start-step", "text-start", "text-delta",
        "text-end", "finish-step", "finish"]
    for read in sdk_read(events)[0]:
        (message,) = read["messages"]
        assert message["id"] == "t1" and message["role"] == "assistant"
        assert [p["type"] for p in message["parts"]] == ["step-start", "text", "tool-get_weather", "step-start", "text"]
        text_part, tool, _, answer = message["parts"][1:]
        assert (text_part["text"], answer["text"], text_part["state"]) == ("Let me check.", "Sunny.", "done")
        assert (tool["toolCallId"], tool["state"], tool["input"], tool["output"]) == \
            ("a", "output-available", {"city": "Oslo"}, "sunny")


def test_parallel_calls_share_a_step_and_the_answer_starts_the_next():
    events = history(user("q"), started("t1"), reasoning("t1", "two lookups"), call("t1", "a"), call("t1", "b"),
                     completed("a", '{"q": 1}'), completed("b", '{"q": 2}'), result("b", {"n": 2}),
                     result("a", "bad", "error"), text("t1", "Done."), finished("t1", "stop"))
    frames = ui_frames(events)
    assert frames[-1] == (f"{len(events)}:2", {"type": "finish", "finishReason": "stop"})
    for read in sdk_read(events)[0]:
        (message,) = read["messages"]
        assert [p["type"] for p in message["parts"]] == \
            ["step-start", "reasoning", "tool-search", "tool-search", "step-start", "text"]
        a, b = message["parts"][2:4]
        assert (a["toolCallId"], a["state"], a["errorText"], a["input"]) == ("a", "output-error", "bad", {"q": 1})
        assert (b["toolCallId"], b["state"], b["output"]) == ("b", "output-available", {"n": 2})


def test_a_pending_result_is_preliminary_until_the_final_one_replaces_it():
    events = history(user("q"), started("t1"), call("t1", "a"), completed("a", "{}"),
                     result("a", "working…", "pending"), finished("t1", "tool_calls"), result("a", "done"))
    frames = ui_frames(events)
    assert frames[-4:] == [
        ("7:1", {"type": "finish", "finishReason": "tool-calls"}),
        # The final result came after the turn ended: its message is re-opened.
        ("8:0", {"type": "start", "messageId": "t1"}),
        ("8:1", {"type": "tool-output-available", "toolCallId": "a", "output": "done"}),
        ("8:2", {"type": "finish"})]
    pending = events[:6]
    for read_pending, read_final in zip(*sdk_read(pending, events)):
        assert parts_of(read_pending["messages"][0])[0]["preliminary"] is True
        (message,) = read_final["messages"]
        (tool,) = parts_of(message)
        assert (tool["state"], tool["output"], tool.get("preliminary")) == ("output-available", "done", None)


def test_a_result_after_a_newer_turn_started_is_left_to_the_history():
    events = history(user("q"), started("t1"), call("t1", "a"), completed("a", "{}"),
                     result("a", "working…", "pending"), finished("t1", "tool_calls"),
                     user("and?"), started("t2"), text("t2", "Still waiting."), finished("t2"), result("a", "done"))
    assert ui_frames(events[-1:], _state_after(events[:-1])) == []
    for read in sdk_read(events)[0]:
        first, second = read["messages"]
        assert (first["id"], parts_of(first)[0]["output"], second["id"]) == ("t1", "working…", "t2")


def test_a_cancelled_turn_keeps_its_output_and_aborts():
    events = history(user("q"), started("t1"), text("t1", "Partial"), call("t1", "a"), completed("a", "{}"),
                     call("t1", "b"), args("b", '{"x'), cancelled("t1"))
    assert ui_frames(events[-1:], _state_after(events[:-1])) == [
        ("9:0", {"type": "tool-output-error", "toolCallId": "a",
                 "errorText": '{"error":"no_result","reason":"cancelled"}'}),
        ("9:1", {"type": "tool-input-error", "toolCallId": "b", "toolName": "search", "input": '{"x',
                 "errorText": NEVER_COMPLETED}),
        ("9:2", {"type": "abort"})]
    for read in sdk_read(events)[0]:
        (message,) = read["messages"]
        text_part, a, b = parts_of(message)
        assert (text_part["text"], text_part["state"]) == ("Partial", "done")
        assert (a["state"], b["state"], b["errorText"]) == ("output-error", "output-error", NEVER_COMPLETED)
        assert read["errors"] == []


def test_a_failed_turn_reports_the_error_and_finishes_the_message():
    events = history(user("q"), started("t1"), reasoning("t1", "Thinking"), failed("t1"))
    assert types(ui_frames(events))[-5:] == ["reasoning-delta", "reasoning-end", "error", "finish-step", "finish"]
    for read in sdk_read(events)[0]:
        assert read["errors"] == ["Upstream broke."]
        assert parts_of(read["messages"][0])[0]["state"] == "done"


def test_a_step_stays_open_while_one_of_its_calls_streams_input():
    # b's result ends the history step, but a's input is still streaming and the
    # SDK can only update it within the step it started in: "so" and c join the
    # first UI step. c's result then ends the step as usual.
    events = history(user("q"), started("t1"), call("t1", "a"), args("a", "{"), call("t1", "b"),
                     completed("b", "{}"), result("b", "r"), text("t1", "so"), args("a", "}"), completed("a"),
                     call("t1", "c"), completed("c", "{}"), result("a", "s"), result("c", "t"), text("t1", " then"),
                     finished("t1"))
    assert types(ui_frames(events)).count("start-step") == 2
    for read in sdk_read(events)[0]:
        (message,) = read["messages"]
        assert [p["type"] for p in message["parts"]] == \
            ["step-start", "tool-search", "tool-search", "text", "tool-search", "step-start", "text"]
        assert [p.get("output") for p in parts_of(message)] == ["s", "r", None, "t", None]


def test_arguments_a_browser_cannot_parse_end_the_call_with_an_input_error():
    # The domain checks arguments with Python's json, which takes NaN; JSON.parse does not.
    events = history(user("q"), started("t1"), call("t1", "a"), completed("a", '{"x": NaN}'), finished("t1"))
    assert ui_frames(events)[3] == ("5:0", {"type": "tool-input-error", "toolCallId": "a", "toolName": "search",
                                            "input": '{"x": NaN}',
                                            "errorText": "The tool call's arguments are not JSON."})
    for read in sdk_read(events)[0]:
        (tool,) = parts_of(read["messages"][0])
        assert (tool["state"], tool["rawInput"]) == ("output-error", '{"x": NaN}')


def test_events_outside_turns_give_no_frames():
    assert ui_frames(history(user("hi"), titled("Greeting"))) == []


def _state_after(events: list[dict]) -> dict:
    state = initial_ui_state()
    ui_frames(events, state)
    return state


# -- properties with the real SDK --------------------------------------------------------

@SDK_EXAMPLES
@given(valid_event_sequences())
def test_every_frame_passes_the_sdk_and_rebuilds_the_history(events):
    reads = check_sse([sse_body(events), sse_body(events, compacted=True)])
    for version, (read, read_compacted) in reads.items():
        where = f"ai {version}"
        assert read["problems"] == [] and read_compacted["problems"] == [], (where, read["problems"],
                                                                              read_compacted["problems"])
        assert read["chunks"] == len(ui_frames(events)), where
        assert read["errors"] == [e["data"]["error"]["message"] for e in events if e["type"] == "turn.failed"]
        assert read_compacted["messages"] == read["messages"], where
        assert_agrees_with_history(events, read["messages"])


# -- resume, snapshots, compaction: pure -------------------------------------------------

@PURE
@given(valid_event_sequences())
def test_resuming_after_any_frame_id_misses_nothing_and_repeats_nothing(events):
    frames = ui_frames(events)
    for i, (frame_id, _) in enumerate(frames):
        assert ui_frames_after(events, frame_id) == frames[i + 1:]
        assert ui_frames_after(events, parse_frame_id(frame_id)) == frames[i + 1:]
    for seq in range(len(events) + 1):
        assert ui_frames_after(events, str(seq)) == [f for f in frames if parse_frame_id(f[0])[0] > seq]


@PURE
@given(valid_event_sequences(), st.data())
def test_resuming_from_a_snapshot_equals_resuming_from_seq_1(events, data):
    frames = ui_frames(events)
    split = data.draw(st.integers(0, len(events)), label="snapshot seq")
    snapshot = _shuffled_snapshot(_state_after(events[:split]), data.draw(st.randoms(), label="key order"))
    for i, (frame_id, _) in enumerate(frames):
        if parse_frame_id(frame_id)[0] > split:
            assert ui_frames_after(events[split:], frame_id, copy.deepcopy(snapshot)) == \
                frames[i + 1:]


@PURE
@given(valid_event_sequences())
def test_a_snapshot_plus_the_rest_gives_the_same_frames(events):
    full = ui_frames(events)
    for split in range(len(events) + 1):
        head_state = initial_ui_state()
        head = ui_frames(events[:split], head_state)
        snapshot = _shuffled_snapshot(head_state, random.Random(split))
        assert head + ui_frames(events[split:], snapshot) == full


@PURE
@given(valid_event_sequences())
def test_a_turn_replayed_alone_gives_the_conversation_frames(events):
    frames = ui_frames(events)
    starts = [i for i, e in enumerate(events) if e["type"] == "turn.started"]
    for start in starts:
        end = next((j for j in range(start, len(events)) if is_turn_end(events[j])), len(events) - 1)
        first, last = events[start]["seq"], events[end]["seq"]
        assert ui_frames(events[start:end + 1]) == [f for f in frames if first <= parse_frame_id(f[0])[0] <= last]


@PURE
@given(valid_event_sequences())
def test_compacted_frames_stand_for_the_frames_with_the_same_ids(events):
    frames = ui_frames(events)
    ids = [frame_id for frame_id, _ in frames]
    for i, (frame_id, _) in enumerate(frames):
        # The catch-up after a resume point is compacted; frame contents agree once deltas are joined.
        assert _joined_deltas(ui_frames_after(events, frame_id, compacted=True)) == _joined_deltas(frames[i + 1:])
    compacted = ui_frames(compact(events))
    for j, (frame_id, _) in enumerate(compacted):
        assert frame_id in ids
        upto = ids.index(frame_id) + 1
        assert _joined_deltas(compacted[:j + 1]) == _joined_deltas(frames[:upto])


def _joined_deltas(frames) -> list[dict]:
    """Chunks with runs of deltas of one part (or one call's input) joined, ids dropped."""
    out: list[dict] = []
    for _, chunk in frames:
        field = {"text-delta": "delta", "reasoning-delta": "delta", "tool-input-delta": "inputTextDelta"}.get(
            chunk["type"])
        same = out and field and out[-1]["type"] == chunk["type"] and \
            out[-1].get("id", out[-1].get("toolCallId")) == chunk.get("id", chunk.get("toolCallId"))
        if same:
            out[-1] = {**out[-1], field: out[-1][field] + chunk[field]}
        else:
            out.append(chunk)
    return out


def _shuffled_snapshot(state: dict, rnd: random.Random) -> dict:
    """The state through JSON with every object's keys reordered, as jsonb may."""
    def shuffle(value):
        if isinstance(value, dict):
            items = list(value.items())
            rnd.shuffle(items)
            return {k: shuffle(v) for k, v in items}
        if isinstance(value, list):
            return [shuffle(v) for v in value]
        return value
    return ui_state_from_json(orjson.dumps(shuffle(state)))


def test_a_snapshot_of_another_version_is_refused():
    try:
        ui_state_from_json(orjson.dumps({**initial_ui_state(), "version": 0}))
    except ValueError:
        return
    raise AssertionError("an old snapshot was accepted")


def test_a_snapshot_past_the_resume_point_is_refused():
    events = history(user("q"), started("t1"), text("t1", "a"), text("t1", "b"))
    try:
        ui_frames_after(events[4:], "4:0", _state_after(events[:4]))
    except ValueError:
        return
    raise AssertionError("resumed from a snapshot that had already passed the resume point")
