"""The shape of each event type's `data`, as the contract's event table gives it.

Shape is checked here (types, required fields, allowed values); the rules that
depend on history (open turn, known tool call, ...) live in the aggregate.
Unknown fields are refused: a typo such as `tool_callid` must not be stored
silently and then break a projection later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ForkedFrom(_Data):
    conversation_id: str
    seq: int


class ConversationCreated(_Data):
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    system: str | None = None
    forked_from: ForkedFrom | None = None


class UserMessage(_Data):
    # A string, or OpenAI content parts kept exactly as given.
    content: str | list[dict[str, JsonValue]]
    name: str | None = None


class SystemMessage(_Data):
    content: str


class TurnStarted(_Data):
    turn_id: str = Field(min_length=1)
    request_id: str | None = None
    model: str | None = None


class TextDelta(_Data):
    turn_id: str
    text: str


class ReasoningDelta(_Data):
    turn_id: str
    text: str


class ToolCallStarted(_Data):
    turn_id: str
    tool_call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)


class ToolCallDelta(_Data):
    tool_call_id: str
    text: str


class ToolCallCompleted(_Data):
    tool_call_id: str
    arguments: str | None = None


class ToolResult(_Data):
    tool_call_id: str
    content: JsonValue
    status: Literal["ok", "error", "pending"]


class Usage(_Data):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TurnFinished(_Data):
    turn_id: str
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"]
    usage: Usage | None = None


class TurnCancelled(_Data):
    turn_id: str
    reason: str | None = None


class TurnError(_Data):
    code: str
    message: str
    status: int | None = None  # the upstream's HTTP status, for the runner's `upstream_error`


class TurnFailed(_Data):
    turn_id: str
    error: TurnError


class ConversationTitled(_Data):
    title: str


class ModelRequested(_Data):
    """What the runner sent the model for one step: the `format=openai`
    projection at `at_seq` plus these fields make the exact request body,
    whose SHA-256 is `request_sha256`."""

    turn_id: str
    step: int = Field(ge=1)
    model: str = Field(min_length=1)
    at_seq: int = Field(ge=1)
    request_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tools: list[dict[str, JsonValue]] | None = None
    tool_choice: JsonValue = None
    params: dict[str, JsonValue] | None = None


@dataclass(frozen=True)
class EventType:
    """One entry of the event vocabulary: everything the domain, the
    projections, compaction and the store need to know about a type besides
    its rule (domain/conversation.py COMMANDS) and its projection handlers."""

    name: str
    data: type[_Data]  # the shape of its `data`
    merges_by: str | None = None  # a delta: consecutive ones with the same value of this field merge
    closes_turn: bool = False  # ends the open turn


VOCABULARY: dict[str, EventType] = {t.name: t for t in (
    EventType("conversation.created", ConversationCreated),
    EventType("message.user", UserMessage),
    EventType("message.system", SystemMessage),
    EventType("turn.started", TurnStarted),
    EventType("text.delta", TextDelta, merges_by="turn_id"),
    EventType("reasoning.delta", ReasoningDelta, merges_by="turn_id"),
    EventType("tool_call.started", ToolCallStarted),
    EventType("tool_call.delta", ToolCallDelta, merges_by="tool_call_id"),
    EventType("tool_call.completed", ToolCallCompleted),
    EventType("tool.result", ToolResult),
    EventType("turn.finished", TurnFinished, closes_turn=True),
    EventType("turn.cancelled", TurnCancelled, closes_turn=True),
    EventType("turn.failed", TurnFailed, closes_turn=True),
    EventType("conversation.titled", ConversationTitled),
    EventType("model.requested", ModelRequested),
)}

# A tool call's lifecycle, one vocabulary for the aggregate and every fold:
# started (arguments streaming) -> completed (arguments final, no result yet)
# -> pending (a `pending` result stands in, for a long-running tool) -> final
# (its ok/error result). "abandoned": its turn closed before it completed, so
# it never will (the projections drop it).
STARTED, COMPLETED, PENDING, FINAL, ABANDONED = "started", "completed", "pending", "final", "abandoned"
# calls in these states still take events
LIVE_CALL = (STARTED, COMPLETED, PENDING)

SCHEMAS: dict[str, type[_Data]] = {name: t.data for name, t in VOCABULARY.items()}
# delta type -> the data field naming the stream its run belongs to (compaction)
DELTAS: dict[str, str] = {name: t.merges_by for name, t in VOCABULARY.items() if t.merges_by}
TURN_ENDS: frozenset[str] = frozenset(name for name, t in VOCABULARY.items() if t.closes_turn)

EVENT_TYPES = tuple(SCHEMAS)


def problems(exc: Any, skip: int = 0) -> list[dict[str, str]]:
    """A pydantic (or FastAPI request) validation error as every error answer
    lists it: [{"field", "problem"}]. `skip` drops leading location parts
    (FastAPI's "query", "path"...)."""
    errors = exc.errors(include_url=False, include_input=False) if isinstance(exc, ValidationError) else exc.errors()
    return [{"field": ".".join(str(p).replace("\x00", "\\u0000") for p in e["loc"][skip:])
                      or ".".join(str(p) for p in e["loc"][:skip]),
             "problem": e["msg"]}
            for e in errors]


class InvalidData(ValueError):
    """The data does not have the shape its event type requires."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.errors = errors or []


def check_data(type_: str, data: Any) -> dict[str, Any]:
    """Validate `data` for `type_`; return it as it will be stored.

    Stored data is what the client sent, minus nothing: optional fields the
    client left out stay out (so an idempotent retry compares equal).
    """
    schema = SCHEMAS.get(type_)
    if schema is None:
        raise InvalidData(f"unknown event type {type_!r}; known types: {', '.join(EVENT_TYPES)}")
    if not isinstance(data, dict):
        raise InvalidData(f"data of {type_} must be a JSON object")
    try:
        model = schema.model_validate(data)
    except ValidationError as exc:
        errors = problems(exc)
        first = errors[0]
        raise InvalidData(
            f"data of {type_} is not valid: {first['field'] or 'data'}: {first['problem']}", errors
        ) from None
    return model.model_dump(mode="json", exclude_unset=True)
