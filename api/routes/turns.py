"""The built-in runner's endpoints: POST /turns, GET /turns/{turn_id},
GET /turns/{turn_id}/requests, POST /turns/{turn_id}/cancel.

Validate, call the runner (runner/runner.py), shape the answer.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, Field, JsonValue

from api.bodies import Body, parse
from api.deps import BodyDep, ConversationIdDep, PrincipalDep, SettingsDep, StoreDep, storable
from api.errors import ApiError
from api.openapi import operation
from api.responses import JSONResponse
from api.routes import stream as stream_routes
from runner.chunks import RESERVED_PARAMS
from runner.runner import NoUpstream, Runner, TurnRunning
from store.errors import NotFound

router = APIRouter(prefix="/v1/conversations", tags=["turns"])


class TurnMessage(Body):
    role: Literal["user"]
    content: str | list[dict[str, JsonValue]]
    name: str | None = None


class TurnOptions(BaseModel):
    """The options of a turn, as POST /turns and POST /ai-sdk/chat take them."""

    model: str | None = Field(None, min_length=1)
    tools: list[dict[str, JsonValue]] | None = None
    tool_choice: JsonValue = None
    max_steps: int = Field(8, ge=1, le=1000)
    params: dict[str, JsonValue] | None = None

    def checked_options(self) -> dict:
        """The options as the runner takes them, after the checks pydantic cannot make."""
        clash = sorted(RESERVED_PARAMS & (self.params or {}).keys())
        if clash:
            raise ApiError(422, "invalid_request", f"params may not set {', '.join(clash)}: they are fields of "
                           "the request or set by the runner", field="params")
        if self.tool_choice is not None and not self.tools:
            raise ApiError(422, "invalid_request", "tool_choice needs tools", field="tool_choice")
        return self.model_dump(include=set(TurnOptions.model_fields), mode="json", exclude_none=True)


class StartTurn(TurnOptions, Body):
    message: TurnMessage | None = None
    request_id: str | None = Field(None, min_length=1, max_length=200)
    if_running: Literal["reject", "interrupt", "enqueue"] = "reject"


def runner_of(request: Request) -> Runner:
    state = request.app.state
    if state.runner is None:
        # an app whose lifespan did not run (tests on an ASGI transport): a
        # runner without lease or signals, enough to read and cancel turns
        state.runner = Runner(state.store, state.settings)
    return state.runner


async def start(runner: Runner, principal: str, conversation_id, turn_request: dict) -> tuple[str, str, bool]:
    """Runner.start, its refusals in the contract's error shape (503 no_upstream, 409 turn_running)."""
    try:
        return await runner.start(principal, conversation_id, turn_request)
    except NoUpstream as exc:
        raise ApiError(503, "no_upstream", exc.message) from None
    except TurnRunning as exc:
        raise ApiError(409, "turn_running", str(exc), turn_id=exc.turn_id) from None


def _turn_id(turn_id: str, conversation_id) -> str:
    if not storable(turn_id):
        raise ApiError(404, "not_found", f"turn {turn_id!r} was not found in conversation {conversation_id}")
    return turn_id


@router.post("/{conversation_id}/turns", status_code=202, openapi_extra=operation(StartTurn, errors=(409, 503)))
async def start_turn(request: Request, principal: PrincipalDep, conversation_id: ConversationIdDep, body: BodyDep,
                     store: StoreDep, settings: SettingsDep, format: Literal["events", "ui"] = "events",
                     accept: str | None = Header(None)):
    parsed = parse(StartTurn, body)
    parsed.checked_options()
    turn_request = parsed.model_dump(mode="json", exclude_none=True)
    turn_id, status, created = await start(runner_of(request), principal, conversation_id, turn_request)
    stream_url = f"/v1/conversations/{conversation_id}/turns/{turn_id}/stream"
    if accept and "text/event-stream" in accept:
        try:
            return await stream_routes.turn_stream(principal, conversation_id, turn_id, store, settings, None, format,
                                                   True, request.headers.get("last-event-id"))
        except NotFound:
            pass  # enqueued: nothing to stream yet, the answer says where it will be
    return JSONResponse({"turn_id": turn_id, "stream_url": stream_url, "status": status},
                        status_code=202 if created else 200)


@router.get("/{conversation_id}/turns/{turn_id}")
async def get_turn(request: Request, principal: PrincipalDep, conversation_id: ConversationIdDep, turn_id: str):
    return JSONResponse(await runner_of(request).status(principal, conversation_id, _turn_id(turn_id, conversation_id)))


@router.get("/{conversation_id}/turns/{turn_id}/requests")
async def get_turn_requests(request: Request, principal: PrincipalDep, conversation_id: ConversationIdDep,
                            turn_id: str):
    requests = await runner_of(request).requests(principal, conversation_id, _turn_id(turn_id, conversation_id))
    return JSONResponse({"requests": requests})


@router.post("/{conversation_id}/turns/{turn_id}/cancel", status_code=202)
async def cancel_turn(request: Request, principal: PrincipalDep, conversation_id: ConversationIdDep, turn_id: str):
    await runner_of(request).cancel(principal, conversation_id, _turn_id(turn_id, conversation_id))
    return JSONResponse({"turn_id": turn_id, "status": "cancelling"}, status_code=202)
