"""format=openai, rule by rule: the exact message list users send to Chat Completions."""

from projections import fold_all, render_openai
from tests.strategies import (args, call, cancelled, check_openai, completed, created, failed, finished, history,
                              reasoning, result, started, system, text, titled, user)


def openai(*pairs):
    messages = render_openai(fold_all(history(*pairs)))
    check_openai(messages)
    return messages


def asked(*ids_names_args):
    return [{"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in ids_names_args]


def test_text_then_tool_call_is_one_assistant_message():
    assert openai(
        user("weather?"), started("t1"), text("t1", "Let me "), text("t1", "check."),
        call("t1", "a", "get_weather"), args("a", '{"city":'), args("a", '"Oslo"}'), completed("a"),
        result("a", "sunny"), finished("t1", "tool_calls"),
    ) == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": asked(("a", "get_weather", '{"city":"Oslo"}'))},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
    ]


def test_text_after_a_result_is_a_new_assistant_message():
    assert openai(
        user("q"), started("t1"), call("t1", "a"), completed("a", "{}"), result("a", "r"),
        text("t1", "The answer"), text("t1", " is r."), finished("t1"),
    ) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": asked(("a", "search", "{}"))},
        {"role": "tool", "tool_call_id": "a", "content": "r"},
        {"role": "assistant", "content": "The answer is r."},
    ]


def test_parallel_calls_answered_out_of_order_keep_call_order():
    assert openai(
        user("q"), started("t1"), call("t1", "a"), call("t1", "b", "fetch"), completed("b", '{"b":1}'),
        completed("a", '{"a":1}'), result("b", "B"), result("a", "A"), text("t1", "done"), finished("t1"),
    ) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None,
         "tool_calls": asked(("a", "search", '{"a":1}'), ("b", "fetch", '{"b":1}'))},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "assistant", "content": "done"},
    ]


def test_result_for_an_earlier_steps_call_does_not_split_the_current_step():
    assert openai(
        started("t1"), call("t1", "a"), call("t1", "b"), completed("a", "{}"), completed("b", "{}"),
        result("a", "A"), text("t1", "one "), result("b", "B"), text("t1", "two"), finished("t1"),
    ) == [
        {"role": "assistant", "content": None, "tool_calls": asked(("a", "search", "{}"), ("b", "search", "{}"))},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "assistant", "content": "one two"},
    ]


def test_final_result_replaces_pending_in_its_original_place_after_later_turns():
    pairs = [user("book it"), started("t1"), call("t1", "a", "book"), completed("a", "{}"),
             result("a", {"status": "queued"}, "pending"), text("t1", "Queued."), finished("t1"),
             user("thanks"), started("t2"), text("t2", "You're welcome."), finished("t2")]
    before = [
        {"role": "user", "content": "book it"},
        {"role": "assistant", "content": None, "tool_calls": asked(("a", "book", "{}"))},
        {"role": "tool", "tool_call_id": "a", "content": '{"status":"queued"}'},
        {"role": "assistant", "content": "Queued."},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    assert openai(*pairs) == before
    after = openai(*pairs, result("a", {"status": "booked", "ref": 7}))
    assert after == before[:2] + [{"role": "tool", "tool_call_id": "a", "content": '{"status":"booked","ref":7}'}] \
        + before[3:]


def test_cancelled_turn_answers_its_unanswered_calls_and_keeps_partial_text():
    assert openai(
        user("q"), started("t1"), text("t1", "Searching"), call("t1", "a"), completed("a", "{}"),
        call("t1", "b"), completed("b", "{}"), result("b", "B"), cancelled("t1"),
    ) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Searching",
         "tool_calls": asked(("a", "search", "{}"), ("b", "search", "{}"))},
        {"role": "tool", "tool_call_id": "a", "content": '{"error":"no_result","reason":"cancelled"}'},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
    ]


def test_failed_turn_answers_its_unanswered_calls_with_reason_failed():
    assert openai(user("q"), started("t1"), call("t1", "a"), completed("a", "{}"), failed("t1")) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": asked(("a", "search", "{}"))},
        {"role": "tool", "tool_call_id": "a", "content": '{"error":"no_result","reason":"failed"}'},
    ]


def test_result_arriving_after_a_cancel_replaces_the_synthetic_one():
    messages = openai(user("q"), started("t1"), call("t1", "a"), completed("a", "{}"), cancelled("t1"),
                      result("a", "late", "error"))
    assert messages[2] == {"role": "tool", "tool_call_id": "a", "content": "late"}


def test_call_that_never_completed_is_dropped_with_any_result_for_it():
    # The domain refuses a result for an incomplete call; the fold drops one anyway.
    assert openai(
        user("q"), started("t1"), text("t1", "Let me look"), call("t1", "a"), args("a", '{"q":'),
        cancelled("t1"), result("a", "orphan"),
    ) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Let me look"},
    ]


def test_completed_call_without_result_is_left_out_until_the_result_comes():
    pairs = [user("q"), started("t1"), text("t1", "Running it."), call("t1", "a"), completed("a", "{}"),
             finished("t1", "tool_calls"), user("still there?"), started("t2"), text("t2", "Yes."), finished("t2")]
    assert openai(*pairs) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Running it."},
        {"role": "user", "content": "still there?"},
        {"role": "assistant", "content": "Yes."},
    ]
    assert openai(*pairs, result("a", "ran")) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Running it.", "tool_calls": asked(("a", "search", "{}"))},
        {"role": "tool", "tool_call_id": "a", "content": "ran"},
        {"role": "user", "content": "still there?"},
        {"role": "assistant", "content": "Yes."},
    ]


def test_call_in_the_open_turn_is_left_out_while_it_runs():
    assert openai(user("q"), started("t1"), call("t1", "a"), completed("a", "{}")) == [
        {"role": "user", "content": "q"},
    ]


def test_steps_with_no_output_are_left_out():
    assert openai(
        user("q"), started("t1"), reasoning("t1", "hmm"), finished("t1"),
        user("again"), started("t2"), text("t2", ""), finished("t2"), started("t3"), finished("t3"),
    ) == [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}]


def test_adjacent_steps_merge_into_one_message_joined_by_newline():
    assert openai(
        user("q"), started("t1"), text("t1", "First."), call("t1", "a"), completed("a", "{}"),
        finished("t1", "tool_calls"), started("t2"), text("t2", "Second."), call("t2", "b"),
        completed("b", "{}"), result("b", "B"), finished("t2"),
    ) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "First.\nSecond.", "tool_calls": asked(("b", "search", "{}"))},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
    ]


def test_merging_into_a_step_without_text_adds_no_newline():
    messages = openai(user("q"), started("t1"), text("t1", "Hm."), finished("t1"), started("t2"), call("t2", "a"),
                      completed("a", "{}"), result("a", "A"), finished("t2"))
    assert messages[1] == {"role": "assistant", "content": "Hm.", "tool_calls": asked(("a", "search", "{}"))}


def test_arguments_are_the_completed_ones_else_the_joined_deltas():
    messages = openai(
        started("t1"), call("t1", "a"), args("a", '{"x"'), args("a", ":1}"), completed("a", '{"x": 2}'),
        call("t1", "b"), args("b", "[1,"), args("b", "2]"), completed("b"),
        result("a", "A"), result("b", "B"), finished("t1"),
    )
    assert messages[0]["tool_calls"] == asked(("a", "search", '{"x": 2}'), ("b", "search", "[1,2]"))


def test_json_result_content_is_a_compact_json_string():
    messages = openai(started("t1"), call("t1", "a"), completed("a", "{}"),
                      result("a", {"temp": 21.5, "tags": ["a", "b"], "ok": True, "none": None}), finished("t1"))
    assert messages[1]["content"] == '{"temp":21.5,"tags":["a","b"],"ok":true,"none":null}'


def test_reasoning_is_not_part_of_the_messages():
    assert openai(user("q"), started("t1"), reasoning("t1", "think"), text("t1", "A."), finished("t1")) == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "A."}]


def test_system_prompt_comes_first_and_system_messages_stay_in_place():
    assert openai(
        created("You are terse."), user("hi"), started("t1"), text("t1", "Hi."), finished("t1"),
        system("Answer in French."), titled("Greeting"), user("bye"),
    ) == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hi."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "bye"},
    ]


def test_empty_system_prompt_gives_no_system_message():
    assert openai(created(""), user("hi")) == [{"role": "user", "content": "hi"}]


def test_user_name_and_content_parts_are_kept_as_given():
    parts = [{"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}}]
    assert openai(user(parts, name="alice"), user("plain")) == [
        {"role": "user", "content": parts, "name": "alice"},
        {"role": "user", "content": "plain"},
    ]
