"""Chat Completions stream chunks -> contract events, for one model call (a "step"). Pure: no I/O.

A `StepTranslator` is fed the chunks of one streamed upstream call, as plain
dicts (`ChatCompletionChunk.model_dump()`, or the JSON of an SSE `data:` line),
and returns the `(type, data)` events each chunk yields, in order, one event
per fragment: the contract records every chunk, so nothing is merged here
(readers who want runs ask for `compact=true`). `finish()` closes a step whose
stream ended normally and returns its `StepOutcome`; `abandon()` closes one
that broke or was cancelled. Whether the turn then ends (`turn_finished`,
`turn_failed`) or waits for tool results is the runner's decision.

Every sequence this module yields after a `turn.started`, followed by the
closing event the outcome calls for, is accepted by the domain aggregate
(tests/test_runner_chunks.py checks it for arbitrary chunkings), so a runner
using it never writes a batch the store refuses.

How chunks map, and the choices made where providers differ:

- `delta.content` -> `text.delta`. `delta.refusal` (OpenAI's structured-output
  refusal) -> `text.delta` too: it is what the model said to the user, and the
  projections have no other place for it. Empty strings and role-only deltas
  yield nothing; non-string content is ignored.
- `delta.reasoning_content` (DeepSeek, older vLLM) or `delta.reasoning`
  (OpenRouter, vLLM >= 0.11) -> `reasoning.delta`. Some gateways send both
  with the same text, so one delta yields at most one event, from
  `reasoning_content` when it is non-empty. `reasoning_details` is ignored.
- `delta.tool_calls[]` fragments are keyed by `index` (their position in the
  list when a server leaves `index` out). A fragment whose provider id differs
  from the id of the call open at its index starts a new call (servers that
  send every parallel call at index 0). The name may come whole or split over
  fragments, so `tool_call.started` is written once the name is complete:
  when the call's first argument fragment arrives, when another call replaces
  it at its index, or when the step closes. A fragment repeating the whole
  name so far is a repeat, not a split. Argument fragments that arrive before
  then are buffered and written, each as its own `tool_call.delta`, right
  after `tool_call.started`. Legacy `delta.function_call` is one more call.
- Ids: the provider's id when it gave a non-empty one that is not already used
  (in this step, or in `taken_ids` the runner passes: ids of the
  conversation's earlier calls, since some local servers reuse ids such as
  `call_0`); otherwise `call_` + 24 hex digits of SHA-256(turn_id, step,
  ordinal of the call in the step). Deterministic, so a replay of the same
  chunks yields the same events, and made of [A-Za-z0-9_] as Anthropic's
  tool_use ids must be.
- `tool_call.completed` is written by `finish()` only, for every call, with no
  `arguments` (the contract's default: the joined deltas) except that empty
  arguments (no-argument tools on some servers) are recorded as `"{}"`.
  If any call's joined arguments are not strict JSON (truncated by `length`,
  or a model writing bad JSON), or a call never got a name, no call of the
  step is completed: the outcome carries an `invalid_tool_call` error and the
  runner writes `turn.failed`, which leaves the calls abandoned (the
  projections drop them, no tool is run on made-up arguments, nothing waits
  for a result) while their fragments stay in the log as the model wrote
  them. Writing `"{}"` instead would run the tool with arguments the model
  never gave and show the model a call it never made.
- Only choice 0 is recorded (`request_body` refuses `n`).
- `finish_reason`: stop / length / tool_calls / content_filter as they are;
  legacy `function_call` -> tool_calls; a few other providers' names are
  mapped (`max_tokens` -> length, `end_turn` / `stop_sequence` / `eos` ->
  stop, `tool_use` -> tool_calls); any other value, or none at all, becomes
  tool_calls when the step completed calls and stop otherwise: the stream
  ended normally, so its output is whole, and `turn.finished` only takes the
  four contract values. `stop` with completed calls (Ollama) is tool_calls.
  The raw value stays in `StepOutcome.upstream_finish_reason` for logs.
  `error` (OpenRouter's mid-stream error), or a chunk with a top-level
  `error`, makes the outcome an `upstream_error`.
- Usage: the last chunk carrying `usage` wins (with `include_usage` it is the
  final chunk, whose `choices` is empty, null or missing); only
  prompt/completion/total tokens are kept, total computed when missing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Collection

import orjson

Event = tuple[str, dict]

FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter"})
_FINISH_ALIASES = {"function_call": "tool_calls", "tool_use": "tool_calls", "max_tokens": "length",
                   "end_turn": "stop", "stop_sequence": "stop", "eos": "stop"}

# the runner owns these request keys; `n`: only choice 0 is recorded
RESERVED_PARAMS = frozenset({"model", "messages", "stream", "stream_options", "tools", "tool_choice",
                             "functions", "function_call", "n"})


@dataclass(frozen=True)
class ToolCall:
    tool_call_id: str
    name: str
    arguments: str  # JSON text, as recorded


@dataclass(frozen=True)
class StepOutcome:
    """How one model call ended. `error` set: the runner must write
    `turn.failed` with it (`turn_failed`); else the step succeeded and
    `tool_calls` (completed, in the order the model began them) are to be run,
    or the turn ends with `turn_finished`."""

    finish_reason: str | None  # one of FINISH_REASONS; None when error is set
    upstream_finish_reason: str | None
    usage: dict | None
    tool_calls: tuple[ToolCall, ...] = ()
    error: dict | None = None  # {"code", "message"}


@dataclass
class _Call:
    ordinal: int
    upstream_id: str | None = None
    name_parts: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)  # every argument fragment received
    written: int = 0  # how many of `args` were written as tool_call.delta
    args_begun: bool = False
    tool_call_id: str | None = None  # set when tool_call.started is written

    @property
    def name(self) -> str:
        return "".join(self.name_parts)


class StepTranslator:
    """One upstream call's chunks -> events. Not thread-safe; one per step."""

    def __init__(self, turn_id: str, step: int = 0, taken_ids: Collection[str] = ()) -> None:
        self.turn_id = turn_id
        self.step = step
        self._taken = taken_ids
        self._used: set[str] = set()
        self._calls: list[_Call] = []
        self._slots: dict[Any, _Call] = {}  # tool-call index -> the call open at it
        self._finish_reason: str | None = None
        self._usage: dict | None = None
        self._error: dict | None = None
        self._closed = False

    # -- feeding ---------------------------------------------------------------

    def feed(self, chunk: dict) -> list[Event]:
        """The events one chunk yields (often none or one)."""
        if self._closed:
            raise RuntimeError("this step is closed; start a new StepTranslator for the next upstream call")
        out: list[Event] = []
        error = chunk.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else error
            self._error = {"code": "upstream_error", "message": str(message or error)}
        usage = _usage(chunk.get("usage"))
        if usage is not None:
            self._usage = usage
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or (choice.get("index") or 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta, dict):
                self._delta(delta, out)
            if choice.get("finish_reason"):
                self._finish_reason = str(choice["finish_reason"])
        return out

    def _delta(self, delta: dict, out: list[Event]) -> None:
        reasoning = _text(delta.get("reasoning_content")) or _text(delta.get("reasoning"))
        if reasoning:
            out.append(("reasoning.delta", {"turn_id": self.turn_id, "text": reasoning}))
        for key in ("content", "refusal"):
            text = _text(delta.get(key))
            if text:
                out.append(("text.delta", {"turn_id": self.turn_id, "text": text}))
        fragments = delta.get("tool_calls")
        if isinstance(fragments, list):
            for position, fragment in enumerate(fragments):
                if isinstance(fragment, dict):
                    index = fragment.get("index")
                    self._fragment(position if index is None else index, _text(fragment.get("id")),
                                   fragment.get("function") or {}, out)
        legacy = delta.get("function_call")
        if isinstance(legacy, dict):
            self._fragment("function_call", None, legacy, out)

    def _fragment(self, index: Any, upstream_id: str | None, function: dict, out: list[Event]) -> None:
        call = self._slots.get(index)
        if call is None or (upstream_id and call.upstream_id and upstream_id != call.upstream_id):
            if call is not None:  # replaced at its index: its name is complete
                self._start(call, out)
                self._write_args(call, out)
            call = _Call(ordinal=len(self._calls))
            self._calls.append(call)
            self._slots[index] = call
        if upstream_id and call.upstream_id is None and call.tool_call_id is None:
            call.upstream_id = upstream_id
        name = _text(function.get("name")) if isinstance(function, dict) else None
        if name and call.tool_call_id is None and name != call.name:
            call.name_parts.append(name)
        arguments = _text(function.get("arguments")) if isinstance(function, dict) else None
        if arguments:
            call.args.append(arguments)
            call.args_begun = True
        if call.args_begun:
            self._start(call, out)
        self._write_args(call, out)

    def _start(self, call: _Call, out: list[Event]) -> None:
        if call.tool_call_id is not None or not call.name:
            return
        call_id = call.upstream_id
        if not call_id or call_id in self._used or call_id in self._taken:
            call_id = made_up_id(self.turn_id, self.step, call.ordinal)
        self._used.add(call_id)
        call.tool_call_id = call_id
        out.append(("tool_call.started", {"turn_id": self.turn_id, "tool_call_id": call_id, "name": call.name}))

    def _write_args(self, call: _Call, out: list[Event]) -> None:
        if call.tool_call_id is None:
            return
        for text in call.args[call.written:]:
            out.append(("tool_call.delta", {"tool_call_id": call.tool_call_id, "text": text}))
        call.written = len(call.args)

    # -- closing ---------------------------------------------------------------

    def _flush(self) -> list[Event]:
        """Start every named call not yet started and write its buffered fragments."""
        out: list[Event] = []
        for call in self._calls:
            self._start(call, out)
            self._write_args(call, out)
        return out

    def finish(self) -> tuple[list[Event], StepOutcome]:
        """The stream ended normally: the closing events and the step's outcome."""
        self._closed = True
        out = self._flush()
        upstream = self._finish_reason
        if self._error is None and upstream == "error":
            self._error = {"code": "upstream_error", "message": "the upstream ended the stream with finish_reason 'error'"}
        if self._error is not None:
            return out, self._failed(self._error)
        calls: list[ToolCall] = []
        for call in self._calls:
            if call.tool_call_id is None:
                return out, self._failed({"code": "invalid_tool_call",
                                          "message": f"tool call {call.ordinal} of step {self.step} has no name"})
            arguments = "".join(call.args)
            if not arguments.strip():
                arguments = "{}"
            else:
                try:
                    orjson.loads(arguments)  # strict, as the domain checks it
                except orjson.JSONDecodeError:
                    return out, self._failed({
                        "code": "invalid_tool_call",
                        "message": f"arguments of tool call {call.tool_call_id!r} ({call.name}) are not valid JSON"
                                   f" (finish_reason {upstream!r}): {arguments[:80]!r}"})
            calls.append(ToolCall(call.tool_call_id, call.name, arguments))
        for call, done in zip(self._calls, calls):
            data = {"tool_call_id": done.tool_call_id}
            if done.arguments != "".join(call.args):
                data["arguments"] = done.arguments
            out.append(("tool_call.completed", data))
        reason = _FINISH_ALIASES.get(upstream, upstream)
        if reason not in FINISH_REASONS or (reason == "stop" and calls):
            reason = "tool_calls" if calls else "stop"
        return out, StepOutcome(reason, upstream, self._usage, tuple(calls))

    def abandon(self) -> list[Event]:
        """The stream broke or was cancelled: write everything received (buffered
        argument fragments of named calls included), complete nothing. The
        runner then closes the turn (turn.failed / turn.cancelled), which leaves
        the open calls abandoned. Fragments of a call whose name never arrived
        cannot be written (a started call needs a name)."""
        self._closed = True
        return self._flush()

    def _failed(self, error: dict) -> StepOutcome:
        return StepOutcome(None, self._finish_reason, self._usage, (), error)


# -- helpers ------------------------------------------------------------------


def made_up_id(turn_id: str, step: int, ordinal: int) -> str:
    digest = hashlib.sha256(f"{turn_id}\x00{step}\x00{ordinal}".encode()).hexdigest()
    return f"call_{digest[:24]}"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _usage(value: Any) -> dict | None:
    if not isinstance(value, dict):
        return None
    prompt, completion, total = (value.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    if not all(type(v) is int for v in (prompt, completion)):
        return None
    if type(total) is not int:
        total = prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def add_usage(a: dict | None, b: dict | None) -> dict | None:
    """The usage of two steps together (a turn's usage is its steps' sum)."""
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def turn_finished(turn_id: str, outcome: StepOutcome, usage: dict | None = None) -> Event:
    """`turn.finished` for a turn whose last step is `outcome` (which must have
    no error); `usage` defaults to that step's, pass the turn's sum instead."""
    if outcome.error is not None:
        raise ValueError(f"this step failed ({outcome.error['code']}); write turn_failed instead")
    data = {"turn_id": turn_id, "finish_reason": outcome.finish_reason}
    usage = outcome.usage if usage is None else usage
    if usage is not None:
        data["usage"] = usage
    return ("turn.finished", data)


def turn_failed(turn_id: str, error: dict) -> Event:
    """`turn.failed` with `error` ({"code", "message"}, e.g. `StepOutcome.error`)."""
    return ("turn.failed", {"turn_id": turn_id, "error": {"code": error["code"], "message": error["message"]}})


# -- the request ----------------------------------------------------------------


def request_body(model: str, messages: list[dict], tools: list[dict] | None = None,
                 tool_choice: Any = None, params: dict | None = None) -> dict:
    """The Chat Completions request for one step: streamed, with usage in the last chunk."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty string")
    params = dict(params or {})
    clash = sorted(RESERVED_PARAMS & params.keys())
    if clash:
        raise ValueError(f"params may not set {', '.join(clash)}: the runner sets "
                         "model, messages, stream, stream_options, tools and tool_choice itself and records choice 0 only")
    if tool_choice is not None and not tools:
        raise ValueError("tool_choice needs tools")
    body = {**params, "model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    if tools:  # OpenAI refuses an empty tools list
        body["tools"] = tools
        if tool_choice is not None:
            body["tool_choice"] = tool_choice
    return body


def encode(body: dict) -> bytes:
    """The exact bytes to send. Keys sorted: the body rebuilt later from the log
    (jsonb keeps no key order) then encodes, and hashes, the same."""
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_requested(turn_id: str, step: int, at_seq: int, body: dict) -> Event:
    """`model.requested` for `body` (from `request_body`), sent after the
    conversation's `format=openai` projection at `at_seq`."""
    data = {"turn_id": turn_id, "step": step, "model": body["model"], "at_seq": at_seq,
            "request_sha256": sha256_hex(encode(body))}
    if "tools" in body:
        data["tools"] = body["tools"]
        if "tool_choice" in body:
            data["tool_choice"] = body["tool_choice"]
    params = {k: v for k, v in body.items() if k not in RESERVED_PARAMS}
    if params:
        data["params"] = params
    return ("model.requested", data)


def rebuild_body(requested: dict, messages: list[dict]) -> dict:
    """The body a `model.requested` event's data recorded, given the messages
    (the `format=openai` projection at its `at_seq`): hash `encode()` of it and
    compare with `request_sha256`."""
    return request_body(requested["model"], messages, requested.get("tools"),
                        requested.get("tool_choice"), requested.get("params"))
