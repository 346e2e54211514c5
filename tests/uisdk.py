"""The real Vercel AI SDK as a test oracle for `format=ui` streams.

`check_sse(bodies)` hands SSE bodies to tests/js/check-ui-stream.mjs, one node
process kept for the whole run (node and the SDK take most of a second to
start; a body then takes about a millisecond), and returns, per
installed SDK version, one result per body: `{"problems", "errors", "chunks",
"messages"}` (see the script's header). node_modules is installed from the
committed package-lock.json on first use; a missing npm is an error, never a skip.

`sse_body(events)` is what the stream sends for a history (`sse_text` writes
any frames as a body), and `assert_agrees_with_history(events, messages)`
checks the messages the SDK rebuilt from it. What "agrees with the history"
means, per turn (= one UI message, id turn_id), against the history fold
(projections.history) of the same events:
- the message's text parts joined equal the turn's text deltas joined; the same
  for reasoning; tool parts are the turn's calls in start order, `tool-<name>`;
- its steps (parts between `step-start`s) are the turn's history steps, except
  that a history step begun while a call of the turn was still streaming its
  input joins the step before it (projections.ui explains why);
- a completed call shows its parsed arguments as `input` and the last result the
  stream delivered (ok: output; pending: output + preliminary; error:
  errorText); none: `input-available`, or in a cancelled/failed turn the
  history's synthetic no_result as errorText. A call never completed shows
  `output-error` once its turn ended. Results reach a message while its turn is
  open or its message is still the latest one;
- against render(state, "openai"): every assistant tool call is such a tool part
  with the same name and arguments; every tool message's content is what the UI
  part shows, unless its result came too late for the stream; with no joined
  steps, the assistant texts are the UI steps' texts.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import select
import shutil
import subprocess
import tempfile
from collections import defaultdict
from hashlib import sha1
from pathlib import Path
from typing import Iterable

import orjson

from projections import compact, fold, initial_state, render_openai
from projections.ui import initial_ui_state, is_turn_end, ui_frames

JS = Path(__file__).parent / "js"
SCRIPT = JS / "check-ui-stream.mjs"
_LOCK = JS / "package-lock.json"
# npm ci writes this last; it is older than the lock file when the lock changed since.
_INSTALLED = JS / "node_modules" / ".package-lock.json"


def ensure_installed() -> None:
    if _INSTALLED.exists() and _INSTALLED.stat().st_mtime >= _LOCK.stat().st_mtime:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("tests/test_ui_stream.py needs Node.js 20+ with npm (to install the `ai` package "
                           "from tests/js/package-lock.json); none was found on PATH")
    # One installer at a time when test processes run in parallel.
    # (The lock file lives outside node_modules, which npm ci deletes.)
    lock_path = Path(tempfile.gettempdir()) / f"chatlog-npm-{sha1(str(JS).encode()).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _INSTALLED.exists() and _INSTALLED.stat().st_mtime >= _LOCK.stat().st_mtime:
            return
        done = subprocess.run([npm, "ci", "--prefix", str(JS), "--no-audit", "--no-fund", "--loglevel=error"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"npm ci in {JS} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def check_sse(bodies: list[str]) -> dict[str, list[dict]]:
    """`{sdk version: [result per body]}` for SSE `bodies` (text, as sent)."""
    global _worker
    if _worker is None or _worker.poll() is not None:
        _worker = _start()
    _worker.stdin.write(json.dumps({"bodies": bodies}) + "\n")
    _worker.stdin.flush()
    if not select.select([_worker.stdout], [], [], _TIMEOUT)[0]:
        _worker.kill()
        raise RuntimeError(f"{SCRIPT.name} gave no answer in {_TIMEOUT} s")
    line = _worker.stdout.readline()
    if not line:
        _worker.stderr.seek(0)
        raise RuntimeError(f"{SCRIPT.name} exited ({_worker.wait()}):\n{_worker.stderr.read()}")
    # JavaScript numbers are doubles: read them all as floats, so 6.0000987900762848e16
    # printed as 60000987900762850 compares equal to the float it is.
    return json.loads(line, parse_int=float)["sdks"]


# One node process for the whole test run, answering a line per request.
_worker: subprocess.Popen | None = None
_TIMEOUT = 120


def _start() -> subprocess.Popen:
    ensure_installed()
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("tests/test_ui_stream.py needs Node.js 20+ (`node`) on PATH")
    # stderr to a file: a pipe nobody reads could fill up and stall node.
    worker = subprocess.Popen([node, str(SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=tempfile.TemporaryFile(mode="w+"), text=True, encoding="utf-8", cwd=JS)
    atexit.register(_stop, worker)
    return worker


def _stop(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        worker.stdin.close()  # the script ends when its input does
        try:
            worker.wait(timeout=5)
        except subprocess.TimeoutExpired:
            worker.kill()


# -- what the stream sends ---------------------------------------------------------------


def sse_text(frames: Iterable[tuple[str | None, str]]) -> str:
    """An SSE body of (id, data) frames; a frame without an id has no `id:` line."""
    return "".join(f"data: {data}\n\n" if frame_id is None else f"id: {frame_id}\ndata: {data}\n\n"
                   for frame_id, data in frames)


def sse_body(events: list[dict], compacted: bool = False) -> str:
    """What the format=ui stream sends for `events` read from seq 1: a frame per
    chunk, `data: [DONE]` after each turn's end."""
    state = initial_ui_state()

    def frames():
        for event in compact(events) if compacted else events:
            for frame_id, chunk in ui_frames([event], state):
                yield frame_id, orjson.dumps(chunk).decode()
            if is_turn_end(event):
                yield None, "[DONE]"

    return sse_text(frames())


# -- the messages the SDK rebuilt agree with the history -------------------------------------

TURN_ENDS = ("turn.finished", "turn.cancelled", "turn.failed")
NEVER_COMPLETED = "The tool call was never completed."


def parts_of(message: dict) -> list[dict]:
    return [p for p in message["parts"] if p["type"] != "step-start"]


def assert_agrees_with_history(events: list[dict], messages: list[dict]) -> None:
    state, steps = _history_steps(events)
    assert [m["id"] for m in messages] == [e["data"]["turn_id"] for e in events if e["type"] == "turn.started"]
    ended = {e["data"]["turn_id"]: e["type"] for e in events if e["type"] in TURN_ENDS}
    begun, done = _call_seqs(events)
    visible = _visible_results(events)
    parts_by_call, joined = {}, False
    for message in messages:
        turn = message["id"]
        parts = parts_of(message)
        history_steps = [item for _, item in steps[turn]]
        assert _joined(parts, "text") == "".join("".join(s["text"]) for s in history_steps), turn
        assert _joined(parts, "reasoning") == "".join("".join(s["reasoning"]) for s in history_steps), turn
        tools = [p for p in parts if p["type"].startswith("tool-")]
        assert [p["toolCallId"] for p in tools] == [cid for s in history_steps for cid in s["calls"]], turn
        streaming = [p for p in parts if p["type"] in ("text", "reasoning") and p["state"] != "done"]
        assert len(streaming) <= (0 if turn in ended else 1), (turn, streaming)
        for p in tools:
            parts_by_call[p["toolCallId"]] = p
            _assert_tool_part(p, state["calls"][p["toolCallId"]], visible.get(p["toolCallId"]), ended.get(turn))
        groups = _ui_step_groups(steps[turn], begun, done, turn)
        joined = joined or any(len(g) > 1 for g in groups)
        assert _ui_steps(message) == [_merged(g) for g in groups], turn
    _assert_openai_agrees(events, state, parts_by_call, visible, messages, joined)


def _assert_tool_part(part: dict, call: dict, shown: dict | None, end: str | None) -> None:
    where = (part, call, shown, end)
    assert part["type"] == f"tool-{call['name']}", where
    if call["arguments"] is None:
        assert (part["state"], part.get("errorText")) == \
            (("output-error", NEVER_COMPLETED) if end else ("input-streaming", None)), where
        return
    assert part["input"] == json.loads(call["arguments"]), where
    if shown is None:
        died = end in ("turn.cancelled", "turn.failed")
        reason = "cancelled" if end == "turn.cancelled" else "failed"
        assert (part["state"], part.get("errorText")) == (("output-error", _no_result(reason)) if died
                                                          else ("input-available", None)), where
    elif shown["status"] == "error":
        assert (part["state"], part["errorText"]) == ("output-error", _as_text(shown["content"])), where
    else:
        assert (part["state"], part["output"]) == ("output-available", shown["content"]), where
        assert part.get("preliminary") == (True if shown["status"] == "pending" else None), where


def _assert_openai_agrees(events, state, parts_by_call, visible, messages, joined) -> None:
    openai = render_openai(state)
    latest = {e["data"]["tool_call_id"]: e["data"] for e in events if e["type"] == "tool.result"}
    for m in openai:
        for c in m.get("tool_calls") or []:
            part = parts_by_call[c["id"]]
            assert (part["type"], part["input"]) == (f"tool-{c['function']['name']}",
                                                     json.loads(c["function"]["arguments"]))
        if m["role"] == "tool" and visible.get(m["tool_call_id"]) is latest.get(m["tool_call_id"]):
            part = parts_by_call[m["tool_call_id"]]
            if part["state"] == "output-error" or isinstance(part["output"], str):
                assert part.get("errorText", part.get("output")) == m["content"], (m, part)
            else:  # numbers came back from JavaScript as floats: compare values, not spellings
                assert part["output"] == json.loads(m["content"]), (m, part)
    if not joined:
        texts = [t for message in messages for t, _, _ in _ui_steps(message) if t]
        assert "\n".join(texts) == "\n".join(m["content"] for m in openai if m["role"] == "assistant" and m["content"])


def _history_steps(events):
    """The history fold of `events`, and per turn its steps as (seq of the event
    that began the step, step item), read off the fold itself."""
    state, began = initial_state(), {}
    for event in events:
        count = len(state["items"])
        fold(state, event)
        if len(state["items"]) > count and state["items"][-1]["kind"] == "step":
            began[count] = event["seq"]
    steps = defaultdict(list)
    for index, item in enumerate(state["items"]):
        if item["kind"] == "step":
            steps[item["turn_id"]].append((began[index], item))
    return state, steps


def _call_seqs(events):
    begun = {e["data"]["tool_call_id"]: e["seq"] for e in events if e["type"] == "tool_call.started"}
    done = {e["data"]["tool_call_id"]: e["seq"] for e in events if e["type"] == "tool_call.completed"}
    return begun, done


def _ui_step_groups(turn_steps, begun, done, turn):
    """History steps grouped as the UI shows them: a step begun while a call of
    the turn was streaming input (started before, not completed yet) joins the previous one."""
    mine = [cid for (_, item) in turn_steps for cid in item["calls"]]
    groups = []
    for seq, item in turn_steps:
        streaming = any(begun[cid] < seq and done.get(cid, seq + 1) > seq for cid in mine)
        if groups and streaming:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _merged(group):
    return ("".join(t for s in group for t in s["text"]), "".join(t for s in group for t in s["reasoning"]),
            [cid for s in group for cid in s["calls"]])


def _ui_steps(message):
    """(text, reasoning, tool call ids) per step of a UI message, empty steps left out."""
    steps = []
    for p in message["parts"]:
        if p["type"] == "step-start":
            steps.append([])
        else:
            steps[-1].append(p)
    return [(_joined(s, "text"), _joined(s, "reasoning"), [p["toolCallId"] for p in s if "toolCallId" in p])
            for s in steps if s]


def _joined(parts, kind):
    return "".join(p["text"] for p in parts if p["type"] == kind)


def _visible_results(events):
    """tool_call_id -> the last result the stream delivered: while the call's
    turn was the latest one started (open, or ended with nothing newer)."""
    latest, turn_of, shown = None, {}, {}
    for e in events:
        data = e["data"]
        if e["type"] == "turn.started":
            latest = data["turn_id"]
        elif e["type"] == "tool_call.started":
            turn_of[data["tool_call_id"]] = data["turn_id"]
        elif e["type"] == "tool.result" and turn_of[data["tool_call_id"]] == latest:
            shown[data["tool_call_id"]] = data
    return shown


def _no_result(reason):
    return orjson.dumps({"error": "no_result", "reason": reason}).decode()


def _as_text(content):
    return content if isinstance(content, str) else orjson.dumps(content).decode()
