"""Request bodies. Event `data` is checked per type by domain.schemas."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError, WithJsonSchema, create_model

from api.errors import ApiError
from domain.chain import MAX_SAFE, unsafe_number
from domain.schemas import SCHEMAS, problems

# What the store's columns can hold: a seq is a 32-bit integer, a position a
# 64-bit one. Parameters beyond these are refused (422), never sent to SQL.
MAX_SEQ = 2**31 - 1
MAX_POSITION = 2**63 - 1


# A conversation id in a body: text the route parses as a UUID (422 otherwise).
UuidText = Annotated[str, WithJsonSchema({"type": "string", "format": "uuid"})]


class Body(BaseModel):
    # strict: `true` or `6.0` is not an integer, `1` is not a boolean
    model_config = ConfigDict(extra="forbid", strict=True)
    # fields whose strings may hold anything, checked elsewhere (event data)
    nul_checked_elsewhere: ClassVar[frozenset[str]] = frozenset()


class CreateConversation(Body):
    id: UuidText | None = None
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    system: str | None = None


EventId = Annotated[str, Field(min_length=1, max_length=200)]


class EventIn(Body):
    id: EventId | None = None
    type: str
    data: dict[str, Any] = Field(default_factory=dict)


def _typed(type_: str, data: type[BaseModel]) -> type[Body]:
    """EventIn for one type, its `data` shaped by that type's schema."""
    return create_model(f"EventIn_{type_}", __base__=Body, id=(EventId | None, None), type=(Literal[type_], ...),
                        data=(data, ...))


# A whole batch, envelopes and data, checked in one call: what a valid batch
# (nearly every one) pays instead of EventIn and domain.check_data per event
# (measured: 2.6 against 11 µs per event). It accepts exactly what those two
# accept (the same models; `data` left out, which EventIn reads as `{}`, and
# `conversation.created`, which no append may carry, fall to them); when it
# refuses a batch, they run event by event to say which event and why.
VALID_BATCH = TypeAdapter(list[Annotated[
    Union[tuple(_typed(t, m) for t, m in SCHEMAS.items() if t != "conversation.created")],
    Field(discriminator="type")]])


class AppendEvents(Body):
    expected_seq: int | None = Field(None, ge=1, le=MAX_SEQ)
    events: list[Any]
    # each event's problems (NUL included) are invalid_event with its index
    nul_checked_elsewhere: ClassVar[frozenset[str]] = frozenset({"events"})


def nul_path(value: Any, path: tuple = ()) -> tuple | None:
    """The path of the first string (or object key) holding NUL, else None.
    PostgreSQL text and jsonb cannot store U+0000."""
    stack = [(value, path)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    return (*path, key)
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))
    return None


def field_name(path: tuple) -> str:
    return ".".join(str(p).replace("\x00", "\\u0000") for p in path)


def parse(model: type[Body], body: Any) -> Any:
    """Validate a JSON body; a wrong shape is 400 (not JSON object) or 422."""
    if not isinstance(body, dict):
        raise ApiError(400, "malformed_request", "the request body must be a JSON object")
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        errors = problems(exc)
        first = errors[0]
        raise ApiError(422, "invalid_request", f"{first['field']}: {first['problem']}", errors=errors) from None
    where = nul_path({k: v for k, v in body.items() if k not in model.nul_checked_elsewhere})
    if where is not None:
        field = field_name(where)
        raise ApiError(422, "invalid_request",
                       f"{field}: contains a NUL character (\\u0000), which cannot be stored",
                       errors=[{"field": field, "problem": "contains a NUL character"}])
    # what a body carries may end up in an event, whose hash needs every number
    # exact after the store's round trip (events' own: the store's rule safe_numbers)
    where = unsafe_number({k: v for k, v in body.items() if k not in model.nul_checked_elsewhere})
    if where is not None:
        field = field_name(where)
        problem = f"is a number beyond ±(2^53 − 1) ({MAX_SAFE}), which cannot be kept exactly; send it as a string"
        raise ApiError(422, "invalid_request", f"{field}: {problem}", errors=[{"field": field, "problem": problem}])
    return parsed
