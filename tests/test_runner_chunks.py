"""The runner's chunk -> event translation (runner/chunks.py), without I/O.

What the runner relies on: whatever way a provider cuts a reply into chunks,
the recorded events give back the same text, reasoning and tool calls, and
the domain accepts every batch the translation yields (so a runner never
writes a batch the store refuses); a stream that breaks keeps what arrived.
"""

from __future__ import annotations

import uuid

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import domain
from domain.schemas import ABANDONED, COMPLETED
from runner.chunks import (StepTranslator, add_usage, encode, made_up_id, model_requested, rebuild_body,
                           request_body, sha256_hex, turn_failed, turn_finished)
from tests.helpers import messages_at, replay
from tests.strategies import check_openai

CID = uuid.UUID("c0ffee00-0000-4000-8000-00000000c4c4")
TURN = "turn-1"
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


# -- chunk builders (the shapes OpenAI, DeepSeek, vLLM and OpenRouter stream) -------


def chunk(delta: dict | None = None, finish_reason=None, index: int = 0) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}]}


def content(text: str) -> dict:
    return chunk({"content": text})


def tool(index: int, id: str | None = None, name: str | None = None, arguments: str | None = None) -> dict:
    fragment: dict = {"index": index, "function": {}}
    if id is not None:
        fragment.update(id=id, type="function")
    if name is not None:
        fragment["function"]["name"] = name
    if arguments is not None:
        fragment["function"]["arguments"] = arguments
    return fragment


def tools(*fragments: dict) -> dict:
    return chunk({"tool_calls": list(fragments)})


def usage_chunk(usage: dict = USAGE) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [], "usage": usage}


def translate(chunks: list[dict], taken_ids=()) -> tuple[list, object]:
    step = StepTranslator(TURN, 0, taken_ids)
    events = [e for c in chunks for e in step.feed(c)]
    closing, outcome = step.finish()
    return events + closing, outcome


def recorded(events: list, closing) -> list[tuple[str, dict]]:
    """The whole conversation as the runner writes it: every event passes the
    shape check and the aggregate's rules."""
    log = [("conversation.created", {"metadata": {}}), ("message.user", {"content": "hi"}),
           ("turn.started", {"turn_id": TURN, "model": "m"}), *events, closing]
    for type_, data in log:
        assert domain.check_data(type_, data) == data, (type_, data)
    replay(CID, log)  # raises RuleBroken on the first event the domain refuses
    return log


def with_seq(log: list[tuple[str, dict]]) -> list[dict]:
    return [{"seq": n, "type": t, "data": d} for n, (t, d) in enumerate(log, 1)]


def fold(events: list) -> dict:
    """text, reasoning and calls (id -> [name, joined fragments, completed?]) from the events."""
    out = {"text": "", "reasoning": "", "calls": {}}
    for type_, data in events:
        if type_ == "text.delta":
            out["text"] += data["text"]
        elif type_ == "reasoning.delta":
            out["reasoning"] += data["text"]
        elif type_ == "tool_call.started":
            out["calls"][data["tool_call_id"]] = [data["name"], "", False]
        elif type_ == "tool_call.delta":
            out["calls"][data["tool_call_id"]][1] += data["text"]
        elif type_ == "tool_call.completed":
            call = out["calls"][data["tool_call_id"]]
            call[1], call[2] = data.get("arguments", call[1]), True
    return out


# -- property: any chunking gives back the reference answer --------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
answers = st.fixed_dictionaries({
    "reasoning": st.text(max_size=30),
    "text": st.text(max_size=40),
    # (name, arguments, does the provider send an id?)
    "calls": st.lists(st.tuples(st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True),
                                st.dictionaries(st.text(max_size=5), json_values, max_size=3),
                                st.booleans()), max_size=4),
})


def pieces(draw, s: str) -> list[str]:
    """`s` cut at arbitrary places (no empty pieces)."""
    if not s:
        return []
    cuts = sorted(draw(st.sets(st.integers(1, len(s) - 1), max_size=len(s) - 1)) if len(s) > 1 else [])
    return [s[a:b] for a, b in zip([0, *cuts], [*cuts, len(s)])]


@st.composite
def streams(draw):
    """(answer, chunks): the answer cut into fragments, the fragments' queues
    interleaved at random (each keeps its order), tool-call fragments grouped
    into chunks at random, plus the noise real streams carry."""
    answer = draw(answers)
    queues = [[("reasoning", p) for p in pieces(draw, answer["reasoning"])],
              [("text", p) for p in pieces(draw, answer["text"])]]
    for i, (name, arguments, has_id) in enumerate(answer["calls"]):
        names = pieces(draw, name) if draw(st.booleans()) else [name]  # split name, or whole in the first fragment
        if any(p == "".join(names[:k]) for k, p in enumerate(names) if k):
            names = [name]  # "a" + "a" reads as a repeated name (see runner/chunks.py): not a split this test makes
        first = tool(i, id=f"call_up_{i}" if has_id else None, name=names[0], arguments="")
        queue = [("tool", first)] + [("tool", tool(i, name=p)) for p in names[1:]]
        queue += [("tool", tool(i, arguments=p)) for p in pieces(draw, orjson.dumps(arguments).decode())]
        queues.append(queue)
    chunks = [chunk({"role": "assistant", "content": ""})]
    while any(queues):
        queue = draw(st.sampled_from([q for q in queues if q]))
        kind, value = queue.pop(0)
        if kind == "tool":
            last = chunks[-1]["choices"][0]["delta"] if chunks[-1]["choices"] else {}
            if "tool_calls" in last and draw(st.booleans()):
                last["tool_calls"].append(value)  # several fragments in one chunk
            else:
                chunks.append(tools(value))
        elif kind == "reasoning":
            chunks.append(chunk({draw(st.sampled_from(["reasoning_content", "reasoning"])): value}))
        else:
            chunks.append(content(value))
        noise = draw(st.sampled_from([None, None, None, "empty", "other_choice"]))
        if noise == "empty":
            chunks.append(chunk({"content": "", "reasoning_content": None}))
        elif noise == "other_choice":
            chunks.append(chunk({"content": "choice 1 is not recorded"}, index=1))
    chunks.append(chunk({}, "tool_calls" if answer["calls"] else "stop"))
    last = usage_chunk()
    shape = draw(st.sampled_from(["empty", "null", "missing"]))
    if shape == "null":
        last["choices"] = None
    elif shape == "missing":
        del last["choices"]
    chunks.append(last)
    return answer, chunks


@settings(max_examples=300, deadline=None)
@given(streams())
def test_any_chunking_gives_back_the_same_answer_and_a_valid_log(case):
    answer, chunks = case
    events, outcome = translate(chunks)
    log = recorded(events, turn_finished(TURN, outcome))

    got = fold(events)
    assert got["text"] == answer["text"] and got["reasoning"] == answer["reasoning"]
    expected = sorted((name, orjson.dumps(args, option=orjson.OPT_SORT_KEYS)) for name, args, _ in answer["calls"])
    assert sorted((name, orjson.dumps(orjson.loads(args), option=orjson.OPT_SORT_KEYS))
                  for name, args, done in got["calls"].values() if done) == expected
    assert len(got["calls"]) == len(answer["calls"])
    provider_ids = {f"call_up_{i}" for i, (_, _, has_id) in enumerate(answer["calls"]) if has_id}
    assert provider_ids <= set(got["calls"])
    assert outcome.finish_reason == ("tool_calls" if answer["calls"] else "stop") and outcome.usage == USAGE
    assert sorted((c.tool_call_id, c.name, c.arguments) for c in outcome.tool_calls) == sorted(
        (i, c[0], c[1]) for i, c in got["calls"].items())
    # every chunk is its own event: nothing merged
    assert sum(1 for t, _ in events if t == "text.delta") == sum(
        1 for c in chunks if c.get("choices") and c["choices"][0]["index"] == 0
        and c["choices"][0]["delta"].get("content"))

    # the projection the next step sends upstream (once the tools answered) holds the same answer
    log += [("tool.result", {"tool_call_id": c.tool_call_id, "content": "done", "status": "ok"})
            for c in outcome.tool_calls]
    replay(CID, log)
    messages = messages_at(with_seq(log), len(log), "openai")["messages"]
    check_openai(messages)
    if answer["text"] or answer["calls"]:
        reply = messages[-1 - len(answer["calls"])]
        assert reply["role"] == "assistant" and reply["content"] == (answer["text"] or None)
        assert sorted((c["function"]["name"], orjson.dumps(orjson.loads(c["function"]["arguments"]),
                                                           option=orjson.OPT_SORT_KEYS))
                      for c in reply.get("tool_calls", [])) == expected


@settings(max_examples=300, deadline=None)
@given(streams(), st.data())
def test_a_stream_that_breaks_anywhere_keeps_what_arrived_and_completes_nothing(case, data):
    answer, chunks = case
    cut = data.draw(st.integers(0, len(chunks) - 2))  # before the finish chunk
    fed = chunks[:cut]
    step = StepTranslator(TURN, 0)
    events = [e for c in fed for e in step.feed(c)]
    events += step.abandon()
    log = recorded(events, turn_failed(TURN, {"code": "upstream_error", "message": "connection reset"}))
    conversation = replay(CID, log)

    assert not any(t == "tool_call.completed" for t, _ in events)
    got = fold(events)
    assert answer["text"].startswith(got["text"]) and answer["reasoning"].startswith(got["reasoning"])
    # every argument fragment of a call whose name arrived is in the log, under a deterministic id
    received: dict[int, dict] = {}
    for c in fed:
        for fragment in (c.get("choices") or [{}])[0].get("delta", {}).get("tool_calls", []):
            call = received.setdefault(fragment["index"], {"ordinal": len(received), "id": None, "named": False, "args": ""})
            call["id"] = call["id"] or fragment.get("id")
            call["named"] |= bool(fragment["function"].get("name"))
            call["args"] += fragment["function"].get("arguments", "")
    expected = {call["id"] or made_up_id(TURN, 0, call["ordinal"]): call["args"]
                for call in received.values() if call["named"]}
    assert {i: c[1] for i, c in got["calls"].items()} == expected
    assert all(conversation.calls[i][1] == ABANDONED for i in expected)


# -- examples -------------------------------------------------------------------------


def test_usage_comes_from_the_last_chunk_whose_choices_are_empty():
    events, outcome = translate([content("Hi"), chunk({}, "stop"), usage_chunk()])
    assert events == [("text.delta", {"turn_id": TURN, "text": "Hi"})]
    assert turn_finished(TURN, outcome) == ("turn.finished", {"turn_id": TURN, "finish_reason": "stop", "usage": USAGE})


def test_usage_on_every_chunk_keeps_the_last_and_extra_fields_are_dropped():
    first = content("a") | {"usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
    last = chunk({}, "stop") | {"usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                          "completion_tokens_details": {"reasoning_tokens": 1}}}
    _, outcome = translate([first, last])
    assert outcome.usage == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    _, no_usage = translate([content("a"), chunk({}, "stop")])
    assert turn_finished(TURN, no_usage) == ("turn.finished", {"turn_id": TURN, "finish_reason": "stop"})


def test_a_turns_usage_is_the_sum_of_its_steps():
    assert add_usage(USAGE, USAGE) == {"prompt_tokens": 22, "completion_tokens": 14, "total_tokens": 36}
    assert add_usage(None, USAGE) == USAGE and add_usage(None, None) is None


def test_legacy_function_call_is_one_tool_call_and_finishes_as_tool_calls():
    chunks = [chunk({"role": "assistant", "function_call": {"name": "lookup", "arguments": ""}}),
              chunk({"function_call": {"arguments": '{"q": '}}), chunk({"function_call": {"arguments": '"x"}'}}),
              chunk({}, "function_call")]
    events, outcome = translate(chunks)
    call_id = made_up_id(TURN, 0, 0)
    assert events == [("tool_call.started", {"turn_id": TURN, "tool_call_id": call_id, "name": "lookup"}),
                      ("tool_call.delta", {"tool_call_id": call_id, "text": '{"q": '}),
                      ("tool_call.delta", {"tool_call_id": call_id, "text": '"x"}'}),
                      ("tool_call.completed", {"tool_call_id": call_id})]
    assert (outcome.finish_reason, outcome.upstream_finish_reason) == ("tool_calls", "function_call")
    recorded(events, turn_finished(TURN, outcome))


def test_calls_without_ids_get_the_same_made_up_ids_on_every_replay():
    chunks = [tools(tool(0, name="a", arguments="{}")), tools(tool(1, name="b", arguments="{}")), chunk({}, "tool_calls")]
    first, _ = translate(chunks)
    again, _ = translate(chunks)
    assert first == again
    ids = [d["tool_call_id"] for t, d in first if t == "tool_call.started"]
    assert ids == [made_up_id(TURN, 0, 0), made_up_id(TURN, 0, 1)] and len(set(ids)) == 2
    assert all(i.startswith("call_") and i.replace("_", "").isalnum() for i in ids)
    assert made_up_id(TURN, 1, 0) not in ids  # the next step's calls get other ids


def test_a_reused_or_taken_provider_id_is_replaced_so_the_batch_stays_valid():
    chunks = [tools(tool(0, id="call_0", name="a", arguments="{}")),
              tools(tool(1, id="call_0", name="b", arguments="{}")),  # a server numbering per response
              chunk({}, "tool_calls")]
    events, outcome = translate(chunks)
    assert [c.tool_call_id for c in outcome.tool_calls] == ["call_0", made_up_id(TURN, 0, 1)]
    recorded(events, turn_finished(TURN, outcome))
    _, later = translate(chunks, taken_ids={"call_0"})  # call_0 used by an earlier turn
    assert [c.tool_call_id for c in later.tool_calls] == [made_up_id(TURN, 0, 0), made_up_id(TURN, 0, 1)]


def test_parallel_calls_all_sent_at_index_0_stay_separate():
    chunks = [tools(tool(0, id="call_a", name="a", arguments='{"x":')), tools(tool(0, arguments="1}")),
              tools(tool(0, id="call_b", name="b", arguments="{}")), chunk({}, "tool_calls")]
    _, outcome = translate(chunks)
    assert [(c.tool_call_id, c.name, c.arguments) for c in outcome.tool_calls] == [
        ("call_a", "a", '{"x":1}'), ("call_b", "b", "{}")]


def test_a_split_name_is_started_whole_and_early_fragments_are_kept():
    step = StepTranslator(TURN)
    assert step.feed(tools(tool(0, id="call_1", name="get_", arguments=""))) == []
    assert step.feed(tools(tool(0, name="weather"))) == []
    assert step.feed(tools(tool(0, name="get_weather"))) == []  # a repeat of the whole name so far, not more name
    assert step.feed(tools(tool(0, arguments='{"city"'))) == [
        ("tool_call.started", {"turn_id": TURN, "tool_call_id": "call_1", "name": "get_weather"}),
        ("tool_call.delta", {"tool_call_id": "call_1", "text": '{"city"'})]
    assert step.feed(tools(tool(0, arguments=': "Paris"}'))) == [
        ("tool_call.delta", {"tool_call_id": "call_1", "text": ': "Paris"}'})]


def test_empty_arguments_are_recorded_as_an_empty_object():
    events, outcome = translate([tools(tool(0, id="call_1", name="now", arguments="")), chunk({}, "tool_calls")])
    assert events == [("tool_call.started", {"turn_id": TURN, "tool_call_id": "call_1", "name": "now"}),
                      ("tool_call.completed", {"tool_call_id": "call_1", "arguments": "{}"})]
    assert outcome.tool_calls[0].arguments == "{}"
    recorded(events, turn_finished(TURN, outcome))


def test_invalid_arguments_complete_no_call_and_the_turn_fails_with_the_fragments_kept():
    chunks = [tools(tool(0, id="call_ok", name="a", arguments="{}")),
              tools(tool(1, id="call_cut", name="b", arguments='{"text": "a long ans')), chunk({}, "length")]
    events, outcome = translate(chunks)
    assert outcome.error["code"] == "invalid_tool_call" and "call_cut" in outcome.error["message"]
    assert outcome.finish_reason is None and outcome.tool_calls == ()
    assert not any(t == "tool_call.completed" for t, _ in events)
    with pytest.raises(ValueError):
        turn_finished(TURN, outcome)
    conversation = replay(CID, recorded(events, turn_failed(TURN, outcome.error)))
    assert conversation.calls["call_ok"][1] == conversation.calls["call_cut"][1] == ABANDONED
    assert fold(events)["calls"]["call_cut"][1] == '{"text": "a long ans'


def test_nan_is_not_json_for_the_runner_either():
    _, outcome = translate([tools(tool(0, id="c", name="a", arguments='{"x": NaN}')), chunk({}, "tool_calls")])
    assert outcome.error["code"] == "invalid_tool_call"


def test_a_call_that_never_got_a_name_fails_the_step():
    events, outcome = translate([tools(tool(0, id="c", arguments="{}")), chunk({}, "tool_calls")])
    assert events == [] and outcome.error["code"] == "invalid_tool_call"


@pytest.mark.parametrize("upstream, calls, expected", [
    ("stop", False, "stop"), ("length", False, "length"), ("content_filter", False, "content_filter"),
    ("tool_calls", True, "tool_calls"), ("function_call", True, "tool_calls"),
    ("stop", True, "tool_calls"),  # Ollama reports stop with tool calls
    ("max_tokens", False, "length"), ("end_turn", False, "stop"), ("eos", False, "stop"),
    ("SAFETY", False, "stop"), ("something_new", True, "tool_calls"), (None, False, "stop"),
])
def test_finish_reasons_map_to_the_contracts_four(upstream, calls, expected):
    chunks = [content("x")]
    if calls:
        chunks.append(tools(tool(0, id="c1", name="f", arguments="{}")))
    chunks.append(chunk({}, upstream))
    events, outcome = translate(chunks)
    assert (outcome.finish_reason, outcome.upstream_finish_reason) == (expected, upstream)
    recorded(events, turn_finished(TURN, outcome))


def test_an_upstream_error_mid_stream_fails_the_step_and_keeps_the_text():
    error_chunk = chunk({}, "error") | {"error": {"code": 502, "message": "provider went away"}}
    events, outcome = translate([content("partial "), content("answer"), error_chunk])
    assert outcome.error == {"code": "upstream_error", "message": "provider went away"}
    log = recorded(events, turn_failed(TURN, outcome.error))
    assert messages_at(with_seq(log), len(log), "openai")["messages"][-1] == {"role": "assistant",
                                                                            "content": "partial answer"}
    _, bare = translate([content("x"), chunk({}, "error")])
    assert bare.error["code"] == "upstream_error"


def test_refusal_is_text_reasoning_is_recorded_once_and_other_choices_are_ignored():
    events, _ = translate([
        chunk({"role": "assistant", "content": None, "refusal": None}),
        chunk({"reasoning_content": "think", "reasoning": "think"}),  # a gateway sending both names
        chunk({"reasoning": "more"}),
        chunk({"refusal": "I can't help with that."}),
        chunk({"content": "ignored"}, index=1),
        chunk({}, "stop")])
    assert events == [("reasoning.delta", {"turn_id": TURN, "text": "think"}),
                      ("reasoning.delta", {"turn_id": TURN, "text": "more"}),
                      ("text.delta", {"turn_id": TURN, "text": "I can't help with that."})]


def test_a_broken_stream_writes_buffered_fragments_of_named_calls_and_drops_the_calls():
    step = StepTranslator(TURN)
    events = step.feed(content("Let me look."))
    events += step.feed(tools(tool(0, id="call_1", name="search", arguments="")))  # name maybe not whole yet
    closing = step.abandon()
    assert closing == [("tool_call.started", {"turn_id": TURN, "tool_call_id": "call_1", "name": "search"})]
    log = recorded(events + closing, ("turn.cancelled", {"turn_id": TURN, "reason": "user"}))
    assert replay(CID, log).calls["call_1"][1] == ABANDONED
    assert messages_at(with_seq(log), len(log), "openai")["messages"][-1] == {"role": "assistant",
                                                                            "content": "Let me look."}
    with pytest.raises(RuntimeError):
        step.feed(content("late"))


def test_a_completed_call_waits_for_its_result():
    events, outcome = translate([tools(tool(0, id="call_1", name="f", arguments='{"a": 1}')), chunk({}, "tool_calls")])
    conversation = replay(CID, recorded(events, turn_finished(TURN, outcome)))
    assert conversation.calls["call_1"][1] == COMPLETED


# -- the request body and its hash ---------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Current weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_the_request_streams_with_usage_and_carries_tools_and_params():
    body = request_body("gpt-4o", MESSAGES, TOOLS, "auto", {"temperature": 0.2, "max_tokens": 100, "seed": 7})
    assert body == {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True},
                    "tools": TOOLS, "tool_choice": "auto", "temperature": 0.2, "max_tokens": 100, "seed": 7}
    assert "tools" not in request_body("gpt-4o", MESSAGES, [], None)  # OpenAI refuses an empty list


@pytest.mark.parametrize("key", ["model", "messages", "stream", "stream_options", "tools", "tool_choice", "n"])
def test_params_that_would_override_the_runner_are_refused(key):
    with pytest.raises(ValueError, match=key):
        request_body("m", MESSAGES, params={key: 1})


def test_tool_choice_without_tools_and_an_empty_model_are_refused():
    with pytest.raises(ValueError, match="tool_choice"):
        request_body("m", MESSAGES, None, "auto")
    with pytest.raises(ValueError, match="model"):
        request_body("", MESSAGES)


def reorder(value):
    """The same JSON with every object's keys in reverse order (as jsonb may give them back)."""
    if isinstance(value, dict):
        return {k: reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reorder(v) for v in value]
    return value


def test_the_body_rebuilt_from_model_requested_hashes_the_same():
    body = request_body("gpt-4o", MESSAGES, TOOLS, {"type": "function", "function": {"name": "weather"}},
                        {"temperature": 0.7, "stop": ["\n\n"], "top_p": 1.0})
    type_, data = model_requested(TURN, 2, 5, body)
    assert type_ == "model.requested" and data["request_sha256"] == sha256_hex(encode(body))
    assert {k: data[k] for k in ("turn_id", "step", "at_seq", "model")} == {"turn_id": TURN, "step": 2, "at_seq": 5,
                                                                            "model": "gpt-4o"}
    assert data["params"] == {"temperature": 0.7, "stop": ["\n\n"], "top_p": 1.0} and data["tools"] == TOOLS
    stored = reorder(orjson.loads(orjson.dumps(data)))  # through the log and back, keys in another order
    rebuilt = rebuild_body(stored, reorder(MESSAGES))
    assert encode(rebuilt) == encode(body) and sha256_hex(encode(rebuilt)) == data["request_sha256"]
    assert "params" not in model_requested(TURN, 0, 3, request_body("m", MESSAGES))[1]
