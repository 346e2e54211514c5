"""The conversation aggregate: every rule of the contract's event table.

Each command method decorated with `@event(...)` is its own event's mutator
(eventsourcing's style): the rule checks come first and raise `RuleBroken`
before any state changes, so a refused event leaves the aggregate as it was.
The aggregate's version is the conversation's `seq`.

The rules themselves live in `Rules`, a plain class the aggregate inherits:
each @event method's body is its Rules method. Every command of the aggregate
builds the library's event object; the store checks batches on a plain Rules
instead (`resume`, `check`), running exactly the same rule code without that
object. Measured under 200 concurrent streaming appenders: the library's
machinery was a third of the writer process's CPU (about 9 µs per event on an
idle machine, against well under 1 µs for the rule itself).

The state the store saves with every append (`to_state`) is bounded by what
is live: the open turn, the tool calls still waiting for their final result,
argument text only while a call is open. So appending to a long conversation
never re-reads its events and never rewrites its history. The rules that need
the whole history (a turn id or tool-call id used before, a call that already
has its final result) get the facts for just the ids a batch names (`Known`),
which the store reads with one index probe per id and the database's unique
indexes guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.domain import Aggregate, event

from domain.errors import RuleBroken
from domain.schemas import ABANDONED, COMPLETED, FINAL, LIVE_CALL, PENDING, STARTED



@dataclass(frozen=True)
class Known:
    """Facts from a conversation's history about the ids one batch names."""

    turn_ids: frozenset[str] = frozenset()  # turn ids already used
    calls: dict[str, str] = field(default_factory=dict)  # past (not live) calls: id -> FINAL or ABANDONED


def ids_named(events: list[tuple[str, dict]]) -> tuple[list[str], list[str]]:
    """(turn ids, tool-call ids) a batch names, for which the store reads `Known`."""
    turns = sorted({d["turn_id"] for t, d in events if t == "turn.started"})
    calls = sorted({d["tool_call_id"] for t, d in events if "tool_call_id" in d})
    return turns, calls


class Rules:
    """A conversation's rule state and every rule of the contract's event
    table: one method per event type, the checks first (raising RuleBroken
    before anything changes), then the change."""

    def __init__(self, open_turn_id: str | None = None, turn_ids: set[str] | None = None,
                 calls: dict[str, list] | None = None, call_args: dict[str, list[str]] | None = None,
                 title: str | None = None) -> None:
        self.open_turn_id = open_turn_id
        self.turn_ids: set[str] = turn_ids if turn_ids is not None else set()
        # tool_call_id -> [turn_id, status]
        self.calls: dict[str, list] = calls if calls is not None else {}
        # tool_call_id -> argument fragments, only while the call is open
        self.call_args: dict[str, list[str]] = call_args if call_args is not None else {}
        self.title = title

    # -- messages ---------------------------------------------------------

    def add_user_message(self, content: Any, name: str | None = None) -> None:
        self._require_no_open_turn("message.user")

    def add_system_message(self, content: str) -> None:
        self._require_no_open_turn("message.system")

    def set_title(self, title: str) -> None:
        self.title = title

    # -- turns ------------------------------------------------------------

    def start_turn(self, turn_id: str, request_id: str | None = None,
                   model: str | None = None) -> None:
        if self.open_turn_id is not None:
            raise RuleBroken("one_open_turn",
                             f"turn {self.open_turn_id!r} is still open; close it before starting another")
        if turn_id in self.turn_ids:
            raise RuleBroken("turn_id_unique", f"turn_id {turn_id!r} was already used in this conversation")
        self.open_turn_id = turn_id
        self.turn_ids.add(turn_id)

    def add_text_delta(self, turn_id: str, text: str) -> None:
        self._require_open_turn(turn_id, "text.delta")

    def add_reasoning_delta(self, turn_id: str, text: str) -> None:
        self._require_open_turn(turn_id, "reasoning.delta")

    def request_model(self, turn_id: str, step: int, model: str, at_seq: int, request_sha256: str,
                      tools: list | None = None, tool_choice: Any = None, params: dict | None = None) -> None:
        self._require_open_turn(turn_id, "model.requested")

    def finish_turn(self, turn_id: str, finish_reason: str, usage: dict | None = None) -> None:
        self._close_turn(turn_id, "turn.finished")

    def cancel_turn(self, turn_id: str, reason: str | None = None) -> None:
        self._close_turn(turn_id, "turn.cancelled")

    def fail_turn(self, turn_id: str, error: dict) -> None:
        self._close_turn(turn_id, "turn.failed")

    # -- tool calls ---------------------------------------------------------

    def start_tool_call(self, turn_id: str, tool_call_id: str, name: str) -> None:
        self._require_open_turn(turn_id, "tool_call.started")
        if tool_call_id in self.calls:
            raise RuleBroken("tool_call_id_unique",
                             f"tool_call_id {tool_call_id!r} was already used in this conversation")
        self.calls[tool_call_id] = [turn_id, STARTED]
        self.call_args[tool_call_id] = []

    def add_tool_call_delta(self, tool_call_id: str, text: str) -> None:
        self._require_open_call(tool_call_id, "tool_call.delta")
        self.call_args[tool_call_id].append(text)

    def complete_tool_call(self, tool_call_id: str, arguments: str | None = None) -> None:
        self._require_open_call(tool_call_id, "tool_call.completed")
        if arguments is None:
            arguments = "".join(self.call_args[tool_call_id])
        try:
            # strict JSON (orjson): NaN/Infinity, which json.loads lets through,
            # would break OpenAI requests and browsers' JSON.parse
            orjson.loads(arguments)
        except orjson.JSONDecodeError:
            raise RuleBroken("arguments_json",
                             f"arguments of tool call {tool_call_id!r} are not valid JSON: {arguments[:80]!r}") from None
        del self.call_args[tool_call_id]
        self.calls[tool_call_id][1] = COMPLETED

    def add_tool_result(self, tool_call_id: str, content: Any, status: str) -> None:
        call = self.calls.get(tool_call_id)
        if call is None:
            raise RuleBroken("result_needs_completed_call", f"tool call {tool_call_id!r} was never started")
        if call[1] == FINAL:
            raise RuleBroken("one_final_result", f"tool call {tool_call_id!r} already has its final result")
        if call[1] not in (COMPLETED, PENDING):
            raise RuleBroken("result_needs_completed_call",
                             f"tool call {tool_call_id!r} is not completed (it is {call[1]})")
        call[1] = PENDING if status == "pending" else FINAL

    # -- rule helpers ---------------------------------------------------------

    def _require_no_open_turn(self, type_: str) -> None:
        if self.open_turn_id is not None:
            raise RuleBroken("no_message_during_turn",
                             f"{type_} is not allowed while turn {self.open_turn_id!r} is open")

    def _require_open_turn(self, turn_id: str, type_: str) -> None:
        if self.open_turn_id is None:
            raise RuleBroken("needs_open_turn", f"{type_} needs an open turn, and no turn is open")
        if turn_id != self.open_turn_id:
            raise RuleBroken("needs_open_turn",
                             f"{type_} names turn {turn_id!r} but the open turn is {self.open_turn_id!r}")

    def _require_open_call(self, tool_call_id: str, type_: str) -> None:
        call = self.calls.get(tool_call_id)
        if call is None:
            raise RuleBroken("needs_started_call", f"{type_} names tool call {tool_call_id!r}, which was never started")
        if call[1] != STARTED:
            raise RuleBroken("needs_started_call",
                             f"{type_} names tool call {tool_call_id!r}, which is {call[1]}, not in progress")

    def _close_turn(self, turn_id: str, type_: str) -> None:
        self._require_open_turn(turn_id, type_)
        for call_id in [c for c, (t, status) in self.calls.items() if t == turn_id and status == STARTED]:
            self.calls[call_id][1] = ABANDONED
            del self.call_args[call_id]
        self.open_turn_id = None


class Conversation(Aggregate, Rules):
    """The aggregate: each command is its own event's mutator (eventsourcing's
    style), whose body is the Rules method of the same name."""

    # Declaring `id` lets callers pass the conversation's own UUID on creation.
    id: UUID

    @event("Created")
    def __init__(self, metadata: dict | None = None, system: str | None = None,
                 forked_from: dict | None = None) -> None:
        Rules.__init__(self)

    @event("UserMessageAdded")
    def add_user_message(self, content: Any, name: str | None = None) -> None:
        super().add_user_message(content, name)

    @event("SystemMessageAdded")
    def add_system_message(self, content: str) -> None:
        super().add_system_message(content)

    @event("Titled")
    def set_title(self, title: str) -> None:
        super().set_title(title)

    @event("TurnStarted")
    def start_turn(self, turn_id: str, request_id: str | None = None, model: str | None = None) -> None:
        super().start_turn(turn_id, request_id, model)

    @event("TextDeltaReceived")
    def add_text_delta(self, turn_id: str, text: str) -> None:
        super().add_text_delta(turn_id, text)

    @event("ReasoningDeltaReceived")
    def add_reasoning_delta(self, turn_id: str, text: str) -> None:
        super().add_reasoning_delta(turn_id, text)

    @event("ModelRequested")
    def request_model(self, turn_id: str, step: int, model: str, at_seq: int, request_sha256: str,
                      tools: list | None = None, tool_choice: Any = None, params: dict | None = None) -> None:
        super().request_model(turn_id, step, model, at_seq, request_sha256, tools, tool_choice, params)

    @event("TurnFinished")
    def finish_turn(self, turn_id: str, finish_reason: str, usage: dict | None = None) -> None:
        super().finish_turn(turn_id, finish_reason, usage)

    @event("TurnCancelled")
    def cancel_turn(self, turn_id: str, reason: str | None = None) -> None:
        super().cancel_turn(turn_id, reason)

    @event("TurnFailed")
    def fail_turn(self, turn_id: str, error: dict) -> None:
        super().fail_turn(turn_id, error)

    @event("ToolCallStarted")
    def start_tool_call(self, turn_id: str, tool_call_id: str, name: str) -> None:
        super().start_tool_call(turn_id, tool_call_id, name)

    @event("ToolCallDeltaReceived")
    def add_tool_call_delta(self, tool_call_id: str, text: str) -> None:
        super().add_tool_call_delta(tool_call_id, text)

    @event("ToolCallCompleted")
    def complete_tool_call(self, tool_call_id: str, arguments: str | None = None) -> None:
        super().complete_tool_call(tool_call_id, arguments)

    @event("ToolResultReceived")
    def add_tool_result(self, tool_call_id: str, content: Any, status: str) -> None:
        super().add_tool_result(tool_call_id, content, status)


# Contract event type -> rule (Rules method). `conversation.created` is missing
# on purpose: it is only ever seq 1, made by creating the conversation.
RULES = {
    "message.user": Rules.add_user_message,
    "message.system": Rules.add_system_message,
    "turn.started": Rules.start_turn,
    "text.delta": Rules.add_text_delta,
    "reasoning.delta": Rules.add_reasoning_delta,
    "tool_call.started": Rules.start_tool_call,
    "tool_call.delta": Rules.add_tool_call_delta,
    "tool_call.completed": Rules.complete_tool_call,
    "tool.result": Rules.add_tool_result,
    "turn.finished": Rules.finish_turn,
    "turn.cancelled": Rules.cancel_turn,
    "turn.failed": Rules.fail_turn,
    "conversation.titled": Rules.set_title,
    "model.requested": Rules.request_model,
}
# ... and -> the aggregate's command method of the same name.
COMMANDS = {type_: getattr(Conversation, rule.__name__) for type_, rule in RULES.items()}


def create(conversation_id: UUID, data: dict) -> Conversation:
    """Start a conversation: its seq 1 is `conversation.created`."""
    return Conversation(id=conversation_id, **data)


def apply(conversation: Conversation, type_: str, data: dict) -> None:
    """Apply one contract event to the aggregate, or raise `RuleBroken`."""
    _not_created(type_)
    COMMANDS[type_](conversation, **data)


def check(rules: Rules, type_: str, data: dict) -> None:
    """The same as `apply`, on a plain Rules (no event object is built)."""
    _not_created(type_)
    RULES[type_](rules, **data)


def _not_created(type_: str) -> None:
    if type_ == "conversation.created":
        raise RuleBroken("created_is_seq_1", "conversation.created is always seq 1; it is made by creating the conversation")


# -- stored state -------------------------------------------------------------
# The store keeps this beside the conversation row, updated in the same
# transaction as each append, so checking a batch costs one small read.

def to_state(conversation: Rules) -> dict:
    """What the store saves: only what is live (see the module's docstring)."""
    return {
        "open_turn_id": conversation.open_turn_id,
        "calls": {c: v for c, v in conversation.calls.items() if v[1] in LIVE_CALL},
        "call_args": conversation.call_args,
    }


def _rule_state(state: dict, known: Known) -> dict:
    """The Rules attributes from a saved state plus the history facts a batch needs."""
    calls = {c: list(v) for c, v in state["calls"].items()}
    for call_id, status in known.calls.items():
        calls.setdefault(call_id, [None, status])
    turn_ids = set(known.turn_ids) | ({state["open_turn_id"]} if state["open_turn_id"] else set())
    return {
        "open_turn_id": state["open_turn_id"],
        "turn_ids": turn_ids,
        "calls": calls,
        "call_args": {k: list(v) for k, v in state["call_args"].items()},
        # no rule needs the title: it is kept once, in the conversation's
        # row; here it is only what this batch sets (None: unchanged)
        "title": None,
    }


def resume(state: dict, known: Known = Known()) -> Rules:
    """A plain Rules at a saved state plus the history facts a batch needs (see `check`)."""
    return Rules(**_rule_state(state, known))


def from_state(conversation_id: UUID, seq: int, state: dict, known: Known = Known()) -> Conversation:
    """The aggregate at `seq` from its saved state, plus the history facts a batch needs.

    Built as the eventsourcing library builds an aggregate from a snapshot
    (`Aggregate.Snapshot`, public API); the library's own snapshot store is
    not used because the state lives in the conversation's row, written in
    the append's own transaction.
    """
    snapshot = Conversation.Snapshot(
        originator_id=conversation_id,
        originator_version=seq,
        timestamp=Conversation.Snapshot.create_timestamp(),
        topic=f"{Conversation.__module__}:{Conversation.__qualname__}",
        state=_rule_state(state, known),
    )
    return snapshot.mutate(None)
