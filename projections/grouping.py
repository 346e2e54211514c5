"""The grouping both message formats share: which assistant messages and tool
results the history shows, and in which order. Renderers only translate it.

Yields provider-neutral tuples:
- `("system", content)` and `("user", content, name or None)`;
- `("assistant", text, calls)`: `calls` is a list of `(tool_call_id, call)`,
  `text` may be "" only when there are calls;
- `("tool", tool_call_id, content: str, status)`, right after its assistant
  message, one per call in call order; `status` is None for a synthetic result.
"""

from __future__ import annotations

from typing import Iterator

import orjson

from domain.schemas import STARTED

# Turns whose completed calls without a result get a synthetic one: nothing
# will run them any more, and a call may not stand unanswered.
_DEAD_TURNS = ("cancelled", "failed")


def grouped(state: dict) -> Iterator[tuple]:
    calls, turns = state["calls"], state["turns"]
    if state["system"]:
        yield ("system", state["system"])
    # The assistant message not yet yielded: a following step may still merge into it.
    held: list | None = None
    for item in state["items"]:
        if item["kind"] != "step":
            if held is not None:
                yield from _assistant(held, turns)
                held = None
            if item["kind"] == "user":
                yield ("user", item["content"], item["name"])
            else:
                yield ("system", item["content"])
            continue
        text = "".join(item["text"])
        shown = [(call_id, calls[call_id]) for call_id in item["calls"] if _shown(calls[call_id], turns)]
        if not text and not shown:
            continue
        if held is not None and not held[1]:
            # Nothing stands between the two steps (a message with calls would be
            # followed by its results), so they are one assistant message.
            held = ["\n".join(t for t in (held[0], text) if t), shown]
        else:
            if held is not None:
                yield from _assistant(held, turns)
            held = [text, shown]
    if held is not None:
        yield from _assistant(held, turns)


def _shown(call: dict, turns: dict) -> bool:
    # A call never completed is dropped; a completed one without a result waits
    # for it (left out) unless its turn died.
    if call["status"] == STARTED:
        return False
    return call["result"] is not None or turns[call["turn_id"]] in _DEAD_TURNS


def _assistant(held: list, turns: dict) -> Iterator[tuple]:
    text, shown = held
    yield ("assistant", text, shown)
    for call_id, call in shown:
        result = call["result"]
        if result is None:
            reason = turns[call["turn_id"]]
            yield ("tool", call_id, orjson.dumps({"error": "no_result", "reason": reason}).decode(), None)
        else:
            content = result["content"]
            if not isinstance(content, str):
                content = orjson.dumps(content).decode()
            yield ("tool", call_id, content, result["status"])
