"""The shape of each event type's `data`, as the contract's event table gives it.

Shape is checked here (types, required fields, allowed values); the rules that
depend on history (open turn, known tool call, ...) live in the aggregate.
Unknown fields are refused: a typo such as `tool_callid` must not be stored
silently and then break a projection later.
"""

from __future__ import annotations

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


class TurnFailed(_Data):
    turn_id: str
    error: TurnError


class ConversationTitled(_Data):
    title: str


SCHEMAS: dict[str, type[_Data]] = {
    "conversation.created": ConversationCreated,
    "message.user": UserMessage,
    "message.system": SystemMessage,
    "turn.started": TurnStarted,
    "text.delta": TextDelta,
    "reasoning.delta": ReasoningDelta,
    "tool_call.started": ToolCallStarted,
    "tool_call.delta": ToolCallDelta,
    "tool_call.completed": ToolCallCompleted,
    "tool.result": ToolResult,
    "turn.finished": TurnFinished,
    "turn.cancelled": TurnCancelled,
    "turn.failed": TurnFailed,
    "conversation.titled": ConversationTitled,
}

EVENT_TYPES = tuple(SCHEMAS)


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
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        first = errors[0]
        raise InvalidData(
            f"data of {type_} is not valid: {first['field'] or 'data'}: {first['problem']}", errors
        ) from None
    return model.model_dump(mode="json", exclude_unset=True)
