"""format=anthropic, rule by rule: the exact body users send to the Messages API."""

from projections import fold_all, render_anthropic
from projections.anthropic import EMPTY_RESULT_TEXT, OPENING_USER_TEXT
from tests.strategies import (call, cancelled, check_anthropic, completed, created, finished, history, result,
                              started, system, text, user)


def anthropic(*pairs):
    body = render_anthropic(fold_all(history(*pairs)))
    check_anthropic(body)
    return body


def said(text_):
    return {"type": "text", "text": text_}


def test_system_prompt_and_system_messages_are_joined_into_system():
    assert anthropic(created("You are terse."), user("hi"), system("Answer in French."), user("bye")) == {
        "system": "You are terse.\n\nAnswer in French.",
        "messages": [{"role": "user", "content": [said("hi"), said("bye")]}],
    }


def test_no_system_text_gives_system_none():
    assert anthropic(user("hi"))["system"] is None


def test_tool_results_open_the_next_user_message_before_its_text():
    assert anthropic(
        user("weather?"), started("t1"), text("t1", "Checking."), call("t1", "a", "get_weather"),
        completed("a", '{"city": "Oslo"}'), finished("t1", "tool_calls"), result("a", {"sky": "clear"}),
        user("and tomorrow?"),
    )["messages"] == [
        {"role": "user", "content": [said("weather?")]},
        {"role": "assistant", "content": [
            said("Checking."), {"type": "tool_use", "id": "a", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "a", "content": '{"sky":"clear"}'}, said("and tomorrow?")]},
    ]


def test_only_error_results_are_marked_is_error():
    messages = anthropic(
        user("q"), started("t1"), call("t1", "a"), call("t1", "b"), call("t1", "c"),
        completed("a", "{}"), completed("b", "{}"), completed("c", "{}"),
        result("a", "fine"), result("b", "boom", "error"), result("c", "working", "pending"), finished("t1"),
    )["messages"]
    assert messages[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "a", "content": "fine"},
        {"type": "tool_result", "tool_use_id": "b", "content": "boom", "is_error": True},
        {"type": "tool_result", "tool_use_id": "c", "content": "working"},
    ]


def test_cancelled_turn_answers_its_calls_with_a_no_result_error():
    messages = anthropic(user("q"), started("t1"), text("t1", "Part"), call("t1", "a"), completed("a", "{}"),
                         cancelled("t1"))["messages"]
    assert messages[1:] == [
        {"role": "assistant", "content": [
            said("Part"), {"type": "tool_use", "id": "a", "name": "search", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "a", "content": '{"error":"no_result","reason":"cancelled"}'}]},
    ]


def test_history_starting_with_the_assistant_gets_a_placeholder_user_message():
    assert anthropic(created("Greet the user."), started("t1"), text("t1", "Hello!"), finished("t1")) == {
        "system": "Greet the user.",
        "messages": [{"role": "user", "content": [said(OPENING_USER_TEXT)]},
                     {"role": "assistant", "content": [said("Hello!")]}],
    }


def test_assistant_messages_separated_only_by_a_system_message_are_merged():
    messages = anthropic(user("q"), started("t1"), text("t1", "One."), finished("t1"), system("Be brief."),
                         started("t2"), text("t2", "Two."), finished("t2"))["messages"]
    assert messages == [{"role": "user", "content": [said("q")]},
                        {"role": "assistant", "content": [said("One."), said("Two.")]}]


def test_non_object_arguments_are_wrapped_in_value():
    messages = anthropic(user("q"), started("t1"), call("t1", "a"), completed("a", "[1, 2]"),
                         call("t1", "b"), completed("b", "NaN"), result("a", "A"), result("b", "B"),
                         finished("t1"))["messages"]
    assert [block["input"] for block in messages[1]["content"]] == [{"value": [1, 2]}, {"value": "NaN"}]


def test_tool_ids_outside_the_allowed_pattern_are_mapped_the_same_in_use_and_result():
    messages = anthropic(user("q"), started("t1"), call("t1", "functions.search:0"),
                         completed("functions.search:0", "{}"), result("functions.search:0", "ok"),
                         finished("t1"))["messages"]
    use_id, result_id = messages[1]["content"][0]["id"], messages[2]["content"][0]["tool_use_id"]
    assert use_id == result_id and use_id.startswith("functions_search_0_")


def test_images_become_image_blocks():
    parts = [{"type": "text", "text": "Compare"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
             {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}}]
    assert anthropic(user(parts))["messages"][0]["content"] == [
        said("Compare"),
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/b.png"}},
    ]


def test_whitespace_only_text_is_left_out_and_empty_results_get_a_placeholder():
    messages = anthropic(user("q"), user("  "), started("t1"), text("t1", "\n"), call("t1", "a"),
                         completed("a", "{}"), result("a", "", "error"), finished("t1"))["messages"]
    assert messages == [
        {"role": "user", "content": [said("q")]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "search", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "a", "content": EMPTY_RESULT_TEXT, "is_error": True}]},
    ]
