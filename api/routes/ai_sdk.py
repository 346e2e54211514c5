"""The Vercel AI SDK's `useChat` transport, served by chatlog itself:
POST /v1/ai-sdk/chat and GET /v1/ai-sdk/chat/{chat_id}/stream.

`DefaultChatTransport` posts `{"id", "messages", "trigger", "messageId", ...}`.
Only the message the request is about is read; the rest of `messages` is the
browser's copy, and the history the model sees is the log's. What a request
does:

- the last message is a user message: a turn through the runner, with that
  message (`request_id` = the UI message's id, so a repeat never starts a
  second generation) -> the turn's `format=ui` stream from its `start`.
- the last message is the assistant message `messageId` (= its turn_id) after
  `addToolOutput`: its tool outputs that the log has no result for become
  `tool.result` events (event ids made from the call ids: a repeat writes
  nothing twice), and the answer continues that message: a `start` with its
  id (the SDK then appends to it), then the turn's frames after the step the
  browser answered. The runner, waiting for those results, goes on by itself.
- `regenerate-message`: the log is append-only, so the answer to regenerate
  would stay in what the model sees. Only when the last turn left no answer
  in the history (it failed or was cancelled before any output) does a new
  turn start without a message; otherwise 409 `cannot_regenerate`.

A response ends where the SDK expects one to: at the turn's end, or when a
step has ended with tool calls the browser has to answer (`finish-step`,
`finish` with reason `tool-calls`, `[DONE]`): useChat sends tool outputs only
once its stream has ended. Tools named in `server_tools` are answered by
others through /events; the stream waits for their results instead.

Chat ids: useChat's own ids are not UUIDs. A UUID is the conversation id as
it is; any other id names the conversation uuid5(CHAT_IDS, principal + id),
so the same id is the same conversation for one tenant and another one's for
another. Every answer says which (`x-chatlog-conversation-id`).
"""

from __future__ import annotations

import uuid
from contextlib import aclosing
from typing import AsyncIterator, ClassVar, Iterable, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from starlette.responses import Response, StreamingResponse

from api import sse
from api.bodies import parse
from api.deps import BodyDep, PrincipalDep, SettingsDep, StoreDep, parse_uuid, storable
from api.errors import ApiError
from api.openapi import operation
from api.routes import stream as stream_routes
from api.routes import turns as turns_routes
from api.routes.turns import TurnOptions, runner_of
from api.settings import Settings
from projections import ui
from runner.runner import NoUpstream
from store import NewEvent, Store
from store.errors import ConversationExists, NotFound

router = APIRouter(prefix="/v1/ai-sdk", tags=["ai-sdk"])

# The namespace of conversation ids made from chat ids that are not UUIDs. Fixed
# forever: changing it would move every such chat to a new, empty conversation.
CHAT_IDS = uuid.UUID("5b0f3c1e-7a52-4d0e-9c61-2f8a4b7d3e10")
CONVERSATION_HEADER = "x-chatlog-conversation-id"
TURN_HEADER = "x-chatlog-turn-id"
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **stream_routes.UI_HEADERS}
# The UI tool-part states that carry the browser's answer, and the result each gives.
_ANSWERED = {"output-available": "ok", "output-error": "error"}


class _Loose(BaseModel):
    # the transport and the SDK's messages carry fields of their own: tolerated
    model_config = ConfigDict(extra="ignore", strict=True)
    nul_checked_elsewhere: ClassVar[frozenset[str]] = frozenset()  # none: api.bodies.parse checks every string


class UIMessage(_Loose):
    id: str = Field(min_length=1, max_length=200)
    role: Literal["system", "user", "assistant"]
    parts: list[dict[str, JsonValue]]


class ChatRequest(TurnOptions, _Loose):
    id: str = Field(min_length=1, max_length=200, description="the chat id: a conversation id, or any other "
                    "string, which names a conversation of its own (see x-chatlog-conversation-id)")
    messages: list[UIMessage] = Field(min_length=1)
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    messageId: str | None = Field(None, min_length=1, max_length=200)
    # and the turn's options, as POST /turns takes them (the transport's `body`): TurnOptions
    server_tools: list[str] = Field(default_factory=list, description="names of tools answered by others "
                                    "through /events: the stream waits for their results")


# -- chat ids -----------------------------------------------------------------------------------

def conversation_for(principal: str, chat_id: str) -> uuid.UUID:
    """The conversation a chat id names for `principal` (see the module doc)."""
    parsed = parse_uuid(chat_id)
    return parsed if parsed is not None else uuid.uuid5(CHAT_IDS, f"{principal}\n{chat_id}")


async def _ensure_conversation(store: Store, principal: str, conversation_id: uuid.UUID) -> None:
    try:
        await store.get_conversation(principal, conversation_id)
    except NotFound:
        try:
            await store.create_conversation(principal, conversation_id)
        except ConversationExists:
            pass  # another request made it meanwhile


# -- the user's message as a Chat Completions message's content ---------------------------------------

_AUDIO = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/mpeg": "mp3", "audio/mp3": "mp3"}


def _file(part: dict, index: int) -> dict:
    """A UI file part as the OpenAI content part that carries it; 422 when none does."""
    media, url = part.get("mediaType"), part.get("url")
    if not isinstance(media, str) or not isinstance(url, str) or not url:
        raise ApiError(422, "invalid_request", f"file part {index} needs a mediaType and a url", field=f"parts.{index}")
    inline = url.startswith("data:")
    if media.startswith("image/"):
        return {"type": "image_url", "image_url": {"url": url}}
    if media == "application/pdf" and inline:
        return {"type": "file", "file": {"filename": part.get("filename") or "file.pdf", "file_data": url}}
    if media in _AUDIO and inline and ";base64," in url:
        return {"type": "input_audio", "input_audio": {"data": url.partition(";base64,")[2], "format": _AUDIO[media]}}
    raise ApiError(422, "unsupported_file", f"file part {index} ({media}) cannot be sent to a Chat Completions model: "
                   "images (any url), PDFs and wav/mp3 audio (as data: urls) can", field=f"parts.{index}",
                   media_type=media)


def user_content(message: UIMessage, settings: Settings) -> str | list[dict]:
    """Text parts joined (by newlines), or, with files, OpenAI content parts in
    the message's order. Other parts (data, sources, step markers) are not
    for the model."""
    texts, parts = [], []
    for index, part in enumerate(message.parts):
        if part.get("type") == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(422, "invalid_request", f"text part {index} has no text", field=f"parts.{index}")
            texts.append(part["text"])
            parts.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "file":
            parts.append(_file(part, index))
    if len(parts) == len(texts):
        content: str | list[dict] = "\n".join(texts)
        if not content:
            raise ApiError(422, "invalid_request", "the user message has no text and no files", field="messages")
    else:
        content = parts
    size = len(orjson.dumps(content))
    if size > settings.max_event_bytes:
        raise ApiError(413, "event_too_large", f"the user message is {size} bytes as an event, the limit is "
                       f"{settings.max_event_bytes}", limit=settings.max_event_bytes)
    return content


def _turn_options(body: ChatRequest) -> dict:
    """The turn request's options, checked as POST /turns checks them."""
    options = body.checked_options()
    if body.server_tools:
        options["ai_sdk_server_tools"] = body.server_tools  # kept with the turn, for reconnects
    return options


# -- the UI stream of one turn, as useChat reads it ---------------------------------------------------

class UntilBrowserTools:
    """A turn's `format=ui` frames (projections.ui.UiStream), ended where useChat
    needs a response to end: when the turn ends (`[DONE]` from UiStream), or
    when no call is streaming its input and some wait for the browser's answer
    while none waits for `server_tools`. The calls watched are those whose
    input the stream shows, and `waiting` (call id -> tool name: calls the
    browser saw before this response and has not answered yet)."""

    share = None  # an ending of its own: no sharing with other readers

    def __init__(self, frames: ui.UiStream, server_tools: Iterable[str], waiting: dict[str, str],
                 last_id: str | None) -> None:
        self.frames, self.server_tools = frames, frozenset(server_tools)
        self.streaming: set[str] = set()
        self.browser: set[str] = set()  # calls waiting for the browser's answer
        self.others: set[str] = set()  # calls waiting for a server tool's result
        for call, name in waiting.items():
            self._waits(call, name)
        self.last_id = last_id  # the ending's frames repeat it: they add no event's frame
        self.done = False

    def __call__(self, live: bool, events: list[dict]) -> Iterable[tuple[str, dict] | str]:
        for item in self.frames(live, events):
            if self.done:
                return
            if item is ui.DONE:
                self.done = True
            else:
                self.last_id = item[0]
                self._watch(item[1])
            yield item
        yield from self.ending()

    def ending(self) -> list[tuple[str, dict] | str]:
        """The frames that end the response now that only the browser can go on, or none."""
        if self.done or not self.browser or self.others or self.streaming:
            return []
        self.done = True
        return [(self.last_id, {"type": "finish-step"}),
                (self.last_id, {"type": "finish", "finishReason": "tool-calls"}), ui.DONE]

    def _waits(self, call: str, name: str) -> None:
        (self.others if name in self.server_tools else self.browser).add(call)

    def _watch(self, chunk: dict) -> None:
        kind, call = chunk["type"], chunk.get("toolCallId")
        if kind == "tool-input-start":
            self.streaming.add(call)
        elif kind == "tool-input-available":
            self.streaming.discard(call)
            self._waits(call, chunk["toolName"])
        elif kind in ("tool-input-error", "tool-output-available", "tool-output-error"):
            for waiting in (self.streaming, self.browser, self.others):
                waiting.discard(call)

    def handoff(self) -> None:
        return None

    def adopt(self, state: None) -> None:
        pass


async def _until_done(batches: AsyncIterator, render: UntilBrowserTools) -> AsyncIterator:
    """The store's batches until the renderer has ended the response."""
    async with aclosing(batches):
        async for batch in batches:
            yield batch
            if render.done:
                return


async def _led(frames: AsyncIterator[bytes], lead: bytes, render: UntilBrowserTools,
               caught_up: bool) -> AsyncIterator[bytes]:
    """`frames` with `lead` right after their `retry:`; `caught_up` (nothing
    after the resume point yet): ended at once when only the browser can go on."""
    async with aclosing(frames):
        yield await anext(frames)
        yield lead
        if caught_up and (ending := render.ending()):
            yield b"".join(sse.DONE if item is ui.DONE else sse.frame(*item) for item in ending)
            return
        async for chunk in frames:
            yield chunk


def _headers(conversation_id: uuid.UUID, turn_id: str | None = None) -> dict[str, str]:
    headers = {CONVERSATION_HEADER: str(conversation_id)}
    if turn_id is not None:
        headers[TURN_HEADER] = turn_id
    return headers


async def turn_ui_stream(store: Store, settings: Settings, principal: str, conversation_id: uuid.UUID,
                         turn_id: str, server_tools: Iterable[str], after: int | None = None,
                         waiting: dict[str, str] | None = None) -> StreamingResponse:
    """The turn's ui stream from its `start`; or, continuing (`after`: a seq
    inside the turn, `waiting`: see UntilBrowserTools), a `start` naming the
    turn's message, which makes the SDK append to that message, then the
    turn's frames after that seq."""
    start, end = await store.turn_span(principal, conversation_id, turn_id)
    resume = start - 1 if after is None else after
    upto, first, state = await stream_routes._start(store, principal, conversation_id, resume, end,
                                                    ui_state_at=None if after is None else after)
    batches = store.stream(principal, conversation_id, resume, upto, end is None, settings.heartbeat_seconds, first)
    render = UntilBrowserTools(ui.UiStream((resume, None), True, state), server_tools, waiting or {},
                               None if after is None else str(after))
    body = sse.body(_until_done(batches, render), render, until_turn=turn_id)
    if after is not None:
        # the lead's id is the resume point: what follows it is exactly the frames after that seq
        body = _led(body, sse.frame(str(after), {"type": "start", "messageId": turn_id}), render, not first)
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={**_STREAM_HEADERS, **_headers(conversation_id, turn_id)})


# -- tool outputs the browser adds ---------------------------------------------------------------------

async def _turn_events(store: Store, principal: str, conversation_id: uuid.UUID, start: int) -> list[dict]:
    """The conversation's events from the turn's `turn.started` on (later
    results for its calls included)."""
    out: list[dict] = []
    after = start - 1
    while True:
        page, current = await store.read_events(principal, conversation_id, after, 1000)
        out.extend(page)
        if not page or page[-1]["seq"] >= current:
            return out
        after = page[-1]["seq"]


def _tool_parts(message: UIMessage) -> list[dict]:
    parts = []
    for index, part in enumerate(message.parts):
        kind = part.get("type")
        if not (isinstance(kind, str) and (kind.startswith("tool-") or kind == "dynamic-tool")):
            continue
        if not isinstance(part.get("toolCallId"), str) or not isinstance(part.get("state"), str):
            raise ApiError(422, "invalid_request", f"tool part {index} needs a toolCallId and a state",
                           field=f"parts.{index}")
        if part["state"] == "output-error" and not isinstance(part.get("errorText"), str):
            raise ApiError(422, "invalid_request", f"tool part {index} is an output-error without errorText",
                           field=f"parts.{index}")
        parts.append(part)
    return parts


def _result_event(part: dict) -> NewEvent:
    status = _ANSWERED[part["state"]]
    content = part.get("output") if status == "ok" else part["errorText"]
    # one id per call: a repeated re-POST is an idempotent retry of the same append
    event_id = f"ai-sdk:{uuid.uuid5(CHAT_IDS, 'tool.result:' + part['toolCallId'])}"
    return NewEvent("tool.result", {"tool_call_id": part["toolCallId"], "content": content, "status": status},
                    id=event_id)


async def record_tool_outputs(store: Store, principal: str, conversation_id: uuid.UUID,
                              message: UIMessage) -> tuple[int, dict[str, str]]:
    """Append the browser's answers the log lacks. Returns the seq the
    continuation resumes after (the end of the latest step the message
    answers) and the calls of the message still waiting for the browser."""
    turn_id = message.id
    start, end = await store.turn_span(principal, conversation_id, turn_id)
    names: dict[str, str] = {}  # the turn's calls -> their tool names
    completed: dict[str, int] = {}  # its completed calls -> seq of their completion
    answered, steps = set(), []
    for event in await _turn_events(store, principal, conversation_id, start):
        kind, data = event["type"], event["data"]
        if kind == "tool_call.started" and data["turn_id"] == turn_id:
            names[data["tool_call_id"]] = data["name"]
        elif kind == "tool_call.completed" and data["tool_call_id"] in names:
            completed[data["tool_call_id"]] = event["seq"]
        elif kind == "tool.result" and data["tool_call_id"] in names:
            answered.add(data["tool_call_id"])
        elif kind == "model.requested" and data["turn_id"] == turn_id:
            steps.append(event["seq"])
    parts = _tool_parts(message)
    unknown = sorted(p["toolCallId"] for p in parts if p["toolCallId"] not in names)
    if unknown:
        raise ApiError(422, "invalid_request", f"tool call {unknown[0]!r} is not a call of turn {turn_id}",
                       field="messages", tool_call_id=unknown[0])
    # calls the log dropped (never completed) have no place in the history: their parts are not answers
    ours = [p for p in parts if p["toolCallId"] in completed]
    if not ours:
        raise ApiError(422, "invalid_request", f"assistant message {turn_id} carries no tool calls to answer; "
                       "send a user message to go on", field="messages")
    resume = max(completed[p["toolCallId"]] for p in ours)
    open_calls = [p["toolCallId"] for p in ours if p["toolCallId"] not in answered]
    new = [p for p in ours if p["toolCallId"] in open_calls and p["state"] in _ANSWERED and not p.get("preliminary")]
    if end is not None and (new or not any(seq > resume for seq in steps)):
        # the turn will not go on: a result now would call no model, and a stream
        # showing nothing new would have useChat send the same outputs again
        raise ApiError(409, "turn_ended", f"turn {turn_id} has ended; its tool calls are not answered through this "
                       "route any more: send a new message", turn_id=turn_id)
    if new:
        await store.append(principal, conversation_id, [_result_event(p) for p in new])
    now = {p["toolCallId"] for p in new}
    return resume, {call: names[call] for call in open_calls if call not in now}


# -- routes ----------------------------------------------------------------------------------------------

def _answered_message(body: ChatRequest) -> UIMessage | None:
    """The assistant message whose tool outputs a submit carries: `messageId`'s
    (the SDK names the message it answered) or else the last, when it is the
    assistant's. None: the request is a new user message."""
    if body.messageId is not None:
        for message in body.messages:
            if message.id == body.messageId and message.role == "assistant":
                return message
    return body.messages[-1] if body.messages[-1].role == "assistant" else None


def _server_tools(run: dict | None) -> list[str]:
    return ((run or {}).get("request") or {}).get("ai_sdk_server_tools") or []


@router.post("/chat", openapi_extra=operation(ChatRequest, sse=True, errors=(409, 410, 503)))
async def ai_sdk_chat(request: Request, principal: PrincipalDep, body: BodyDep, store: StoreDep,
                      settings: SettingsDep):
    parsed = parse(ChatRequest, body)
    conversation_id = conversation_for(principal, parsed.id)
    options = _turn_options(parsed)
    runner = runner_of(request)
    answered = _answered_message(parsed) if parsed.trigger == "submit-message" else None
    if answered is not None:
        if not storable(answered.id):  # PostgreSQL text cannot hold it, so no turn has that id
            raise ApiError(404, "not_found", f"turn {answered.id!r} was not found in conversation {conversation_id}")
        resume, waiting = await record_tool_outputs(store, principal, conversation_id, answered)
        server_tools = _server_tools(await runner.turns.get(principal, conversation_id, answered.id))
        return await turn_ui_stream(store, settings, principal, conversation_id, answered.id, server_tools, resume,
                                    waiting)
    last = parsed.messages[-1]
    if parsed.trigger == "submit-message":
        if last.role != "user":
            raise ApiError(422, "invalid_request", "the last message must be a new user message, or the assistant "
                           "message whose tool outputs are sent", field="messages")
        turn_request = {"message": {"role": "user", "content": user_content(last, settings)},
                        "request_id": last.id, **options}
        if runner.upstream is None:  # before the conversation is made: a refused request writes nothing
            raise ApiError(503, "no_upstream", NoUpstream.message)
        await _ensure_conversation(store, principal, conversation_id)
    else:
        history = (await store.messages(principal, conversation_id, "openai"))["messages"]
        if not history or history[-1]["role"] != "user":
            raise ApiError(409, "cannot_regenerate", "the log is append-only: the answer to regenerate would stay in "
                           "the history the model sees. Send a new message, or fork the conversation before that "
                           "answer (POST /v1/conversations/{id}/fork)", conversation_id=str(conversation_id))
        turn_request = {**options}
        if parsed.messageId is not None:  # a repeat of this regeneration is the same turn
            turn_request["request_id"] = f"regenerate:{parsed.messageId}"
    turn_id, _, _ = await turns_routes.start(runner, principal, conversation_id, turn_request)
    return await turn_ui_stream(store, settings, principal, conversation_id, turn_id, parsed.server_tools)


def _no_turn_running() -> dict:
    extra = operation(sse=True)
    extra["responses"]["204"] = {"description": "No turn is running in this chat's conversation"}
    return extra


@router.get("/chat/{chat_id}/stream", openapi_extra=_no_turn_running())
async def ai_sdk_chat_stream(request: Request, principal: PrincipalDep, chat_id: str, store: StoreDep,
                             settings: SettingsDep):
    if not storable(chat_id):  # no body can carry it (JSON has no lone surrogates): no chat has it
        return Response(status_code=204)
    conversation_id = conversation_for(principal, chat_id)
    try:
        conversation = await store.get_conversation(principal, conversation_id)
    except NotFound:  # a chat that never sent a message (or another tenant's id: the same to you)
        conversation = {"open_turn_id": None}
    turn_id = conversation["open_turn_id"]
    if turn_id is None:
        return Response(status_code=204, headers=_headers(conversation_id))
    server_tools = _server_tools(await runner_of(request).turns.get(principal, conversation_id, turn_id))
    return await turn_ui_stream(store, settings, principal, conversation_id, turn_id, server_tools)
