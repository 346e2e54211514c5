"""What a valid history looks like, for property tests of any layer.

- event builders (`history(user("hi"), started("t1"), ...)`) for scenario tests;
- `DomainRules` / `first_invalid_index`: the contract's event-table rules as a
  small reference model;
- hypothesis strategies: `valid_event_sequences()` and
  `event_sequences_with_one_invalid()` -> (events, index of the first invalid);
- `check_openai` / `check_anthropic`: what the providers' servers accept,
  raising AssertionError naming the broken rule.
"""

from __future__ import annotations

import json
import re

import orjson

from hypothesis import strategies as st

# -- builders: each returns (type, data); history() numbers them --------------


def created(system=None):
    return ("conversation.created", {"metadata": {}} if system is None else {"metadata": {}, "system": system})


def user(content, name=None):
    return ("message.user", {"content": content} if name is None else {"content": content, "name": name})


def system(content):
    return ("message.system", {"content": content})


def started(turn_id):
    return ("turn.started", {"turn_id": turn_id})


def text(turn_id, text):
    return ("text.delta", {"turn_id": turn_id, "text": text})


def reasoning(turn_id, text):
    return ("reasoning.delta", {"turn_id": turn_id, "text": text})


def call(turn_id, tool_call_id, name="search"):
    return ("tool_call.started", {"turn_id": turn_id, "tool_call_id": tool_call_id, "name": name})


def args(tool_call_id, text):
    return ("tool_call.delta", {"tool_call_id": tool_call_id, "text": text})


def completed(tool_call_id, arguments=None):
    data = {"tool_call_id": tool_call_id}
    if arguments is not None:
        data["arguments"] = arguments
    return ("tool_call.completed", data)


def result(tool_call_id, content, status="ok"):
    return ("tool.result", {"tool_call_id": tool_call_id, "content": content, "status": status})


def finished(turn_id, finish_reason="stop"):
    return ("turn.finished", {"turn_id": turn_id, "finish_reason": finish_reason})


def cancelled(turn_id):
    return ("turn.cancelled", {"turn_id": turn_id})


def failed(turn_id):
    return ("turn.failed", {"turn_id": turn_id, "error": {"code": "upstream_error", "message": "Upstream broke."}})


def titled(title):
    return ("conversation.titled", {"title": title})


def history(*pairs, created_first=True) -> list[dict]:
    """Stored events with seq 1..n; a conversation.created is put first unless given."""
    if created_first and (not pairs or pairs[0][0] != "conversation.created"):
        pairs = (created(),) + pairs
    return [{"conversation_id": "c0ffee00-0000-4000-8000-000000000000", "seq": i, "position": i,
             "id": f"event-{i}", "type": type_, "data": data, "created_at": "2026-11-21T10:00:00Z"}
            for i, (type_, data) in enumerate(pairs, start=1)]


# -- the domain's rules ----------------------------------------------------------

STARTED, COMPLETED, FINAL, ABANDONED = "started", "completed", "final", "abandoned"
_TURN_EVENTS = ("text.delta", "reasoning.delta", "tool_call.started", "turn.finished", "turn.cancelled", "turn.failed")


class DomainRules:
    """The event table's rules, one event at a time: `broken_rule` names the
    rule an event would break (None: allowed), `apply` records an allowed one."""

    def __init__(self):
        self.seq = 0
        self.open_turn = None
        self.turns: set[str] = set()
        self.calls: dict[str, dict] = {}  # tool_call_id -> {"turn_id", "status", "deltas"}

    def broken_rule(self, type_: str, data: dict) -> str | None:
        if self.seq == 0:
            return None if type_ == "conversation.created" else "seq 1 is conversation.created"
        if type_ == "conversation.created":
            return "conversation.created is only seq 1"
        if type_ in ("message.user", "message.system"):
            return "no message while a turn is open" if self.open_turn else None
        if type_ == "turn.started":
            if self.open_turn:
                return "one open turn at a time"
            return "turn_id unique in the conversation" if data["turn_id"] in self.turns else None
        if type_ in _TURN_EVENTS:
            if self.open_turn is None or data["turn_id"] != self.open_turn:
                return "needs that open turn"
            if type_ == "tool_call.started" and data["tool_call_id"] in self.calls:
                return "tool_call_id unique in the conversation"
            return None
        if type_ in ("tool_call.delta", "tool_call.completed"):
            call = self.calls.get(data["tool_call_id"])
            if call is None or call["status"] != STARTED:
                return "needs a started, not completed call of the open turn"
            if type_ == "tool_call.completed":
                arguments = data.get("arguments")
                try:
                    orjson.loads("".join(call["deltas"]) if arguments is None else arguments)
                except orjson.JSONDecodeError:
                    return "arguments must be JSON"
            return None
        if type_ == "tool.result":
            call = self.calls.get(data["tool_call_id"])
            if call is None or call["status"] in (STARTED, ABANDONED):
                return "needs a completed call"
            return "one final result" if call["status"] == FINAL else None
        return None if type_ == "conversation.titled" else f"unknown type {type_}"

    def apply(self, type_: str, data: dict) -> None:
        self.seq += 1
        if type_ == "turn.started":
            self.open_turn = data["turn_id"]
            self.turns.add(self.open_turn)
        elif type_ in ("turn.finished", "turn.cancelled", "turn.failed"):
            for c in self.calls.values():
                if c["turn_id"] == self.open_turn and c["status"] == STARTED:
                    c["status"] = ABANDONED
            self.open_turn = None
        elif type_ == "tool_call.started":
            self.calls[data["tool_call_id"]] = {"turn_id": data["turn_id"], "status": STARTED, "deltas": []}
        elif type_ == "tool_call.delta":
            self.calls[data["tool_call_id"]]["deltas"].append(data["text"])
        elif type_ == "tool_call.completed":
            self.calls[data["tool_call_id"]]["status"] = COMPLETED
        elif type_ == "tool.result" and data["status"] != "pending":
            self.calls[data["tool_call_id"]]["status"] = FINAL

    def with_status(self, *statuses: str) -> list[str]:
        return [cid for cid, c in self.calls.items() if c["status"] in statuses]


def first_invalid_index(events: list[dict]) -> int | None:
    rules = DomainRules()
    for i, event in enumerate(events):
        if rules.broken_rule(event["type"], event["data"]) is not None:
            return i
        rules.apply(event["type"], event["data"])
    return None


# -- data -------------------------------------------------------------------------

texts = st.one_of(st.sampled_from(["", " ", "\n", "Hello", " world", "."]), st.text(max_size=6))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
json_texts = st.one_of(st.dictionaries(st.text(max_size=4), json_values, max_size=3), json_values).map(json.dumps)
_parts = st.one_of(
    texts.map(lambda t: {"type": "text", "text": t}),
    st.sampled_from(["https://example.com/cat.png", "data:image/png;base64,iVBORw0KGgo="]).map(
        lambda url: {"type": "image_url", "image_url": {"url": url}}),
)
user_contents = st.one_of(texts, st.lists(_parts, min_size=1, max_size=3))
results = st.tuples(st.one_of(texts, json_values), st.sampled_from(["ok", "error", "pending"]))


def _turn_id(rules: DomainRules) -> str:
    return f"turn_{len(rules.turns) + 1}"


def _call_id(draw, rules: DomainRules) -> str:
    # Some ids from other providers break Anthropic's id pattern.
    return draw(st.sampled_from(["call_{}", "functions.search:{}"])).format(len(rules.calls) + 1)


# -- valid sequences ----------------------------------------------------------------


def _next_valid(draw, rules: DomainRules, plans: dict) -> tuple[str, dict]:
    """One allowed event, chosen among everything the rules allow now."""
    started_calls = [cid for cid in rules.with_status(STARTED) if rules.calls[cid]["turn_id"] == rules.open_turn]
    answerable = rules.with_status(COMPLETED)
    # Weighted so that calls usually complete, and results often come late.
    if rules.open_turn is None:
        weights = {"titled": 1, "user": 2, "system": 1, "turn": 4}
    else:
        weights = {"titled": 1, "text": 3, "reasoning": 1, "call": 2, "end": 2, "call_input": 8 * bool(started_calls)}
    weights["result"] = (2 if rules.open_turn else 5) * bool(answerable)
    choices = [choice for choice, weight in weights.items() for _ in range(weight)]
    choice = draw(st.sampled_from(choices))
    turn = rules.open_turn
    if choice == "titled":
        return titled(draw(texts))
    if choice == "user":
        return user(draw(user_contents), draw(st.none() | st.sampled_from(["alice", "bob"])))
    if choice == "system":
        return system(draw(texts))
    if choice == "turn":
        return started(_turn_id(rules))
    if choice == "text":
        return text(turn, draw(texts))
    if choice == "reasoning":
        return reasoning(turn, draw(texts))
    if choice == "call":
        cid = _call_id(draw, rules)
        plans[cid] = draw(json_texts)
        return call(turn, cid, draw(st.sampled_from(["search", "get_weather"])))
    if choice == "end":
        return draw(st.sampled_from([finished(turn, "tool_calls"), finished(turn), cancelled(turn), failed(turn)]))
    if choice == "call_input":
        return _call_input(draw, rules, plans, draw(st.sampled_from(started_calls)))
    content, status = draw(results)
    return result(draw(st.sampled_from(answerable)), content, status)


def _call_input(draw, rules: DomainRules, plans: dict, cid: str) -> tuple[str, dict]:
    """Deltas stream the call's planned arguments; completion gives them
    explicitly unless the deltas so far already parse."""
    sent = "".join(rules.calls[cid]["deltas"])
    rest = plans[cid][len(sent):]
    if rest and draw(st.booleans()):
        return args(cid, rest[:draw(st.integers(1, len(rest)))])
    try:
        json.loads(sent)
        given = draw(st.none() | json_texts)
    except ValueError:
        given = draw(json_texts)
    return completed(cid, given)


def _grow(draw, rules: DomainRules, pairs: list, count: int, plans: dict) -> None:
    for _ in range(count):
        pair = _next_valid(draw, rules, plans)
        assert rules.broken_rule(*pair) is None, (pair, "the generator made an invalid event")
        rules.apply(*pair)
        pairs.append(pair)


@st.composite
def valid_event_sequences(draw, max_events: int = 40) -> list[dict]:
    """Stored events (seq 1..n, conversation.created first) that the domain accepts."""
    rules, plans = DomainRules(), {}
    pairs = [created(draw(st.none() | texts))]
    rules.apply(*pairs[0])
    _grow(draw, rules, pairs, draw(st.integers(0, max_events - 1)), plans)
    return history(*pairs, created_first=False)


# -- one invalid event -----------------------------------------------------------------


def _invalid(draw, rules: DomainRules) -> tuple[str, dict]:
    """One event breaking a rule, each rule about equally likely."""
    open_turn = rules.open_turn
    other_turn = draw(st.sampled_from(sorted(rules.turns - {open_turn}) + ["turn_unknown"]))
    unusable = draw(st.sampled_from(rules.with_status(COMPLETED, FINAL, ABANDONED) + ["call_unknown"]))
    candidates = [
        draw(st.sampled_from([text(other_turn, "x"), call(other_turn, "call_new"), cancelled(other_turn)])),
        draw(st.sampled_from([args(unusable, "{}"), completed(unusable, "{}")])),
        result(draw(st.sampled_from(rules.with_status(STARTED, ABANDONED) + ["call_unknown"])), "early", "ok"),
        created("A second prompt"),
    ]
    if rules.with_status(FINAL):
        candidates.append(result(draw(st.sampled_from(rules.with_status(FINAL))), "again", "ok"))
    if open_turn:
        candidates += [draw(st.sampled_from([user("hi"), system("be brief")])), started(_turn_id(rules))]
        mine = [cid for cid in rules.with_status(STARTED) if rules.calls[cid]["turn_id"] == open_turn]
        if mine:
            candidates.append(completed(draw(st.sampled_from(mine)), "{not json"))
        if rules.calls:
            candidates.append(call(open_turn, draw(st.sampled_from(sorted(rules.calls)))))
    elif rules.turns:
        candidates.append(started(draw(st.sampled_from(sorted(rules.turns)))))
    return draw(st.sampled_from(candidates))


@st.composite
def event_sequences_with_one_invalid(draw, max_events: int = 40) -> tuple[list[dict], int]:
    """(events, index): events[:index] is valid, events[index] breaks a rule;
    valid-looking events may follow it."""
    if draw(st.integers(0, 19)) == 0:
        return history(user("hi"), created(), created_first=False), 0
    rules, plans = DomainRules(), {}
    pairs = [created()]
    rules.apply(*pairs[0])
    _grow(draw, rules, pairs, draw(st.integers(0, max_events - 5)), plans)
    bad = _invalid(draw, rules)
    assert rules.broken_rule(*bad) is not None, (bad, "the generator made a valid event")
    index = len(pairs)
    pairs.append(bad)
    _grow(draw, rules, pairs, draw(st.integers(0, 4)), plans)
    return history(*pairs, created_first=False), index


# -- what the providers accept ------------------------------------------------------

_OPENAI_KEYS = {"system": {"role", "content"}, "user": {"role", "content", "name"},
                "assistant": {"role", "content", "tool_calls"}, "tool": {"role", "tool_call_id", "content"}}


def check_openai(messages: list[dict]) -> None:
    """Chat Completions' rules for `messages`, plus the contract's: adjacent
    assistant messages are merged and tool messages follow in call order."""
    call_ids: set[str] = set()
    i = 0
    while i < len(messages):
        m, where = messages[i], f"messages[{i}]"
        role = m.get("role")
        assert role in _OPENAI_KEYS and "content" in m and set(m) <= _OPENAI_KEYS[role], f"{where}: bad shape {m}"
        assert role != "tool", f"{where}: tool message that answers no tool call of the assistant message before it"
        if role == "system":
            assert isinstance(m["content"], str), f"{where}: system content must be a string"
        elif role == "user":
            content = m["content"]
            assert isinstance(content, str) or (isinstance(content, list) and content and all(
                isinstance(p, dict) and "type" in p for p in content)), f"{where}: bad user content"
            assert isinstance(m.get("name", ""), str), f"{where}: name must be a string"
        else:
            calls = m.get("tool_calls")
            assert "tool_calls" not in m or (isinstance(calls, list) and calls), f"{where}: empty tool_calls"
            content = m["content"]
            assert (content is None and calls) or (isinstance(content, str) and content), \
                f"{where}: assistant content is null only with tool_calls, and never empty"
            assert i == 0 or messages[i - 1]["role"] != "assistant", f"{where}: adjacent assistant messages"
            ids = []
            for c in calls or []:
                assert set(c) == {"id", "type", "function"} and c["type"] == "function", f"{where}: bad call {c}"
                assert set(c["function"]) == {"name", "arguments"}, f"{where}: bad function {c}"
                assert isinstance(c["function"]["arguments"], str), f"{where}: arguments must be a string"
                assert c["id"] not in call_ids, f"{where}: tool call id {c['id']} used twice"
                call_ids.add(c["id"])
                ids.append(c["id"])
            answers = messages[i + 1:i + 1 + len(ids)]
            assert [a.get("role") for a in answers] == ["tool"] * len(ids) and \
                [a.get("tool_call_id") for a in answers] == ids, \
                f"{where}: each tool call needs its tool message right after, in call order"
            assert all(isinstance(a["content"], str) for a in answers), f"{where}: tool content must be a string"
            i += len(ids)
        i += 1


_ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]+")


def check_anthropic(body: dict) -> None:
    """The Messages API's rules for `{"system", "messages"}`."""
    system_text = body["system"]
    assert system_text is None or (isinstance(system_text, str) and system_text.strip()), "empty system"
    open_ids: list[str] = []  # tool_use ids the next user message must answer
    use_ids: set[str] = set()
    for i, m in enumerate(body["messages"]):
        where = f"messages[{i}]"
        assert set(m) == {"role", "content"}, f"{where}: bad shape {m}"
        assert m["role"] == ("user" if i % 2 == 0 else "assistant"), f"{where}: roles alternate, starting with user"
        blocks = m["content"]
        assert isinstance(blocks, list) and blocks, f"{where}: empty content"
        for b in blocks:
            assert b.get("type") != "text" or (isinstance(b["text"], str) and b["text"].strip()), \
                f"{where}: text blocks must contain non-whitespace text"
        if m["role"] == "assistant":
            assert not open_ids
            for b in blocks:
                assert b["type"] in ("text", "tool_use"), f"{where}: bad assistant block {b}"
                if b["type"] == "tool_use":
                    assert set(b) == {"type", "id", "name", "input"} and isinstance(b["input"], dict), \
                        f"{where}: bad tool_use {b}"
                    assert _ANTHROPIC_ID.fullmatch(b["id"]) and b["id"] not in use_ids, f"{where}: bad id {b['id']}"
                    use_ids.add(b["id"])
                    open_ids.append(b["id"])
        else:
            n = next((k for k, b in enumerate(blocks) if b["type"] != "tool_result"), len(blocks))
            assert all(b["type"] != "tool_result" for b in blocks[n:]), f"{where}: tool_result blocks come first"
            assert [b["tool_use_id"] for b in blocks[:n]] == open_ids, \
                f"{where}: must answer exactly the previous assistant's tool_use blocks"
            for b in blocks[:n]:
                assert set(b) <= {"type", "tool_use_id", "content", "is_error"}, f"{where}: bad tool_result {b}"
                assert isinstance(b["content"], str) and b["content"].strip(), f"{where}: empty tool_result"
                assert b.get("is_error", True) is True, f"{where}: is_error is only ever true"
            open_ids = []
    assert not open_ids, "the last assistant message's tool_use blocks are unanswered"
