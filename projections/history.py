"""The message-history fold every message projection shares.

`fold(state, event)` turns the event log into steps, tool calls and results;
the renderers (projections.openai, projections.anthropic) only read the state.

The state is plain JSON (dicts, lists, str, int, None) so the store can keep a
snapshot of it and fold only the tail:
`fold_all(tail, state_from_json(state_to_json(fold_all(head))))` equals
`fold_all(head + tail)` exactly. Nothing depends on dict key order, because a
jsonb column does not keep it.

State shape:
- `seq`: the last seq folded; `system`: conversation.created's system or None.
- `items`: the history in order, each `{"kind": "system"|"user", "content", "name"}`
  or a step `{"kind": "step", "turn_id", "text": [...], "reasoning": [...], "calls": [tool_call_id...]}`.
  Texts stay lists of deltas: joining on every delta would be quadratic.
- `calls`: tool_call_id -> `{"name", "turn_id", "step": index in items, "status": the call's lifecycle
  (domain.schemas STARTED / COMPLETED / PENDING / FINAL), "deltas": [...], "arguments": str once completed,
  "result": {"content", "status"} or None}`.
- `turns`: turn_id -> "open" | "finished" | "cancelled" | "failed".
- `open_turn`: the open turn_id or None; `step`: index of the step that output
  goes to, or None when the next output starts a new step (always None while
  no turn is open).
"""

from __future__ import annotations

from typing import Iterable

import orjson

from domain.schemas import COMPLETED, FINAL, PENDING, STARTED

# Bump when the state's shape or meaning changes: older snapshots are then refused.
VERSION = 2


def initial_state() -> dict:
    return {"version": VERSION, "seq": 0, "system": None, "items": [], "calls": {},
            "turns": {}, "open_turn": None, "step": None}


def fold(state: dict, event: dict) -> dict:
    """Fold one event into `state`, which is changed in place (copying the state
    per event would make a fold quadratic) and returned.

    Uses only the event's `seq`, `type` and `data`. An event the domain would
    refuse for its place in the history (wrong or closed turn, unknown or
    finished call, second final result, message during a turn, second
    conversation.created) changes nothing but `seq`, so reading a history never
    fails; shapes and argument JSON are not checked again.
    """
    handler = _HANDLERS.get(event["type"])
    if handler is not None:
        handler(state, event["data"])
    state["seq"] = event["seq"]
    return state


def fold_all(events: Iterable[dict], state: dict | None = None) -> dict:
    """Fold `events` (in seq order) into `state`, or into a fresh state."""
    if state is None:
        state = initial_state()
    for event in events:
        fold(state, event)
    return state


def state_to_json(state: dict) -> bytes:
    return orjson.dumps(state)


def state_from_json(raw: bytes | str) -> dict:
    """Load a snapshot; raises ValueError when it was made by another fold
    version, so the caller folds from seq 1 instead of trusting it."""
    state = orjson.loads(raw)
    if state.get("version") != VERSION:
        raise ValueError(f"snapshot of fold version {state.get('version')!r}, this is {VERSION}")
    return state


# -- handlers: (state, data) -> None ------------------------------------------

def _created(state: dict, data: dict) -> None:
    # Only when set: an empty system prompt is no system prompt.
    if state["seq"] == 0 and data.get("system"):
        state["system"] = data["system"]


def _message(kind: str):
    def handle(state: dict, data: dict) -> None:
        if state["open_turn"] is None:
            state["items"].append({"kind": kind, "content": data["content"], "name": data.get("name")})
    return handle


def _turn_started(state: dict, data: dict) -> None:
    turn_id = data["turn_id"]
    if state["open_turn"] is None and turn_id not in state["turns"]:
        state["turns"][turn_id] = "open"
        state["open_turn"] = turn_id


def _turn_closed(status: str):
    def handle(state: dict, data: dict) -> None:
        if data["turn_id"] == state["open_turn"]:
            state["turns"][data["turn_id"]] = status
            state["open_turn"] = None
            state["step"] = None
    return handle


def _current_step(state: dict) -> dict:
    # Steps are made on their first output, so boundaries without output
    # (a turn with no output, a result followed by nothing) leave no empty steps.
    if state["step"] is None:
        state["items"].append({"kind": "step", "turn_id": state["open_turn"], "text": [], "reasoning": [], "calls": []})
        state["step"] = len(state["items"]) - 1
    return state["items"][state["step"]]


def _delta(field: str):
    def handle(state: dict, data: dict) -> None:
        if data["turn_id"] == state["open_turn"]:
            _current_step(state)[field].append(data["text"])
    return handle


def _call_started(state: dict, data: dict) -> None:
    call_id = data["tool_call_id"]
    if data["turn_id"] == state["open_turn"] and call_id not in state["calls"]:
        _current_step(state)["calls"].append(call_id)
        state["calls"][call_id] = {"name": data["name"], "turn_id": data["turn_id"], "step": state["step"],
                                   "status": STARTED, "deltas": [], "arguments": None, "result": None}


def _open_call(state: dict, call_id: str) -> dict | None:
    # Closing a turn abandons its incomplete calls: they take no more input.
    call = state["calls"].get(call_id)
    if call is None or call["status"] != STARTED or call["turn_id"] != state["open_turn"]:
        return None
    return call


def _call_delta(state: dict, data: dict) -> None:
    call = _open_call(state, data["tool_call_id"])
    if call is not None:
        call["deltas"].append(data["text"])


def _call_completed(state: dict, data: dict) -> None:
    call = _open_call(state, data["tool_call_id"])
    if call is not None:
        arguments = data.get("arguments")
        call["arguments"] = "".join(call["deltas"]) if arguments is None else arguments
        call["deltas"] = []  # no longer needed: keeps snapshots small
        call["status"] = COMPLETED


def _result(state: dict, data: dict) -> None:
    call = state["calls"].get(data["tool_call_id"])
    if call is None or call["status"] == STARTED:
        return  # a call never completed is dropped, its results too
    if call["status"] == FINAL:
        return  # the first final result stays
    # A result for one of the current step's own calls ends that step: what the
    # model says next answers the result. Results for older steps' calls (late,
    # or final after pending) land in their own place and split nothing.
    if call["step"] == state["step"]:
        state["step"] = None
    call["result"] = {"content": data["content"], "status": data["status"]}
    call["status"] = PENDING if data["status"] == "pending" else FINAL


_HANDLERS = {
    "conversation.created": _created,
    "message.user": _message("user"),
    "message.system": _message("system"),
    "turn.started": _turn_started,
    "text.delta": _delta("text"),
    "reasoning.delta": _delta("reasoning"),
    "tool_call.started": _call_started,
    "tool_call.delta": _call_delta,
    "tool_call.completed": _call_completed,
    "tool.result": _result,
    "turn.finished": _turn_closed("finished"),
    "turn.cancelled": _turn_closed("cancelled"),
    "turn.failed": _turn_closed("failed"),
    # conversation.titled changes no message.
}
