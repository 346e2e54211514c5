"""The provider-rule checkers catch the histories providers refuse; otherwise
the property tests built on them would prove nothing."""

import copy

import pytest

from tests.strategies import check_anthropic, check_openai

CALL = {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
OPENAI_OK = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "q"},
    {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "b"}]},
    {"role": "tool", "tool_call_id": "a", "content": "A"},
    {"role": "tool", "tool_call_id": "b", "content": "B"},
    {"role": "assistant", "content": "done"},
]
ANTHROPIC_OK = {"system": "s", "messages": [
    {"role": "user", "content": [{"type": "text", "text": "q"}]},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": "A"},
                                 {"type": "text", "text": "more"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "done"}]},
]}


def test_valid_examples_pass():
    check_openai(OPENAI_OK)
    check_anthropic(ANTHROPIC_OK)


@pytest.mark.parametrize("breaks", [
    lambda m: m.pop(3),                                        # a call without its tool message
    lambda m: m.insert(5, {"role": "tool", "tool_call_id": "a", "content": "A"}),  # answered twice
    lambda m: m.insert(3, {"role": "user", "content": "x"}),   # something between call and result
    lambda m: m.__setitem__(slice(3, 5), [m[4], m[3]]),        # results out of call order
    lambda m: m[2].pop("tool_calls"),                          # null content without tool calls; orphans
    lambda m: m[2].__setitem__("tool_calls", []),              # empty tool_calls
    lambda m: m[5].__setitem__("content", ""),                 # empty assistant message
    lambda m: m.append({"role": "assistant", "content": "again"}),  # adjacent assistants not merged
    lambda m: m[3].__setitem__("content", {"x": 1}),           # tool content not a string
    lambda m: m.append({"role": "tool", "tool_call_id": "z", "content": "?"}),  # orphan tool message
])
def test_openai_checker_refuses_what_chat_completions_refuses(breaks):
    messages = copy.deepcopy(OPENAI_OK)
    breaks(messages)
    with pytest.raises(AssertionError):
        check_openai(messages)


@pytest.mark.parametrize("breaks", [
    lambda b: b["messages"].pop(0),                                    # starts with assistant
    lambda b: b["messages"].pop(2),                                    # tool_use unanswered, no alternation
    lambda b: b["messages"][2]["content"].reverse(),                   # tool_result after text
    lambda b: b["messages"][2]["content"][0].__setitem__("tool_use_id", "z"),  # answers another id
    lambda b: b["messages"][0]["content"].append({"type": "text", "text": " "}),  # whitespace-only text
    lambda b: b["messages"][3].__setitem__("content", []),             # empty content
    lambda b: b["messages"][1]["content"][0].__setitem__("input", [1]),  # input not an object
    lambda b: b["messages"][1]["content"][0].__setitem__("id", "a.b"),  # id outside the pattern
    lambda b: b["messages"][2]["content"][0].__setitem__("content", ""),  # empty result
    lambda b: b.__setitem__("system", ""),                             # empty system
    lambda b: b["messages"].append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "a", "content": "A"}]}),  # result for an older call
])
def test_anthropic_checker_refuses_what_the_messages_api_refuses(breaks):
    body = copy.deepcopy(ANTHROPIC_OK)
    breaks(body)
    with pytest.raises(AssertionError):
        check_anthropic(body)
