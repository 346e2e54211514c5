"""Request bodies. Event `data` is checked per type by domain.schemas."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from api.errors import ApiError


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateConversation(_Body):
    id: str | None = None
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    system: str | None = None


class EventIn(_Body):
    id: str | None = Field(None, min_length=1, max_length=200)
    type: str
    data: dict[str, Any] = Field(default_factory=dict)


class AppendEvents(_Body):
    expected_seq: int | None = Field(None, ge=1)
    events: list[Any]


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; a wrong shape is 400 (not JSON object) or 422."""
    if not isinstance(body, dict):
        raise ApiError(400, "malformed_request", "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]}
                  for e in exc.errors(include_url=False, include_input=False)]
        first = errors[0]
        raise ApiError(422, "invalid_request", f"{first['field']}: {first['problem']}", errors=errors) from None
