"""`format=ui`: events as the Vercel AI SDK's UI message stream, protocol v1.

Pure: `ui_chunks(state, event)` translates one stored event into the chunks it
gives (zero or more) and updates `state` in place; `ui_frames` numbers them
`<seq>:<k>`; `UiStream` gives a stream's frames batch by batch, with its
`[DONE]` markers. The state is plain JSON with a version, like the history
fold's, so a snapshot plus the remaining events gives exactly the frames a
fold from seq 1 gives; nothing depends on dict key order (jsonb does not keep
it).

Every chunk passes the `ai` package's own `uiMessageChunkSchema` (checked by
tests/test_ui_stream.py with the real SDK, 5.x and 6.x) and uses no field the
schema does not declare, so SDK versions with strict schemas accept it too.

What the stream says:
- one assistant UI message per turn, `messageId` = turn_id: `turn.started` gives
  `start` + `start-step`; the turn's end closes it (`finish`, `abort`, or
  `error` + `finish`, see `_turn_end`).
- text and reasoning: a part per uninterrupted run of one kind; anything else
  that adds to the message (the other kind, tool input) closes the open part
  first, so the parts stand in the order the events came. Part ids are
  `text-<seq>` / `reasoning-<seq>` of the opening event: no counter to keep.
  Empty deltas are sent like any other (every output event gives frames).
- steps follow the history fold (projections.history): a result for one of the
  step's own calls ends the step and the next output opens a new one
  (`finish-step` + `start-step`). One exception: while a call of the step is
  still streaming its input the step stays open in the UI, because the SDK
  only updates a call's input inside the step it started in; the new history
  step then joins the UI step.
- tool calls are static tool parts (`tool-<name>`). A result gives
  `tool-output-available` (`preliminary: true` for `pending`, which the final
  result replaces) or `tool-output-error`.
- a result arriving after its turn ended re-opens that turn's message
  (`start` with the same messageId, the output, `finish`) when that message is
  still the stream's latest one; the SDK then updates the call in place. When
  another turn has started since, re-opening would make SDK readers reset the
  old message to just this call, so nothing is sent: the history projection
  and `format=events` show the result.
- events outside turns (conversation.created, messages, titles) give nothing:
  the protocol only carries assistant messages.
"""

from __future__ import annotations

from typing import Iterable

import orjson

from domain.schemas import COMPLETED, PENDING, STARTED, TURN_ENDS
from projections.compact import compact

# Bump when the state's shape or meaning changes: older snapshots are then refused.
VERSION = 2
# The SDK's FinishReason spellings.
_FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool-calls", "content_filter": "content-filter"}
_DELTAS = ("text.delta", "reasoning.delta", "tool_call.delta")
_ALL = float("inf")  # k of a bare `<seq>` resume point: after all of that event's frames


def initial_ui_state() -> dict:
    """- `seq`: last seq translated; `message_id`: turn_id of the latest started
    turn (the message SDK readers hold); `open_turn`: the open turn_id or None
    (the same name as in the history fold and `open_turn_id` in the API);
    - `part`: the open text/reasoning part `{"type", "id"}` or None;
    - `step`: history steps begun in the open turn; `step_open`: whether output
      still goes to that step (False at turn start and after a step-ending result);
    - `calls`: tool_call_id -> `{"turn_id", "name", "seq" (started at), "step",
      "deltas", "status"}` (the call lifecycle of domain.schemas: STARTED,
      COMPLETED, PENDING), for calls of the open turn and for completed calls
      still waiting for a final result."""
    return {"version": VERSION, "seq": 0, "message_id": None, "open_turn": None, "part": None,
            "step": 0, "step_open": False, "calls": {}}


def ui_chunks(state: dict, event: dict) -> list[dict]:
    """The chunks one stored event gives, in order; `state` is updated in place.
    Events the domain would refuse for their place give nothing, so a stream
    never fails on history."""
    handler = _HANDLERS.get(event["type"])
    chunks = handler(state, event) if handler is not None else []
    state["seq"] = event["seq"]
    return chunks


def ui_frames(events: Iterable[dict], state: dict | None = None) -> list[tuple[str, dict]]:
    """`(frame id, chunk)` for `events` in seq order, from `state` (updated) or
    a fresh one. Ids are `<seq>:<k>`, k counting the chunks of one event.

    Accepts compacted deltas (projections.compact) too: a merged run gives the
    frames of its first event with the joined text, each id being the id of the
    last uncompacted frame it stands for (`<first_seq>:<k>`, and `<seq>:0` for
    the delta). So the ids are those of the uncompacted stream and resuming
    after any of them is exact in either view."""
    if state is None:
        state = initial_ui_state()
    frames = []
    for event in events:
        first = _run_first_seq(state, event)
        chunks = ui_chunks(state, event)
        if first is None:
            ids = [f"{event['seq']}:{k}" for k in range(len(chunks))]
        else:
            ids = [f"{first}:{k}" for k in range(len(chunks) - 1)] + [f"{event['seq']}:0"]
        frames.extend(zip(ids, chunks))
    return frames


def ui_frames_after(events: Iterable[dict], after: str | tuple[int, int | None], state: dict | None = None,
                    compacted: bool = False) -> list[tuple[str, dict]]:
    """The frames after resume point `after` (`"<seq>:<k>"`, `"<seq>"` = after
    all of that event's frames, or the `(seq, k or None)` pair api.sse gives).

    `events`: every event from seq 1 in order, or from `state["seq"] + 1` when
    `state` is a snapshot taken before the resume point's event. For a
    conversation stream that means seq 1 or a snapshot: a late tool result
    needs its call from an older turn. For one turn's stream
    (`/turns/{turn_id}/stream`) pass that turn's events from its `turn.started`
    with no state: a fresh state gives the same frames for them.
    `compacted=True` compacts the events after the resume point's seq (never a
    run the reader has seen part of)."""
    seq, k = parse_frame_id(after) if isinstance(after, str) else after
    k = _ALL if k is None else k
    if state is None:
        state = initial_ui_state()
    elif state["seq"] > seq or (state["seq"] == seq and k != _ALL):
        raise ValueError(f"the snapshot (seq {state['seq']}) is past the resume point {seq}:{k}")
    events = [e for e in events if e["seq"] > state["seq"]]  # a snapshot already holds the earlier ones
    head = [e for e in events if e["seq"] <= seq]
    tail = [e for e in events if e["seq"] > seq]
    frames = ui_frames(head, state) + ui_frames(compact(tail) if compacted else tail, state)
    return [frame for frame in frames if parse_frame_id(frame[0]) > (seq, k)]


def parse_frame_id(frame_id: str) -> tuple[int, int | None]:
    """`"12:3"` -> (12, 3); `"12"` -> (12, None). Raises ValueError otherwise."""
    seq, sep, k = frame_id.strip().partition(":")
    if not seq.isdecimal() or (sep and not k.isdecimal()):
        raise ValueError(f"a frame id is <seq> or <seq>:<k>, not {frame_id!r}")
    return int(seq), int(k) if sep else None


def is_turn_end(event: dict) -> bool:
    """Whether `event` ends a turn: the stream sends `data: [DONE]` after its frames."""
    return event["type"] in TURN_ENDS


def ui_state_from_json(raw: bytes | str) -> dict:
    """Load a snapshot (made with orjson.dumps(state)); raises ValueError for
    another version, so the caller translates from seq 1 instead."""
    state = orjson.loads(raw)
    if state.get("version") != VERSION:
        raise ValueError(f"ui snapshot of version {state.get('version')!r}, this is {VERSION}")
    return state


def _run_first_seq(state: dict, event: dict) -> int | None:
    """The first seq of a compacted run of two or more deltas, else None. Only
    trusted when it lies between the last translated seq and this one."""
    if event["type"] not in _DELTAS:
        return None
    first = event["data"].get("first_seq")
    if isinstance(first, int) and state["seq"] < first < event["seq"]:
        return first
    return None


# -- a stream, batch by batch ---------------------------------------------------------

# The item after the last frame of a turn-ending event: the SDK reads the
# stream's `data: [DONE]` there (api/sse.py writes it).
DONE = "[DONE]"


def read_after(resume: tuple[int, int | None]) -> int:
    """The seq a stream resuming at `resume` reads after: a `<seq>:<k>` point
    is inside an event's frames, so that event itself is read again."""
    seq, k = resume
    return max(seq - 1 if k is not None else seq, 0)


class UiStream:
    """The frames of a `format=ui` stream, one batch of events at a time:
    `(frame id, chunk)` items, and `DONE` right after the last frame of each
    turn-ending event.

    `state` is the translator's state right before the first batch (None: a
    fresh one, right for a turn's own stream); the first batch holds the
    resume point's event when frames of it are left to send. With `compact`
    the stored batches are compacted (never a live one: its deltas are sent
    as they come)."""

    def __init__(self, resume: tuple[int, int | None], compact: bool, state: dict | None = None) -> None:
        self.resume, self.compact = resume, compact
        self.state = initial_ui_state() if state is None else state
        # a `<seq>:<k>` resume point is inside the first batch's first event:
        # that batch is cut there; after a bare `<seq>` nothing is cut
        self.first = resume[1] is not None
        self._borrowed = False  # self.state is shared: copy it before translating

    @property
    def share(self) -> str | None:
        """Streams of one conversation (or of one turn) whose translators
        stand at the same seq give the same frames for the same live events:
        the state at a seq is the fold of the events before it, and live
        batches are never compacted. The first batch is the exception (it
        starts inside the resume point's event)."""
        return None if self.first else "ui"

    def handoff(self) -> dict:
        """The state after the last batch, for other streams at this point to adopt."""
        self._borrowed = True
        return self.state

    def adopt(self, state: dict) -> None:
        """Continue from `state` (handed off by a stream that translated the
        same batch from the same state), without copying it until needed."""
        self.state, self._borrowed = state, True

    def __call__(self, live: bool, events: list[dict]) -> Iterable[tuple[str, dict] | str]:
        if self._borrowed:
            self.state, self._borrowed = copy_ui_state(self.state), False
        compacted = self.compact and not live
        if self.first:
            frames = ui_frames_after(events, self.resume, self.state, compacted=compacted)
            self.first = False
        else:
            frames = ui_frames(compact(events) if compacted else events, self.state)
        # a frame of a later event (by its id's seq) means the turn-ending
        # event before it has given all its frames: [DONE] goes between
        ends = [e["seq"] for e in events if is_turn_end(e)]
        for frame_id, chunk in frames:
            while ends and parse_frame_id(frame_id)[0] > ends[0]:
                ends.pop(0)
                yield DONE
            yield frame_id, chunk
        for _ in ends:
            yield DONE


def copy_ui_state(state: dict) -> dict:
    """A copy of `state` that translating further does not share anything
    mutable with (the calls and their delta lists are copied)."""
    part = state["part"]
    return {**state, "part": None if part is None else dict(part),
            "calls": {call_id: {**call, "deltas": list(call["deltas"])} for call_id, call in state["calls"].items()}}


def through_turn_end(events: list[dict], turn_id: str) -> tuple[list[dict], bool]:
    """`events` up to and including the end of turn `turn_id`, and whether that
    end is among them: a turn's own stream stops there."""
    for i, event in enumerate(events):
        if is_turn_end(event) and event["data"]["turn_id"] == turn_id:
            return events[:i + 1], True
    return events, False


# -- parts and steps ---------------------------------------------------------------

def _close_part(state: dict) -> list[dict]:
    part = state["part"]
    if part is None:
        return []
    state["part"] = None
    return [{"type": f"{part['type']}-end", "id": part["id"]}]


def _begin_output(state: dict) -> list[dict]:
    """Called by every event that the history fold counts as output (it makes
    a step): opens a new step after a step-ending result."""
    if state["step_open"]:
        return []
    state["step_open"] = True
    state["step"] += 1
    if state["step"] == 1 or _streaming_calls(state):
        return []  # turn.started opened the UI's first step; see the module doc for the other case
    return _close_part(state) + [{"type": "finish-step"}, {"type": "start-step"}]


def _streaming_calls(state: dict) -> bool:
    return any(c["turn_id"] == state["open_turn"] and c["status"] == STARTED for c in state["calls"].values())


def _in_open_turn(state: dict, data: dict) -> bool:
    return state["open_turn"] is not None and data.get("turn_id") == state["open_turn"]


# -- handlers: (state, event) -> chunks -----------------------------------------------

def _turn_started(state: dict, event: dict) -> list[dict]:
    if state["open_turn"] is not None:
        return []
    turn_id = event["data"]["turn_id"]
    state.update(open_turn=turn_id, message_id=turn_id, part=None, step=0, step_open=False)
    return [{"type": "start", "messageId": turn_id}, {"type": "start-step"}]


def _delta(kind: str):
    def handle(state: dict, event: dict) -> list[dict]:
        data = event["data"]
        if not _in_open_turn(state, data):
            return []
        chunks = _begin_output(state)
        if state["part"] is not None and state["part"]["type"] != kind:
            chunks += _close_part(state)
        if state["part"] is None:
            part_id = f"{kind}-{_run_first_seq(state, event) or event['seq']}"
            state["part"] = {"type": kind, "id": part_id}
            chunks.append({"type": f"{kind}-start", "id": part_id})
        chunks.append({"type": f"{kind}-delta", "id": state["part"]["id"], "delta": data["text"]})
        return chunks
    return handle


def _call_started(state: dict, event: dict) -> list[dict]:
    data = event["data"]
    call_id = data["tool_call_id"]
    if not _in_open_turn(state, data) or call_id in state["calls"]:
        return []
    chunks = _begin_output(state) + _close_part(state)
    state["calls"][call_id] = {"turn_id": state["open_turn"], "name": data["name"], "seq": event["seq"],
                               "step": state["step"], "deltas": [], "status": STARTED}
    return chunks + [{"type": "tool-input-start", "toolCallId": call_id, "toolName": data["name"]}]


def _streaming_call(state: dict, call_id: str) -> dict | None:
    call = state["calls"].get(call_id)
    if call is None or call["status"] != STARTED or call["turn_id"] != state["open_turn"]:
        return None
    return call


def _call_delta(state: dict, event: dict) -> list[dict]:
    data = event["data"]
    call = _streaming_call(state, data["tool_call_id"])
    if call is None:
        return []
    call["deltas"].append(data["text"])
    return _close_part(state) + [{"type": "tool-input-delta", "toolCallId": data["tool_call_id"],
                                  "inputTextDelta": data["text"]}]


def _call_completed(state: dict, event: dict) -> list[dict]:
    data = event["data"]
    call_id = data["tool_call_id"]
    call = _streaming_call(state, call_id)
    if call is None:
        return []
    arguments = data.get("arguments")
    if arguments is None:
        arguments = "".join(call["deltas"])
    chunks = _close_part(state)
    try:
        # orjson: strict JSON, what a browser's JSON.parse reads too (no NaN,
        # no integers orjson could not write back).
        tool_input = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        del state["calls"][call_id]
        return chunks + [_input_error(call_id, call, arguments, "The tool call's arguments are not JSON.")]
    call.update(status=COMPLETED, deltas=[])
    return chunks + [{"type": "tool-input-available", "toolCallId": call_id, "toolName": call["name"],
                      "input": tool_input}]


def _result(state: dict, event: dict) -> list[dict]:
    data = event["data"]
    call_id = data["tool_call_id"]
    call = state["calls"].get(call_id)
    if call is None or call["status"] == STARTED:
        return []
    if data["status"] == "pending":
        chunk = {"type": "tool-output-available", "toolCallId": call_id, "output": data["content"],
                 "preliminary": True}
        call["status"] = PENDING
    else:
        del state["calls"][call_id]  # one final result: nothing more will come for it
        chunk = ({"type": "tool-output-available", "toolCallId": call_id, "output": data["content"]}
                 if data["status"] == "ok" else
                 {"type": "tool-output-error", "toolCallId": call_id, "errorText": _as_text(data["content"])})
    if call["turn_id"] == state["open_turn"]:
        if call["step"] == state["step"]:
            state["step_open"] = False  # as in the history fold: what follows answers the result
        return [chunk]
    if call["turn_id"] == state["message_id"]:
        return [{"type": "start", "messageId": call["turn_id"]}, chunk, {"type": "finish"}]
    return []


def _turn_end(state: dict, event: dict) -> list[dict]:
    """Closes the message the way the SDK's own streams do: `finish-step` +
    `finish` when finished; `abort` alone when cancelled; `error` then
    `finish-step` + `finish` (reason "error") when failed. Before that, calls
    that never completed get `tool-input-error` (the history drops them; a UI
    should not show them streaming forever), and in a cancelled or failed turn
    completed calls without any result get the history's synthetic result as
    `tool-output-error` (a real result may still replace it)."""
    data = event["data"]
    if not _in_open_turn(state, data):
        return []
    turn = state["open_turn"]
    chunks = _close_part(state)
    died = event["type"] != "turn.finished"
    reason = "cancelled" if event["type"] == "turn.cancelled" else "failed"
    mine = sorted(((c["seq"], call_id, c) for call_id, c in state["calls"].items() if c["turn_id"] == turn))
    for _, call_id, call in mine:
        if call["status"] == STARTED:
            del state["calls"][call_id]
            chunks.append(_input_error(call_id, call, "".join(call["deltas"]), "The tool call was never completed."))
        elif died and call["status"] == COMPLETED:
            no_result = orjson.dumps({"error": "no_result", "reason": reason}).decode()
            chunks.append({"type": "tool-output-error", "toolCallId": call_id, "errorText": no_result})
    state.update(open_turn=None, part=None, step=0, step_open=False)
    if event["type"] == "turn.finished":
        finish = {"type": "finish"}
        if data.get("finish_reason") in _FINISH_REASONS:
            finish["finishReason"] = _FINISH_REASONS[data["finish_reason"]]
        return chunks + [{"type": "finish-step"}, finish]
    if event["type"] == "turn.cancelled":
        # `abort` has no reason field in ai 5's schema; the reason stays in the events.
        return chunks + [{"type": "abort"}]
    message = (data.get("error") or {}).get("message") or "The turn failed."
    return chunks + [{"type": "error", "errorText": message}, {"type": "finish-step"},
                     {"type": "finish", "finishReason": "error"}]


def _input_error(call_id: str, call: dict, raw: str, text: str) -> dict:
    return {"type": "tool-input-error", "toolCallId": call_id, "toolName": call["name"], "input": raw,
            "errorText": text}


def _as_text(content) -> str:
    # As the history projection serialises tool message content.
    return content if isinstance(content, str) else orjson.dumps(content).decode()


_HANDLERS = {
    "turn.started": _turn_started,
    "text.delta": _delta("text"),
    "reasoning.delta": _delta("reasoning"),
    "tool_call.started": _call_started,
    "tool_call.delta": _call_delta,
    "tool_call.completed": _call_completed,
    "tool.result": _result,
    "turn.finished": _turn_end,
    "turn.cancelled": _turn_end,
    "turn.failed": _turn_end,
}
